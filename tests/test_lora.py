"""LoRA adapters at inference: a PEFT adapter on a small random Llama, base and adapter written as GGUF by
llama.cpp's own converters, checked against transformers with the adapter merged, in process on every
CPU backend and through a real `appliance serve` (several adapters in one batch, loaded and unloaded
while it runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import numpy as np
import ollama
import openai
import pytest

from appliance.startup import load_engine
from models.engine import Engine
from models.llama import Llama, Session
from models.lora import AdapterError, Adapters, load_adapter
from offload import train
from offload.coordinator import layer_costs
from offload.pki import certificate_authority
from tests import hf_models
from tests.hf_models import hf_logits, merged_logits, rel_err
from tests.serving import ADMIN_KEY, running_server
from tests.test_offload import new_worker

IDS = list(range(40, 80))
PROMPT = "The appliance runs language models at home, and"


@pytest.fixture(scope="module")
def files(model_path, tmp_path_factory):
    """(base GGUF, {adapter name: (GGUF, PEFT model)}, the transformers base model)."""
    folder = tmp_path_factory.mktemp("lora")
    tokenizer = hf_models.save_smollm2_tokenizer(model_path, folder / "tokenizer")
    hf = hf_models.random_llama(folder / "hf", tokenizer)
    base = hf_models.convert(folder / "hf", folder / "base.gguf")
    adapters = {}
    alpha = hf_models.random_lora(hf, folder / "alpha", seed=1)
    adapters["alpha"] = (hf_models.convert_lora(folder / "alpha", folder / "hf", folder / "alpha.gguf"), alpha)
    # The second is written by our own writer (one converter run less; the writer is held to the
    # converter's bytes in test_adapters_written_here_equal_llama_cpp_converters).
    beta = hf_models.random_lora(hf, folder / "beta", seed=2, targets=["q_proj", "v_proj", "down_proj"])
    adapters["beta"] = (train.save(base, train.lora_pairs(beta), 8.0, folder / "beta.gguf"), beta)
    return base, adapters, hf


@pytest.mark.parametrize("backend, tolerance", [("numpy", 1e-5), ("cpu", 2e-3)])
def test_adapter_logits_match_transformers_merged(files, backend, tolerance):
    base, adapters, hf = files
    engine = Engine.load(base, backend)
    loaded = Adapters(engine.model.file, engine.model.config.spec)
    for name, (path, peft_model) in adapters.items():
        adapter = loaded.load(path)
        theirs = merged_logits(peft_model, IDS)
        ours = engine.forward(IDS, Session(adapter=adapter))
        assert rel_err(ours, theirs) < tolerance, name
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95
        assert rel_err(hf_logits(hf, IDS), theirs) > 0.1  # the adapter moves the logits: a no-op would fail
    assert loaded.get("alpha").describe()["parts"] == ["w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv"]
    assert loaded.get("beta").describe()["parts"] == ["w_down", "wq", "wv"]


def test_a_mixed_batch_gives_each_row_its_own_adapter_and_leaves_the_rest_alone(files):
    """On the C backend rows without an adapter keep the fused pass: the same bits as a batch without adapters."""
    base, adapters, _ = files
    engine = Engine.load(base, "cpu")
    loaded = Adapters(engine.model.file, engine.model.config.spec)
    a, b = (loaded.load(adapters[n][0]) for n in ("alpha", "beta"))
    plain = engine.next_logits_batch([IDS, IDS[:20]], [Session(), Session()])
    mixed = engine.next_logits_batch(
        [IDS, IDS, IDS[:20], IDS], [Session(), Session(adapter=a), Session(), Session(adapter=b)]
    )
    assert np.array_equal(mixed[0], plain[0]) and np.array_equal(mixed[2], plain[1])
    for row, name in ((1, "alpha"), (3, "beta")):
        assert rel_err(mixed[row], merged_logits(adapters[name][1], IDS)[-1]) < 2e-3


def test_the_prefix_cache_keeps_what_each_adapter_computed_apart(files):
    """Positions computed under an adapter are not reused for the base model, nor the other way round; the
    same adapter's are."""
    base, adapters, _ = files
    engine = Engine.load(base, "numpy")
    alpha = Adapters(engine.model.file, engine.model.config.spec).load(adapters["alpha"][0])

    def greedy(adapter):
        gen = engine.generate(IDS, max_tokens=6, ignore_eos=True, adapter=adapter)
        gen.run()
        return gen.token_ids, gen.cached_tokens

    expected = {a: greedy(a)[0] for a in (None, alpha)}
    assert expected[None] != expected[alpha]  # else the test could not tell them apart
    engine.enable_prefix_cache(64 << 20)
    for adapter, hit in ((alpha, False), (None, False), (alpha, True), (None, True)):
        ids, cached = greedy(adapter)
        assert ids == expected[adapter]
        assert (cached > 0) == hit, (adapter, cached)


