"""Pairing codes under concurrency and attack: each code pairs one device, once; a bad request does
not spend it; names are unique; wrong codes lock pairing for a while."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from offload import pki
from offload.pairing import PAIR_PATH, pair_with_appliance
from offload.pki import (
    CertificateAuthority,
    Identity,
    InvalidSigningRequest,
    NameTaken,
    PairingError,
    PairingLocked,
    certificate_authority,
    new_key,
    signing_request,
)
from tests.scale import full_or
from tests.serving import Server, running_server


def csr(name: str) -> str:
    return signing_request(new_key(), name).decode()


def tampered(name: str) -> bytes:
    """A signing request whose signature no longer matches its contents."""
    der = bytearray(x509.load_pem_x509_csr(csr(name).encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()


def _signed_by(ca: CertificateAuthority, cert_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.cert)  # raises if not
    return True


# -- the codes store, in-process (ca: the fixture in conftest) -------------------------------------
def test_first_starts_and_code_requests_at_once_make_one_ca_and_lose_no_code(tmp_path):
    folder = tmp_path / "pki"
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: CertificateAuthority(folder).new_code(), range(16)))
    ca = CertificateAuthority(folder)
    assert ca.key.public_key() == ca.cert.public_key()  # the key and the certificate of one CA
    assert len(set(codes)) == 16
    for i, code in enumerate(codes):  # every code was kept
        assert _signed_by(ca, ca.pair(code, csr(f"d{i}").encode())["certificate"].encode())


def test_a_code_redeemed_by_many_at_once_pairs_exactly_one(ca):
    code = ca.new_code()

    def redeem(i: int) -> str:
        try:
            ca_i = CertificateAuthority(ca.folder)  # as separate requests do
            ca_i.pair(code, csr(f"d{i}").encode())
            return "paired"
        except PairingError as e:
            return str(e)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(redeem, range(10)))
    assert results.count("paired") == 1
    assert all("already used" in r for r in results if r != "paired")
    assert len(ca.workers()) == 1


def test_a_bad_request_or_a_taken_name_leaves_the_code_usable(ca):
    ca.pair(ca.new_code(), csr("laptop").encode())
    code = ca.new_code()
    for bad, error in [
        (b"not a signing request", "not a usable PEM"),
        (csr("appliance").encode(), "the appliance's own name"),
        (csr("two words").encode(), "1 to 64 letters"),
        (tampered("pc"), "signature does not match its key"),
    ]:
        with pytest.raises(InvalidSigningRequest, match=re.escape(error)):
            ca.pair(code, bad)
    with pytest.raises(NameTaken, match="already named 'laptop'"):
        ca.pair(code, csr("laptop").encode())
    assert _signed_by(ca, ca.pair(code, csr("desktop").encode())["certificate"].encode())
    ca.revoke("laptop")  # a revoked name is free again: the same laptop, re-paired
    assert _signed_by(ca, ca.pair(ca.new_code(), csr("laptop").encode())["certificate"].encode())


@pytest.mark.parametrize("ttl", [-5, 0, pki.MAX_CODE_TTL_S + 1, 10**30])
def test_a_code_lifetime_out_of_range_is_refused(ca, ttl):
    with pytest.raises(PairingError, match="1 to 3600 seconds"):
        ca.new_code(ttl)


class Clock:
    """A wall clock the test moves: the CA's waits are measured by it, not slept through."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_wrong_codes_lock_pairing_then_the_lock_lifts(ca):
    ca.clock = clock = Clock()
    code = ca.new_code()
    used = ca.new_code()
    ca.pair(used, csr("first").encode())
    for _ in range(3):  # a spent code is not a guess
        with pytest.raises(PairingError, match="already used"):
            ca.pair(used, csr("again").encode())
    for _ in range(pki.MAX_WRONG_CODES):
        with pytest.raises(PairingError, match="unknown pairing code"):
            ca.pair("ZZZZ-ZZZZ", csr("guesser").encode())
    with pytest.raises(PairingLocked) as locked:  # even the right code waits
        ca.pair(code, csr("owner").encode())
    assert locked.value.status == 429 and locked.value.retry_after == pki.LOCKOUT_S
    clock.now += pki.LOCKOUT_S - 1
    with pytest.raises(PairingLocked):  # a second before the lock lifts: still locked
        ca.pair(code, csr("owner").encode())
    clock.now += 1.1
    assert ca.pair(code, csr("owner").encode())["certificate"]


def test_wrong_codes_spread_out_do_not_lock(ca):
    ca.clock = clock = Clock()
    code = ca.new_code()
    for _ in range(2):
        for _ in range(pki.MAX_WRONG_CODES - 1):
            with pytest.raises(PairingError, match="unknown pairing code"):
                ca.pair("ZZZZ-ZZZZ", csr("guesser").encode())
        clock.now += pki.WRONG_WINDOW_S + 0.1
    assert ca.pair(code, csr("owner").encode())["certificate"]


