"""Selection overhead per call: plan-cache hit and full miss, 1 and 8 threads, and the cache's own miss path.

    python benchmarks/selection.py            # print the table
    python benchmarks/selection.py --write    # also write benchmarks/results/selection-<device>.md

Targets (issue 3): a hit costs at most 1 us, a full miss (about 10 candidate kernels) at most 50 us.
Times are CPU time (thread_time for one thread, process_time summed over threads), so that other
processes on a shared machine do not count; thread figures are CPU time / calls of all threads.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import layerzero as lz
from layerzero.device import device_info
from layerzero.ops.attention import ATTENTION
from layerzero.selection.cache import PlanCache
from layerzero.state import runtime

THREADS = 8
REPEATS = 5


def best_per_call(fn: Callable[[int], None], calls: int, setup: Callable[[], object] = lambda: None) -> float:
    """Best of REPEATS runs of fn(calls), in microseconds per call."""
    best = float("inf")
    for _ in range(REPEATS):
        setup()
        start = time.thread_time()
        fn(calls)
        best = min(best, time.thread_time() - start)
    return best / calls * 1e6


def threaded_per_call(work: Callable[[int, int], object], calls_per_thread: int, threads: int = THREADS,
                      setup: Callable[[], object] = lambda: None) -> float:
    """Best of REPEATS: CPU time of `threads` threads each running work(thread, calls), per call (us)."""
    best = float("inf")
    for _ in range(REPEATS):
        setup()
        barrier = threading.Barrier(threads + 1)

        def run(t: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            work(t, calls_per_thread)

        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for p in pool:
            p.start()
        barrier.wait()
        start = time.process_time()
        for p in pool:
            p.join()
        best = min(best, time.process_time() - start)
    return best / (calls_per_thread * threads) * 1e6


def fill_candidates(op: str, target: int = 10) -> int:
    """Register stand-in CPU kernels until `op` has about `target` candidates; returns the count."""
    runtime.ensure_loaded()
    have = len(runtime.registry.candidates(op))
    for i in range(max(0, target - have)):
        lz.register_kernel(id=f"bench.k{i}", ops=(op,), impl=lambda *a: None, platforms=frozenset({"cpu"}),
                           priority=10 + i, mask_kinds=frozenset({"none"}))
    return len(runtime.registry.candidates(op))


def measure() -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    op = "attention.full"
    out["candidates"] = fill_candidates(op)
    q = torch.randn(1, 16, 4, 64)
    lz.attention(q, q, q)
    key = ATTENTION.key(q, q, q)
    data = runtime.plans.data
    assert data.get(key) is not None

    def hit_lookup(n: int) -> None:
        get = runtime.plans.data.get
        for _ in range(n):
            get(key)

    def hit_with_key(n: int) -> None:
        plans = runtime.plans
        make_key = ATTENTION.key
        for _ in range(n):
            plans.data.get(make_key(q, q, q))

    out["hit_lookup_us"] = best_per_call(hit_lookup, 100_000)
    out["hit_with_key_us"] = best_per_call(hit_with_key, 50_000)
    out["hit_lookup_8t_us"] = threaded_per_call(lambda t, n: hit_lookup(n), 50_000)
    out["hit_with_key_8t_us"] = threaded_per_call(lambda t, n: hit_with_key(n), 10_000)

    # Full misses: distinct shapes, so each call builds its context, evaluates every candidate,
    # binds and inserts. The cache is large enough that nothing is evicted.
    lz.configure(plan_cache_size=1 << 20)
    tensors = [torch.randn(1, s, 4, 64) for s in range(1, 4001)]

    def misses(offset: int) -> Callable[[int], None]:
        def run(n: int) -> None:
            for x in tensors[offset:offset + n]:
                k = ATTENTION.key(x, x, x)
                if runtime.plans.data.get(k) is None:
                    runtime.plan(ATTENTION, k, (x, x, x, None, False, 0.0, None, "BSHD"), {})
        return run

    out["miss_us"] = best_per_call(misses(0), 2000, setup=runtime.plans.invalidate)
    per_thread = 400
    out["miss_8t_us"] = threaded_per_call(lambda t, n: misses(t * per_thread)(n), per_thread,
                                          setup=runtime.plans.invalidate)

    # The cache's own miss-path cost (trivial compute, distinct keys) under 8 threads: what ships
    # (no lock unless threads share a key) and 16 shards of it (what sharding would add).
    calls = 5_000

    def cache_misses(make: Callable[[], Callable[[object], object]]) -> float:
        holder: list[Callable[[object], object]] = []

        def work(t: int, n: int) -> None:
            get = holder[-1]
            for i in range(n):
                get((t, i))

        return threaded_per_call(work, calls, setup=lambda: holder.append(make()))

    def single() -> Callable[[object], object]:
        cache = PlanCache(maxsize=1 << 22)
        return lambda k: cache.data.get(k) or cache.get_or_compute(k, lambda: k)

    def sharded() -> Callable[[object], object]:
        shards = [PlanCache(maxsize=1 << 22) for _ in range(16)]
        def get(k: object) -> object:
            cache = shards[hash(k) & 15]
            return cache.data.get(k) or cache.get_or_compute(k, lambda: k)
        return get

    out["cache_miss_8t_us"] = cache_misses(single)
    out["cache_miss_8t_16_shards_us"] = cache_misses(sharded)
    holder: list[Callable[[object], object]] = []

    def one_thread(n: int) -> None:
        get = holder[-1]
        for i in range(n):
            get(i)

    out["cache_miss_1t_us"] = best_per_call(one_thread, calls, setup=lambda: holder.append(single()))
    return out


def machine() -> str:
    cpu = device_info(torch.device("cpu")).name
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.machine()}")


ROWS = [
    ("hit: `plans.data.get(key)`", "hit_lookup_us", "hit_lookup_8t_us", 1.0),
    ("hit: attention key + lookup", "hit_with_key_us", "hit_with_key_8t_us", None),
    ("full miss: context + {candidates} candidates + bind + insert", "miss_us", "miss_8t_us", 50.0),
]


def table(r: dict[str, float | int | str]) -> str:
    lines = ["| per call (CPU time) | 1 thread (us) | 8 threads (us, aggregate) | target |", "|---|---:|---:|---|"]
    for label, one, eight, target in ROWS:
        goal = f"<= {target:g} us" if target else ""
        lines.append(f"| {label.format(**r)} | {r[one]:.3f} | {r[eight]:.3f} | {goal} |")
    lines += [
        "",
        "Plan-cache miss path alone (trivial compute, distinct keys): would sharding help?",
        "",
        "| cache | us per miss |",
        "|---|---:|",
        f"| what ships (no lock unless threads share a key), 8 threads | {r['cache_miss_8t_us']:.3f} |",
        f"| 16 shards of it, 8 threads | {r['cache_miss_8t_16_shards_us']:.3f} |",
        f"| what ships, 1 thread | {r['cache_miss_1t_us']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/selection-<device>.md")
    args = parser.parse_args()
    results = measure()
    text = table(results)
    print(f"{machine()}\n\n{text}")
    if args.write:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = Path(__file__).parent / "results" / f"selection-{device}.md"
        path.write_text(
            f"# Selection overhead ({device.upper()})\n\nMeasured {datetime.date.today().isoformat()} on {machine()}, "
            f"with `python benchmarks/selection.py --write` (best of {REPEATS} runs).\n\n{text}\n"
        )
        print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
