"""The pairing endpoint: a worker redeems a one-time code (from `appliance-ctl workers pair`) for a
certificate signed by the appliance's CA. No API key: the code is the credential."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from appliance.serving.openai_api import OpenAIError
from offload.pairing import PAIR_PATH
from offload.pki import PairingError, PairingLocked, certificate_authority

router = APIRouter(include_in_schema=False)


class PairRequest(BaseModel):
    code: str = Field(max_length=32)
    csr: str = Field(max_length=8192)


@router.post(PAIR_PATH)
def pair(body: PairRequest) -> dict:
    """403 for a refused code, 400 for an unusable signing request, 409 for a taken name, 429 while locked.
    A plain `def`: FastAPI runs it on a thread, so waiting on the CA's file lock never stalls the event loop."""
    try:
        return certificate_authority().pair(body.code, body.csr.encode())
    except PairingError as e:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, PairingLocked) else None
        raise OpenAIError(e.status, str(e), code="pairing_refused", headers=headers) from e