def test_bad_adapter_files_are_refused_by_name(files):
    base, adapters, _ = files
    engine = Engine.load(base, "numpy")
    loaded = Adapters(engine.model.file, engine.model.config.spec)
    with pytest.raises(AdapterError, match="is not a LoRA adapter"):
        loaded.load(base)
    with pytest.raises(AdapterError, match="no '\\+'"):
        loaded.load(adapters["alpha"][0], name="a+b")
    loaded.load(adapters["alpha"][0])
    with pytest.raises(AdapterError, match="already loaded"):
        loaded.load(adapters["alpha"][0])


def test_offloaded_layers_apply_their_part_of_the_adapter_on_the_worker(files, tmp_path_factory):
    """Layer 1 runs on a real worker process: it gets its layer's part of each session's adapter."""
    base, adapters, hf = files
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("lora-home")))
        ca = certificate_authority()
        model = Llama.load(str(base), "numpy")
        budget = model.fixed_nbytes + layer_costs(model)[0]  # layer 0 here, layer 1 on the worker
        with new_worker(ca, tmp_path_factory, "w1", "50MB") as w1:
            engine = load_engine(base, "numpy", str(budget), [w1.address])
            assert engine.offload.first_remote_layer == 1
            loaded = Adapters(engine.model.file, engine.model.config.spec)
            a, b = (loaded.load(adapters[n][0]) for n in ("alpha", "beta"))
            rows = engine.next_logits_batch([IDS, IDS, IDS], [Session(adapter=a), Session(), Session(adapter=b)])
    assert rel_err(rows[0], merged_logits(adapters["alpha"][1], IDS)[-1]) < 1e-5
    assert rel_err(rows[1], hf_logits(hf, IDS)[-1]) < 1e-5
    assert rel_err(rows[2], merged_logits(adapters["beta"][1], IDS)[-1]) < 1e-5


@pytest.fixture(scope="module")
def server(files):
    base, adapters, _ = files
    args = ("--model", str(base), "--adapter", str(adapters["alpha"][0]), "--no-advertise", "--no-discover")
    with running_server(*args) as s:
        yield s


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key")


def _prompt_logprobs(client: openai.OpenAI, model: str, text: str) -> np.ndarray:
    """The prompt's tokens' logprobs as the server scores them (echo, max_tokens 0)."""
    reply = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=0)
    return np.array(reply.choices[0].logprobs.token_logprobs[1:], dtype=np.float64)


def test_served_adapter_logprobs_match_transformers_merged(files, server):
    base, adapters, hf = files
    client = _openai(server)
    assert [m.id for m in client.models.list().data] == [base.stem, f"{base.stem}+alpha"]
    tokenizer = Engine.load(base, "numpy").tokenizer
    ids = tokenizer.encode(PROMPT)
    for model, logits in (
        (f"{base.stem}+alpha", merged_logits(adapters["alpha"][1], ids)),
        (base.stem, hf_logits(hf, ids)),
    ):
        want = hf_models.log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]
        assert np.abs(_prompt_logprobs(client, model, PROMPT) - want).max() < 2e-2, model
    with pytest.raises(openai.NotFoundError, match="available"):
        client.completions.create(model=f"{base.stem}+gamma", prompt=PROMPT, max_tokens=1)


