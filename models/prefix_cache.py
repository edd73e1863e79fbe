"""KV already computed, kept for the next prompt that starts the same way: an earlier turn of a chat (its
prompt and answer are the next turn's prefix), another client's same system prompt.

Keys and values at position i depend only on the ids up to i, so a new prompt may take the first L positions of
any entry it shares L ids with; only the rest is prefilled. Entries are copies of a finished generation's caches
(each local layer range's keys and values, in the backend's own dtype), bounded in bytes, the least recently used
evicted first; an entry that another extends is dropped for it. Only the layers run here are kept: with layers on
LAN workers (offload) there is no cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.llama import KVCache, Session


@dataclass
class _Entry:
    ids: np.ndarray  # the ids whose positions are held
    kv: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # per layer range: keys, values [layer, T, G, E]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


class PrefixCache:
    """max_bytes: what the entries may hold together; min_tokens: shorter shared prefixes are not worth a copy."""

    def __init__(self, max_bytes: int, new_cache: Callable[[tuple[int, int]], KVCache], min_tokens: int = 16):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._new_cache = new_cache
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

    def restore(self, ids: list[int], session: Session) -> int:
        """Fill an empty session with the longest cached prefix of ids (at most all but the last id: the last
        must run to give the next token's logits); how many positions it now holds."""
        want = np.asarray(ids[:-1], dtype=np.int64)
        with self._lock:
            best, best_key = 0, None
            for key, entry in self._entries.items():
                n = min(len(entry.ids), len(want))
                same = np.flatnonzero(entry.ids[:n] != want[:n])
                common = int(same[0]) if same.size else n
                if common > best:
                    best, best_key = common, key
            if best < self.min_tokens or best_key is None:
                self.misses += 1
                return 0
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            for layers, (k, v) in entry.kv.items():
                cache = self._new_cache(layers)
                cache.reserve(best)
                cache.k[:, :best] = k[:, :best]
                cache.v[:, :best] = v[:, :best]
                cache.advance(best)
                session.caches[layers] = cache
            self.hits += 1
            self.tokens_reused += best
            return best

    def store(self, ids: list[int], session: Session) -> None:
        """Keep a copy of the positions a session holds (ids: what was run through it, in order)."""
        lengths = {c.length for c in session.caches.values()}
        if not session.caches or len(lengths) != 1:
            return
        n = min(lengths.pop(), len(ids))
        if n < self.min_tokens:
            return
        kv = {layers: (c.k[:, :n].copy(), c.v[:, :n].copy()) for layers, c in session.caches.items()}
        entry = _Entry(np.asarray(ids[:n], dtype=np.int64), kv)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            for key, old in list(self._entries.items()):  # an entry the new one extends is no longer needed
                if len(old.ids) <= n and np.array_equal(old.ids, entry.ids[: len(old.ids)]):
                    del self._entries[key]
            self._entries[self._next] = entry
            self._next += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
                self.evictions += 1
