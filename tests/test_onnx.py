"""The ONNX graph of a layer range (the TensorRT path's input) against the NumPy reference, through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

onnxruntime = pytest.importorskip("onnxruntime")

from models.llama import Llama, Session  # noqa: E402
from models.onnx_export import empty_cache, export_range, range_inputs  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

LAYERS = (2, 6)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model(model_path) -> Llama:
    return Llama.load(str(model_path), backend="numpy")


@pytest.fixture(scope="module")
def ort_session(model):
    graph = export_range(model.file, *LAYERS)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_range_graph_matches_reference_prompt_then_decode(model, ort_session):
    """A prompt through the real SmolLM2 file's layers [2, 6), then one decoded token over the graph's own cache."""
    ids = Tokenizer(model.file.metadata).encode("The capital of France is")
    session = Session()
    prompt_hidden = model.embed(ids)
    ref = model.run_layers(LAYERS, prompt_hidden, session)
    out, k, v = ort_session.run(None, range_inputs(prompt_hidden, *empty_cache(model.config, 4), model.config))
    err_prompt = rel_err(out, ref)

    next_hidden = model.embed([ids[-1]])
    ref_next = model.run_layers(LAYERS, next_hidden, session)
    out_next, k2, _ = ort_session.run(None, range_inputs(next_hidden, k, v, model.config))
    err_decode = rel_err(out_next, ref_next)
    cache = session.caches[LAYERS]
    err_cache = rel_err(k2, cache.k[:, : cache.length])
    print(
        f"\nONNX layers {LAYERS} vs NumPy reference, relative error: prompt of {len(ids)} tokens {err_prompt:.2e}, "
        f"decode step {err_decode:.2e}, keys cached {err_cache:.2e}"
    )
    assert out.shape == ref.shape and k2.shape == (4, len(ids) + 1, model.config.n_kv_heads, model.config.head_dim)
    assert err_prompt < 1e-4 and err_decode < 1e-4 and err_cache < 1e-4


def test_range_graph_rejects_layers_outside_the_model(model):
    with pytest.raises(ValueError, match="outside"):
        export_range(model.file, 0, model.config.n_layers + 1)
