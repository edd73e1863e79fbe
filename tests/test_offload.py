"""The model split over the appliance and real worker processes, over real mutual TLS on real ports."""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack

import numpy as np
import pytest

from appliance.startup import load_engine
from appliance.testbed.launch import free_port
from appliance.testbed.netsim import worker_process
from models.engine import Engine
from models.llama import Llama, Session
from offload.coordinator import OffloadError, layer_costs
from offload.pki import certificate_authority, issue_identity
from offload.planner import parse_size
from offload.worker import WorkerService, start_worker

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 32
MIDWAY = 4  # a step in the middle of a generation: with drafts, TOKENS may take only a handful of steps


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh APPLIANCE_HOME (its own CA) for this module's appliance and workers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("appliance")))
        yield certificate_authority()


def new_worker(ca, tmp_path_factory, name: str, budget: str = "210MB", **kw):
    folder = tmp_path_factory.mktemp(name)
    issue_identity(ca, folder, name)
    return worker_process(folder, budget, **kw)


@pytest.fixture(scope="module")
def two_workers(home, tmp_path_factory):
    with new_worker(home, tmp_path_factory, "w1") as w1, new_worker(home, tmp_path_factory, "w2") as w2:
        yield [w1, w2]


@pytest.fixture(scope="module")
def split(model_path, home, two_workers) -> Engine:
    """190 MB here holds the embedding, the float32 head and 3 layers; 210 MB per worker (14 layers as
    float32, with KV room) forces a 3-way split."""
    return load_engine(model_path, "numpy", "190MB", [w.address for w in two_workers])


def greedy(engine: Engine, prompt: str) -> list[int]:
    gen = engine.generate(engine.prompt_ids(prompt), max_tokens=TOKENS, ignore_eos=True)
    gen.run()
    return gen.token_ids


def test_the_model_is_split_over_the_appliance_and_both_workers(split, two_workers):
    plan = split.offload.make_plan()
    assert plan.local.stop == split.offload.first_remote_layer > 0
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