def ctl(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "appliance.ctl", "--server", server.url, "--admin-key", ADMIN_KEY, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _greedy(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    return reply.choices[0].text


def test_adapters_load_and_unload_while_serving_and_share_a_batch(files, server):
    base, adapters, _ = files
    client = _openai(server)
    loaded = ctl(server, "adapters", "load", str(adapters["beta"][0]), "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["model"] == f"{base.stem}+beta"
    listed = json.loads(ctl(server, "adapters", "list", "--json").stdout)
    assert [a["name"] for a in listed] == ["alpha", "beta"]
    tags = ollama.Client(host=server.url, headers={"Authorization": "Bearer test-key"}).list()
    assert [m.model for m in tags.models] == [
        f"{base.stem}:latest",
        f"{base.stem}+alpha:latest",
        f"{base.stem}+beta:latest",
    ]

    models = [base.stem, f"{base.stem}+alpha", f"{base.stem}+beta"]
    alone = {m: _greedy(client, m) for m in models}
    assert len(set(alone.values())) == 3  # each adapter changes the text
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, _greedy(client, m))) for m in models * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    metrics = httpx.get(f"{server.url}/metrics").text
    singles = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith('appliance_batch_size_bucket{le="1.0"}')
        )
    )
    steps = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("appliance_batch_size_count"))
    )
    assert steps > singles  # some steps ran several requests, so adapters shared batches

    assert ctl(server, "adapters", "unload", "beta").returncode == 0
    with pytest.raises(openai.NotFoundError):
        _greedy(client, f"{base.stem}+beta")
    gone = ctl(server, "adapters", "unload", "beta")
    assert gone.returncode == 5 and "no adapter 'beta'" in gone.stderr
    bad = ctl(server, "adapters", "load", str(base))
    assert bad.returncode == 1 and "is not a LoRA adapter" in bad.stderr


def corpus(seed: int, n: int) -> str:
    """Sentences of one small grammar: what a home's own text looks like to a model that never saw it."""
    rng = np.random.default_rng(seed)
    who, what, where = ["Anna", "Ben", "Chloe", "Dev"], ["keys", "book", "phone", "tea"], ["kitchen", "hall", "garden"]
    return " ".join(f"{rng.choice(who)} left the {rng.choice(what)} in the {rng.choice(where)}." for _ in range(n))


def test_adapters_written_here_equal_llama_cpp_converters(files, tmp_path):
    """models.lora.write_adapter (what on-device training writes) against convert_lora_to_gguf.py on one adapter."""
    base, adapters, _ = files
    path, peft_model = adapters["alpha"]
    alpha = peft_model.peft_config["default"].lora_alpha
    ours_path = train.save(base, train.lora_pairs(peft_model), alpha, tmp_path / "o.gguf")
    engine = Engine.load(base, "numpy")
    ours, theirs = (load_adapter(p, engine.model.file, engine.model.config.spec) for p in (ours_path, path))
    assert ours.alpha == theirs.alpha and sorted(ours.layers) == sorted(theirs.layers)
    for layer, parts in theirs.layers.items():
        assert sorted(parts) == sorted(ours.layers[layer])
        for part, d in parts.items():
            assert np.array_equal(d.a_t, ours.layers[layer][part].a_t)
            assert np.array_equal(d.b_t, ours.layers[layer][part].b_t)


def test_an_adapter_trained_on_a_device_lowers_served_perplexity(files, server, tmp_path):
    base, _, _ = files
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_text(corpus(0, 120))
    data = train.examples(base, tmp_path / "corpus")
    peft_model = train.with_lora(train.base_model(base), rank=8, alpha=16)
    train.train(peft_model, data, steps=15)  # measured in process: 12.4 nats a token, 7.0 after 10 steps, 3.8 after 20
    train.save(base, train.lora_pairs(peft_model), 16, tmp_path / "home.gguf")
    assert ctl(server, "adapters", "load", str(tmp_path / "home.gguf")).returncode == 0
    client, held_out = _openai(server), corpus(1, 12)
    base_nll = -_prompt_logprobs(client, base.stem, held_out).mean()
    tuned_nll = -_prompt_logprobs(client, f"{base.stem}+home", held_out).mean()
    assert tuned_nll < 0.7 * base_nll, (tuned_nll, base_nll)
    ctl(server, "adapters", "unload", "home")