# -- through `appliance-ctl` and a running appliance -----------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """APPLIANCE_HOME of this module's server and `appliance-ctl` runs."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("appliance")
        mp.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def server(home) -> Iterator[Server]:
    with running_server("--no-advertise", "--no-discover", log_path=home / "server.log") as s:
        yield s


def ctl(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "appliance.ctl", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("ttl", ["-5", "0", "86400"])
def test_workers_pair_refuses_a_ttl_out_of_range(home, ttl):
    out, err = ctl("workers", "pair", "--ttl", ttl).communicate(timeout=120)
    assert out == "" and "error: a pairing code lives 1 to 3600 seconds" in err and "Traceback" not in err


CONCURRENT = full_or(20, 6)  # each `appliance-ctl` is a Python start-up: 20 take a minute of 2 cores


def test_concurrent_pairings(home, server):
    """20 (smoke: 6) `appliance-ctl workers pair` at once, as many workers redeeming at once, then each code again."""
    n = CONCURRENT
    runs = [ctl("workers", "pair") for _ in range(n)]
    outputs = [(run.communicate(timeout=300), run.returncode) for run in runs]
    assert [rc for _, rc in outputs] == [0] * n, outputs
    assert not [err for (out, err), _ in outputs if "Traceback" in out + err]
    codes = [out.strip() for (out, _), _ in outputs]
    assert len(set(codes)) == n and all(re.fullmatch(r"[A-Z2-9]{4}-[A-Z2-9]{4}", c) for c in codes), codes

    def redeem(i: int, code: str) -> Identity | str:
        try:
            return pair_with_appliance(code, server.url, f"device-{i}", home / "devices" / str(i))
        except PairingError as e:
            return str(e)

    with ThreadPoolExecutor(n) as pool:
        paired = list(pool.map(redeem, range(n), codes))
        again = list(pool.map(redeem, range(n, 2 * n), codes))
    ca = certificate_authority()
    assert all(isinstance(p, Identity) and _signed_by(ca, p.cert_pem) for p in paired), paired
    assert all(isinstance(r, str) and "already used" in r for r in again), again
    assert set(ca.workers()) == {f"device-{i}" for i in range(n)}
    assert "Traceback" not in (home / "server.log").read_text()


def test_refusals_over_http(home, server):
    """400 leaves the code usable, 409 for a taken name, 403 for a spent code, 429 + Retry-After when locked."""
    ca = certificate_authority()

    def post(code: str, request: str) -> httpx.Response:
        return httpx.post(server.url + PAIR_PATH, json={"code": code, "csr": request}, timeout=60)

    code = ca.new_code()
    for bad in ("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", csr("appliance"), csr("no/slashes")):
        refused = post(code, bad)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "pairing_refused"
    assert post(code, csr("laptop")).status_code == 200

    second = ca.new_code()
    taken = post(second, csr("laptop"))
    assert taken.status_code == 409 and "revoke laptop" in taken.json()["error"]["message"]
    assert post(second, csr("desktop")).status_code == 200
    spent = post(second, csr("tablet"))
    assert spent.status_code == 403 and "already used" in spent.json()["error"]["message"]

    waiting = ca.new_code()  # issued before the guessing: a new code would lift the lock
    for _ in range(pki.MAX_WRONG_CODES):
        assert post("ZZZZ-ZZZZ", csr("guesser")).status_code == 403
    locked = post(waiting, csr("phone"))
    assert locked.status_code == 429 and 0 < int(locked.headers["Retry-After"]) <= pki.LOCKOUT_S
    assert "too many wrong pairing codes" in locked.json()["error"]["message"]
    with pytest.raises(PairingError, match=r"try again in \d+ s"):
        pair_with_appliance(waiting, server.url, "phone", home / "phone")
    ca.new_code()  # the owner, at the appliance, lifts the lock; the waiting code was not spent by it
    assert isinstance(pair_with_appliance(waiting, server.url, "phone", home / "phone"), Identity)
    assert "Traceback" not in (home / "server.log").read_text()


def test_a_relay_that_swaps_the_signing_request_is_refused(ca, tmp_path):
    """Someone between the worker and the appliance (pairing cannot check the appliance's certificate yet)
    who reads the code can send the appliance their own signing request: the reply's MAC is then genuine,
    but the certificate is for their key. The worker refuses it rather than keep a certificate it cannot use
    and that lets the relay act as this worker."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class SwappingRelay(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps(ca.pair(body["code"], csr("laptop").encode())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    relay = ThreadingHTTPServer(("127.0.0.1", 0), SwappingRelay)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PairingError, match="for another key than this worker's"):
            pair_with_appliance(ca.new_code(), f"http://127.0.0.1:{relay.server_port}", "laptop", tmp_path / "w")
    finally:
        relay.shutdown()
        relay.server_close()
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").iterdir())  # nothing kept
