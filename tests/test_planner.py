"""Placement: budgets are never exceeded, the fastest feasible chain wins, and failure says why."""

from __future__ import annotations

import pytest

from offload.planner import Device, NoPlacementError, make_plan, parse_size

MB = 10**6
LAYERS = [2 * MB] * 10  # ten 2 MB layers
FIXED = 5 * MB  # embedding + head


def appliance(budget_mb: float) -> Device:
    return Device("appliance", None, int(budget_mb * MB), ms_per_layer=1.0)


def worker(name: str, budget_mb: float, ms_per_layer: float = 1.0, one_way_ms: float = 0.5) -> Device:
    return Device(name, f"{name}:50051", int(budget_mb * MB), ms_per_layer, one_way_ms, bytes_per_ms=1e5)


def test_everything_local_when_it_fits():
    plan = make_plan(LAYERS, FIXED, appliance(100), [worker("a", 100)], 2304)
    assert (plan.local.start, plan.local.stop) == (0, 10) and plan.chain == []


def test_the_appliance_keeps_what_its_budget_holds_and_the_rest_is_contiguous():
    plan = make_plan(LAYERS, FIXED, appliance(11), [worker("a", 8), worker("b", 100)], 2304)
    assert (plan.local.start, plan.local.stop) == (0, 3)
    assert plan.chain[0].start == 3 and plan.chain[-1].stop == 10
    for stage in plan.stages:
        assert stage.bytes <= stage.device.budget_bytes


def test_one_worker_beats_two_when_it_can_hold_everything():
    """Each extra worker is another one-way trip per token."""
    plan = make_plan(LAYERS, FIXED, appliance(5), [worker("a", 100), worker("b", 100)], 2304)
    assert len(plan.chain) == 1


def test_a_faster_worker_takes_more_layers():
    plan = make_plan(LAYERS, FIXED, appliance(5), [worker("slow", 100, 5.0), worker("fast", 12, 0.5)], 2304)
    names = [(s.device.name, s.stop - s.start) for s in plan.chain]
    assert ("fast", 6) in names and ("slow", 4) in names


def test_the_prediction_counts_n_plus_one_trips():
    plan = make_plan(LAYERS, FIXED, appliance(5), [worker("a", 12, 1.0, 2.0), worker("b", 12, 1.0, 2.0)], 0)
    assert len(plan.chain) == 2
    assert plan.ms_per_token == pytest.approx(10 * 1.0 + 3 * 2.0)


def test_no_placement_says_why():
    with pytest.raises(NoPlacementError, match=r"10 layers \(20\.0 MB\) .* 1 reachable worker\(s\) offer 8\.0 MB"):
        make_plan(LAYERS, FIXED, appliance(5), [worker("a", 8)], 2304)
    with pytest.raises(NoPlacementError, match="cannot hold the embedding and head"):
        make_plan(LAYERS, FIXED, appliance(4), [worker("a", 100)], 2304)


@pytest.mark.parametrize(("text", "value"), [("40MB", 40 * MB), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "forty", "40XB", "-1MB"])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("slow", "reason"),
    [(worker("slow", 100, ms_per_layer=10.0), "compute"), (worker("slow", 100, one_way_ms=20.0), "link")],
)
def test_a_slow_device_is_left_out_when_that_is_faster_and_the_plan_says_why(slow, reason):
    """Offered a device with 10x slower compute, or a 20 ms link, beside one that holds everything."""
    fast = worker("fast", 100)
    plan = make_plan(LAYERS, FIXED, appliance(5), [fast, slow], 2304)
    assert [s.device.name for s in plan.chain] == ["fast"] and plan.left_out == [slow]
    alone = plan.ms_per_token
    assert make_plan(LAYERS, FIXED, appliance(5), [slow], 2304).ms_per_token > alone  # it alone is slower too
    assert plan.why[slow.address].startswith("out: with it ")
    assert f"{alone:.1f} without" in plan.why[slow.address], reason
    assert plan.why[fast.address].startswith("in: layers [0, 10)")


def test_a_slow_device_the_model_needs_is_in_and_the_plan_says_so():
    fast, slow = worker("fast", 12), worker("slow", 100, ms_per_layer=10.0)
    plan = make_plan(LAYERS, FIXED, appliance(5), [fast, slow], 2304)
    assert {s.device.name for s in plan.chain} == {"fast", "slow"}
    assert plan.why[slow.address].endswith("the model does not fit without it")


def test_the_plan_leaves_out_every_worker_when_the_appliance_holds_the_model():
    plan = make_plan(LAYERS, FIXED, appliance(100), [worker("a", 100)], 2304)
    assert plan.why == {"a:50051": "out: the appliance holds every layer"}
