"""KV already computed, kept for the next prompt that starts the same way: an earlier turn of a chat (its
prompt and answer are the next turn's prefix), another client's same system prompt.

Keys and values at position i depend only on the ids up to i (and the LoRA adapter they ran with), so a new prompt
may take the first L positions of any entry it shares L ids and the adapter with; only the rest is prefilled.
Entries are copies of a finished generation's caches (each local layer range's keys and values, in the backend's
own dtype), bounded in bytes, the least recently used evicted first; an entry that another extends is dropped for
it. With layers on LAN workers (offload), each worker keeps its own part of a finished session and starts the next
one from it (RemotePrefix); the entry here holds the boundary rows too, so a worker that lost its part is replayed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.llama import KVCache, Session
from models.lora import LoraAdapter


def common_prefix(a, b) -> int:
    """How many ids two sequences share from the start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class RemoteKept(Protocol):
    """A finished session's positions kept on the offload workers (offload.coordinator.Kept)."""

    @property
    def nbytes(self) -> int: ...  # what it holds on this device


class RemotePrefix(Protocol):
    """The offload stage's part (offload.coordinator.Coordinator): keep(): the workers are to keep a finishing
    session's first `length` positions when it is released; resume(): a new session starts from them."""

    def keep(self, session: Session, length: int) -> RemoteKept | None: ...
    def resume(self, kept: RemoteKept, length: int, session: Session) -> None: ...


@dataclass
class _Entry:
    ids: np.ndarray  # the ids whose positions are held
    kv: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # per layer range: keys, values [layer, T, G, E]
    adapter: LoraAdapter | None  # what the positions ran with
    remote: RemoteKept | None  # the positions of the layers on workers

    @property
    def nbytes(self) -> int:
        here = sum(k.nbytes + v.nbytes for k, v in self.kv.values())
        return here + (self.remote.nbytes if self.remote is not None else 0)


class PrefixCache:
    """max_bytes: what the entries may hold together; min_tokens: shorter shared prefixes are not worth a copy;
    remote: the offload stage, when layers run on workers."""

    def __init__(
        self,
        max_bytes: int,
        new_cache: Callable[[tuple[int, int]], KVCache],
        min_tokens: int = 16,
        remote: RemotePrefix | None = None,
    ):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._new_cache, self._remote = new_cache, remote
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    @property
    def entries(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """What /metrics and `appliance-ctl status` show."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "tokens_reused": self.tokens_reused,
            "entries": self.entries,
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
        }

    def clear(self) -> None:
        """Drop every entry (the model is unloaded; workers drop what they kept when idle or pressed)."""
        with self._lock:
            self._entries.clear()

    def restore(self, ids: list[int], session: Session) -> int:
        """Fill an empty session with the longest cached prefix of ids (at most all but the last id: the last
        must run to give the next token's logits); how many positions it now holds."""
        want = np.asarray(ids[:-1], dtype=np.int64)
        with self._lock:
            best, best_key = 0, None
            for key, entry in self._entries.items():
                if entry.adapter is not session.adapter:
                    continue
                common = common_prefix(entry.ids, want)
                if common > best:
                    best, best_key = common, key
            if best < self.min_tokens or best_key is None:
                self.misses += 1
                return 0
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            for layers, (k, v) in entry.kv.items():
                session.caches[layers] = self._new_cache(layers).fill(k, v, best)
            if entry.remote is not None and self._remote is not None:
                self._remote.resume(entry.remote, best, session)
            self.hits += 1
            self.tokens_reused += best
            return best

    def store(self, ids: list[int], session: Session) -> None:
        """Keep a copy of the positions a session holds (ids: what was run through it, in order)."""
        lengths = {c.length for c in session.caches.values()}
        if session.remote is not None:
            lengths.add(session.remote.length)
        if len(lengths) != 1 or (self._remote is not None) != (session.remote is not None):
            return
        n = min(lengths.pop(), len(ids))
        if n < self.min_tokens:
            return
        remote = self._remote.keep(session, n) if self._remote is not None else None
        if self._remote is not None and remote is None:
            return
        kv = {layers: (c.k[:, :n].copy(), c.v[:, :n].copy()) for layers, c in session.caches.items()}
        entry = _Entry(np.asarray(ids[:n], dtype=np.int64), kv, session.adapter, remote)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            for key, old in list(self._entries.items()):  # an entry the new one extends is no longer needed
                extended = len(old.ids) <= n and np.array_equal(old.ids, entry.ids[: len(old.ids)])
                if extended and old.adapter is entry.adapter:
                    del self._entries[key]
            self._entries[self._next] = entry
            self._next += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
                self.evictions += 1
