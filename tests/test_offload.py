"""The model split over the appliance and real worker processes, over real mutual TLS on real ports."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from appliance.bench.netsim import worker_process
from appliance.startup import certificate_authority, load_engine
from models.engine import Engine
from models.llama import Session
from offload.coordinator import OffloadError
from offload.pki import issue_identity
from offload.planner import parse_size
from offload.worker import WorkerService, start_worker

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 32


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh APPLIANCE_HOME (its own CA) for this module's appliance and workers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("appliance")))
        yield certificate_authority()


def new_worker(ca, tmp_path_factory, name: str, budget: str = "50MB", **kw):
    folder = tmp_path_factory.mktemp(name)
    issue_identity(ca, folder, name)
    return worker_process(folder, budget, **kw)


@pytest.fixture(scope="module")
def two_workers(home, tmp_path_factory):
    with new_worker(home, tmp_path_factory, "w1") as w1, new_worker(home, tmp_path_factory, "w2") as w2:
        yield [w1, w2]


@pytest.fixture(scope="module")
def split(model_path, home, two_workers) -> Engine:
    """40 MB here holds the embedding, head and 3 layers; 50 MB per worker forces a 3-way split."""
    return load_engine(model_path, "numpy", "40MB", [w.address for w in two_workers])


def greedy(engine: Engine, prompt: str) -> list[int]:
    gen = engine.generate(engine.prompt_ids(prompt), max_tokens=TOKENS, ignore_eos=True)
    gen.run()
    return gen.token_ids


def test_the_model_is_split_over_the_appliance_and_both_workers(split, two_workers):
    plan = split.offload.make_plan()
    assert plan.local.stop == split.offload.start > 0
    assert {s.device.address for s in plan.chain} == {w.address for w in two_workers}
    assert plan.chain[-1].stop == split.model.config.n_layers
    for stage in plan.stages:
        assert stage.bytes <= stage.device.budget_bytes


@pytest.mark.parametrize("prompt", PROMPTS)
def test_split_greedy_tokens_equal_all_local(engine, split, prompt):
    assert greedy(split, prompt) == greedy(engine, prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_split_hidden_states_equal_all_local_with_fp32_on_the_wire(engine, split, prompt):
    ids = engine.prompt_ids(prompt)
    local, remote = Session(), Session()
    assert_close(split.hidden_states(ids, remote), engine.hidden_states(ids, local), 1e-5)
    for token in (42, 1337, 7):  # then one token per message, through the workers' KV caches
        assert_close(split.hidden_states([token], remote), engine.hidden_states([token], local), 1e-5)
    split.release(remote)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Within tolerance of the states' scale (they reach ~200 after 30 layers): BLAS on another device
    sums in another order, so float32 results agree to ~1e-6 relative, not bit for bit."""
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def test_fp16_on_the_wire_stays_close(model_path, engine, home, two_workers):
    half = load_engine(model_path, "numpy", "40MB", [w.address for w in two_workers], wire_dtype="float16")
    ids = engine.prompt_ids(PROMPTS[0])
    assert_close(half.hidden_states(ids, Session()), engine.hidden_states(ids, Session()), 2e-3)


def test_no_placement_is_a_clear_error(model_path, home, tmp_path_factory):
    with new_worker(home, tmp_path_factory, "small", budget="20MB") as w:
        engine = load_engine(model_path, "numpy", "40MB", [w.address])
        with pytest.raises(OffloadError, match=r"no placement can hold the model: .*27 layers .* 20\.0 MB"):
            greedy(engine, PROMPTS[0])


@pytest.mark.parametrize("fault", ["kill -9", "SIGSTOP"])
def test_a_worker_lost_mid_generation_changes_nothing(engine, model_path, home, tmp_path_factory, fault):
    """Three workers, two in use: one dies (or hangs) at a random step; the text is the no-fault text."""
    expected = greedy(engine, PROMPTS[0])
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with (
        new_worker(home, tmp_path_factory, "f1") as w1,
        new_worker(home, tmp_path_factory, "f2") as w2,
        new_worker(home, tmp_path_factory, "f3") as w3,
    ):
        workers = {w.address: w for w in (w1, w2, w3)}
        split = load_engine(model_path, "numpy", "40MB", list(workers), step_timeout=2.0)
        chain = [s.device.address for s in split.offload.make_plan().chain]
        victim = workers[rng.choice(chain)]
        fault_at = rng.randrange(1, TOKENS)
        gen = split.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        step = 0
        while not gen.done:
            if step == fault_at:
                victim.kill() if fault == "kill -9" else victim.stop()
            ids = gen.next_input()
            gen.advance(len(ids), split.next_logits(ids, gen.session))
            step += 1
        assert gen.token_ids == expected, f"seed {seed}: {fault} of {victim.address} at step {fault_at}"
        assert victim.address not in split.offload.workers
        assert len(split.offload.make_plan().chain) == 2


