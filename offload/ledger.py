"""The contribution ledger: what each device of the home has computed for it, on the record.

An append-only file of JSON lines ($APPLIANCE_HOME/ledger.jsonl). Each entry carries a statement
the device made and signed with its pairing key (offload compute-seconds and hidden-state bytes since
its last statement; training rounds and examples), the device's certificate (issued by the
appliance's CA), the SHA-256 of the previous entry, and the appliance's signature over all of it.
Changing any byte of a past entry breaks its signatures (and the next entry's link); reordering
breaks the indices and links; forging a statement needs the device's key. `verify` names the first
entry that fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from models.files import file_lock
from offload.pki import APPLIANCE_NAME, Identity, certificate_name

GENESIS = "0" * 64  # the `prev` of the first entry
KINDS = {"offload": ("compute_s", "hidden_bytes"), "training": ("rounds", "examples")}


class LedgerError(Exception):
    """A statement or an entry that does not verify; the message names the entry."""


def canonical(obj: dict) -> bytes:
    """The bytes that are signed and hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sign(key_pem: bytes, data: bytes) -> str:
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def _check(cert: x509.Certificate, signature: str, data: bytes) -> bool:
    try:
        cert.public_key().verify(base64.b64decode(signature), data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Statement:
    """What a device says it did, signed by its key; `body` is canonical JSON."""

    body: bytes
    signature: str
    cert_pem: str

    @classmethod
    def make(cls, identity: Identity, kind: str, amounts: dict[str, float], since: float, seq: int) -> Statement:
        """The device's side: sign what it did since `since` (its own counters)."""
        if kind not in KINDS or set(amounts) != set(KINDS[kind]):
            raise ValueError(f"a {kind!r} statement takes {KINDS.get(kind)}")
        device = certificate_name(identity.certificate)
        body = canonical({"device": device, "kind": kind, **amounts, "since": since, "until": time.time(), "seq": seq})
        return cls(body, _sign(identity.key_pem, body), identity.cert_pem.decode())

    def checked(self, ca_pem: bytes) -> dict:
        """The statement's fields, once its certificate is the CA's for the device it names and its
        signature is that certificate's; LedgerError otherwise."""
        cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError) as e:
            raise LedgerError(f"the statement's certificate is not issued by this appliance's CA ({e})") from e
        fields = json.loads(self.body)
        if fields.get("device") != certificate_name(cert):
            raise LedgerError(f"a statement for {fields.get('device')!r} signed by {certificate_name(cert)!r}")
        if fields.get("kind") not in KINDS or not all(
            isinstance(fields.get(k), (int, float)) and fields[k] >= 0 for k in KINDS[fields["kind"]]
        ):
            raise LedgerError(f"a statement of unknown kind or negative amounts: {fields}")
        if not _check(cert, self.signature, self.body):
            raise LedgerError(f"the statement's signature is not {fields['device']}'s")
        return fields


def _entry_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class Ledger:
    """The file, appended to under an flock; `verify` re-checks it from the first entry."""

    def __init__(self, path: Path, appliance: Identity):
        self.path, self.appliance = Path(path), appliance

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines() if self.path.is_file() else []

    def append(self, statement: Statement) -> dict:
        """Check the device's statement, chain it after the last entry, sign, and append (fsync'd)."""
        fields = statement.checked(self.appliance.ca_pem)
        with file_lock(self.path.with_suffix(".lock")):
            lines = self.lines()
            entry = {
                "index": len(lines),
                "time": time.time(),
                "prev": _entry_hash(lines[-1]) if lines else GENESIS,
                "device": fields["device"],
                "statement": statement.body.decode(),
                "device_signature": statement.signature,
                "device_certificate": statement.cert_pem,
            }
            entry["appliance_signature"] = _sign(self.appliance.key_pem, canonical(entry))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:  # append-only: past entries are never rewritten
                f.write(canonical(entry) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return entry

    def entries(self) -> Iterator[dict]:
        for line in self.lines():
            yield json.loads(line)

    def verify(self) -> int:
        """The number of entries, all of them checked: index, link to the previous entry, the
        appliance's signature, the device's certificate and signature. LedgerError naming the first
        entry that fails."""
        appliance = self.appliance.certificate
        prev = GENESIS
        lines = self.lines()
        for at, line in enumerate(lines):
            where = f"ledger entry {at}"
            try:
                entry = json.loads(line)
                signature = entry.pop("appliance_signature")
                statement = Statement(
                    entry["statement"].encode(), entry["device_signature"], entry["device_certificate"]
                )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise LedgerError(f"{where}: not a ledger entry ({e}): the file was changed") from e
            if entry.get("index") != at:
                raise LedgerError(f"{where} says it is entry {entry.get('index')}: entries were reordered or removed")
            if entry.get("prev") != prev:
                raise LedgerError(f"{where}: its link to entry {at - 1} does not match: the history before it changed")
            if certificate_name(appliance) != APPLIANCE_NAME or not _check(appliance, signature, canonical(entry)):
                raise LedgerError(f"{where}: the appliance's signature does not verify: the entry was changed")
            try:
                fields = statement.checked(self.appliance.ca_pem)
            except (LedgerError, ValueError) as e:
                raise LedgerError(f"{where}: {e}") from e
            if fields["device"] != entry.get("device"):
                raise LedgerError(f"{where}: filed under {entry.get('device')!r}, signed by {fields['device']!r}")
            prev = _entry_hash(line)
        return len(lines)

    def shares(self) -> list[dict]:
        """Each device's totals and its share of all offload compute-seconds and training examples."""
        totals: dict[str, dict[str, float]] = {}
        for entry in self.entries():
            fields = json.loads(entry["statement"])
            row = totals.setdefault(fields["device"], {k: 0.0 for ks in KINDS.values() for k in ks})
            for k in KINDS[fields["kind"]]:
                row[k] += fields[k]
        compute = sum(r["compute_s"] for r in totals.values()) or 1.0
        examples = sum(r["examples"] for r in totals.values()) or 1.0
        return [
            {
                "device": name,
                **{k: round(v, 6) for k, v in row.items()},
                "compute_share": round(row["compute_s"] / compute, 4),
                "examples_share": round(row["examples"] / examples, 4),
            }
            for name, row in sorted(totals.items())
        ]


def ledger_path(home: Path) -> Path:
    """Where the appliance keeps it: beside the CA, in APPLIANCE_HOME."""
    return home / "ledger.jsonl"
