"""The GPU path: never loaded without a GPU; where one is, the kernels and the model against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kernels import native
from kernels.backend import UnknownBackendError, select_backend
from kernels.cuda_backend import available, gpu_present


def test_auto_backend_never_imports_pycuda_or_tensorrt():
    code = (
        "import sys, kernels.backend as b; name = b.select_backend('auto').name; "
        "print(name, 'pycuda' in sys.modules, 'tensorrt' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    name, pycuda_loaded, tensorrt_loaded = out.stdout.split()
    assert name == ("cuda" if available() else "cpu" if native.available() else "numpy")
    if not gpu_present():
        assert (pycuda_loaded, tensorrt_loaded) == ("False", "False")


@pytest.mark.skipif(available(), reason="checks the error where cuda cannot run")
def test_cuda_backend_without_a_gpu_is_a_clear_error():
    with pytest.raises(UnknownBackendError, match="needs an NVIDIA GPU"):
        select_backend("cuda")


def test_gpu_check_says_there_is_no_gpu():
    if gpu_present():
        pytest.skip("a GPU is here: make gpu-check runs the checks themselves")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.bench.gpu_check"], capture_output=True, text=True, env=os.environ
    )
    assert proc.returncode == 2 and "no NVIDIA GPU" in proc.stderr


@pytest.mark.gpu
def test_kernels_against_the_reference():
    from appliance.bench import gpu_check
    from kernels.cuda_backend import Device

    gpu_check.ROWS.clear()
    gpu_check.check_kernels(Device())
    assert [r for r in gpu_check.ROWS if r[1] == "FAIL"] == []


@pytest.mark.gpu
def test_greedy_text_equals_the_reference(model_path):
    """`--backend cuda` as served (the engine over CudaRange and the head) against the NumPy reference."""
    from appliance.bench import gpu_check
    from models.engine import Engine

    gpu_check.ROWS.clear()
    ref, engine = Engine.load(model_path, backend="numpy"), Engine.load(model_path, backend="cuda")
    gpu_check.check_greedy(ref, engine, n_new=12)
    gpu_check.check_layer0(ref.model, engine.model)
    assert [r for r in gpu_check.ROWS if r[1] == "FAIL"] == []