def test_the_c_backend_splits_the_same_way(model_path, home, tmp_path_factory):
    """What a user gets by default (auto: the C kernels on the appliance and on every worker), with
    budgets in the C backend's sizes (the file's blocks): three ways split, the tokens are all-local's,
    and each device's layers are the same computation bit for bit."""
    local = Engine.load(model_path, "cpu")
    with (
        new_worker(home, tmp_path_factory, "c1", budget="45MB", backend="cpu") as w1,  # 14 layers of ~3 MB
        new_worker(home, tmp_path_factory, "c2", budget="45MB", backend="cpu") as w2,
    ):
        split = load_engine(model_path, "cpu", "40MB", [w1.address, w2.address])  # 30 MB fixed + 3 layers
        plan = split.offload.make_plan()
        assert plan.local.stop == 3 and {s.device.address for s in plan.chain} == {w1.address, w2.address}
        assert greedy(split, PROMPTS[0]) == greedy(local, PROMPTS[0])
        ids = local.prompt_ids(PROMPTS[1])
        assert np.array_equal(split.hidden_states(ids, Session()), local.hidden_states(ids, Session()))
        split.offload.close()


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Within tolerance of the states' scale (they reach ~200 after 30 layers): BLAS on another device
    sums in another order, so float32 results agree to ~1e-6 relative, not bit for bit."""
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def test_fp16_on_the_wire_stays_close(model_path, engine, home, two_workers):
    half = load_engine(model_path, "numpy", "190MB", [w.address for w in two_workers], wire_dtype="float16")
    ids = engine.prompt_ids(PROMPTS[0])
    # fp16 keeps 11 bits (2^-11 ~ 4.9e-4 of each value) at each of the 3 hops, and later layers amplify
    # what a hop rounds off by an amount that depends on where the cut falls: from layer 15 on, this
    # model's states hold values near 2500, where fp16 steps by 2. Rounding at cuts 3/k/30 gives, for
    # k = 10..24: 3.5e-4, ..., 5.5e-4 (k=14), 1.3e-3 (k=15, 16), 2.1e-3 (k=17..20, this split), 2.6e-3 (k=24).
    assert_close(half.hidden_states(ids, Session()), engine.hidden_states(ids, Session()), 3e-3)


SYSTEM = "You are the assistant of a home. You answer briefly and plainly, in one sentence. " * 4
TURN = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name the capital of France."}]


def _two_turns(engine: Engine) -> tuple[list[str], list[int]]:
    first = engine.generate(engine.chat_ids(TURN), max_tokens=8)
    first.run()
    follow = [*TURN, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = engine.generate(engine.chat_ids(follow), max_tokens=8)
    second.run()
    return [first.text, second.text], [first.cached_tokens, second.cached_tokens]


def test_the_prefix_cache_starts_the_next_turn_from_what_the_workers_kept(model_path, home, two_workers, split):
    """Turn 2 starts from turn 1's positions: the appliance's layers from its cache, each worker's from what it
    kept of turn 1's session (nothing replayed); greedy text as without the cache. Where a worker no longer
    holds them, the rows are replayed instead, with the same text."""
    assert split.prefix_cache is None
    plain, _ = _two_turns(split)
    cached = load_engine(model_path, "numpy", "190MB", [w.address for w in two_workers])
    cached.enable_prefix_cache(64 << 20)
    coordinator = cached.offload
    texts, reused = _two_turns(cached)
    assert texts == plain
    assert reused[1] > len(cached.chat_ids(TURN)) - 4
    assert (coordinator.resumed_rows, coordinator.replayed_rows) == (reused[1], 0)
    for entry in cached.prefix_cache._entries.values():  # as if every worker had restarted since
        entry.remote.chain_id = "gone"
    before = coordinator.resumed_rows
    again, reused = _two_turns(cached)
    assert again == plain and reused[0] == len(cached.chat_ids(TURN)) - 1
    assert coordinator.replayed_rows == sum(reused) and coordinator.resumed_rows == before  # both from the
    # entry the workers lost (turn 2's, the longest match for both)


def test_no_placement_is_a_clear_error(model_path, home, tmp_path_factory, split):
    offloaded = split.model.config.n_layers - split.offload.first_remote_layer  # what 190MB leaves to workers
    with new_worker(home, tmp_path_factory, "small", budget="20MB") as w:
        engine = load_engine(model_path, "numpy", "190MB", [w.address])
        with pytest.raises(OffloadError, match=rf"no placement can hold the model: .*{offloaded} layers .* 20\.0 MB"):
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
        split = load_engine(model_path, "numpy", "190MB", list(workers), step_timeout=2.0)
        fault_at = rng.randrange(1, TOKENS)
        gen = split.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        victim = None
        while not gen.done:
            if victim is None and len(gen.token_ids) >= fault_at:  # a step may add several tokens (drafts)
                # a worker of the chain in use (speeds re-read at a join may move layers)
                victim = workers[rng.choice([s.device.address for s in split.offload.current_plan()[0].chain])]
                victim.kill() if fault == "kill -9" else victim.stop()
            gen.step()
        assert gen.token_ids == expected, f"seed {seed}: {fault} of {victim.address} at token {fault_at}"
        assert victim.address not in split.offload.workers
        assert len(split.offload.make_plan().chain) == 2


def test_a_worker_joining_mid_generation_is_used_and_changes_nothing(engine, model_path, home, tmp_path_factory):
    """A roomy worker appears between tokens: the next token is planned with it, its chain rebuilt."""
    expected = greedy(engine, PROMPTS[2])
    with (
        new_worker(home, tmp_path_factory, "j1") as w1,
        new_worker(home, tmp_path_factory, "j2") as w2,
        new_worker(home, tmp_path_factory, "big", budget="420MB") as big,
    ):
        split = load_engine(model_path, "numpy", "190MB", [w1.address, w2.address])
        assert len(split.offload.make_plan().chain) == 2
        gen = split.generate(engine.prompt_ids(PROMPTS[2]), max_tokens=TOKENS, ignore_eos=True)
        step, rebuilt = 0, None
        while not gen.done:
            if step == MIDWAY:
                split.offload.add_worker(big.address)
                joined = split.offload.generation
            gen.step()
            if step == MIDWAY:
                rebuilt = gen.session.remote.generation
            step += 1
        assert gen.token_ids == expected
        assert rebuilt == joined  # the token right after the join ran on a chain planned with it
        assert big.address in split.offload.workers
        assert gen.session.remote.chain is None  # released at the end


class CorruptingWorker(WorkerService):
    """A real worker (same server, same mTLS) whose outputs turn to NaN from its 4th message on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gflops, self.measured_at = 1e6, math.inf  # claims to be fast (never re-measured): it is put in the chain
        self.sent = 0

    def _output(self, hidden, session_id, step, dtype):
        self.sent += 1
        if self.sent > 3:
            hidden = np.full_like(hidden, np.nan)
        return super()._output(hidden, session_id, step, dtype)


