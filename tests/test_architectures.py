"""The architectures of models/arch.py (Mistral with and without a declared sliding window, Qwen2, Qwen3,
Mixtral, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3), each checked against transformers on a file written by
llama.cpp's own converter (random weights scaled like a trained model's, SmolLM2's tokenizer, or for
Gemma 2 and Phi-3 a SentencePiece one), on both backends, split over a real worker process, and
through a real `appliance serve`; and what we do not run is refused at load, by name.

`python -m tests.test_architectures [CASE...]` prints each file's error against transformers per backend.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from appliance.startup import load_engine
from appliance.testbed.netsim import worker_process
from models.arch import ARCHITECTURES, check_layout, markdown_table
from models.engine import Engine
from models.errors import UnsupportedModelError
from models.llama import LayerRange, Session
from offload.coordinator import layer_costs
from offload.pki import certificate_authority, issue_identity
from tests import hf_models
from tests.hf_models import hf_logits, rel_err
from tests.serving import running_server

SUPPORTED = "llama, llama with experts, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3"
WINDOW = 16  # keys a query sees in the sliding-window case: well under the prompt's length
TOKENS = 64

# name: (transformers class prefix, its config, keys added to the converted file)
CASES = {
    "qwen2": ("Qwen2", {}, {}),
    "qwen3": ("Qwen3", {"head_dim": 32}, {}),  # heads of 32 in a model 64 wide: key_length, not dim / heads
    "mistral": ("Mistral", {"sliding_window": None}, {}),
    "mistral-window": ("Mistral", {"sliding_window": WINDOW}, {"llama.attention.sliding_window": WINDOW}),
    "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, {}),
    # norm_topk_prob as Qwen3-30B-A3B's config has it, and as llama.cpp runs every qwen3moe file (the
    # converter writes no key for it): the chosen experts' router weights sum to 1.
    "qwen3moe": (
        "Qwen3Moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
        {},
    ),
    # Gemma: query_pre_attn_scalar = head_dim, as in every Gemma but the 27B (whose scale llama.cpp knows
    # by its layer count); the converter drops lm_head, so the embeddings are tied. Gemma 2 alternates
    # windowed and global layers, Gemma 3 has five windowed per global one, with their own RoPE base.
    "gemma2": (
        "Gemma2",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "tie_word_embeddings": True}
        | {"rope_theta": 10000.0}  # what llama.cpp assumes: the converter writes no Gemma 2 RoPE base
        | {"attn_logit_softcapping": 5.0},  # a cap these scores reach (Gemma 2 trained scores reach its 50)
        {},
    ),
    "gemma3": (
        "Gemma3Text",
        {
            "model_class": "Gemma3ForCausalLM",
            "num_hidden_layers": 6,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": WINDOW,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},  # Gemma 3 4B's, on its global layers
        },
        {},
    ),
    "phi3": ("Phi3", {"pad_token_id": 0}, {}),
}
ARCH_OF = {name: name for name in ("qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")}  # the rest: llama
SENTENCEPIECE = {"gemma2", "phi3"}  # the converter reads their vocabularies from tokenizer.model only
WINDOWED = {"mistral-window", "gemma2", "gemma3"}
# The C backend's rounding, measured by `python -m tests.test_architectures`: on these float32 files
# (multiplied in float32; the fused pass's float16 KV cache) at most 1.8e-4 relative against
# transformers (3e-7 on the per-operation path the mixtures of experts take); on Q8_0 files, where
# activations are rounded to int8 per 32 values, 0.8-1.2e-2 against the reference on the same blocks,
# as the plain Llama block's (mistral) is, argmax equal at 98-100%.
C_BOUND = 2e-3
Q8_BOUND = 3e-2


def tokenizer_folder(model_path: Path, folder: Path) -> Path:
    return hf_models.save_smollm2_tokenizer(model_path, folder)


def build(name: str, tokenizer_dir: Path, folder: Path, outtype: str = "f32"):
    """(transformers' model, the converted file) for a case."""
    arch, config, keys = CASES[name]
    if name in SENTENCEPIECE:
        tokenizer_dir = hf_models.sentencepiece_tokenizer(tokenizer_dir.parent / "sentencepiece")
    hf = hf_models.random_model(folder / "hf", tokenizer_dir, arch, **config)
    path = hf_models.convert(folder / "hf", folder / f"{name}.{outtype}.gguf", outtype)
    if keys:
        path = hf_models.with_metadata(path, folder / f"{name}.{outtype}.declared.gguf", **keys)
    return hf, path


@pytest.fixture(scope="module")
def tokenizer_dir(model_path, tmp_path_factory):
    return tokenizer_folder(model_path, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def files(tokenizer_dir, tmp_path_factory):
    """A case by name: (name, transformers' model, the file, our NumPy engine on it), built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            hf, path = build(name, tokenizer_dir, tmp_path_factory.mktemp(name))
            built[name] = name, hf, path, Engine.load(path, "numpy")
        return built[name]

    return get


@pytest.fixture(params=sorted(CASES))
def case(request, files):
    return files(request.param)


def prompt_ids(engine: Engine) -> list[int]:
    ids = engine.tokenizer.encode("The appliance runs large language models at home; " * 12)[:TOKENS]
    assert len(ids) == TOKENS
    return ids


def test_the_file_is_read_as_its_architecture(case):
    name, hf, _, engine = case
    c = engine.model.config
    assert c.arch == ARCH_OF.get(name, "llama")
    assert (c.n_experts, c.n_experts_used) == ((4, 2) if name in ("mixtral", "qwen3moe") else (0, 0))
    assert c.head_dim == (
        getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    )
    assert c.sliding_window == (WINDOW if name in WINDOWED else 0)
    assert [c.window(i) > 0 for i in range(c.n_layers)] == {
        "gemma2": [True, False],
        "gemma3": [True] * 5 + [False],
    }.get(name, [name in WINDOWED] * c.n_layers)
    layer = engine.model.layer_range(0, 1).layers[0]
    assert (layer.bq is not None) == (name == "qwen2")
    assert (layer.q_norm is not None) == (name in ("qwen3", "qwen3moe", "gemma3"))
    assert (layer.attn_post_norm is not None) == name.startswith("gemma") == (layer.ffn_post_norm is not None)
    assert (layer.wqkv is not None) == (name == "phi3") == (layer.wq is None)
    assert (layer.router is not None) == (c.n_experts > 0)
    assert (layer.w_gate is None) == (c.n_experts > 0 or name == "phi3")


def test_numpy_logits_match_transformers_at_every_position(case):
    _, hf, _, engine = case
    ids = prompt_ids(engine)
    ours, theirs = prefill_then_decode(engine, ids), hf_logits(hf, ids)
    assert theirs.std() > 1.5  # far from uniform: a wrong model would not match by chance
    assert rel_err(ours, theirs) < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# What each case adds to the plain block, and how to take it away: (config changes, LayerWeights changes).
WITHOUT = {
    "qwen2: no biases": ("qwen2", {}, {"bq": None, "bk": None, "bv": None}),
    "qwen2: adjacent-pair RoPE": ("qwen2", {"arch": "llama"}, {}),
    "qwen3: no q/k norms": ("qwen3", {}, {"q_norm": None, "k_norm": None}),
    "qwen3: adjacent-pair RoPE": ("qwen3", {"arch": "llama"}, {}),
    "mistral-window: no window": ("mistral-window", {"sliding_window": 0}, {}),
    "mixtral: router weights not renormalised": ("mixtral", {"experts_norm": False}, {}),
    "gemma2: no norms after attention and MLP": ("gemma2", {}, {"attn_post_norm": None, "ffn_post_norm": None}),
    "gemma2: no window": ("gemma2", {"sliding_window": 0}, {}),
    "gemma2: no attention soft cap": ("gemma2", {"attn_softcap": 0.0}, {}),
    "gemma3: every layer windowed": ("gemma3", {"swa_pattern": 0}, {}),
    "gemma3: windowed layers on the global RoPE": ("gemma3", {"rope_inv_freq_swa": ()}, {}),
    "phi3: adjacent-pair RoPE": ("phi3", {"arch": "llama"}, {}),
}


@pytest.mark.parametrize("without", sorted(WITHOUT))
def test_each_difference_matters(without, files):
    """The file run without one of its architecture's additions is far off: the checks have teeth."""
    name, config_change, layer_change = WITHOUT[without]
    _, hf, _, engine = files(name)
    m = engine.model
    config = dataclasses.replace(m.config, **config_change)
    layers = [dataclasses.replace(m.layer_range(i, i + 1).layers[0], **layer_change) for i in range(config.n_layers)]
    r = LayerRange(config, m.backend, 0, layers)
    ids = prompt_ids(engine)
    wrong = m.head(r.forward([m.embed(ids)], [r.new_cache()])[0])
    assert rel_err(wrong, hf_logits(hf, ids)) > 1e-2


def prefill_then_decode(engine: Engine, ids: list[int], decode: int = 16) -> np.ndarray:
    """Logits at every position: a prefill, then one token a step (the C pass's few-rows path), so
    the last positions read keys past the sliding window from the cache."""
    session = Session()
    steps = [engine.forward(ids[: len(ids) - decode], session)]
    steps += [engine.forward([token], session) for token in ids[len(ids) - decode :]]
    return np.concatenate(steps)


def test_the_c_backend_matches_transformers_within_its_rounding(case):
    _, hf, path, _ = case
    engine = Engine.load(path, "cpu")
    from kernels.cpu_backend import FUSED_FEATURES

    c = engine.model.config
    fused = engine.model.layer_range(0, c.n_layers).fused
    assert (fused is None) == (not set(c.features) <= FUSED_FEATURES)  # one C pass, or per operation
    ids = prompt_ids(engine)
    ours, theirs = prefill_then_decode(engine, ids), hf_logits(hf, ids)
    assert rel_err(ours, theirs) < C_BOUND
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.fixture(scope="module")
def q8_files(tokenizer_dir, tmp_path_factory):
    """A case's Q8_0 file by name, converted on first use."""
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = build(name, tokenizer_dir, tmp_path_factory.mktemp(f"q8-{name}"), "q8_0")[1]
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_c_backend_on_quantized_blocks_matches_the_reference(name, q8_files):
    """On a Q8_0 file the C pass reads the blocks in place (int8 dot products); the NumPy reference
    dequantizes the same blocks: what is left is the C backend's own rounding."""
    path = q8_files(name)
    reference, engine = Engine.load(path, "numpy"), Engine.load(path, "cpu")
    ids = prompt_ids(engine)
    ours, want = prefill_then_decode(engine, ids), reference.forward(ids, Session())
    assert rel_err(ours, want) < Q8_BOUND
    assert (ours.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cuda_backend_on_quantized_blocks_matches_the_reference(name, q8_files, monkeypatch):
    """`--backend cuda` on the PTX emulator (tests/ptx): every architecture but plain llama runs per operation
    there, each product by the GPU's kernels on the blocks in place (8-bit activations, as the C pass), the
    rest by the NumPy formulas. A prompt's positions at once: emulating the head's 49k rows takes a while."""
    from tests.ptx import driver

    gpu = driver.FakeGpu()
    driver.install(monkeypatch, gpu)
    path = q8_files(name)
    reference, engine = Engine.load(path, "numpy"), Engine.load(path, "cuda")
    assert engine.model.backend.name == "cuda"
    ids = prompt_ids(engine)[:16]
    ours, want = engine.forward(ids, Session()), reference.forward(ids, Session())
    assert rel_err(ours, want) < Q8_BOUND
    assert (ours.argmax(-1) == want.argmax(-1)).mean() > 0.9
    assert "matmat_q8_0" in gpu.launches  # the products ran as the GPU's kernels
    if engine.model.config.n_experts:  # experts stay in their blocks on the GPU, each its own matrix
        from kernels import cuda_backend
        from kernels.backend import Experts

        first = engine.model.layer_range(0, engine.model.config.n_layers).layers[0]
        assert isinstance(first.w_gate_exps, Experts) and isinstance(first.w_gate_exps[0], cuda_backend.GpuTensor)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("appliance")))
        ca = certificate_authority()
        folder = tmp_path_factory.mktemp("worker")
        issue_identity(ca, folder, "w1")
        with worker_process(folder, "100MB") as w:
            yield w


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window", "qwen3moe", "gemma3", "phi3"])
def test_split_over_a_worker_gives_all_local_hidden_states(name, files, worker):
    """A budget that holds the embedding, the head and one layer: the layers after the first run on the
    worker, which builds them from the tensors pushed to it by the architecture's map (Gemma 3's global
    layer, by its index in the model, among them)."""
    _, _, path, local = files(name)
    costs = layer_costs(local.model)
    budget = local.model.fixed_nbytes + costs[0] + costs[1] // 2
    split = load_engine(path, "numpy", f"{budget}B", [worker.address])
    try:
        assert split.offload.first_remote_layer == 1
        ids = prompt_ids(local)
        remote, here = Session(), Session()
        assert_close(split.hidden_states(ids, remote), local.hidden_states(ids, here))
        for token in (42, 137, 7):  # then one token per message, through the worker's KV cache
            assert_close(split.hidden_states([token], remote), local.hidden_states([token], here))
    finally:
        split.offload.close()


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize(
    "name, backend, bound",
    [("qwen3", "numpy", 1e-3), *((n, "auto", C_BOUND) for n in ("qwen2", "gemma2", "phi3", "qwen3moe", "mixtral"))],
)
def test_served_logits_match_transformers(name, backend, bound, files):
    """Through a real `appliance serve`: KServe `NAME-logits` (the real tritonclient) after the whole prompt, and
    at every position the prompt token's logprob (the openai client's completions, echo, token ids) match
    transformers' on the same file, the reference within rounding, the C backend (auto) within its bound."""
    import openai

    _, hf, path, engine = files(name)
    ids = prompt_ids(engine)
    theirs = hf_logits(hf, ids)
    args = ("--model", str(path), "--backend", backend, "--no-advertise", "--no-discover")
    with running_server(*args) as s:
        client = httpclient.InferenceServerClient(s.url.removeprefix("http://"), network_timeout=120)
        t = httpclient.InferInput("input_ids", [len(ids)], "INT64")
        t.set_data_from_numpy(np.array(ids, dtype=np.int64))
        r = client.infer(f"{path.stem}-logits", [t], headers={"authorization": "Bearer test-key"})
        oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="test-key", max_retries=0, timeout=120)
        scored = oa.completions.create(model=path.stem, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert rel_err(r.as_numpy("logits"), theirs[-1]) < bound
    served = np.array(scored.choices[0].logprobs.token_logprobs[1:])  # the first prompt token has none
    want = np.take_along_axis(hf_models.log_softmax(theirs[:-1]), np.array(ids[1:])[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(served, want, atol=5 * bound)


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}  # Phi-3 128k's kind


@pytest.mark.parametrize(
    "arch, config, message",
    [
        (
            "Qwen2Moe",
            {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
            f"'qwen2moe'.* not supported; supported: {SUPPORTED}",
        ),
        (
            "Phi3",
            {"pad_token_id": 0, "rope_scaling": LONGROPE, "original_max_position_embeddings": 1024},
            "LongRoPE .*rope_factors_long.* is not supported",
        ),
    ],
)
def test_a_model_we_do_not_run_is_refused_at_load(arch, config, message, tokenizer_dir, tmp_path):
    """Refused when the file is opened, naming what is not run, not at the first request."""
    if arch == "Phi3":
        tokenizer_dir = hf_models.sentencepiece_tokenizer(tokenizer_dir.parent / "sentencepiece")
    hf_models.random_model(tmp_path / "hf", tokenizer_dir, arch, **config)
    path = hf_models.convert(tmp_path / "hf", tmp_path / "unsupported.gguf")
    with pytest.raises(UnsupportedModelError, match=message):
        Engine.load(path, "numpy")


def test_a_missing_or_unknown_layer_tensor_is_named():
    qwen2, n = ARCHITECTURES[("qwen2", False)], 2
    names = [f"blk.{i}.{suffix}" for i in range(n) for suffix in qwen2.tensors.values()]
    check_layout(qwen2, n, names)
    with pytest.raises(UnsupportedModelError, match="lacks tensor blk.1.attn_k.bias"):
        check_layout(qwen2, n, [x for x in names if x != "blk.1.attn_k.bias"])
    with pytest.raises(UnsupportedModelError, match="tensor blk.0.attn_q_norm.weight: this tensor is not supported"):
        check_layout(qwen2, n, [*names, "blk.0.attn_q_norm.weight"])


def test_only_the_chosen_experts_are_read(tokenizer_dir, tmp_path_factory):
    """On a Q8_0 file the C backend keeps each expert's blocks in place, and a decode step reads the k
    experts its router picks, not all of them."""
    from kernels.backend import Experts
    from kernels.cpu_backend import NativeWeight

    _, path = build("qwen3moe", tokenizer_dir, tmp_path_factory.mktemp("q8-experts"), "q8_0")
    engine = Engine.load(path, "cpu")
    m, read = engine.model, []
    layers = m.layer_range(0, m.config.n_layers).layers
    stored = m.file.tensors["blk.0.ffn_up_exps.weight"].raw
    assert isinstance(layers[0].w_up_exps, Experts) and isinstance(layers[0].w_up_exps[3], NativeWeight)
    assert np.shares_memory(layers[0].w_up_exps[3].raw, stored)

    class Recording:
        def __init__(self, experts):
            self.experts = experts

        def __getitem__(self, e: int):
            read.append(int(e))
            return self.experts[e]

    for layer in layers:
        layer.w_up_exps = Recording(layer.w_up_exps)
    session = Session()
    engine.forward(prompt_ids(engine)[:8], session)
    read.clear()
    engine.forward([42], session)  # one token: k = 2 experts in each of the 2 layers
    assert len(read) == m.config.n_layers * m.config.n_experts_used


def test_the_supported_table_has_every_architecture_and_backend():
    from kernels.backend import fused_features

    table = markdown_table(fused_features())
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [spec.label for spec in ARCHITECTURES.values()]
    assert "`numpy`" in table and "`cpu`" in table and "`cuda`" in table


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray | None:
    """llama.cpp's logits at every position of ids on the same file (llama-cpp-python, which `make bench`
    installs), on every core; None where it is not installed."""
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        return None
    llm = LlamaCpp(str(path), n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=os.cpu_count())
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _report(name: str, who: str, what: str, ours: np.ndarray, want: np.ndarray) -> None:
    same = (ours.argmax(-1) == want.argmax(-1)).mean()
    print(f"{name:15} {who:14} {what}: relative error {rel_err(ours, want):.1e}  argmax equal {same:.0%}")


def main() -> None:
    """Each case's relative error against transformers per backend and llama.cpp's beside them (where
    llama-cpp-python is installed), and the C backend's against the reference on a Q8_0 file (the figures
    C_BOUND and Q8_BOUND rest on) beside llama.cpp's against the same reference."""
    import tempfile

    from models.store import ModelStore

    def fused(engine: Engine) -> str:
        return "fused" if engine.model.layer_range(0, engine.model.config.n_layers).fused is not None else "per-op"

    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_folder(ModelStore().get(), Path(tmp) / "tokenizer")
        for name in sys.argv[1:] or sorted(CASES):
            hf, path = build(name, tok, Path(tmp) / name)
            for backend in ("numpy", "cpu"):
                engine = Engine.load(path, backend)
                ids = prompt_ids(engine)
                theirs = hf_logits(hf, ids)
                _report(
                    name, f"{backend:6} {fused(engine)}", "f32 vs transformers", engine.forward(ids, Session()), theirs
                )
            peer = llama_cpp_logits(path, ids)
            if peer is not None:
                _report(name, "llama.cpp", "f32 vs transformers", peer, theirs)
            _, path = build(name, tok, Path(tmp) / f"{name}-q8", "q8_0")
            reference, engine = Engine.load(path, "numpy"), Engine.load(path, "cpu")
            ids = prompt_ids(reference)
            want = reference.forward(ids, Session())
            _report(name, f"cpu    {fused(engine)}", "q8_0 vs the reference", prefill_then_decode(engine, ids), want)
            peer = llama_cpp_logits(path, ids)
            if peer is not None:
                _report(name, "llama.cpp", "q8_0 vs the reference", peer, want)


if __name__ == "__main__":
    main()
