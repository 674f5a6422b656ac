"""layerzero.distributed over NCCL on two GPUs (the same checks as tests/test_distributed.py with gloo).

Needs 2 CUDA GPUs; skipped otherwise. Each rank runs under a hard deadline (stragglers are killed).
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_distributed import CALLS, _setup_rank, ok, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def _entry(target: Any, rank: int, world: int, port: int, tmp: str) -> None:
    os.environ["LAYERZERO_PERFDB"] = os.path.join(tmp, f"none-{rank}.sqlite")
    import datetime

    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", rank))
        result: Any = ("ok", target(rank, Path(tmp)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    os._exit(0)


def _run(target: Any, tmp_path: Path, deadline: float = 120.0) -> dict[int, Any]:
    return run_ranks(target, 2, tmp_path, deadline, entry=_entry)


def _sync(rank: int, tmp: Path) -> dict[str, Any]:
    from layerzero import distributed as lzd

    _setup_rank(rank, tmp)  # CPU calls: the kernels differ per rank through PerfDB and memory, as with gloo
    local = [__import__("layerzero").which(op, *a, **kw) for op, a, kw in CALLS]
    report = lzd.sync_selection(timeout=30)
    q = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.float16)
    calls = [*CALLS, ("attention", (q, q, q), {"is_causal": True})]
    return {"local": local, "synced": lzd.verify_selection(calls, timeout=30), "rows": report.measurements,
            "versions": report.versions.consistent}


def _stuck(rank: int, tmp: Path) -> dict[str, Any]:
    from layerzero import distributed as lzd

    if rank == 1:
        time.sleep(20)
        return {}
    import faulthandler

    stacks = open(tmp / "rank0-stacks.txt", "w")  # noqa: SIM115 - kept open for the dump below
    faulthandler.dump_traceback_later(15, file=stacks)  # where rank 0 is, should it hang
    start = time.monotonic()
    try:
        lzd.sync_selection(timeout=3)
    except lzd.DistributedTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - start}
    return {"error": "", "elapsed": time.monotonic() - start}


def test_nccl_two_gpus_select_identically_after_sync(tmp_path: Path) -> None:
    results = _run(_sync, tmp_path)
    r0, r1 = ok(results, 0), ok(results, 1)
    assert r0["local"] != r1["local"]
    assert r0["synced"] == r1["synced"] and r0["synced"][:2] == ["mine.rms_b", "mine.layer_big"]
    assert r0["versions"] and r0["rows"] == 2


def test_nccl_stuck_rank_gives_timeout_error(tmp_path: Path) -> None:
    try:
        results = _run(_stuck, tmp_path, deadline=60.0)
    except AssertionError as e:
        stacks = tmp_path / "rank0-stacks.txt"
        raise AssertionError(f"{e}\nrank 0 stacks:\n{stacks.read_text() if stacks.exists() else '-'}") from None
    r0 = ok(results, 0)
    assert "did not complete within 3 s" in r0["error"] and r0["elapsed"] < 30
