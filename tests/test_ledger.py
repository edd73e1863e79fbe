"""The contribution ledger: real worker processes sign their own compute for the appliance, the appliance
chains and signs the entries, and `appliance-ctl ledger verify` catches one changed byte or two swapped
entries, naming the entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from appliance.startup import load_engine
from offload import offload_pb2 as pb
from offload import offload_pb2_grpc as rpc
from offload.ledger import Ledger, LedgerError, Statement, ledger_path
from offload.pki import CertificateAuthority, certificate_authority, issue_identity
from offload.protocol import secure_channel
from tests.test_offload import new_worker


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("appliance")))
        yield certificate_authority()


@pytest.fixture(scope="module")
def recorded(model_path, home, tmp_path_factory):
    """Two rounds of work split over two workers, each round's statements recorded: 4 entries."""
    with new_worker(home, tmp_path_factory, "w1") as w1, new_worker(home, tmp_path_factory, "w2") as w2:
        engine = load_engine(model_path, "numpy", "190MB", [w1.address, w2.address])
        coordinator = engine.offload
        entries = []
        for prompt in ("The capital of France is", "Once upon a time"):
            gen = engine.generate(engine.prompt_ids(prompt), max_tokens=4, ignore_eos=True)
            gen.run()
            entries += coordinator.record_contributions()
        usage = {u.name: u for u in coordinator.usage.values()}
        yield engine, entries, usage, (w1, w2)


def ctl(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "appliance.ctl", *args], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_each_worker_signs_what_it_computed(recorded, home):
    _, entries, usage, _ = recorded
    assert [e["device"] for e in entries] == ["w1", "w2", "w1", "w2"]
    totals: dict[str, dict] = {}
    for e in entries:
        s = json.loads(e["statement"])
        assert s["kind"] == "offload" and s["compute_s"] > 0
        for k in ("compute_s", "hidden_bytes"):
            totals.setdefault(e["device"], {}).setdefault(k, 0)
            totals[e["device"]][k] += s[k]
    for name, t in totals.items():  # the worker's own count agrees with the appliance's
        assert t["hidden_bytes"] == usage[name].bytes
        assert 0.3 * usage[name].seconds <= t["compute_s"] <= usage[name].seconds * 1.01
    shown = json.loads(ctl("ledger", "show", "--json").stdout)
    assert [r["index"] for r in shown["entries"]] == [0, 1, 2, 3]
    assert sum(r["compute_share"] for r in shown["shares"]) == pytest.approx(1, abs=1e-3)


def test_verify_passes_then_names_a_changed_byte_and_a_swap(recorded, home):
    ok = ctl("ledger", "verify")
    assert ok.returncode == 0 and "4 entries" in ok.stdout, ok.stderr
    path = ledger_path(home.folder.parent)
    honest = path.read_bytes()
    lines = honest.splitlines(keepends=True)
    try:
        at = lines[1].index(b'compute_s\\":') + len(b'compute_s\\":')  # the first digit of entry 1's figure
        digit = lines[1][at : at + 1]
        changed = lines[1][:at] + (b"9" if digit != b"9" else b"8") + lines[1][at + 1 :]
        path.write_bytes(b"".join([lines[0], changed, *lines[2:]]))
        bad = ctl("ledger", "verify")
        assert bad.returncode == 1 and "ledger entry 1" in bad.stderr, bad.stderr

        path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
        swapped = ctl("ledger", "verify")
        assert swapped.returncode == 1 and "ledger entry 1 says it is entry 2" in swapped.stderr, swapped.stderr
    finally:
        path.write_bytes(honest)
    assert ctl("ledger", "verify").returncode == 0


def test_forged_statements_and_strangers_are_refused(recorded, home, tmp_path):
    engine, _, _, (w1, _) = recorded
    ledger = Ledger(tmp_path / "ledger.jsonl", home.identity())
    w1_identity = issue_identity(home, tmp_path / "w1", "w1")
    honest = Statement.make(w1_identity, "offload", {"compute_s": 1.0, "hidden_bytes": 10}, 0.0, 1)
    ledger.append(honest)
    inflated = Statement(
        honest.body.replace(b'"compute_s":1.0', b'"compute_s":100.0'), honest.signature, honest.cert_pem
    )
    with pytest.raises(LedgerError, match="signature is not w1's"):
        ledger.append(inflated)
    other_ca = CertificateAuthority(tmp_path / "other-pki")
    stranger = issue_identity(other_ca, tmp_path / "stranger", "w1")
    with pytest.raises(LedgerError, match="not issued by this appliance's CA"):
        ledger.append(Statement.make(stranger, "offload", {"compute_s": 1.0, "hidden_bytes": 1}, 0.0, 1))
    assert ledger.verify() == 1
    # Only the appliance may ask a worker for its statement (a device could otherwise reset another's counters).
    with secure_channel(w1.address, w1_identity) as channel, pytest.raises(grpc.RpcError) as refused:
        rpc.OffloadStub(channel).Attest(pb.AttestRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
