"""Overhead of a solved module (lz.solve) vs calling the kernel function directly, and vs the
dynamic `lz.*` call (plan-cache hit), for small ops where dispatch cost would show.

    PYTHONPATH=src python3 benchmarks/solve_overhead.py [--out benchmarks/results/solve_overhead_<dev>.md]

Each variant is timed in interleaved rounds (so drift hits all alike): per round, N calls timed with
perf_counter and a device sync at the end; the table gives the median over rounds of time per call
and the difference to the direct call in nanoseconds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import layerzero as lz
from layerzero.state import runtime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_ns(fn, args, device: torch.device, n: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) * 1e9 / n


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("solved_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    cases = {  # name: (op, args, solve dims)
        "rms_norm 1x4096": ("rms_norm", (randn(1, 4096), randn(4096)), dict(rows=(1, 1 << 16), hidden=[4096])),
        "rms_norm 64x4096": ("rms_norm", (randn(64, 4096), randn(4096)), dict(rows=(1, 1 << 16), hidden=[4096])),
        "attention decode 8x1x512 h8/2 d64": (
            "attention", (randn(8, 1, 8, 64), randn(8, 512, 2, 64), randn(8, 512, 2, 64), None, True),
            dict(batch=(1, 64), seq_q=(1, 1024), seq_k=(1, 4096), heads=[8], kv_heads=[2], head_dim=[64], causal=[1])),
    }
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name, (op, call_args, dims) in cases.items():
        solved = _import(lz.solve(op, tmp / f"solved_{op}.py", dtypes=[dtype], device=device, **dims).path)
        dynamic = getattr(lz, op)
        plan = lz.select(op, *call_args)
        kernel = runtime.registry.kernel(plan.kernel_id)
        direct = plan.run  # the bound kernel with its layout transforms: what both paths end in
        run_args = __import__("layerzero.perf.workloads", fromlist=["run_args"]).run_args(op, call_args)
        # check all three agree before timing
        ref = direct(*run_args)
        torch.testing.assert_close(getattr(solved, op)(*call_args), ref)
        torch.testing.assert_close(dynamic(*call_args), ref)
        variants = {"direct": (direct, run_args), "solved": (getattr(solved, op), call_args),
                    "dynamic": (dynamic, call_args)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn, a in variants.values():
            _per_call_ns(fn, a, device, 50)
        for _ in range(args.rounds):
            for key, (fn, a) in variants.items():
                times[key].append(_per_call_ns(fn, a, device, args.calls))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, kernel.id, med))
    lines = [f"# solve overhead on {device.type} "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {dtype}, "
             f"torch {torch.__version__}, {datetime.date.today()}",
             "", f"median over {args.rounds} interleaved rounds of {args.calls} calls; ns per call",
             "", "| case | kernel | direct | solved | dynamic (lz.*) | solved - direct | dynamic - direct |",
             "|---|---|---|---|---|---|---|"]
    for name, kid, med in rows:
        lines.append(f"| {name} | {kid} | {med['direct']:.0f} | {med['solved']:.0f} | {med['dynamic']:.0f} | "
                     f"{med['solved'] - med['direct']:+.0f} | {med['dynamic'] - med['direct']:+.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
