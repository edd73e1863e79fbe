"""Continuous batching: one thread runs every piece of model work, a step over all active requests at once.

Between two steps requests join (from a bounded queue) and leave (finished or cancelled), so a new
request waits for at most one step, not for others to finish. A step runs each active job's next
input through the model in one batch: one token for a decoding generation, a chunk of the prompt
for one still prefilling or for a scoring request (KServe `NAME-logits`). While any request is
decoding, prompt chunks are sized from measured step times so that a step takes at most
`prefill_slowdown` times a decode-only one: a prompt of any length slows the streams beside it by
that factor, never stalls them.

The thread never dies of a request: a step that raises fails only the requests in it (each gets an
error event), and anything else that raises fails the active requests and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from appliance.serving.metrics import Metrics
from kernels.backend import describe
from models.engine import Engine
from models.llama import Session
from models.memory import release_memory
from models.sampling import Draw

log = logging.getLogger("appliance")
BROKEN_AFTER = 3  # failed steps in a row (and none served since) before the engine counts as unable to serve
MIN_CHUNK = 8  # prompt ids a prefilling job gets per step at least, however busy: every prompt advances
SMOOTHING = 0.3  # weight of the newest step in the running step-time estimates


class Job(Protocol):
    """What the scheduler steps: models.engine's Generation (sampled text), Scoring (the next token's
    logits) or Embedding (pooled hidden states): each takes the logits and hidden states of its ids."""

    session: Session
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int | None
    prompt_done: bool
    done: bool

    def next_input(self, prefill_chunk: int | None = None) -> list[int]: ...
    def draw(self) -> Draw | None: ...  # this step's token may be chosen on the device (Engine.step_drawing)
    def advance(
        self, n_fed: int, logits: np.ndarray | None, hidden: np.ndarray | None = None, token: int | None = None
    ) -> str: ...


class QueueFullError(Exception):
    """Too many requests waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class GenerationError(Exception):
    """A generation failed on the server's side (its step raised); the message says why."""


@dataclass
class Event:
    kind: str  # "text", "done" or "error"
    text: str = ""


@dataclass
class Ticket:
    """One request inside the scheduler; `cancel()` (its client left) frees its slot and cache at the next step."""

    job: Job
    deliver: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when it joined the batch (monotonic, as the others)
    first_token_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    closed: bool = False  # finished or failed: the scheduler is done with it
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # for `appliance-ctl sessions`

    def cancel(self) -> None:
        self.cancelled.set()


