"""The appliance's own certificate authority, pairing codes, and revocation (`cryptography`).

Pairing: the owner runs `appliance-ctl workers pair`, which prints a one-time code valid for a few
minutes. On the laptop, `appliance-worker --pair CODE` makes a key and a signing request and sends
them with the code to the appliance, which signs a certificate for the worker. From then on every
offload connection is mutual TLS under this CA; a revoked certificate's serial is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every worker certificate also carries this name, which clients verify: workers are reached by
# whatever address the LAN gives them, so the CA (not the address) is what proves who they are.
WORKER_SAN = "appliance-worker"
APPLIANCE_NAME = "appliance"  # the appliance's own certificate; pairing refuses it to devices
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
CODE_TTL_S = 300


class PairingError(Exception):
    """A pairing code or signing request was refused; the message says why."""


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
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(folder / f"{name}.key", self.key_pem)
        (folder / f"{name}.pem").write_bytes(self.cert_pem)
        (folder / "ca.pem").write_bytes(self.ca_pem)

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

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
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
        _write_private(self.folder / "ca.key", key_pem(key))
        (self.folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # -- certificates ------------------------------------------------------------------------
    def sign(self, csr_pem: bytes, days: int = 365, device: bool = True) -> bytes:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise PairingError(f"not a PEM certificate signing request ({e})") from e
        if not csr.is_signature_valid:
            raise PairingError("the signing request's signature does not match its key")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if not name or len(name) > 64:
            raise PairingError("the signing request needs a common name of 1 to 64 characters")
        if device and name == APPLIANCE_NAME:  # workers take the appliance's word on revocations
            raise PairingError(f"{APPLIANCE_NAME!r} is the appliance's own name; give the device another")
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(WORKER_SAN), x509.DNSName(name)]), False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
            .sign(self.key, hashes.SHA256())
        )
        if device:
            self._record(name, cert.serial_number)
        return cert.public_bytes(serialization.Encoding.PEM)

    def identity(self, name: str = APPLIANCE_NAME) -> Identity:
        """This appliance's own certificate (it is the client of every worker), made once."""
        existing = Identity.load(self.folder, name)
        if existing:
            return existing
        key = new_key()
        ident = Identity(key_pem(key), self.sign(signing_request(key, name), days=3650, device=False), self.ca_pem)
        ident.save(self.folder, name)
        return ident

    # -- pairing codes -----------------------------------------------------------------------
    def new_code(self, ttl_s: int = CODE_TTL_S) -> str:
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
        codes = self._json("codes.json")
        codes = {h: c for h, c in codes.items() if c["expires"] > time.time()}
        codes[_digest(code)] = {"expires": time.time() + ttl_s, "used": False}
        self._save_json("codes.json", codes)
        return f"{code[:4]}-{code[4:]}"

    def redeem(self, code: str) -> None:
        """Accept a code once, before it expires; otherwise say which of the two it is."""
        codes = self._json("codes.json")
        entry = codes.get(_digest(_normalize(code)))
        if entry is None:
            raise PairingError("unknown pairing code: run `appliance-ctl workers pair` for a new one")
        if entry["used"]:
            raise PairingError("this pairing code was already used: each code pairs one worker")
        if entry["expires"] < time.time():
            raise PairingError("this pairing code has expired: run `appliance-ctl workers pair` for a new one")
        entry["used"] = True
        self._save_json("codes.json", codes)

    def pair(self, code: str, csr_pem: bytes) -> dict[str, str]:
        self.redeem(code)
        cert = self.sign(csr_pem)
        return {"certificate": cert.decode(), "ca": self.ca_pem.decode(), "mac": pairing_mac(code, cert, self.ca_pem)}

    # -- the paired devices and revocation ---------------------------------------------------
    def workers(self) -> dict[str, dict]:
        return self._json("issued.json")

    def revoke(self, name: str) -> int:
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

    def _record(self, name: str, serial: int) -> None:
        issued = self._json("issued.json")
        entry = issued.setdefault(name, {"serials": [], "paired": time.time()})
        entry["serials"].append(str(serial))
        self._save_json("issued.json", issued)

    def _json(self, file: str) -> dict:
        path = self.folder / file
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_json(self, file: str, data: dict) -> None:
        tmp = self.folder / f".{file}.tmp"
        _write_private(tmp, json.dumps(data, indent=1).encode())
        os.replace(tmp, self.folder / file)


def certificate_name(cert: x509.Certificate) -> str:
    """The device (or appliance) a certificate was signed for: its common name."""
    return cert.subject.rfc4514_string().removeprefix("CN=")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _normalize(code: str) -> str:
    return code.replace("-", "").replace(" ", "").upper()


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
