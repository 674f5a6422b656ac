"""The plan cache: one dict lookup on a hit, O(1) invalidation, single-flight misses."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import SelectionTimeoutError


class PlanCache:
    """Maps call keys to ExecutionPlans.

    `data` is a plain dict read without a lock on the hit path. Invalidation replaces it with a
    new dict (O(1)); a miss computed against an older generation is never inserted into the new
    one. Misses for the same key are computed once while other threads wait (single flight).
    When full, the oldest entries are evicted first.
    """

    def __init__(self, maxsize: int = 4096, wait_timeout_s: float = 60.0) -> None:
        self.data: dict[Hashable, Any] = {}
        self.maxsize = maxsize
        self.wait_timeout_s = wait_timeout_s
        self.generation = 0
        self.hits_on_miss_path = 0
        self.computes = 0
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Event] = {}

    def invalidate(self) -> int:
        """Drop every plan; returns the new generation."""
        with self._lock:
            self.generation += 1
            self.data = {}
            return self.generation

    def __len__(self) -> int:
        return len(self.data)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any], max_rounds: int = 8) -> Any:
        """The plan for `key`, computing it at most once per generation across threads."""
        for _ in range(max_rounds):
            with self._lock:
                data, generation = self.data, self.generation
                plan = data.get(key)
                if plan is not None:
                    self.hits_on_miss_path += 1
                    return plan
                event = self._inflight.get((generation, key))
                owner = event is None
                if owner:
                    event = self._inflight[(generation, key)] = threading.Event()
            assert event is not None
            if not owner:
                if not event.wait(self.wait_timeout_s):
                    raise SelectionTimeoutError(
                        f"waited {self.wait_timeout_s}s for another thread's selection of {key!r}"
                    )
                continue
            try:
                plan = compute()
                self.computes += 1
                with self._lock:
                    if self.generation == generation:
                        if len(data) >= self.maxsize:
                            for old in list(data)[: max(1, self.maxsize // 8)]:
                                del data[old]
                        data[key] = plan
                        return plan
                # Policy, registry or health changed while we computed: compute again for the
                # new generation rather than return a plan from the old one.
            finally:
                with self._lock:
                    self._inflight.pop((generation, key), None)
                event.set()
        return compute()  # the generation kept changing; a fresh plan, uncached