class TokenStream:
    """The text pieces of one submitted job, for asyncio servers (none for a scoring); a failure raises
    GenerationError."""

    def __init__(self, ticket: Ticket, queue: asyncio.Queue[Event]):
        self.ticket, self.queue = ticket, queue

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        event = await self.queue.get()
        if event.kind == "text":
            return event.text
        if event.kind == "error":
            raise GenerationError(event.text)
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop generating (a no-op once done): frees the batch slot and the KV cache at the next step."""
        self.ticket.cancel()


async def drain(streams: list[TokenStream]) -> None:
    """Run streams to their end (a plain request's answer is read from its jobs after); if the awaiting
    task is cancelled (its client left), the generations stop too."""
    try:
        for stream in streams:
            async for _ in stream:
                pass
    finally:
        for stream in streams:
            stream.cancel()


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 16,
        max_queue: int = 64,
        step_tokens: int = 256,
        metrics: Metrics | None = None,
        prefill_slowdown: float = 3.0,
    ):
        """step_tokens: ids one step may run at most; prefill_slowdown: how much longer than a decode-only
        step a step with prompt chunks may take while requests are decoding."""
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.metrics.backend.info({"name": engine.model.backend.name, "description": describe(engine.model.backend)})
        if engine.offload is not None:
            self.metrics.watch_offload(engine.offload)
        if engine.prefix_cache is not None:
            self.metrics.watch_prefix_cache(engine.prefix_cache)
        self.max_batch, self.max_queue, self.step_tokens = max_batch, max_queue, step_tokens
        self.prefill_slowdown = prefill_slowdown
        self.decode_step_s: float | None = None  # running estimate of a decode-only step
        self.prefill_token_s: float | None = None  # ... and of what each prompt id adds to a step
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.active: list[Ticket] = []
        self.failed_steps = 0  # in a row
        self._wake = threading.Condition()
        self._stopped = False
        self._busy_since_trim = False
        self._unload = False  # unload_when_idle was asked
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    @property
    def ready(self) -> bool:
        """Whether requests can be served: the thread runs and the engine has not failed step after step."""
        return self._thread.is_alive() and not self._stopped and self.failed_steps < BROKEN_AFTER

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=timeout)

    def unload_when_idle(self) -> None:
        """Free the model's weights once no request runs or waits (Ollama's keep_alive 0); the next request's
        first step loads them again."""
        with self._wake:
            self._unload = True
            self._wake.notify()

    def submit(self, job: Job, deliver: Callable[[Event], None]) -> Ticket:
        return self.submit_all([(job, deliver)])[0]

    def submit_all(self, requests: list[tuple[Job, Callable[[Event], None]]]) -> list[Ticket]:
        """Queue several jobs (one request's n choices) together, or none of them."""
        tickets = [Ticket(g, deliver) for g, deliver in requests]
        with self._wake:
            if len(self.waiting) + len(tickets) > self.max_queue:
                raise QueueFullError(len(self.waiting))
            self.waiting.extend(tickets)
            self._wake.notify()
        return tickets

    def streams(self, jobs: list[Job]) -> list[TokenStream]:
        """Submit now, all or none (QueueFullError before any reply is sent); iterate each for text pieces."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in jobs]

        def deliverer(queue: asyncio.Queue[Event]) -> Callable[[Event], None]:
            def deliver(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is going down
                    loop.call_soon_threadsafe(queue.put_nowait, event)

            return deliver

        tickets = self.submit_all([(g, deliverer(q)) for g, q in zip(jobs, queues, strict=True)])
        return [TokenStream(t, q) for t, q in zip(tickets, queues, strict=True)]

    def stream(self, job: Job) -> TokenStream:
        return self.streams([job])[0]

    # --- the scheduling thread ---

    def _leave(self, ticket: Ticket) -> None:
        """A ticket leaves the batch: its caches go, here and on workers."""
        if not ticket.job.done:
            self.engine.release(ticket.job.session)
        ticket.job.session.caches.clear()

    def _admit(self) -> None:
        with self._wake:
            while not self._stopped and not self.active and not self.waiting:
                if self._unload:  # on this thread, between steps: nothing can be using the weights
                    self._unload = False
                    self.engine.unload()
                    release_memory()
                    continue
                if self._busy_since_trim:  # idle after work: return the burst's memory
                    self._busy_since_trim = False
                    release_memory()
                    continue
                self._wake.wait()
            self._busy_since_trim = True
            for t in self.active + list(self.waiting):
                if t.cancelled.is_set() and not t.closed:  # a client that left
                    self.metrics.cancelled.inc()
                    t.closed = True
                    self._leave(t)
            self.active = [t for t in self.active if not t.closed]
            self.waiting = collections.deque(t for t in self.waiting if not t.closed)
            while self.waiting and len(self.active) < self.max_batch:
                ticket = self.waiting.popleft()
                ticket.admitted_at = time.monotonic()
                self.metrics.queue_seconds.observe(ticket.admitted_at - ticket.submitted)
                self.active.append(ticket)
            self.metrics.active.set(len(self.active))
            self.metrics.kv_bytes.set(sum(t.job.session.nbytes for t in self.active))
            self.metrics.waiting.set(len(self.waiting))

    def _fail(self, tickets: list[Ticket], error: BaseException) -> None:
        log.error("generation failed: %r", error, exc_info=error)
        for t in tickets:
            if t.closed:
                continue
            t.closed = True
            self.metrics.failed.inc()
            t.deliver(Event("error", f"generation failed: {error}"))
            self._leave(t)

    def _prefill_budget(self, decoding: int) -> int:
        """Prompt ids this step may run: all of step_tokens when no one decodes; else as many as fit in
        (prefill_slowdown - 1) decode steps' time, by the running estimates (MIN_CHUNK until measured)."""
        room = self.step_tokens - decoding
        if not decoding:
            return room
        if self.decode_step_s is None or not self.prefill_token_s:
            return min(MIN_CHUNK, room)
        fits = (self.prefill_slowdown - 1) * self.decode_step_s / self.prefill_token_s
        return min(max(int(fits), MIN_CHUNK), room)

    def _measured(self, seconds: float, decoding: int, prefilled: int) -> None:
        """Update the running step-time estimates with one step's time."""

        def blend(old: float | None, new: float) -> float:
            return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

        if not prefilled:
            self.decode_step_s = blend(self.decode_step_s, seconds)
        else:
            decode = (self.decode_step_s or 0.0) if decoding else 0.0  # the share of the step's decode rows
            self.prefill_token_s = blend(self.prefill_token_s, max(seconds - decode, 0.1 * seconds) / prefilled)

    def _plan_step(self) -> list[tuple[Ticket, list[int]]]:
        """Each decoding request gets its one token; prefilling ones share the prefill budget in turn."""
        decoding = sum(1 for t in self.active if t.job.prompt_done)
        budget = self._prefill_budget(decoding)
        step = []
        for t in self.active:
            if t.job.prompt_done:
                step.append((t, t.job.next_input()))
            elif budget > 0:
                ids = t.job.next_input(prefill_chunk=budget)
                budget -= len(ids)
                step.append((t, ids))
        return step

    def _run(self) -> None:
        while True:
            try:
                self._admit()
                if self._stopped:
                    break
                self._step()
            except Exception as e:  # a bug outside any one step: fail what is running, keep serving
                try:
                    self._fail(self.active, e)
                except Exception:
                    log.exception("failing the active requests failed too")
                    self.active = []
        self._fail(self.active + list(self.waiting), RuntimeError("the server is shutting down"))

    def _step(self) -> None:
        step = self._plan_step()
        if not step:
            return
        started = time.monotonic()
        decoding = sum(1 for t, _ in step if t.job.prompt_done)
        try:
            logits, tokens, hiddens = self.engine.step_drawing(
                [ids for _, ids in step], [t.job.session for t, _ in step], [t.job.draw() for t, _ in step]
            )
        except Exception as e:  # the step's requests fail; the others, and later ones, go on
            self.failed_steps += 1
            self._fail([t for t, _ in step], e)
            return
        self.failed_steps = 0
        now = time.monotonic()
        self._measured(now - started, decoding, sum(len(ids) for _, ids in step) - decoding)
        m = self.metrics
        m.step_seconds.observe(now - started)
        m.batch_size.observe(len(step))
        m.kv_bytes.set(sum(t.job.session.nbytes for t in self.active))
        for (t, ids), row, token, hidden in zip(step, logits, tokens, hiddens, strict=True):
            try:
                had_tokens = t.job.completion_tokens
                piece = t.job.advance(len(ids), row, hidden, token)
            except Exception as e:  # sampling or decoding this one request failed: only it ends
                self._fail([t], e)
                continue
            if t.job.completion_tokens > had_tokens:
                m.tokens.inc(t.job.completion_tokens - had_tokens)  # a step with drafts may add several
                if t.first_token_at is None:
                    t.first_token_at = now
                    m.ttft_seconds.observe(now - t.submitted)
            if piece:
                t.deliver(Event("text", piece))
            if t.job.done:
                m.finished.labels(t.job.finish_reason).inc()
                t.closed = True
                t.deliver(Event("done", t.job.finish_reason or "stop"))
                self._leave(t)
