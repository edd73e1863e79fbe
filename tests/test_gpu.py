"""The GPU path: never loaded without a GPU; where one is, the kernels and the model against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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
    from appliance.bench import gpu_check
    from kernels.cuda_backend import Device, GpuModel
    from models.engine import Engine
    from models.gguf_file import open_gguf

    gpu_check.ROWS.clear()
    gpu = GpuModel(open_gguf(model_path), Device(), max_batch=2, max_context=256)
    gpu_check.check_greedy(Engine.load(model_path, backend="numpy"), gpu, n_new=12)
    assert [r for r in gpu_check.ROWS if r[1] == "FAIL"] == []
    assert np.isfinite(gpu.forward_hidden((0, 1), np.ones((2, gpu.config.dim), np.float32), 1, 0)).all()
