"""`--backend cuda` as the product runs it, on the PTX emulator: the engine, the real scheduler and an
offload worker use the range-level CUDA backend exactly as they use the C one.

The fake pycuda (tests/ptx/driver.py) is installed for this module, so `select_backend("cuda")` takes
the product's own path to the emulated GPU. The worker is in-process (start_worker on a real port,
real mutual TLS): it shares the fake driver with the appliance, as one GPU shared by two processes.
A tiny synthetic Llama (models/synthetic.py, 2 layers of width 128): emulation is slow.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from appliance.serving.scheduler import Scheduler
from appliance.startup import load_engine
from kernels import cuda_backend as cb
from models.engine import Engine
from models.gguf_file import open_gguf
from models.llama import Llama, Session
from models.sampling import SamplingParams
from models.synthetic import TINY, write_llama_1b_q4_0
from offload.coordinator import layer_costs
from offload.pki import certificate_authority, issue_identity
from offload.planner import parse_size
from offload.worker import start_worker
from tests.ptx import driver
from tests.scale import full_or

# Prompts whose greedy continuations have a top-2 margin of at least 0.09 logits at every step in the
# reference (8-bit activations move these logits by ~0.02): the tokens must be equal, not nearly.
PROMPTS = [[243, 263, 387, 486, 19], [415, 45, 93, 122, 94], [429, 135, 57, 154, 213]]
TOKENS = full_or(6, 4)  # the margins above hold for 6


@pytest.fixture(scope="module")
def gpu():
    with pytest.MonkeyPatch.context() as mp:
        fake = driver.FakeGpu()
        driver.install(mp, fake)
        yield fake


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama_1b_q4_0(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=256, shapes=TINY)


@pytest.fixture(scope="module")
def want(tiny) -> list[list[int]]:
    """The NumPy reference's greedy tokens for each prompt."""
    ref = Engine.load(tiny, "numpy")
    out = []
    for ids in PROMPTS:
        gen = ref.generate(ids, max_tokens=TOKENS, ignore_eos=True)
        gen.run()
        out.append(gen.token_ids)
    return out


def serve(engine: Engine, prompts: list[list[int]], sampling: list | None = None, **kw) -> list[list[int]]:
    """The prompts submitted together to a real Scheduler (continuous batching); each one's tokens.
    sampling: each prompt's SamplingParams (greedy where None); kw: more Engine.generate arguments."""
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    done = [threading.Event() for _ in prompts]
    errors: list[str] = []
    sampling = sampling or [None] * len(prompts)
    jobs = [
        engine.generate(ids, s, max_tokens=TOKENS, ignore_eos=True, **kw)
        for ids, s in zip(prompts, sampling, strict=True)
    ]

    def deliver(i: int):
        def on(event) -> None:
            if event.kind == "error":
                errors.append(event.text)
            if event.kind in ("done", "error"):
                done[i].set()

        return on

    try:
        scheduler.submit_all([(job, deliver(i)) for i, job in enumerate(jobs)])
        for event in done:
            assert event.wait(300), "the scheduler did not finish"
    finally:
        scheduler.stop()
    assert errors == []
    return [job.token_ids for job in jobs]


def test_auto_and_cuda_pick_the_emulated_gpu(gpu, tiny):
    engine = Engine.load(tiny, "auto")
    assert engine.model.backend.name == "cuda"
    assert isinstance(engine.model.layer_range(0, TINY["n_layers"]).fused, cb.CudaRange)