def test_a_worker_joining_mid_generation_is_used_and_changes_nothing(engine, model_path, home, tmp_path_factory):
    """A roomy worker appears between tokens: the next token is planned with it, its chain rebuilt."""
    expected = greedy(engine, PROMPTS[2])
    with (
        new_worker(home, tmp_path_factory, "j1") as w1,
        new_worker(home, tmp_path_factory, "j2") as w2,
        new_worker(home, tmp_path_factory, "big", budget="200MB") as big,
    ):
        split = load_engine(model_path, "numpy", "40MB", [w1.address, w2.address])
        assert len(split.offload.make_plan().chain) == 2
        gen = split.generate(engine.prompt_ids(PROMPTS[2]), max_tokens=TOKENS, ignore_eos=True)
        step, rebuilt = 0, None
        while not gen.done:
            if step == TOKENS // 2:
                split.offload.add_worker(big.address)
                joined = split.offload.version
            ids = gen.next_input()
            gen.advance(len(ids), split.next_logits(ids, gen.session))
            if step == TOKENS // 2:
                rebuilt = gen.session.remote.version
            step += 1
        assert gen.token_ids == expected
        assert rebuilt == joined  # the token right after the join ran on a chain planned with it
        assert big.address in split.offload.workers
        assert gen.session.remote.chain is None  # released at the end


class CorruptingWorker(WorkerService):
    """A real worker (same server, same mTLS) whose outputs turn to NaN from its 4th message on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gflops = 1e6  # claims to be fast, so the planner puts it in the chain
        self.sent = 0

    def _output(self, hidden, session_id, step, dtype):
        self.sent += 1
        if self.sent > 3:
            hidden = np.full_like(hidden, np.nan)
        return super()._output(hidden, session_id, step, dtype)


@pytest.mark.parametrize(("budget", "position"), [("90MB", "alone"), ("50MB", "first of two")])
def test_a_worker_sending_malformed_tensors_is_dropped(engine, model_path, home, tmp_path_factory, budget, position):
    """Alone, the appliance sees the NaNs; first of two, the next worker refuses them and says whose they are."""
    expected = greedy(engine, PROMPTS[1])
    folder = tmp_path_factory.mktemp("liar")
    identity = issue_identity(home, folder, "liar")
    server, liar, port = start_worker(
        identity, folder, "127.0.0.1", 0, parse_size(budget), service_class=CorruptingWorker
    )
    try:
        with new_worker(home, tmp_path_factory, "h1") as w1, new_worker(home, tmp_path_factory, "h2") as w2:
            address = f"127.0.0.1:{port}"
            split = load_engine(model_path, "numpy", "40MB", [address, w1.address, w2.address], step_timeout=5.0)
            chain = [s.device.address for s in split.offload.make_plan().chain]
            assert chain[0] == address and len(chain) == (1 if position == "alone" else 2)
            assert greedy(split, PROMPTS[1]) == expected
            assert liar.sent > 3 and address not in split.offload.workers
    finally:
        server.stop(None)


class SlowingWorker(WorkerService):
    """A real worker that, once told to, spends `delay_s` more on every message: a laptop throttling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = 0.0

    def _output(self, hidden, session_id, step, dtype):
        time.sleep(self.delay_s)
        return super()._output(hidden, session_id, step, dtype)


def test_a_worker_that_slows_down_is_replaced_between_tokens(engine, model_path, home, tmp_path_factory):
    """Either of two workers can hold every offloaded layer; the one in use slows down tenfold
    mid-generation: within a few tokens the other takes over, and the text is the no-fault text."""
    expected = greedy(engine, PROMPTS[0])
    servers, services = [], {}
    try:
        for name in ("slow1", "slow2"):
            folder = tmp_path_factory.mktemp(name)
            identity = issue_identity(home, folder, name)
            server, service, port = start_worker(
                identity, folder, "127.0.0.1", 0, parse_size("90MB"), service_class=SlowingWorker
            )
            servers.append(server)
            services[f"127.0.0.1:{port}"] = service
        split = load_engine(model_path, "numpy", "40MB", list(services), step_timeout=5.0)
        (used,) = [s.device.address for s in split.offload.make_plan().chain]  # one link beats two
        (other,) = set(services) - {used}
        gen = split.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        step, moved_at = 0, None
        while not gen.done:
            if step == 8:
                services[used].delay_s = 0.3
            ids = gen.next_input()
            gen.advance(len(ids), split.next_logits(ids, gen.session))
            if moved_at is None and split.offload.plan.chain[0].device.address == other:
                moved_at = step
            step += 1
        assert gen.token_ids == expected
        assert moved_at is not None and moved_at <= 8 + 6, f"still on the slow worker after step {moved_at}"
        assert used in split.offload.workers  # slow, not gone: it stays a candidate
    finally:
        for server in servers:
            server.stop(None)
