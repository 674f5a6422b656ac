"""The plan cache: one dict lookup on a hit, O(1) invalidation, single-flight misses, bounded.

The hit path of every op is `runtime.plans.data.get(key)`: a plain dict read without a lock.
Everything else (insert, eviction, expiry, waiting for another thread) happens on the miss
path. A miss that no other thread shares takes no lock either: it claims its key with one
atomic `dict.setdefault` and inserts with one dict store (both single operations under the
GIL). The lock guards what changes several dicts together (invalidation, resizing, segment
rotation, promotion, TTL) and the waiting of threads that need a key another thread computes;
it is never held while a plan is computed. (Two lock round trips per miss made eight threads
missing at once queue on it: about 3 context switches per miss and twice the CPU time.)

Eviction is least-recently-used at the granularity of half the cache ("two segments"): new
plans go into `data`; when it holds maxsize/2 plans it becomes the old segment and a fresh
`data` starts. A miss whose key is in the old segment moves the plan back (no selection), so
a key used at least once per maxsize/2 insertions is never evicted; the rest drop out when the
old segment is replaced. This keeps the hit path a single lookup, which a true LRU could not.

Measured (benchmarks/results/selection-cpu.md): sharding buys nothing here: hits take no lock,
and neither does a miss of a key that no other thread is computing.

Scoped overrides (`with lz.prefer(...)`, policy/config.py) change the choice of one thread or task
only. Their plans are filed under (scope, key), and while any block is active in the process, `data`
(what the hit path reads) is an empty read-only view: every call goes to the miss path, which looks
its key (scoped or not) up in the plans themselves. When no block is active, `data` is the plans
again and the hit path is what it was: one lookup of the op's own key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConfigurationError, SelectionTimeoutError


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of the miss path (hits are not counted: that would cost the hit path)."""

    size: int
    maxsize: int
    ttl_s: float | None
    generation: int
    computes: int
    promotions: int
    evictions: int
    expirations: int
    waits: int


# What the hit path reads while a scoped override is active anywhere: nothing, and nothing can be put in.
_NO_PLANS: Mapping[Hashable, Any] = MappingProxyType({})


class _Flight:
    """One in-progress computation of a (generation, key): its owner thread and whether it ended.

    Waiters sleep on the cache's condition variable, so an uncontended miss allocates no event.
    """

    __slots__ = ("owner", "done", "waited")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.done = False
        self.waited = False  # someone sleeps on it: landing must wake them


