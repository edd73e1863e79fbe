"""OpenAI's /v1/embeddings: each input's pooled, unit-length hidden state (models.engine.Embedding),
computed on the scheduler like every other forward pass, all inputs of a request admitted together.

Inputs as OpenAI takes them: a string, a list of strings, a list of token ids, or a list of such
lists; `encoding_format` float or base64 (little-endian float32, as OpenAI sends it).
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from appliance.serving.auth import authorize
from appliance.serving.disconnect import unless_client_leaves
from appliance.serving.fields import Text
from appliance.serving.openai_api import OpenAIError, check_model
from appliance.serving.scheduler import drain
from appliance.serving.state import ServerState, server_state
from models.engine import Embedding
from models.errors import ContextLengthError

MAX_INPUTS = 32  # per request; each is one scheduler job


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, ...) are accepted and ignored

    model: Text
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
State = Annotated[ServerState, Depends(server_state)]


def _token_lists(state: ServerState, given: str | list) -> list[list[int]]:
    """Each input as token ids (a text is tokenized; ids are checked against the vocabulary)."""
    if isinstance(given, str) or (given and all(isinstance(x, int) for x in given)):
        given = [given]
    if not given:
        raise OpenAIError(400, "input must not be empty", param="input")
    if len(given) > MAX_INPUTS:
        raise OpenAIError(400, f"input takes at most {MAX_INPUTS} items, got {len(given)}", param="input")
    vocab = state.engine.model.config.vocab_size
    lists = []
    for item in given:
        ids = state.engine.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise OpenAIError(400, "an input is empty", param="input")
        if min(ids) < 0 or max(ids) >= vocab:
            raise OpenAIError(400, f"token ids must be in [0, {vocab})", param="input")
        lists.append(ids)
    return lists


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest, state: State) -> dict:
    check_model(state, body.model)
    dim = state.engine.model.config.dim
    if body.dimensions not in (None, dim):
        raise OpenAIError(400, f"this model's embeddings have {dim} dimensions", param="dimensions")
    try:
        jobs: list[Embedding] = [state.engine.embed(ids) for ids in _token_lists(state, body.input)]
    except ContextLengthError as e:
        raise OpenAIError(400, str(e), param="input", code="context_length_exceeded") from e
    await unless_client_leaves(request, drain(state.scheduler.streams(jobs)))
    data = []
    for i, job in enumerate(jobs):
        vector = job.vector
        assert vector is not None  # the stream ended without error: the job finished
        if body.encoding_format == "base64":
            value: str | list[float] = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        else:
            value = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(job.prompt_tokens for job in jobs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": state.model_name, "usage": usage}
