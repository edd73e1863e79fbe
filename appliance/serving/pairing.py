"""The pairing endpoint: a worker redeems a one-time code (from `appliance-ctl workers pair`) for a
certificate signed by the appliance's CA. No API key: the code is the credential."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from appliance.serving.openai_api import OpenAIError
from appliance.startup import certificate_authority
from offload.pairing import PAIR_PATH
from offload.pki import PairingError

router = APIRouter(include_in_schema=False)


class PairRequest(BaseModel):
    code: str = Field(max_length=32)
    csr: str = Field(max_length=8192)


@router.post(PAIR_PATH)
async def pair(body: PairRequest) -> dict:
    try:
        return certificate_authority().pair(body.code, body.csr.encode())
    except PairingError as e:
        raise OpenAIError(403, str(e), code="pairing_refused") from e