class PlanCache:
    """Maps call keys to ExecutionPlans; see the module docstring for the guarantees.

    `compute_log`, when set to a list, records `(generation, key)` for every computation
    (tests use it to check single flight; None costs nothing).
    """

    def __init__(self, maxsize: int = 4096, ttl_s: float | None = None, wait_timeout_s: float = 60.0) -> None:
        # (generation, the plans of its newest segment), replaced as one: a flight reads both at once
        self._current: tuple[int, dict[Hashable, Any]] = (0, {})
        self.data: Mapping[Hashable, Any] = self._current[1]  # the hit path's view: the plans, or _NO_PLANS
        self.scopes = 0  # scoped-override blocks active in any thread
        self.maxsize = 0
        self.ttl_s: float | None = None
        self.wait_timeout_s = wait_timeout_s
        self.compute_log: list[tuple[int, Hashable]] | None = None
        self.computes = self.promotions = self.evictions = self.expirations = self.waits = 0
        self._older: dict[Hashable, Any] = {}
        self._born: dict[Hashable, float] = {}  # insertion times, kept only with a TTL
        self._lock = threading.Lock()
        self._flight_done = threading.Condition(self._lock)
        self._inflight: dict[tuple[int, Hashable], _Flight] = {}
        self._sweeper: threading.Thread | None = None
        self._sweeper_stop = threading.Event()
        self.configure(maxsize, ttl_s)

    # ---- settings and invalidation

    def configure(self, maxsize: int | None = None, ttl_s: float | None = None) -> None:
        """Resize (maxsize >= 2 plans) and set the TTL (seconds, or None for none); drops the plans."""
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 2):
            raise ConfigurationError(f"plan cache maxsize: expected an int >= 2, got {maxsize!r}")
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0):
            raise ConfigurationError(f"plan cache ttl_s: expected seconds > 0 or None, got {ttl_s!r}")
        with self._lock:
            if maxsize is not None:
                self.maxsize = maxsize
            self.ttl_s = None if ttl_s is None else float(ttl_s)  # before the dict: see _publish
            self._replace_store({})
            self._older, self._born = {}, {}
        self._stop_sweeper()
        if self.ttl_s is not None:
            self._sweeper_stop = threading.Event()
            self._sweeper = threading.Thread(
                target=self._sweep, args=(self._sweeper_stop,), name="layerzero-plan-ttl", daemon=True
            )
            self._sweeper.start()

    def invalidate(self) -> int:
        """Drop every plan (O(1): the dicts are replaced); returns the new generation."""
        with self._lock:
            self._replace_store({}, self.generation + 1)
            self._older, self._born = {}, {}
            return self.generation

    def close(self) -> None:
        """Stop the TTL sweeper thread, if any."""
        self._stop_sweeper()

    @property
    def generation(self) -> int:
        """Bumped by every invalidate(): a plan computed under an older generation is never served."""
        return self._current[0]

    @property
    def _store(self) -> dict[Hashable, Any]:
        return self._current[1]

    def _replace_store(self, store: dict[Hashable, Any], generation: int | None = None) -> None:
        """Under the lock: a new newest segment (of a new generation, when given), which the hit path
        sees unless a scope is active."""
        self._current = (self.generation if generation is None else generation, store)
        self.data = store if not self.scopes else _NO_PLANS

    def enter_scope(self) -> None:
        """A scoped-override block begins (in any thread): hide the plans from the hit path."""
        with self._lock:
            self.scopes += 1
            self.data = _NO_PLANS

    def leave_scope(self) -> None:
        """A block ends: when it was the last one, the hit path sees the plans again."""
        with self._lock:
            self.scopes -= 1
            if not self.scopes:
                self.data = self._store

    @contextmanager
    def pinned(self, key: Hashable, plan: Any) -> Iterator[None]:
        """Serve `plan` for `key` inside the block, then what was there (perf/workloads.run_args records
        a call's run arguments with it)."""
        store = self._store
        saved = store.get(key)
        store[key] = plan
        try:
            yield
        finally:
            if saved is None:
                store.pop(key, None)
            else:
                store[key] = saved

    def get(self, key: Hashable) -> Any:
        """The plan for `key` in the newest segment, or None (what a hit would find, scopes aside)."""
        return self._store.get(key)

    def __len__(self) -> int:
        return len(self._store) + len(self._older)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store or key in self._older

    def stats(self) -> CacheStats:
        return CacheStats(
            len(self),
            self.maxsize,
            self.ttl_s,
            self.generation,
            self.computes,
            self.promotions,
            self.evictions,
            self.expirations,
            self.waits,
        )

    # ---- the miss path

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any], max_rounds: int = 8) -> Any:
        """The plan for `key`, computing it at most once per generation across threads.

        A thread that finds another computing the same key waits for it (at most
        `wait_timeout_s`, then SelectionTimeoutError). A plan computed while the generation
        changed is not cached; the call computes again for the new generation, at most
        `max_rounds` times, then returns an uncached plan of the newest policy. A compute that
        re-enters the same key in the same thread runs uncached instead of waiting on itself.
        """
        me = threading.get_ident()
        for _ in range(max_rounds):
            generation = self.generation
            mine = _Flight(me)
            flight = self._inflight.setdefault((generation, key), mine)  # atomic: one owner per key
            if flight is not mine:
                if flight.owner == me:
                    break  # re-entered from inside our own compute
                self._wait(flight, key)
                continue  # look again: the plan is in, or the owner failed and we compute
            published = False
            try:
                plan = self._lookup(key)  # in since the caller looked, or in the old segment
                if plan is not None:
                    return plan
                if self.generation != generation:
                    # Read after _lookup read `data` (see _publish): our generation's plan, if
                    # another flight landed one, was in the `data` we looked in.
                    continue
                if self.compute_log is not None:
                    self.compute_log.append((generation, key))
                plan = compute()
                self.computes += 1
                published = self._publish(generation, key, plan)
            finally:
                self._land(generation, key, mine)  # after the insert: a waiter wakes to find the plan
            if published:
                return plan
            # Policy, registry or health changed while we computed: compute again for the new
            # generation rather than return a plan from the old one.
        self.computes += 1
        return compute()  # the generation kept changing (or re-entry): a fresh plan, uncached

    def _wait(self, flight: _Flight, key: Hashable) -> None:
        """Sleep until another thread's flight lands (at most wait_timeout_s)."""
        with self._lock:
            self.waits += 1
            flight.waited = True  # before reading `done`; _land sets `done` before reading `waited`
            deadline = time.monotonic() + self.wait_timeout_s
            while not flight.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SelectionTimeoutError(
                        f"waited {self.wait_timeout_s}s for another thread's selection of {key!r}"
                    )
                self._flight_done.wait(remaining)

    def _land(self, generation: int, key: Hashable, flight: _Flight) -> None:
        """End a flight and wake its waiters, if any (they look again)."""
        self._inflight.pop((generation, key), None)
        flight.done = True
        if flight.waited:  # a waiter sleeps, or is about to under the lock: wake it there
            with self._lock:
                self._flight_done.notify_all()

    def _lookup(self, key: Hashable) -> Any:
        """The plan in the newest segment, or moved back from the old segment, or None."""
        plan = self._store.get(key)
        if plan is not None or not self._older:
            return plan
        with self._lock:
            plan = self._older.pop(key, None)
            if plan is None:
                return None
            if self.ttl_s is not None and time.monotonic() - self._born.get(key, 0.0) >= self.ttl_s:
                self._born.pop(key, None)
                self.expirations += 1
                return None
            self.promotions += 1
            self._insert(key, plan, promoted=True)
            return plan

    def _publish(self, generation: int, key: Hashable, plan: Any) -> bool:
        """Insert a plan computed for `generation`, unless invalidate() has moved past it.

        Lock-free unless a TTL is set or the newest segment is due to rotate. The generation and its
        dict are read as one (`_current`): a plan computed for generation G goes into G's dict or
        nowhere, never into a newer generation's, and never into a dict that invalidate() replaced
        on the way to G (the plan would be lost and computed again). configure() sets the TTL
        before replacing the dict, so the TTL read after it is the one that applies to it.
        """
        current, data = self._current
        if self.ttl_s is not None or len(data) >= self.maxsize // 2:
            with self._lock:  # insertion times, or a segment rotation: several dicts change together
                if self.generation != generation:
                    return False
                self._insert(key, plan)
                return True
        if current != generation:
            return False
        data[key] = plan
        return True

    def _insert(self, key: Hashable, plan: Any, promoted: bool = False) -> None:
        """Under the lock: add to `data`, rotating segments when it is half the capacity.

        (Lock-free inserts of concurrent misses may take `data` a few plans past half.)"""
        if len(self._store) >= self.maxsize // 2:
            dropped = self._older
            self.evictions += len(dropped)
            if self._born:
                for old in dropped:
                    self._born.pop(old, None)
            self._older = self._store
            self._replace_store({})
        self._store[key] = plan
        if self.ttl_s is not None and not promoted:
            self._born[key] = time.monotonic()

    # ---- TTL

    def expire(self) -> int:
        """Drop plans older than the TTL; returns how many. The sweeper calls it periodically."""
        if self.ttl_s is None:
            return 0
        with self._lock:
            cutoff = time.monotonic() - self.ttl_s
            old = [k for k, born in self._born.items() if born <= cutoff]
            for key in old:
                del self._born[key]
                self._store.pop(key, None)
                self._older.pop(key, None)
            self.expirations += len(old)
            return len(old)

    def _sweep(self, stop: threading.Event) -> None:
        ttl = self.ttl_s or 1.0
        while not stop.wait(min(ttl / 4, 1.0)):
            self.expire()

    def _stop_sweeper(self) -> None:
        self._sweeper_stop.set()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper is not threading.current_thread():
            sweeper.join(timeout=5.0)