@pytest.mark.parametrize(("budget", "position"), [("420MB", "alone"), ("210MB", "first of two")])
def test_a_worker_sending_malformed_tensors_is_dropped(engine, model_path, home, tmp_path_factory, budget, position):
    """Alone, the appliance sees the NaNs; first of two, the next worker refuses them and says whose they are."""
    expected = greedy(engine, PROMPTS[1])
    folder = tmp_path_factory.mktemp("liar")
    identity = issue_identity(home, folder, "liar")
    server, liar, port = start_worker(
        identity, folder, "127.0.0.1", 0, parse_size(budget), backend="numpy", service_class=CorruptingWorker
    )
    try:
        with new_worker(home, tmp_path_factory, "h1") as w1, new_worker(home, tmp_path_factory, "h2") as w2:
            address = f"127.0.0.1:{port}"
            split = load_engine(model_path, "numpy", "190MB", [address, w1.address, w2.address], step_timeout=5.0)
            chain = [s.device.address for s in split.offload.make_plan().chain]
            assert chain[0] == address and len(chain) == (1 if position == "alone" else 2)
            assert greedy(split, PROMPTS[1]) == expected
            assert liar.sent > 3 and address not in split.offload.workers
    finally:
        server.stop(None)


class SlowingWorker(WorkerService):
    """A real worker that, once told to, spends `delay_s` more on every message: a laptop throttling.

    Its speed is a fixed claim, so two of them are costed alike: these tests are about the slowdown,
    and on a busy shared machine two measurements moments apart can differ many times over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gflops, self.measured_at = 50.0, math.inf
        self.delay_s = 0.0

    def _output(self, hidden, session_id, step, dtype):
        time.sleep(self.delay_s)
        return super()._output(hidden, session_id, step, dtype)


def run_slowing(split, gen, service: SlowingWorker, at: int = 8) -> list[str]:
    """Generate to the end; from step `at` on, `service` takes ten times as long per token as the
    fastest step so far took in all (a fixed delay would be lost in the noise of a busy machine, where
    one token takes from 0.3 s to over 1 s). Returns the address of the chain's first worker after each step."""
    firsts, fastest = [], float("inf")
    while not gen.done:
        if len(firsts) == at:
            service.delay_s = 9 * fastest
        ids = gen.next_input()
        started = time.monotonic()
        gen.advance(len(ids), split.next_logits(ids, gen.session))
        if len(ids) == 1:
            fastest = min(fastest, time.monotonic() - started)
        firsts.append(split.offload.plan.chain[0].device.address)
    return firsts


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
                identity, folder, "127.0.0.1", 0, parse_size("420MB"), backend="numpy", service_class=SlowingWorker
            )
            servers.append(server)
            services[f"127.0.0.1:{port}"] = service
        split = load_engine(model_path, "numpy", "190MB", list(services), step_timeout=30.0, draft="none")
        (used,) = [s.device.address for s in split.offload.make_plan().chain]  # one link beats two
        (other,) = set(services) - {used}
        gen = split.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        firsts = run_slowing(split, gen, services[used])
        moved_at = firsts.index(other) if other in firsts else None
        assert gen.token_ids == expected
        assert moved_at is not None and moved_at <= 8 + 6, f"still on the slow worker after step {moved_at}"
        assert used in split.offload.workers  # slow, not gone: it stays a candidate
    finally:
        for server in servers:
            server.stop(None)


