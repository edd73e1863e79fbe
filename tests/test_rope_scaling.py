"""RoPE scaling as the file declares it (llama3's rope_freqs.weight, linear, YaRN), checked against
transformers on files written by llama.cpp's own converter, through every path a user reaches.

Positions run well past each model's original context (64), where the schedules differ most.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tritonclient.http as httpclient

from appliance.startup import load_engine
from appliance.testbed.netsim import worker_process
from models.engine import Engine
from models.errors import UnsupportedModelError
from models.llama import Llama, LlamaConfig, Session
from offload.coordinator import layer_costs
from offload.pki import issue_identity
from tests import hf_models
from tests.hf_models import hf_logits, rel_err
from tests.serving import running_server

SCALINGS = {
    # wavelengths of the 8 pairs (head_dim 16, theta 5e5): 6, 33, 168, ...: one pair each side of the
    # high/low-frequency bounds (16 and 64) and one between.
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}
TOKENS = 300  # positions 0..299


@pytest.fixture(scope="module")
def tokenizer_dir(model_path, tmp_path_factory):
    return hf_models.save_smollm2_tokenizer(model_path, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def scaled(request, tokenizer_dir, tmp_path_factory):
    """(kind, transformers' model, our NumPy engine) on one converted file."""
    folder = tmp_path_factory.mktemp(f"rope-{request.param}")
    hf = hf_models.random_llama(folder / "hf", tokenizer_dir, SCALINGS[request.param])
    path = hf_models.convert(folder / "hf", folder / f"rope-{request.param}.gguf")
    return request.param, hf, path, Engine.load(path, "numpy")


def prompt_ids(engine: Engine) -> list[int]:
    text = "The appliance runs large language models at home; " * 40
    return engine.tokenizer.encode(text)[:TOKENS]


def test_the_file_declares_the_scaling_and_we_read_it(scaled):
    kind, _, _, engine = scaled
    meta, config = engine.model.file.metadata, engine.model.config
    assert config.rope_scaling == kind
    if kind == "llama3":  # stored as a tensor of per-pair factors, no metadata key
        assert "rope_freqs.weight" in engine.model.file.tensors
    else:
        assert meta["llama.rope.scaling.type"] == kind
    assert not np.allclose(config.inv_freq, dataclasses.replace(config, rope_inv_freq=()).inv_freq)


def test_logits_match_transformers_at_every_position(scaled):
    _, hf, _, engine = scaled
    ids = prompt_ids(engine)
    assert len(ids) == TOKENS
    ours, theirs = engine.forward(ids, Session()), hf_logits(hf, ids)
    assert rel_err(ours, theirs) < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_ignoring_the_scaling_would_be_caught(scaled):
    """The same file run with the plain schedule is far off: the check above has teeth."""
    _, hf, _, engine = scaled
    ids = prompt_ids(engine)
    model = engine.model
    plain = dataclasses.replace(model.config, rope_inv_freq=(), rope_attn_factor=1.0)
    model._ranges.clear()
    model.config, saved = plain, model.config
    try:
        wrong = engine.forward(ids, Session())
    finally:
        model.config = saved
        model._ranges.clear()
    assert rel_err(wrong, hf_logits(hf, ids)) > 1e-2


def test_the_c_backend_rotates_the_same_way(scaled):
    """Within the C backend's rounding (8-bit activations, a float16 cache): 1.4e-4 measured here."""
    _, hf, path, _ = scaled
    engine = Engine.load(path, "cpu")
    ids = prompt_ids(engine)
    ours, theirs = engine.forward(ids, Session()), hf_logits(hf, ids)
    assert rel_err(ours, theirs) < 5e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.97


def test_served_logits_match_transformers(scaled):
    """KServe `NAME-logits` through a real `appliance serve`, by the real tritonclient."""
    _, hf, path, engine = scaled
    ids = prompt_ids(engine)
    with running_server("--model", str(path), "--backend", "numpy", "--no-advertise", "--no-discover") as s:
        client = httpclient.InferenceServerClient(s.url.removeprefix("http://"), network_timeout=120)
        t = httpclient.InferInput("input_ids", [len(ids)], "INT64")
        t.set_data_from_numpy(np.array(ids, dtype=np.int64))
        r = client.infer(f"{path.stem}-logits", [t], headers={"authorization": "Bearer test-key"})
    want = hf_logits(hf, ids)[-1]
    assert rel_err(r.as_numpy("logits"), want) < 1e-4


def test_an_unknown_scaling_type_is_refused_at_load():
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.context_length": 256,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 10,
        "llama.rope.scaling.type": "longrope",
    }
    with pytest.raises(UnsupportedModelError, match="longrope.*supported: none, linear, yarn"):
        LlamaConfig.from_metadata(meta)


def test_a_worker_rotates_its_layers_the_same_way(scaled, ca, tmp_path):
    """Split with a real worker process holding layer 1: the schedule travels in the layer range's
    config, and the hidden states are all-local's."""
    _, _, path, engine = scaled
    model = Llama.load(str(path), "numpy")
    budget = model.fixed_nbytes + int(1.5 * layer_costs(model)[0])  # the fixed part and one layer here
    issue_identity(ca, tmp_path / "w", "w")
    with worker_process(tmp_path / "w", "20MB") as worker:
        split = load_engine(path, "numpy", str(budget), [worker.address])
        try:
            assert split.offload.first_remote_layer == 1
            ids = prompt_ids(engine)
            remote = Session()
            np.testing.assert_allclose(
                split.hidden_states(ids, remote), engine.hidden_states(ids, Session()), atol=1e-5
            )
        finally:
            split.offload.close()
