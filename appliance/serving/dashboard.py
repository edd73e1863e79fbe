"""The home dashboard at /ui: one static page (package data, no build step, no CDN) and the summary it polls.

The page is public (it holds no data); what it shows comes from /ui/summary, which takes an API key,
and its chat box streams from /v1/chat/completions with the same key.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from appliance.serving.admin import summary
from appliance.serving.auth import authorize
from appliance.serving.state import ServerState, server_state

router = APIRouter(prefix="/ui", include_in_schema=False)
PAGE = resources.files("appliance.serving").joinpath("ui/dashboard.html")


@router.get("")
def page() -> HTMLResponse:
    # no-store: a new version of the appliance serves its new page at once
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})


@router.get("/summary", dependencies=[Depends(authorize)])
def dashboard_summary(request: Request, state: Annotated[ServerState, Depends(server_state)]) -> dict:
    return summary(state, request.app.state.kserve)
