"""A short run of the offload chaos test (`make chaos` runs 20 trials): tight budgets, a worker killed
or frozen at a random step, the text still the all-local text, the engine serving afterwards."""

from __future__ import annotations

from appliance.drills.chaos import run_chaos


def test_chaos_smoke(model_path):
    lines: list[str] = []
    results = run_chaos(trials=2, model_path=model_path, out=lines.append)
    print("\n".join(lines))
    assert len(results) == 2 and all(t.ok for t in results), "\n".join(lines)
