"""The worker's half of pairing: send the code and a signing request, keep the signed certificate."""

from __future__ import annotations

import hmac
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from offload.pki import Identity, PairingError, key_pem, new_key, pairing_mac, signing_request

PAIR_PATH = "/v1/offload/pair"


def pair_with_appliance(code: str, appliance: str | None, name: str, home: Path, timeout: float = 10.0) -> Identity:
    """Pair with the appliance at `appliance` (https://host:port, or http:// on a plain one; found by mDNS
    when None). Over HTTPS the appliance's certificate cannot be checked yet (its CA is what pairing
    brings): the reply is trusted by its MAC, keyed by the one-time code, as over plain HTTP."""
    if appliance is None:
        from offload.discovery import find_appliance

        appliance = find_appliance(timeout=5.0)
        if appliance is None:
            raise PairingError(
                "no appliance found on the LAN by mDNS: give its address with --appliance https://HOST:8000"
            )
    key = new_key()
    body = json.dumps({"code": code, "csr": signing_request(key, name).decode()}).encode()
    request = urllib.request.Request(
        appliance.rstrip("/") + PAIR_PATH, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        unverified = _unverified() if appliance.startswith("https:") else None
        with urllib.request.urlopen(request, timeout=timeout, context=unverified) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
        wait = f" (try again in {e.headers['Retry-After']} s)" if e.code == 429 and e.headers["Retry-After"] else ""
        raise PairingError(f"the appliance refused to pair: {_message(e)}{wait}") from e
    except (urllib.error.URLError, OSError) as e:
        raise PairingError(f"cannot reach the appliance at {appliance}: {e}") from e
    except ValueError as e:
        raise PairingError(f"the appliance at {appliance} did not answer in JSON: is it an appliance?") from e
    try:
        cert, ca = reply["certificate"].encode(), reply["ca"].encode()
    except (KeyError, TypeError, AttributeError) as e:
        raise PairingError(f"the appliance at {appliance} sent no certificate: is it an appliance?") from e
    if not hmac.compare_digest(reply.get("mac", ""), pairing_mac(code, cert, ca)):
        raise PairingError("the reply was not signed with this pairing code: is that really your appliance?")
    _check_issued_for(key, cert, ca)
    identity = Identity(key_pem(key), cert, ca)
    identity.save(home, "worker")
    return identity


def _check_issued_for(key, cert_pem: bytes, ca_pem: bytes) -> None:
    """The certificate must carry this worker's own public key and be signed by the CA sent with it: a
    certificate for someone else's key would let its holder act as this worker."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        cert, ca = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise PairingError(f"the appliance sent a certificate its CA did not sign: {e}") from e
    der = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*der) != key.public_key().public_bytes(*der):
        raise PairingError("the appliance sent a certificate for another key than this worker's")


def _message(e: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(e.read()).get("error")
        return error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return f"HTTP {e.code}"


def _unverified() -> ssl.SSLContext:
    """TLS that hides the code from the LAN without checking the appliance's certificate (pairing brings its CA)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context
