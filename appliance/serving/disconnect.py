"""Work for a plain (non-streaming) HTTP request stops when its client leaves.

Streaming responses notice a client that left at their next write; a plain request writes nothing
until the end, so it waits for the ASGI `http.disconnect` message beside the work itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientLeft(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (the request's body must already be read); cancel it if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # the work's own finally blocks cancel its generations
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientLeft
