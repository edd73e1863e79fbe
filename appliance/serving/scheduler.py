"""Continuous batching: one thread runs decode steps over every active request at once.

Between two steps requests join (from a bounded queue) and leave (finished or cancelled), so a new
request waits for at most one step, not for others to finish. A step runs each active request's
next input through the model in one batch: one token for a decoding request, a chunk of the prompt
for one still prefilling, within a per-step token budget so a long prompt does not stall the
tokens of the others.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.serving.metrics import Metrics
from models.engine import Engine, Generation


class QueueFullError(Exception):
    """Too many requests waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Event:
    kind: str  # "text", "done" or "error"
    text: str = ""


@dataclass
class Ticket:
    """One request inside the scheduler; `cancel()` frees its slot and cache at the next step."""

    generation: Generation
    deliver: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class TokenStream:
    """The text pieces of one submitted generation, for asyncio servers."""

    def __init__(self, ticket: Ticket, queue: asyncio.Queue[Event]):
        self.ticket, self.queue = ticket, queue

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        event = await self.queue.get()
        if event.kind == "text":
            return event.text
        if event.kind == "error":
            raise RuntimeError(event.text)
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop generating (a no-op once done): frees the batch slot and the KV cache at the next step."""
        self.ticket.cancel()


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 16,
        max_queue: int = 64,
        step_tokens: int = 256,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.metrics = metrics or Metrics()
        if engine.offload is not None:
            self.metrics.watch_offload(engine.offload)
        self.max_batch, self.max_queue, self.step_tokens = max_batch, max_queue, step_tokens
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.active: list[Ticket] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, generation: Generation, deliver: Callable[[Event], None]) -> Ticket:
        ticket = Ticket(generation, deliver)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(len(self.waiting))
            self.waiting.append(ticket)
            self._wake.notify()
        return ticket

    def stream(self, generation: Generation) -> TokenStream:
        """Submit now (QueueFullError before any reply is sent); iterate the result for text pieces."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        return TokenStream(self.submit(generation, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e)), queue)

    # --- the scheduling thread ---

    def _admit(self) -> None:
        with self._wake:
            while not self._stopped and not self.active and not self.waiting:
                self._wake.wait()
            for t in self.active:
                if t.cancelled.is_set() and not t.generation.done:  # a client that left: free its workers' caches
                    self.engine.release(t.generation.session)
            self.active = [t for t in self.active if not t.cancelled.is_set()]
            self.waiting = collections.deque(t for t in self.waiting if not t.cancelled.is_set())
            while self.waiting and len(self.active) < self.max_batch:
                ticket = self.waiting.popleft()
                self.metrics.queue_seconds.observe(time.monotonic() - ticket.submitted)
                self.active.append(ticket)
            self.metrics.active.set(len(self.active))
            self.metrics.kv_bytes.set(sum(t.generation.session.nbytes for t in self.active))
            self.metrics.waiting.set(len(self.waiting))

    def _plan_step(self) -> list[tuple[Ticket, list[int]]]:
        """Each decoding request gets its one token; prefilling ones share what is left of the budget."""
        budget = self.step_tokens - sum(1 for t in self.active if t.generation.prompt_done)
        step = []
        for t in self.active:
            if t.generation.prompt_done:
                step.append((t, t.generation.next_input()))
            elif budget > 0:
                ids = t.generation.next_input(prefill_chunk=budget)
                budget -= len(ids)
                step.append((t, ids))
        return step

    def _run(self) -> None:
        while True:
            self._admit()
            if self._stopped:
                return
            step = self._plan_step()
            if not step:
                continue
            started = time.monotonic()
            try:
                logits = self.engine.next_logits_batch(
                    [ids for _, ids in step], [t.generation.session for t, _ in step]
                )
            except Exception as e:  # a fault in one step must not take the server down
                for t, _ in step:
                    t.deliver(Event("error", f"generation failed: {e}"))
                    t.cancel()
                continue
            now = time.monotonic()
            m = self.metrics
            m.step_seconds.observe(now - started)
            m.batch_size.observe(len(step))
            m.kv_bytes.set(sum(t.generation.session.nbytes for t in self.active))
            for (t, ids), row in zip(step, logits, strict=True):
                had_tokens = t.generation.completion_tokens
                piece = t.generation.advance(len(ids), row)
                if t.generation.completion_tokens > had_tokens:
                    m.tokens.inc()
                    if t.first_token_at is None:
                        t.first_token_at = now
                        m.ttft_seconds.observe(now - t.submitted)
                if piece:
                    t.deliver(Event("text", piece))
                if t.generation.done:
                    m.finished.labels(t.generation.finish_reason).inc()
                    t.deliver(Event("done", t.generation.finish_reason or "stop"))
                    t.cancel()