def _copied_back(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of what Device.to_host copies from the GPU, from now on."""
    shapes: list[tuple[int, ...]] = []
    to_host = cb.Device.to_host

    def recorded(self, ptr, shape, dtype=np.float32):
        shapes.append(tuple(shape))
        return to_host(self, ptr, shape, dtype)

    monkeypatch.setattr(cb.Device, "to_host", recorded)
    return shapes


def test_served_by_the_scheduler_the_greedy_tokens_are_numpys(gpu, tiny, want, monkeypatch):
    """Three prompts batched: their prompts in one mat-mat step, then decode steps of three rows
    replayed from the width-4 graph; every session's cache slot is back in the pool at the end. The
    tokens are chosen on the GPU (the `sample` kernel after the head): no row of logits comes back."""
    engine = Engine.load(tiny, "cuda")
    r = engine.model.layer_range(0, TINY["n_layers"])
    gpu.launches.clear()
    copied = _copied_back(monkeypatch)
    assert serve(engine, PROMPTS) == want
    assert "matmat_q4_0" in gpu.launches and "matvec_q4_0_b4" in gpu.launches and "sample" in gpu.launches
    assert copied and not [s for s in copied if s[-1] == TINY["vocab"]]
    assert set(r.fused._graphs) >= {4}
    assert len(r.fused._free) == r.fused.slots - 1  # slot 0 is the padding rows'


def test_sampled_on_the_gpu_a_seed_repeats_and_rows_needing_logits_get_them(gpu, tiny, want):
    """Temperature sampling by the `sample` kernel: the same seed gives the same tokens wherever its row is in the
    batch and run after run, another seed other tokens; top_k 1 is greedy; a row asking for logprobs gets its
    logits (the host samples it) and the reference's greedy tokens. (Alone, a row runs at width 1, whose
    rounding differs from width 4's: a draw near a boundary may differ, as on a real GPU.)"""
    engine = Engine.load(tiny, "cuda")
    hot = [SamplingParams(temperature=1.5, seed=s) for s in (1, 2, 1)]
    batched = serve(engine, PROMPTS[:1] * 3, hot)
    assert batched[0] == batched[2] != batched[1]
    assert serve(engine, PROMPTS[:1] * 3, hot[::-1]) == batched[::-1]
    assert serve(engine, PROMPTS, [SamplingParams(temperature=1.5, top_k=1, seed=9)] * 3) == want
    gen = engine.generate(PROMPTS[1], max_tokens=TOKENS, ignore_eos=True, logprobs=1)
    assert gen.draw() is None
    gen.run()
    assert gen.token_ids == want[1] and len(gen.logprobs) == TOKENS


def test_a_sequence_alone_and_in_a_batch_gets_the_same_tokens(gpu, tiny, want):
    """One prompt alone (every step at width 1: its prompt on mat-vec too) gives the batch's tokens."""
    engine = Engine.load(tiny, "cuda")
    gen = engine.generate(PROMPTS[0], max_tokens=TOKENS, ignore_eos=True)
    gen.run()
    assert gen.token_ids == want[0]


def test_split_with_an_offload_worker_on_the_emulated_gpu(gpu, tiny, want, tmp_path_factory, monkeypatch):
    """Layer 0 here, layer 1 on a worker, both on the cuda backend; served by the scheduler."""
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("home")))
    ca = certificate_authority()
    folder = tmp_path_factory.mktemp("w1")
    identity = issue_identity(ca, folder, "w1")
    server, service, port = start_worker(identity, folder, "127.0.0.1", 0, parse_size("4MB"), backend="cuda")
    try:
        local = Engine.load(tiny, "cuda").model
        budget = local.fixed_nbytes + layer_costs(local)[0] + 1000  # one layer and its KV room here
        split = load_engine(tiny, "cuda", str(budget), [f"127.0.0.1:{port}"])
        assert split.offload is not None and split.offload.first_remote_layer == 1
        assert service.backend.name == "cuda"
        assert serve(split, PROMPTS[:2]) == want[:2]
        loaded = [r.layers for r in service.ranges.values()]
        assert loaded and all(isinstance(r.fused, cb.CudaRange) for r in loaded)
        split.offload.close()
    finally:
        server.stop(None)


def test_the_cache_pool_grows_keeping_what_it_holds_and_a_full_slot_is_a_clear_error(gpu, tiny):
    model = Llama(open_gguf(tiny), cb.CudaBackend(max_context=8))
    r = model.layer_range(0, TINY["n_layers"])
    first = Session()
    model.run_layers_batch((0, 2), [model.embed(PROMPTS[0])], [first])
    cache = first.caches[(0, 2)]
    before = r.fused.dev.to_host(cache.k, (r.fused.slot_bytes,), np.uint8)
    others = [r.new_cache() for _ in range(r.fused.slots)]  # past the pool: it doubles
    assert r.fused.slots == 8 and len({c.slot for c in [cache, *others]}) == len(others) + 1
    np.testing.assert_array_equal(r.fused.dev.to_host(cache.k, (r.fused.slot_bytes,), np.uint8), before)
    del others
    assert len(r.fused._free) == 6  # 8 slots, less the padding slot and `first`'s
    with pytest.raises(cb.KVCacheFullError, match="do not fit the GPU KV cache of 8 tokens"):
        model.run_layers_batch((0, 2), [model.embed(PROMPTS[1])], [first])


def test_gpu_checks_of_the_product_path_pass_on_the_emulated_gpu(gpu, tiny):
    """`make gpu-check`'s own checks, as far as they run without a GPU: layer 0 (graph-replayed and
    mat-mat) and greedy text of `--backend cuda` against the reference, on the emulator; and the
    mirrored kernel tests' run, its subject a second emulated GPU (labelled so in the row)."""
    from appliance.bench import gpu_check

    gpu_check.ROWS.clear()
    ref, engine = Engine.load(tiny, "numpy"), Engine.load(tiny, "cuda")
    gpu_check.check_layer0(ref.model, engine.model)
    gpu_check.check_greedy(ref, engine, n_new=full_or(TOKENS, 2), prompts=PROMPTS[:1])
    gpu_check.emulated_kernel_tests("emulated", select="rmsnorm or silu")  # the path, not every kernel again
    assert [r[1] for r in gpu_check.ROWS] == ["PASS"] * 4, gpu_check.ROWS
    assert gpu_check.ROWS[-1][0] == "emulator's kernel tests, mirrored on the emulated"
    assert gpu_check.ROWS[-1][2].startswith("2 passed")
