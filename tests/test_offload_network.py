"""Offload over links like a home LAN's: delay, jitter and a rate limit; workers forwarding directly."""

from __future__ import annotations

import pytest

from appliance.startup import load_engine
from appliance.testbed.netsim import DelayRelay, can_build_lan, home_lan, worker_process
from offload.pki import issue_identity
from tests.test_offload import PROMPTS, TOKENS, greedy


def test_the_last_worker_answers_the_appliance_directly(ca, tmp_path, model_path):
    """appliance -> w1 -> w2 -> appliance: hidden states never travel back through w1."""
    for name in ("w1", "w2"):
        issue_identity(ca, tmp_path / name, name)
    with (
        worker_process(tmp_path / "w1") as w1,
        worker_process(tmp_path / "w2") as w2,
        DelayRelay(w1.address) as r1,
        DelayRelay(w2.address) as r2,
    ):
        split = load_engine(model_path, "numpy", "190MB", [r1.address, r2.address])
        hidden_bytes = split.model.config.dim * 4  # one token's hidden state, fp32
        chain = [s.device.address for s in split.offload.make_plan().chain]
        assert len(chain) == 2
        first, last = (r1, r2) if chain[0] == r1.address else (r2, r1)
        gen = split.generate(split.prompt_ids(PROMPTS[0]), max_tokens=TOKENS, ignore_eos=True)
        gen.step()  # the prompt
        before = {"first": first.bytes_down, "last": last.bytes_down}
        gen.run()  # 31 more tokens, one message per step (with drafts: a row per position, >= one per token)
        decoded = TOKENS - 1
        assert last.bytes_down - before["last"] >= decoded * hidden_bytes  # outputs come from the last worker
        assert first.bytes_down - before["first"] < decoded * hidden_bytes / 4  # only HTTP/2 bookkeeping


@pytest.mark.skipif(bool(can_build_lan()), reason=f"LAN simulation unavailable: {can_build_lan()}")
def test_identical_output_over_delayed_jittery_rate_limited_links(ca, tmp_path, model_path, engine):
    """Two workers in their own network namespaces, 20 Mbit/s links, 3 +- 1 ms one way."""
    for name in ("w1", "w2"):
        issue_identity(ca, tmp_path / name, name)
    with home_lan(2, rate="20mbit", prefix="aplt") as lan:
        (ns1, a1), (ns2, a2) = lan.devices.items()
        with (
            worker_process(tmp_path / "w1", host=a1, netns=ns1) as w1,
            worker_process(tmp_path / "w2", host=a2, netns=ns2) as w2,
            DelayRelay(w1.address, 3, 1, listen=f"{lan.host_address}:0") as r1,
            DelayRelay(w2.address, 3, 1, listen=f"{lan.host_address}:0") as r2,
        ):
            split = load_engine(model_path, "numpy", "190MB", [r1.address, r2.address])
            assert len(split.offload.make_plan().chain) == 2
            for prompt in PROMPTS:
                assert greedy(split, prompt) == greedy(engine, prompt)
            assert r1.bytes_up > 0 and r2.bytes_up > 0
