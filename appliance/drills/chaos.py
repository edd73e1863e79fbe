"""The offload chaos test (`make chaos`): workers whose budgets only just hold the model, one of them
killed (kill -9) or frozen (SIGSTOP) at a random decode step, trial after trial on one engine.

Three workers; any two of them hold the offloaded layers with less than one layer to spare, so after
a loss the survivor must take a different (often bigger) range. Every trial's greedy text must be
the all-local text. Between trials the victim comes back (restarted, or SIGCONT), and the engine
must take it back by itself (its re-probe), so each trial also shows the engine serving normally
after the last one. Prints one line per trial with its seed.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from appliance.startup import load_engine
from appliance.testbed.launch import free_port
from appliance.testbed.netsim import Worker, worker_process
from models.engine import Engine
from models.llama import Llama
from models.store import ModelStore
from offload.coordinator import Coordinator, layer_costs
from offload.pki import certificate_authority, issue_identity

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 24
LOCAL_LAYERS = 3  # the appliance keeps the embedding, the head and this many layers
SLACK = 0.3  # of one layer: what each budget has beyond whole layers
STEP_TIMEOUT_S = 2.0
REJOIN_S = 60.0  # a victim must be back in the engine's worker set within this
TRIAL_S = 180.0  # one trial's generation must end within this


def budgets(model: Llama) -> tuple[int, list[int]]:
    """The appliance's budget (its fixed part and LOCAL_LAYERS layers) and three workers' budgets such that
    any two hold the remaining layers, with SLACK of a layer to spare: [a + 1, a, n - a] layers."""
    costs = layer_costs(model)
    unit = max(costs[LOCAL_LAYERS:])
    appliance = model.fixed_nbytes + sum(costs[:LOCAL_LAYERS]) + int(SLACK * unit)
    n = len(costs) - LOCAL_LAYERS
    a = (n + 1) // 2
    return appliance, [int((layers + SLACK) * unit) for layers in (a + 1, a, n - a)]


@dataclass
class Trial:
    seed: int
    victim: str
    signal: str
    step: int
    ok: bool
    seconds: float
    detail: str

    def line(self, i: int) -> str:
        verdict = "same text as all-local" if self.ok else f"DIFFERENT: {self.detail}"
        return (
            f"trial {i:2d}  seed {self.seed:<10d} {self.signal:<7s} {self.victim:<22s} at token {self.step:2d}: "
            f"{verdict}  ({self.seconds:.1f} s)"
        )


class Fleet:
    """Three worker processes on fixed ports, restarted on the same home and port after a kill."""

    def __init__(self, stack: ExitStack, root: Path, ca, worker_budgets: list[int]):
        self.stack, self.root = stack, root
        self.specs: dict[str, tuple[Path, int, int]] = {}  # address -> (home, port, budget)
        self.workers: dict[str, Worker] = {}
        self.exits: dict[str, ExitStack] = {}
        for i, budget in enumerate(worker_budgets, 1):
            home, port = root / f"c{i}", free_port()
            issue_identity(ca, home, f"c{i}")
            self.specs[f"127.0.0.1:{port}"] = (home, port, budget)
        for address in self.specs:
            self.start(address)
        stack.callback(self.close)

    def start(self, address: str) -> None:
        home, port, budget = self.specs[address]
        inner = ExitStack()
        self.workers[address] = inner.enter_context(worker_process(home, str(budget), port=port))
        self.exits[address] = inner

    def hit(self, address: str, sig: str) -> None:
        os.kill(self.workers[address].proc.pid, signal.SIGKILL if sig == "kill -9" else signal.SIGSTOP)

    def heal(self, address: str, sig: str) -> None:
        """The victim comes back: SIGCONT, or a new process on the same home and port."""
        if sig == "SIGSTOP":
            os.kill(self.workers[address].proc.pid, signal.SIGCONT)
        else:
            self.exits.pop(address).close()
            self.start(address)

    def close(self) -> None:
        for inner in self.exits.values():  # worker_process sends SIGCONT before SIGTERM, then kills
            inner.close()


def wait_for_all(coordinator: Coordinator, addresses: set[str], timeout: float = REJOIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not addresses <= set(coordinator.workers):
        if time.monotonic() > deadline:
            missing = addresses - set(coordinator.workers)
            raise TimeoutError(f"workers {sorted(missing)} not taken back within {timeout:.0f} s")
        time.sleep(0.2)


def settle(coordinator: Coordinator, timeout: float = REJOIN_S) -> None:
    """Wait until the speeds re-read after a join are in, so the plan a trial starts on stays put."""
    deadline = time.monotonic() + timeout
    while coordinator.speeds_due and time.monotonic() < deadline:
        time.sleep(0.2)
    coordinator.current_plan()


def generate_with_fault(engine: Engine, prompt: str, token_at: int, fault) -> list[int]:
    gen = engine.generate(engine.prompt_ids(prompt), max_tokens=TOKENS, ignore_eos=True)
    deadline = time.monotonic() + TRIAL_S
    fired = False
    while not gen.done:
        if not fired and len(gen.token_ids) >= token_at:  # by tokens: a step with drafts may add several
            fault()
            fired = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"generation still running after {TRIAL_S:.0f} s")
        gen.step()
    return gen.token_ids


def run_chaos(trials: int, seed: int | None = None, model_path: Path | None = None, out=print) -> list[Trial]:
    """Run the trials; returns them (the caller decides what failing means). Raises on a hang."""
    base = random.randrange(1 << 30) if seed is None else seed
    model_path = model_path or ModelStore().resolve(None)
    local = Engine.load(model_path, "numpy")
    expected: dict[str, list[int]] = {}
    for prompt in PROMPTS:
        gen = local.generate(local.prompt_ids(prompt), max_tokens=TOKENS, ignore_eos=True)
        gen.run()
        expected[prompt] = gen.token_ids
    appliance_budget, worker_budgets = budgets(local.model)
    out(
        f"chaos: {trials} trials from seed {base}; appliance {appliance_budget / 1e6:.1f} MB, workers "
        f"{', '.join(f'{b / 1e6:.1f}' for b in worker_budgets)} MB (any two hold layers [{LOCAL_LAYERS}, "
        f"{local.model.config.n_layers}) with {SLACK} of a layer to spare)"
    )
    results: list[Trial] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        stack.callback(_restore, "APPLIANCE_HOME", os.environ.get("APPLIANCE_HOME"))
        os.environ["APPLIANCE_HOME"] = str(root / "appliance")  # a CA of its own
        ca = certificate_authority()
        fleet = Fleet(stack, root, ca, worker_budgets)
        engine = load_engine(
            model_path, "numpy", f"{appliance_budget}B", list(fleet.specs), step_timeout=STEP_TIMEOUT_S
        )
        coordinator = engine.offload
        stack.callback(coordinator.close)
        assert coordinator.first_remote_layer == LOCAL_LAYERS, coordinator.first_remote_layer
        for i in range(trials):
            rng = random.Random(base + i)
            wait_for_all(coordinator, set(fleet.specs))
            settle(coordinator)
            sig, step, prompt = rng.choice(["kill -9", "SIGSTOP"]), rng.randrange(1, TOKENS), rng.choice(PROMPTS)
            hit: list[str] = []

            def fault(rng=rng, sig=sig, hit=hit) -> None:  # a worker of the chain the next step uses
                hit.append(rng.choice([s.device.address for s in coordinator.current_plan()[0].chain]))
                fleet.hit(hit[0], sig)

            started = time.monotonic()
            try:
                tokens = generate_with_fault(engine, prompt, step, fault)
                ok, detail = tokens == expected[prompt], f"{tokens} != {expected[prompt]}"
                if ok and hit[0] in [s.device.address for s in coordinator.plan.chain]:
                    ok, detail = False, f"{hit[0]} is still in the chain after its {sig}"
            except Exception as e:  # noqa: BLE001  a failed generation is a failed trial, reported with its seed
                ok, detail = False, f"{type(e).__name__}: {e}"
            finally:
                if hit:
                    fleet.heal(hit[0], sig)
            results.append(Trial(base + i, hit[0] if hit else "-", sig, step, ok, time.monotonic() - started, detail))
            out(results[-1].line(i))
        wait_for_all(coordinator, set(fleet.specs))
        gen = engine.generate(engine.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        gen.run()
        after = gen.token_ids == expected[PROMPTS[0]]
        out(f"after the trials, all workers back: {'serves the all-local text' if after else 'DIFFERENT text'}")
        if not after:
            results.append(Trial(base, "-", "none", 0, False, 0.0, "the engine does not serve normally afterwards"))
    passed = sum(t.ok for t in results)
    out(f"chaos: {passed}/{len(results)} passed")
    return results


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    results = run_chaos(args.trials, args.seed)
    raise SystemExit(0 if all(t.ok for t in results) else 1)


if __name__ == "__main__":
    main()
