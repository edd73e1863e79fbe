"""The appliance's own certificate authority, pairing codes, and revocation (`cryptography`).

Pairing: the owner runs `appliance-ctl workers pair`, which prints a one-time code valid for a few
minutes. On the laptop, `appliance-worker --pair CODE` makes a key and a signing request and sends
them with the code to the appliance, which signs a certificate for the worker. From then on every
offload connection is mutual TLS under this CA; a revoked certificate's serial is refused.

The CA's state files (codes, issued and revoked certificates) are shared by the server and every
`appliance-ctl` process: each read-modify-write holds an flock on `pki.lock`, and each file is
replaced atomically, so concurrent pairings never lose or double-spend a code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from models.files import file_lock, write_atomic
from models.store import default_root

# Every worker certificate also carries this name, which clients verify: workers are reached by
# whatever address the LAN gives them, so the CA (not the address) is what proves who they are.
WORKER_SAN = "appliance-worker"
APPLIANCE_NAME = "appliance"  # the appliance's own certificate; pairing refuses it to devices
SERVER_NAME = "server"  # pki/server.{pem,key}: the certificate of the home-facing HTTPS and gRPC ports
SERVER_DAYS = 397  # a server certificate's life (the longest browsers take from public CAs) ...
SERVER_RENEW_DAYS = 30  # ... renewed when it has less than this left (at start-up, and while serving)
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
CODE_TTL_S = 300
MAX_CODE_TTL_S = 3600  # a code is for pairing a device now, not a standing invitation
# Brute force: after MAX_WRONG_CODES unknown codes within WRONG_WINDOW_S (from anyone), every
# redemption is refused for LOCKOUT_S: at most ~5 guesses per 2 minutes against 32^8 codes. A new
# code (the owner at the appliance) lifts the lockout, so a guesser cannot keep the owner from pairing.
MAX_WRONG_CODES, WRONG_WINDOW_S, LOCKOUT_S = 5, 60.0, 60.0
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a host name: it goes in the certificate's DNS name


class PairingError(Exception):
    """A pairing code or signing request was refused; the message says why. `status`: its HTTP status."""

    status = 403


class InvalidSigningRequest(PairingError):
    """The signing request itself is unusable (the code is not spent)."""

    status = 400


class NameTaken(PairingError):
    """Another paired (not revoked) device already has this name."""

    status = 409


class PairingLocked(PairingError):
    """Too many wrong codes lately: redemptions wait `retry_after` seconds."""

    status = 429

    def __init__(self, retry_after: int):
        super().__init__(f"too many wrong pairing codes: pairing is locked for {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """A private key, its certificate, and the CA that both sides trust, as PEM bytes."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, folder: Path, name: str) -> Identity | None:
        paths = [folder / f"{name}.key", folder / f"{name}.pem", folder / "ca.pem"]
        if not all(p.is_file() for p in paths):
            return None
        return cls(*(p.read_bytes() for p in paths))

    def save(self, folder: Path, name: str) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(folder / "ca.pem", self.ca_pem, mode=0o644)
        write_atomic(folder / f"{name}.pem", self.cert_pem, mode=0o644)
        write_atomic(folder / f"{name}.key", self.key_pem)  # last: `load` takes all three or none

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def signing_request(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def issue_identity(ca: CertificateAuthority, folder: Path, name: str) -> Identity:
    """A signed identity saved where a worker keeps it: pairing without the network, for tests and benchmarks."""
    key = new_key()
    identity = Identity(key_pem(key), ca.sign(signing_request(key, name)), ca.ca_pem)
    identity.save(folder, "worker")
    return identity


def pairing_mac(code: str, *parts: bytes) -> str:
    """Proof, keyed by the one-time code, that the reply came from the appliance that showed the code."""
    return hmac.new(_normalize(code).encode(), b"".join(parts), hashlib.sha256).hexdigest()


class CertificateAuthority:
    """Lives in APPLIANCE_HOME/pki: the CA key, the appliance's own client identity, codes, revocations."""

    def __init__(self, folder: Path, clock: Callable[[], float] = time.time):
        """clock: the wall clock codes and lockouts are measured by (tests move it instead of waiting)."""
        self.folder, self.clock = folder, clock
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():  # two first starts at once must not make two CAs
            if not (folder / "ca.key").is_file():
                self._create()
        self.key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        self.ca_pem = (folder / "ca.pem").read_bytes()
        self.cert = x509.load_pem_x509_certificate(self.ca_pem)

    def _create(self) -> None:
        key = new_key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("appliance CA"))
            .issuer_name(_name("appliance CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        write_atomic(self.folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        write_atomic(self.folder / "ca.key", key_pem(key))  # last: its presence means the CA is complete

    # -- certificates ------------------------------------------------------------------------
    def sign(self, csr_pem: bytes, days: int = 365, device: bool = True) -> bytes:
        """A certificate for the request's key and name; a device's is recorded for `workers list` and revoke."""
        csr, name = _read_request(csr_pem, device)
        if not device:
            return self._certificate(csr, name, days)
        with self._locked():
            return self._sign_device(csr, name, days)

    def _certificate(self, csr: x509.CertificateSigningRequest, name: str, days: int) -> bytes:
        sans = [x509.DNSName(WORKER_SAN), x509.DNSName(name)]
        return self._build(csr.public_key(), name, days, sans).public_bytes(serialization.Encoding.PEM)

    def _build(self, public_key, name: str, days: int, sans: list, server_only: bool = False) -> x509.Certificate:
        """A certificate under this CA: devices' serve and dial (mutual TLS), the home-facing server's only serves."""
        now = self._clock_now()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([] if server_only else [ExtendedKeyUsageOID.CLIENT_AUTH])
        return (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), False)
            .add_extension(x509.ExtendedKeyUsage(usages), False)
            .sign(self.key, hashes.SHA256())
        )

    def _clock_now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)

    def _sign_device(self, csr: x509.CertificateSigningRequest, name: str, days: int) -> bytes:
        """Sign and record (the caller holds the lock)."""
        cert = self._certificate(csr, name, days)
        issued = self._json("issued.json")
        entry = issued.setdefault(name, {"serials": [], "paired": self.clock()})
        entry["serials"].append(str(x509.load_pem_x509_certificate(cert).serial_number))
        self._save_json("issued.json", issued)
        return cert

    def identity(self, name: str = APPLIANCE_NAME) -> Identity:
        """This appliance's own certificate (it is the client of every worker), made once."""
        with self._locked():
            existing = Identity.load(self.folder, name)
            if existing:
                return existing
            key = new_key()
            cert = self.sign(signing_request(key, name), days=3650, device=False)
            ident = Identity(key_pem(key), cert, self.ca_pem)
            ident.save(self.folder, name)
            return ident

    def server_identity(
        self, dns_names: list[str], ip_addresses: list[str], renew_days: float = SERVER_RENEW_DAYS
    ) -> tuple[Identity, bool]:
        """The home-facing server's certificate, for these names and addresses (pki/server.*), and whether
        it was just issued: a new one when there is none, when it expires within `renew_days` (by this
        CA's clock), or when it lacks a name or address the appliance is now reached by."""
        wanted = _san_entries(dns_names, ip_addresses)
        with self._locked():
            existing = Identity.load(self.folder, SERVER_NAME)
            if existing is not None and existing.ca_pem == self.ca_pem:
                cert = existing.certificate
                left = cert.not_valid_after_utc - self._clock_now()
                names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
                if left > dt.timedelta(days=renew_days) and set(wanted) <= names:
                    return existing, False
            key = new_key()
            cert = self._build(key.public_key(), "appliance server", SERVER_DAYS, wanted, server_only=True)
            ident = Identity(key_pem(key), cert.public_bytes(serialization.Encoding.PEM), self.ca_pem)
            ident.save(self.folder, SERVER_NAME)
            return ident, True

    def issue_client(self, name: str, folder: Path) -> Identity:
        """A key and certificate for a device that administers the appliance (`--admin-mtls`), recorded
        like a paired device's so `workers revoke NAME` ends it; saved as folder/admin.{pem,key} + ca.pem."""
        key = new_key()
        csr, name = _read_request(signing_request(key, name), device=True)
        with self._locked():
            if self._in_use(name):
                raise NameTaken(f"a paired device is already named {name!r}: give this one another name")
            cert = self._sign_device(csr, name, 365)
        identity = Identity(key_pem(key), cert, self.ca_pem)
        identity.save(folder, "admin")
        return identity

    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), as browsers and `openssl x509 -fingerprint -sha256` show it."""
        return ":".join(f"{b:02X}" for b in self.cert.fingerprint(hashes.SHA256()))

    # -- pairing codes -----------------------------------------------------------------------
    def new_code(self, ttl_s: int = CODE_TTL_S) -> str:
        if not 1 <= ttl_s <= MAX_CODE_TTL_S:
            raise PairingError(f"a pairing code lives 1 to {MAX_CODE_TTL_S} seconds; {ttl_s} is out of range")
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
        with self._locked():
            state, now = self._codes(), self.clock()
            # Spent and expired codes are kept a while, so that their use is refused with the right reason.
            state["codes"] = {h: c for h, c in state["codes"].items() if c["expires"] > now - MAX_CODE_TTL_S}
            state["codes"][_digest(code)] = {"expires": now + ttl_s, "used": False}
            state["wrong"], state["locked_until"] = [], 0.0  # the owner is here: a guesser's lockout ends
            self._save_json("codes.json", state)
        return f"{code[:4]}-{code[4:]}"

    def pair(self, code: str, csr_pem: bytes) -> dict[str, str]:
        """Sign a new device's request for a live code. The code is spent only when signing succeeds:
        a bad request (400) or a taken name (409) leaves it usable."""
        with self._locked():
            state = self._codes()
            entry = self._live_code(state, code)
            csr, name = _read_request(csr_pem, device=True)
            if self._in_use(name):
                raise NameTaken(
                    f"a paired device is already named {name!r}: give this one another name, "
                    f"or revoke the old one first (appliance-ctl workers revoke {name})"
                )
            # The code is spent on disk before the device is recorded: a crash between the two leaves a
            # spent code and no device (the owner makes a new code), never one code good for two devices.
            entry["used"] = True
            self._save_json("codes.json", state)
            cert = self._sign_device(csr, name, 365)
        return {"certificate": cert.decode(), "ca": self.ca_pem.decode(), "mac": pairing_mac(code, cert, self.ca_pem)}

    def _live_code(self, state: dict, code: str) -> dict:
        """The unused, unexpired entry of `code` (the caller holds the lock); unknown codes count towards lockout."""
        now = self.clock()
        if state["locked_until"] > now:
            raise PairingLocked(math.ceil(state["locked_until"] - now))
        entry = state["codes"].get(_digest(_normalize(code)))
        if entry is None:
            state["wrong"] = [t for t in state["wrong"] if t > now - WRONG_WINDOW_S] + [now]
            if len(state["wrong"]) >= MAX_WRONG_CODES:
                state["locked_until"], state["wrong"] = now + LOCKOUT_S, []
            self._save_json("codes.json", state)
            raise PairingError("unknown pairing code: run `appliance-ctl workers pair` for a new one")
        if entry["used"]:
            raise PairingError("this pairing code was already used: each code pairs one worker")
        if entry["expires"] < now:
            raise PairingError("this pairing code has expired: run `appliance-ctl workers pair` for a new one")
        return entry

    def _codes(self) -> dict:
        """codes.json: {"codes": {digest: {"expires", "used"}}, "wrong": [times of unknown codes], "locked_until"}."""
        saved = self._json("codes.json")
        return {k: saved.get(k, empty) for k, empty in (("codes", {}), ("wrong", []), ("locked_until", 0.0))}

    # -- the paired devices and revocation ---------------------------------------------------
    def workers(self) -> dict[str, dict]:
        return self._json("issued.json")

    def revoke(self, name: str) -> int:
        with self._locked():
            issued = self.workers()
            if name not in issued:
                raise PairingError(f"no paired device is named {name!r}; paired: {', '.join(sorted(issued)) or 'none'}")
            revoked = self._json("revoked.json")
            for serial in issued[name]["serials"]:
                revoked[str(serial)] = name
            self._save_json("revoked.json", revoked)
        return len(issued[name]["serials"])

    def revoked_serials(self) -> set[int]:
        return {int(s) for s in self._json("revoked.json")}

    def _in_use(self, name: str) -> bool:
        """A device of this name holds a certificate that is not revoked."""
        serials = {int(s) for s in self.workers().get(name, {}).get("serials", [])}
        return bool(serials - self.revoked_serials())

    # -- the state files ---------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Held around every read-modify-write of the state files, against this and every other process.
        Not reentrant: methods that need it take it once, and call helpers that assume it."""
        with file_lock(self.folder / "pki.lock"):
            yield

    def _json(self, file: str) -> dict:
        path = self.folder / file
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_json(self, file: str, data: dict) -> None:
        write_atomic(self.folder / file, json.dumps(data, indent=1).encode())


