"""TensorRT engines for layer ranges, built from the ONNX graph of models/onnx_export.py.

Where `tensorrt` imports (it cannot be installed on the GPU machines this project was lent, so this
module has NOT been run anywhere yet: the graph it builds from is checked by onnxruntime in CI),
an engine is built once per (model file hash, layer range, GPU name) and cached on disk, with one
optimization profile spanning prompts up to PREFILL tokens and caches up to the context window.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from models.gguf_file import GGUFModelFile
from models.onnx_export import export_range

CACHE = Path(os.environ.get("APPLIANCE_TRT_CACHE", Path.home() / ".cache" / "appliance" / "tensorrt"))
PREFILL = 512


def file_hash(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of the first and last 16 MiB and the size: enough to tell model files apart, fast."""
    h, size = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        h.update(f.read(chunk))
    h.update(str(size).encode())
    return h.hexdigest()[:16]


def engine_path(file: GGUFModelFile, start: int, stop: int, gpu_name: str) -> Path:
    gpu = "".join(ch if ch.isalnum() else "-" for ch in gpu_name)
    return CACHE / f"{file_hash(file.path)}-layers{start}-{stop}-{gpu}.plan"


def build_engine(file: GGUFModelFile, start: int, stop: int, gpu_name: str, context: int) -> Path:
    """Build (or find in the cache) the serialized engine of layers [start, stop)."""
    import tensorrt as trt

    out = engine_path(file, start, stop, gpu_name)
    if out.exists():
        return out
    from models.llama import LlamaConfig

    c = LlamaConfig.from_file(file)
    L, G, E = stop - start, c.n_kv_heads, c.head_dim
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(export_range(file, start, stop, weight_dtype=np.float16).SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the range's graph: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden", (1, c.dim), (1, c.dim), (PREFILL, c.dim))
    for name in ("cos", "sin"):
        profile.set_shape(name, (1, E // 2), (1, E // 2), (PREFILL, E // 2))
    profile.set_shape("mask", (1, 1), (1, context // 2), (PREFILL, context))
    for name in ("past_k", "past_v"):
        profile.set_shape(name, (L, 0, G, E), (L, context // 2, G, E), (L, context - 1, G, E))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(plan))
    return out


class TensorRTRange:
    """One layer range as a TensorRT engine: hidden states and the cache in, hidden states and the cache out."""

    def __init__(self, file: GGUFModelFile, start: int, stop: int, gpu_name: str, context: int):
        import tensorrt as trt
        import torch  # device buffers for the bindings

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(build_engine(file, start, stop, gpu_name, context).read_bytes())
        self.context = self.engine.create_execution_context()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs as models.onnx_export.range_inputs makes them; outputs hidden_out, present_k, present_v."""
        torch = self.torch
        keep = {}
        for name, value in inputs.items():
            keep[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outputs = {}
        for name in ("hidden_out", "present_k", "present_v"):
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {name: t.cpu().numpy() for name, t in outputs.items()}
