"""Shared fixtures: the real default model file, our engine on it, and Hugging Face's on the same file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# mDNS from tests (and the servers and workers they start) stays on loopback.
os.environ["APPLIANCE_MDNS_INTERFACES"] = "127.0.0.1"

from kernels.cuda_backend import gpu_present  # NVML only: imports nothing of CUDA's
from models.engine import Engine
from models.store import ModelStore
from offload.pki import CertificateAuthority, certificate_authority


def pytest_collection_modifyitems(config, items):
    if gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: none on this machine (runs wherever one is present)")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that also matches a folder named gpu
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ModelStore().get()


@pytest.fixture(scope="session")
def smol_meta(model_path) -> dict:
    """The default model's metadata: SmolLM2's tokenizer for the small files tests write."""
    from models.gguf_file import open_gguf

    return open_gguf(model_path).metadata


@pytest.fixture()
def ca(tmp_path, monkeypatch) -> CertificateAuthority:
    """A fresh APPLIANCE_HOME for this test, and the certificate authority the appliance makes there."""
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    return certificate_authority()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Engine:
    """The NumPy reference: the oracle the checks against transformers hold to (the C backend is
    checked against it in test_cpu_backend.py)."""
    return Engine.load(model_path, "numpy")


@pytest.fixture(scope="session")
def served(model_path: Path) -> Engine:
    """The engine a test server runs by default (`--backend auto`: the C kernels where they are built):
    what a served greedy text must equal."""
    return Engine.load(model_path, "auto")


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers' own GGUF loader and Llama implementation: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
