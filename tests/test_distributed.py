"""layerzero.distributed on real torch.distributed (gloo on 127.0.0.1, 2 and 4 CPU processes).

Every multi-process test runs its ranks under a hard deadline: stragglers are killed and the
test fails instead of hanging.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import layerzero as lz
from layerzero import distributed as lzd
from layerzero.kernel import Backend, KernelSpec
from layerzero.perf.perfdb import Bucket, PerfRecord, current_signature

pytestmark = pytest.mark.distributed

DEADLINE_S = 60.0


# ------------------------------------------------------------------------------------------ harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(target: Callable[..., Any], rank: int, world: int, port: int, tmp: str) -> None:
    os.environ["LAYERZERO_PERFDB"] = os.path.join(tmp, f"none-{rank}.sqlite")  # never the user's cache
    import datetime

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        result: Any = ("ok", target(rank, world, Path(tmp)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # no teardown: a peer may be dead, and destroy_process_group could wait on it


def run_ranks(target: Callable[..., Any], world: int, tmp_path: Path, deadline: float = DEADLINE_S,
              entry: Callable[..., None] = _entry) -> dict[int, Any]:
    """Run entry(target, rank, world, port, tmp) on `world` spawned ranks (gloo's _entry by default);
    {rank: ("ok", result) | ("error", ...)}."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=entry, args=(target, r, world, port, str(tmp_path)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.pkl"
        if path.exists():
            results[r] = pickle.loads(path.read_bytes())
    assert not stuck, f"ranks {stuck} still running after {deadline} s (killed); results: {results}"
    return results


def ok(results: dict[int, Any], rank: int) -> Any:
    status, *rest = results[rank]
    assert status == "ok", f"rank {rank} raised {rest[0]}: {rest[1]}\n{rest[2]}"
    return rest[0]


# ------------------------------------------------------------------------------------------ rank setups

X = (torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64) / 100.0)
W = torch.ones(64)
B = torch.zeros(64)
CALLS = [("rms_norm", (X, W), {}), ("layer_norm", (X, W, B), {})]


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 if weight is None else weight)


