"""PlanCache: hit-path contract, bounds and eviction, TTL, generations, single flight, and a stress test."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import pytest
import torch

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.kernel import KernelSpec
from layerzero.ops import OpFamily
from layerzero.selection.cache import PlanCache
from layerzero.state import runtime


def test_hit_path_is_a_plain_dict_lookup():
    q = torch.randn(1, 4, 2, 8)
    lz.attention(q, q, q)
    assert type(runtime.plans.data) is dict
    assert len(runtime.plans.data) == 1
    plan = next(iter(runtime.plans.data.values()))
    assert lz.select("attention", q, q, q) is plan


def test_bounded_and_recently_used_keys_survive():
    cache = PlanCache(maxsize=8)
    cache.compute_log = []
    for i in range(100):
        cache.get_or_compute(("hot",), lambda: "hot-plan")  # used once per insertion
        cache.get_or_compute(("cold", i), lambda i=i: f"plan{i}")
        assert len(cache) <= 8
    assert [k for _, k in cache.compute_log].count(("hot",)) == 1
    assert ("cold", 0) not in cache and ("cold", 99) in cache
    stats = cache.stats()
    assert stats.evictions > 0 and stats.promotions > 0 and stats.size <= 8


def test_key_unused_for_a_segment_is_evicted_and_recomputed():
    cache = PlanCache(maxsize=4)
    cache.compute_log = []
    cache.get_or_compute("a", lambda: 1)
    for i in range(4):
        cache.get_or_compute(i, lambda: 0)
    assert "a" not in cache
    cache.get_or_compute("a", lambda: 1)
    assert [k for _, k in cache.compute_log].count("a") == 2


def test_configure_validates():
    with pytest.raises(lz.ConfigurationError, match="maxsize: expected an int >= 2, got 1"):
        PlanCache(maxsize=1)
    with pytest.raises(lz.ConfigurationError, match="ttl_s: expected seconds > 0 or None, got 0"):
        PlanCache(ttl_s=0)


def test_ttl_expiry_by_sweep_and_on_promotion():
    cache = PlanCache(maxsize=4, ttl_s=0.05)
    try:
        cache.get_or_compute("a", lambda: 1)
        assert "a" in cache
        deadline = time.monotonic() + 5
        while "a" in cache and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "a" not in cache  # the sweeper thread dropped it
        cache.compute_log = []
        cache.get_or_compute("b", lambda: 2)
        cache.get_or_compute("c", lambda: 3)
        cache.get_or_compute("d", lambda: 4)  # rotates: b, c now in the old segment
        time.sleep(0.06)
        cache.get_or_compute("b", lambda: 22)  # expired in the old segment: recomputed, not promoted
        assert [k for _, k in cache.compute_log] == ["b", "c", "d", "b"]
        assert cache.expire() >= 0 and cache.stats().expirations >= 2
    finally:
        cache.close()
    assert cache._sweeper is None


def test_invalidate_is_o1_and_a_plan_computed_across_it_is_not_cached():
    cache = PlanCache()
    cache.get_or_compute("k", lambda: "old")
    data = cache.data
    assert cache.invalidate() == 1
    assert cache.data is not data and "k" not in cache
    calls = []

    def compute() -> str:
        calls.append(cache.generation)
        if len(calls) == 1:
            cache.invalidate()  # policy changed while we selected
        return f"plan@{cache.generation}"

    assert cache.get_or_compute("k", compute) == "plan@2"
    assert calls == [1, 2] and cache.data["k"] == "plan@2"


def test_generation_that_never_settles_ends_after_max_rounds():
    cache = PlanCache()

    def compute() -> int:
        cache.invalidate()
        return cache.generation

    assert cache.get_or_compute("k", compute, max_rounds=3) == 4  # 3 rounds, then one uncached
    assert "k" not in cache


def test_single_flight_computes_once_and_everyone_gets_the_same_plan():
    cache = PlanCache()
    cache.compute_log = []
    started = threading.Event()

    def compute() -> object:
        started.set()
        time.sleep(0.05)
        return object()

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(cache.compute_log) == 1 and len(results) == 8 and len({id(r) for r in results}) == 1
    assert cache.stats().waits >= 1


def test_waiting_times_out_with_a_named_error():
    cache = PlanCache(wait_timeout_s=0.05)
    release = threading.Event()
    owner = threading.Thread(target=lambda: cache.get_or_compute("k", lambda: release.wait(5) and "plan"))
    owner.start()
    while not cache._inflight:
        time.sleep(0.001)
    with pytest.raises(lz.SelectionTimeoutError, match="waited 0.05s for another thread's selection of 'k'"):
        cache.get_or_compute("k", lambda: "mine")
    release.set()
    owner.join(5)
    assert cache.data["k"] == "plan"


def test_failed_compute_is_not_cached_and_waiters_retry():
    cache = PlanCache()
    gate = threading.Event()
    attempts = []

    def failing() -> str:
        attempts.append(1)
        gate.wait(5)
        raise ValueError("bad input")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_compute("k", failing)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and len(attempts) == 3  # each caller sees its own error
    assert not cache._inflight and "k" not in cache


def test_reentrant_compute_does_not_wait_on_itself():
    cache = PlanCache(wait_timeout_s=1.0)

    def outer() -> str:
        return "outer+" + cache.get_or_compute("k", lambda: "inner")

    assert cache.get_or_compute("k", outer) == "outer+inner"


def test_configure_plan_cache_through_lz_keeps_the_generation():
    q = torch.randn(1, 4, 2, 8)
    lz.attention(q, q, q)
    generation = runtime.generation
    lz.configure(plan_cache_size=16)
    assert runtime.plans.maxsize == 16 and runtime.generation == generation and len(runtime.plans) == 0


# ---- stress: 32 threads select while another thread changes policy 500 times


def _stress_family() -> OpFamily:
    def key(i: int) -> tuple[str, int]:
        return ("stress", i)

    def context(i: int) -> SelectionContext:
        return SelectionContext(op="stress.op", batch=i)

    return OpFamily("stress", key, context, lambda spec, ctx: (spec.impl, ()), lambda spec, ctx: ())


@pytest.mark.stress
def test_stress_no_stale_plan_after_a_policy_change_returns():
    # runtime.register: the op of this test's own family is no public op, which lz.register_kernel refuses
    runtime.register(KernelSpec(id="stress.k", ops=("stress.op",), impl=lambda i: i, platforms="cpu", priority=1))
    family = _stress_family()
    runtime.plans.compute_log = []
    changes, threads_n, keys_n = 500, 32, 16
    done = [0]  # the last policy version whose change has returned
    finished = threading.Event()
    stale: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lookups = [0] * threads_n

    def reader(t: int) -> None:
        i = t
        try:
            while not finished.is_set():
                i += 1
                before = done[0]
                key = family.key(i % keys_n)
                plan = runtime.plans.data.get(key)
                if plan is None:
                    plan = runtime.plan(family, key, (i % keys_n,), {})
                version = round(plan.score) - 1  # boost factor = version + 1 on priority 1
                if version < before:
                    stale.append((version, before))
                lookups[t] += 1
                if i % 8 == 0:
                    time.sleep(0)  # let the policy thread in; 32 busy threads would starve it
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def changer() -> None:
        try:
            for version in range(1, changes + 1):
                lz.configure({"boosts": [{"kernel": "stress.k", "boost_factor": version + 1}]})
                done[0] = version
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            finished.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    start = time.monotonic()
    try:
        readers = [threading.Thread(target=reader, args=(t,), daemon=True) for t in range(threads_n)]
        for t in readers:
            t.start()
        policy_thread = threading.Thread(target=changer, daemon=True)
        policy_thread.start()
        policy_thread.join(60)
        finished.set()
        for t in readers:
            t.join(10)
    finally:
        sys.setswitchinterval(old_interval)
    elapsed = time.monotonic() - start
    assert not policy_thread.is_alive() and not any(t.is_alive() for t in readers), "deadlock"
    assert not errors, errors[:3]
    assert done[0] == changes
    assert not stale, f"{len(stale)} stale plans, e.g. {stale[:5]}"
    counts = Counter(runtime.plans.compute_log)
    assert counts and max(counts.values()) == 1, counts.most_common(3)
    assert sum(lookups) > changes and min(lookups) > 0
    assert elapsed < 60
    # After the last change every key's plan is of the last policy.
    for k in range(keys_n):
        plan = runtime.plan(family, family.key(k), (k,), {})
        assert round(plan.score) - 1 == changes


def test_engine_shortcuts_follow_the_generation():
    """The miss path's per-generation shortcuts (kernels viable on this device, no PerfDB rows, no
    breakers) must see a registration, a policy change and a backend that fails to import."""
    cpu = frozenset({"cpu"})

    def shape(s: int) -> torch.Tensor:
        return torch.randn(1, s, 2, 64)

    q = shape(3)
    first = lz.select("attention", q, q, q).kernel_id
    lz.register_kernel(id="gen.fast", ops=("attention.full",), impl=lambda *a: None, platforms=cpu, priority=97)
    q = shape(4)
    assert lz.select("attention", q, q, q).kernel_id == "gen.fast"
    lz.configure(deny=["gen.fast"])
    q = shape(5)
    assert lz.select("attention", q, q, q).kernel_id == first

    def missing(*args):
        raise ImportError("no module named gen_lib")

    lz.register_kernel(id="genlib.k", ops=("attention.full",), impl=missing, platforms=cpu, priority=99)
    q = shape(6)
    lz.attention(q, q, q)  # genlib.k fails to import: its backend is marked unavailable, the call falls back
    q = shape(7)
    assert lz.select("attention", q, q, q).kernel_id == first  # gen.fast stays denied
    reasons = lz.explain("attention", q, q, q).rejection_reasons
    assert reasons["genlib.k"] == [lz.Reason.BACKEND_IMPORT_FAILED]


@pytest.mark.stress
@pytest.mark.parametrize("maxsize", [8, 4096], ids=["rotating", "large"])
def test_stress_lock_free_misses_never_cache_across_invalidation(maxsize):
    """Misses take no lock unless threads share a key (PlanCache docstring): 16 threads miss on 24
    keys while another thread invalidates 300 times. No plan computed before an invalidation may
    be returned after it returned, and no (generation, key) is computed twice unless evicted."""
    cache = PlanCache(maxsize=maxsize)
    cache.compute_log = []
    done = [0]  # the generation of the last invalidate() that has returned
    finished = threading.Event()
    stale: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def compute() -> int:
        return cache.generation  # the "policy" this plan was chosen under

    def reader(t: int) -> None:
        try:
            i = t
            while not finished.is_set():
                i += 7
                before = done[0]
                key = ("k", i % 24)
                plan = cache.data.get(key)
                if plan is None:
                    plan = cache.get_or_compute(key, compute)
                if plan < before:
                    stale.append((plan, before))
                if i % 5 == 0:
                    time.sleep(0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def changer() -> None:
        for _ in range(300):
            done[0] = cache.invalidate()
            time.sleep(0)
        finished.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=reader, args=(t,), daemon=True) for t in range(16)]
        threads.append(threading.Thread(target=changer, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors[:3]
    assert not stale, f"{len(stale)} stale plans, e.g. {stale[:5]}"
    counts = Counter(cache.compute_log)
    if maxsize > 24:  # nothing is evicted
        assert max(counts.values()) == 1, counts.most_common(3)
    else:
        assert cache.stats().evictions and cache.stats().promotions
    assert len(cache) <= maxsize + 16 and not cache._inflight