def certificate_authority() -> CertificateAuthority:
    """This appliance's CA: APPLIANCE_HOME/pki (beside the model store), made on first use."""
    return CertificateAuthority(default_root().parent / "pki")


def certificate_name(cert: x509.Certificate) -> str:
    """The device (or appliance) a certificate was signed for: its common name."""
    return cert.subject.rfc4514_string().removeprefix("CN=")


def _san_entries(dns_names: list[str], ip_addresses: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names, each once, in the order given."""
    entries: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
    entries += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(ip_addresses)]
    return entries


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _normalize(code: str) -> str:
    return code.replace("-", "").replace(" ", "").upper()


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _read_request(csr_pem: bytes, device: bool) -> tuple[x509.CertificateSigningRequest, str]:
    """A signing request whose signature holds, and the device name it asks for."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InvalidSigningRequest(f"not a usable PEM certificate signing request ({e})") from e
    if not valid:
        raise InvalidSigningRequest("the signing request's signature does not match its key")
    if len(names) != 1:
        raise InvalidSigningRequest("the signing request must carry exactly one common name (the device's name)")
    name = str(names[0].value)
    if not DEVICE_NAME.fullmatch(name):
        raise InvalidSigningRequest(
            f"the device name {name!r} must be 1 to 64 letters, digits, '.', '-' or '_' (like a host name)"
        )
    if device and name == APPLIANCE_NAME:  # workers take the appliance's word on revocations
        raise InvalidSigningRequest(f"{APPLIANCE_NAME!r} is the appliance's own name; give the device another")
    return csr, name