def _layer(x: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _setup_rank(rank: int, tmp: Path) -> None:
    """Kernels alike on every rank; a PerfDB and free memory that differ per rank."""
    cpu = frozenset({"cpu"})
    lz.register_kernel(id="mine.rms_a", ops=("norm.rms",), impl=_rms, platforms=cpu, priority=90)
    lz.register_kernel(id="mine.rms_b", ops=("norm.rms",), impl=_rms, platforms=cpu, priority=90)
    # needs 1 GiB of workspace: fits rank 0's (claimed) memory, not rank 1's
    lz.register_kernel(id="mine.layer_big", ops=("norm.layer",), impl=_layer, platforms=cpu, priority=99,
                       workspace_bytes=lambda ctx: 1 << 30)
    lz.configure_memory(free_memory=lambda device, index: ((64 << 30) if rank == 0 else (256 << 20), 64 << 30))
    from layerzero.ops.norm import RMS_NORM
    from layerzero.state import runtime

    ctx = RMS_NORM.context(X, W)
    fast = "mine.rms_b" if rank == 0 else "mine.rms_a"  # each rank's own PerfDB crowns another kernel
    sig = current_signature("cpu", 0)
    records = [PerfRecord(k, ctx.op, ctx.dtype_name, Bucket.of(ctx), sig, runtime._backend_version(k) or "",
                          5.0 if k == fast else 50.0, 6.0, 10, 0.01) for k in ("mine.rms_a", "mine.rms_b")]
    db = lz.perfdb(tmp / f"perf-{rank}.sqlite")
    assert db is not None
    db.record(records)
    runtime.measurements.reload()
    runtime.bump()


def _picks() -> list[str]:
    return [lz.which(op, *args, **kwargs) for op, args, kwargs in CALLS]


def _sync_two(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    _setup_rank(rank, tmp)
    local = _picks()
    try:
        lzd.verify_selection(CALLS, timeout=20)
        mismatch = ""
    except lzd.SelectionMismatchError as e:
        mismatch = str(e)
    report = lzd.sync_selection(timeout=20)
    synced = lzd.verify_selection(CALLS, timeout=20)
    ctx = lz.explain("rms_norm", X, W).context
    return {"local": local, "mismatch": mismatch, "synced": synced, "rows": report.measurements,
            "tp": (ctx.tp_size, ctx.tp_rank)}


def _invariant_four(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    _setup_rank(min(rank, 1), tmp)
    if rank >= 2:  # ranks 2, 3 also get a breaker-style local failure state: an open breaker on mine.rms_a
        lz.configure_health(failure_threshold=1)
        from layerzero.state import runtime

        runtime.health.record_failure(runtime.registry.kernel("mine.rms_a"), RuntimeError("local fault"))
    local = _picks()
    with lzd.tp_invariant(tp_size=world, tp_rank=rank):
        invariant = lzd.verify_selection(CALLS, timeout=20)
        ctx = lz.explain("layer_norm", X, W, B).context
    return {"local": local, "invariant": invariant, "tp": (ctx.tp_size, ctx.tp_rank)}


def _versions_four(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    fake = Backend("fakelib", (KernelSpec(id="fakelib.rms", ops=("norm.rms",), impl=_rms,
                                          platforms=frozenset({"cpu"}), priority=99),))
    fake.__dict__["availability"] = (True, "2.0" if rank == 3 else "1.0", None)  # rank 3 has another version
    lz.register_backend(fake)
    before = lz.which("rms_norm", X, W)
    try:
        lzd.check_versions(mode="training", timeout=20)
        training = ""
    except lzd.VersionMismatchError as e:
        training = str(e)
    report = lzd.sync_selection(timeout=20, mode="inference")
    return {"before": before, "training": training, "excluded": sorted(report.versions.excluded),
            "mismatches": report.versions.mismatches, "after": lz.which("rms_norm", X, W)}


def _dead_peer(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    if rank == 1:
        os._exit(0)  # dies without a word
    start = time.monotonic()
    try:
        lzd.sync_selection(timeout=3)
    except lzd.DistributedTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - start}
    return {"error": "", "elapsed": time.monotonic() - start}


def _stuck_peer(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    if rank == 1:
        time.sleep(12)  # alive, but never joins the exchange
        return {}
    start = time.monotonic()
    try:
        lzd.verify_selection(CALLS, timeout=2)
    except lzd.DistributedTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - start}
    return {"error": "", "elapsed": time.monotonic() - start}


# ------------------------------------------------------------------------------------------ tests


def test_two_ranks_with_different_perfdb_and_memory_select_identically_after_sync(tmp_path: Path) -> None:
    results = run_ranks(_sync_two, 2, tmp_path)
    r0, r1 = ok(results, 0), ok(results, 1)
    # without sync the ranks disagree (the setup really differs) and verify_selection says so
    assert r0["local"] == ["mine.rms_b", "mine.layer_big"]
    assert r1["local"][0] == "mine.rms_a" and r1["local"][1] != "mine.layer_big"
    assert "ranks select different kernels" in r0["mismatch"] and "rank 1: mine.rms_a" in r0["mismatch"]
    # after sync both run rank 0's measured choice; memory no longer splits them
    assert r0["synced"] == r1["synced"] == ["mine.rms_b", "mine.layer_big"]
    assert r0["rows"] == r1["rows"] == 2
    assert r0["tp"] == (2, 0) and r1["tp"] == (2, 1)


def test_four_ranks_tp_invariant_ignore_local_perfdb_memory_and_health(tmp_path: Path) -> None:
    results = run_ranks(_invariant_four, 4, tmp_path)
    out = [ok(results, r) for r in range(4)]
    assert len({tuple(o["local"]) for o in out}) > 1  # rank-local state made them differ
    assert all(o["invariant"] == out[0]["invariant"] for o in out)
    assert out[0]["invariant"][1] == "mine.layer_big"  # memory not consulted
    assert [o["tp"] for o in out] == [(4, r) for r in range(4)]


def test_four_ranks_version_mismatch_reported_training_raises_inference_falls_back(tmp_path: Path) -> None:
    results = run_ranks(_versions_four, 4, tmp_path)
    out = [ok(results, r) for r in range(4)]
    assert all(o["before"] == "fakelib.rms" for o in out)
    for o in out:
        assert "backend fakelib" in o["training"] and "rank 3=2.0" in o["training"]
        assert o["excluded"] == ["fakelib"]
        assert o["mismatches"]["backend fakelib"] == {0: "1.0", 1: "1.0", 2: "1.0", 3: "2.0"}
    afters = {o["after"] for o in out}
    assert len(afters) == 1 and afters != {"fakelib.rms"}


def test_dead_rank_gives_timeout_error_not_hang(tmp_path: Path) -> None:
    results = run_ranks(_dead_peer, 2, tmp_path, deadline=45)
    r0 = ok(results, 0)
    assert "did not complete within 3 s" in r0["error"] and "version check" in r0["error"]
    assert r0["elapsed"] < 20


def test_stuck_rank_gives_timeout_error_within_timeout(tmp_path: Path) -> None:
    results = run_ranks(_stuck_peer, 2, tmp_path, deadline=45)
    r0 = ok(results, 0)
    assert "selection hash" in r0["error"] and "did not complete within 2 s" in r0["error"]
    assert 1.5 < r0["elapsed"] < 10


# ------------------------------------------------------------------------------------------ single process


def test_compare_environments_lists_differences_and_excludes_unshared_backends() -> None:
    base = dict(torch="2.13", cuda="", driver="", device="cpu")
    envs = [lzd.Environment(0, backends=(("flashinfer", "0.2"), ("liger", "1.0"), ("xformers", None)), **base),
            lzd.Environment(1, backends=(("flashinfer", "0.3"), ("liger", None), ("xformers", None)), **base)]
    report = lzd.compare_environments(envs)
    assert not report.consistent
    assert report.mismatches == {"backend flashinfer": {0: "0.2", 1: "0.3"},
                                 "backend liger": {0: "1.0", 1: "unavailable"}}
    assert report.excluded == frozenset({"flashinfer", "liger"})  # xformers is missing everywhere: not ruled out
    assert "rank 1=0.3" in str(report)
    assert lzd.compare_environments(envs[:1]).consistent


def test_tp_invariant_validates_and_restores() -> None:
    from layerzero.state import runtime

    with pytest.raises(lz.ConfigurationError, match="tp_rank"):
        lzd.tp_invariant(tp_size=2, tp_rank=2)
    with pytest.raises(lz.ConfigurationError, match="tp_size"):
        lzd.tp_invariant(tp_size=0)
    assert runtime.invariant is None
    with lzd.tp_invariant(tp_size=2, tp_rank=1) as mode:
        assert runtime.invariant is mode
        assert lz.explain("rms_norm", X, W).context.tp_size == 2
    assert runtime.invariant is None


def test_exchange_without_process_group_raises_configuration_error() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(lz.ConfigurationError, match="init_process_group"):
        lzd.sync_selection(timeout=1)
