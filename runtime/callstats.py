"""Per-call run statistics.

`Session.run` opens a `CallStats` for its call in a context variable, so every thread (and every
asyncio task) running the same Session has its own; the reader, the cache and the chunked ops add
to whichever is current. Concurrent calls therefore never mix their counts, without a lock around
the run. Counts made outside a call (opening a session, pinning) go to the reader's and the cache's
totals only.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading


class CallStats:
    """What one call read and looked up. `states` maps an op's own record (a layer's counters, an
    MoE layer) to what this call counted for it (see `state_for`)."""

    __slots__ = ("bytes_read", "disk_bytes_read", "payloads_read", "cache_hits", "cache_misses", "states", "deferred")

    def __init__(self):
        self.bytes_read = 0
        self.disk_bytes_read = 0
        self.payloads_read = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.states: dict = {}
        self.deferred: list = []  # (fn, args): counts whose inputs are fixed already, made when first read

    def settle(self) -> "CallStats":
        """Make the deferred counts (in this call's context, so they land in `states`); self."""
        if self.deferred:
            token = _current.set(self)
            try:
                while self.deferred:
                    fn, args = self.deferred.pop()
                    fn(*args)
            finally:
                _current.reset(token)
        return self


_current: contextvars.ContextVar[CallStats | None] = contextvars.ContextVar("nadoo_call_stats", default=None)


def current() -> CallStats | None:
    return _current.get()


@contextlib.contextmanager
def collecting():
    """`with collecting() as cs:` everything counted in this thread/task until the block ends goes to cs."""
    cs = CallStats()
    token = _current.set(cs)
    try:
        yield cs
    finally:
        _current.reset(token)


def defer(fn, *args) -> None:
    """Count `fn(*args)` for the current call when its statistics are first read, not now (a run whose
    statistics nobody reads does not pay for them); at once outside a call. `args` must not change
    after the call (shapes, per-signature tuples: never a caller's array)."""
    cs = _current.get()
    if cs is None:
        fn(*args)
    else:
        cs.deferred.append((fn, args))


def state_for(owner, new):
    """The current call's state of `owner`, made by `new()` on first use (a throwaway outside a call).
    One call runs in one thread, so the state needs no lock."""
    cs = _current.get()
    if cs is None:
        return new()
    st = cs.states.get(owner)
    if st is None:
        st = cs.states[owner] = new()
    return st


def bytes_read() -> int:
    """Payload bytes the current call has read so far (0 outside a call)."""
    cs = _current.get()
    return 0 if cs is None else cs.bytes_read


# `+=` on an attribute is a read, an add and a write: two threads can lose one of their updates.
_totals_lock = threading.Lock()


def count_read(bundle, payload_bytes: int, disk_bytes: int, payloads: int) -> None:
    """Account a read of `bundle`'s payloads: to its running totals and to the current call."""
    with _totals_lock:
        bundle.bytes_read += payload_bytes
        bundle.disk_bytes_read += disk_bytes
        bundle.payloads_read += payloads
    cs = _current.get()
    if cs is not None:
        cs.bytes_read += payload_bytes
        cs.disk_bytes_read += disk_bytes
        cs.payloads_read += payloads


def count_lookup(hit: bool) -> None:
    """A cache lookup of the current call (the cache keeps its own totals)."""
    cs = _current.get()
    if cs is not None:
        if hit:
            cs.cache_hits += 1
        else:
            cs.cache_misses += 1