def test_after_every_worker_died_a_returning_one_is_taken_back(engine, model_path, home, tmp_path_factory):
    """The only worker is killed: a step fails with a clear error. It comes back on its address: the
    background probe takes it back by itself, and requests are served again."""
    expected = greedy(engine, PROMPTS[1])
    folder = tmp_path_factory.mktemp("phoenix")
    issue_identity(home, folder, "phoenix")
    port = free_port()
    with worker_process(folder, "420MB", port=port) as w:
        split = load_engine(model_path, "numpy", "190MB", [w.address], step_timeout=2.0)
        assert greedy(split, PROMPTS[1]) == expected
        w.kill()
        w.proc.wait()
        with pytest.raises(OffloadError):
            greedy(split, PROMPTS[1])
        assert w.address not in split.offload.workers
    with worker_process(folder, "420MB", port=port) as w:
        deadline = time.monotonic() + 30
        while w.address not in split.offload.workers and time.monotonic() < deadline:
            time.sleep(0.2)
        assert w.address in split.offload.workers, "the returning worker was not probed again"
        assert greedy(split, PROMPTS[1]) == expected
    split.offload.close()


def tight_budgets(model_path, layers: tuple[int, ...]) -> list[int]:
    """Budgets of exactly these many offloaded layers each, plus a third of a layer."""
    costs = layer_costs(Llama.load(str(model_path), "numpy"))
    return [int((n + 0.3) * max(costs[3:])) for n in layers]


def test_a_worker_revoked_mid_generation_leaves_before_the_next_token(engine, model_path, home, tmp_path_factory):
    """Three workers, any two of which only just hold the offloaded layers: one in the chain is revoked
    between tokens; the next token already runs without it, and the text is the no-fault text."""
    expected = greedy(engine, PROMPTS[2])
    budgets = tight_budgets(model_path, (15, 14, 13))
    names = ("r1", "r2", "r3")
    with ExitStack() as stack:
        workers = {}
        for name, budget in zip(names, budgets, strict=True):
            w = stack.enter_context(new_worker(home, tmp_path_factory, name, budget=f"{budget}B"))
            workers[w.address] = name
        split = load_engine(model_path, "numpy", "190MB", list(workers), step_timeout=2.0)
        victim = split.offload.make_plan().chain[0].device.address
        gen = split.generate(engine.prompt_ids(PROMPTS[2]), max_tokens=TOKENS, ignore_eos=True)
        step = 0
        while not gen.done:
            if step == MIDWAY:
                home.revoke(workers[victim])
            gen.step()
            if step == MIDWAY:
                assert victim not in split.offload.workers
                assert victim not in [s.device.address for s in split.offload.plan.chain]
            step += 1
        assert gen.token_ids == expected
        split.offload.close()


def test_a_slowdown_that_swaps_ranges_works_under_tight_budgets(engine, model_path, home, tmp_path_factory):
    """Two workers that together only just hold the offloaded layers; the first slows tenfold: the
    re-plan moves it to the shorter range and the other to the longer one, each freeing its old range."""
    expected = greedy(engine, PROMPTS[0])
    servers, services = [], {}
    try:
        for name, budget in zip(("tight1", "tight2"), tight_budgets(model_path, (14, 14)), strict=True):
            folder = tmp_path_factory.mktemp(name)
            identity = issue_identity(home, folder, name)
            server, service, port = start_worker(
                identity, folder, "127.0.0.1", 0, budget, backend="numpy", service_class=SlowingWorker
            )
            servers.append(server)
            services[f"127.0.0.1:{port}"] = service
        split = load_engine(model_path, "numpy", "190MB", list(services), step_timeout=30.0, draft="none")
        first = split.offload.make_plan().chain[0]
        assert first.stop - first.start == 14
        gen = split.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        firsts = run_slowing(split, gen, services[first.device.address])
        assert gen.token_ids == expected
        assert any(a != first.device.address for a in firsts), "the slow worker kept the first range"
        for address, service in services.items():  # each holds only its range of the current plan
            assert len(service.ranges) == 1 and service.used <= service.budget, address
        split.offload.close()
    finally:
        for server in servers:
            server.stop(None)
