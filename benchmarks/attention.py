"""Attention benchmark (GPU): every eligible kernel per shape, its median latency, TFLOP/s or GB/s,
and the kernel LayerZero picks (before any tuning).

    PYTHONPATH=src python3 benchmarks/attention.py [--quick] [--out results.md]

Each candidate is first checked against the float64 reference on a slice (first sequence, first
KV-head group) so that a wrong kernel is reported instead of timed. Timing: CUDA events, warm-up,
median of repeats, inputs rotated over copies larger than L2 (50 MB on the H100).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys

import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.ops.attention import ATTENTION, PAGED_ATTENTION
from layerzero.selection.engine import bind_kernel
from layerzero.state import runtime

L2_BYTES = 50 * 2**20

# (name, B, Sq, Sk, Hq, Hkv, D, causal)
DENSE = [
    ("prefill small", 1, 512, 512, 32, 8, 128, True),
    ("prefill long", 1, 8192, 8192, 32, 8, 128, True),
    ("prefill batch", 8, 1024, 1024, 32, 8, 128, True),
    ("prefill 32x512", 32, 512, 512, 32, 8, 128, True),
    ("prefill 32x512 D64", 32, 512, 512, 32, 8, 64, True),  # layerzero.serve's e2e prefill (1.1B model)
    ("prefill D64 MHA", 16, 1024, 1024, 16, 16, 64, True),
    ("prefill D256", 4, 2048, 2048, 16, 16, 256, True),
    ("encoder D64", 8, 1024, 1024, 16, 16, 64, False),
    ("decode 1k", 32, 1, 1024, 32, 8, 128, True),
    ("decode 4k", 16, 1, 4096, 32, 8, 128, True),
    ("decode 16k", 8, 1, 16384, 32, 8, 128, True),
    ("decode 32k", 4, 1, 32768, 32, 8, 128, True),
    ("decode D256", 8, 1, 8192, 16, 16, 256, True),
    ("decode D64 MHA", 32, 1, 2048, 16, 16, 64, True),
    ("decode D128 MHA", 16, 1, 4096, 32, 32, 128, True),
]
# (name, B, Sq, context, Hq, Hkv, D, page_size)
PAGED = [
    ("paged decode 2k", 64, 1, 2048, 32, 8, 128, 16),
    ("paged decode 8k", 32, 1, 8192, 32, 8, 128, 16),
    ("paged decode 32k", 8, 1, 32768, 32, 8, 128, 16),
    ("paged prefill chunk", 4, 256, 4096, 32, 8, 128, 16),
]


def time_ms(fn, arg_sets, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of fn(*args), rotating over arg_sets."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = arg_sets[i % len(arg_sets)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copies(nbytes: int) -> int:
    return max(1, min(8, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def dense_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, n):
    out = []
    for _ in range(n):
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)
        out.append((q, k, v))
    return out


def check_dense(run, q, k, v, causal, tol) -> float:
    """Max abs error on (first sequence, first KV-head group) against the float64 reference."""
    g = q.shape[2] // k.shape[2]
    out = run(q, k, v, None, causal, 0.0, None, None, 0.0, None)
    qs, ks, vs = q[:1, :, :g], k[:1, :, :1], v[:1, :, :1]
    ref = R.attention(qs.transpose(1, 2).double(), ks.transpose(1, 2).double(), vs.transpose(1, 2).double(),
                      None, causal, 0.0, None).transpose(1, 2)
    return float((out[:1, :, :g].double() - ref).abs().max())


def bench_dense(dtype, shapes, rows):
    for name, B, Sq, Sk, Hq, Hkv, D, causal in shapes:
        elem = torch.finfo(dtype).bits // 8
        nbytes = (B * Sq * Hq * D * 2 + 2 * B * Sk * Hkv * D) * elem
        sets = dense_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, copies(nbytes))
        q, k, v = sets[0]
        report = lz.explain("attention", q, k, v, is_causal=causal)
        pick = report.selected_kernel
        ctx = report.context
        pairs = Sq * Sk if not causal else (Sq * Sk - Sq * (Sq - 1) / 2 if Sq <= Sk else Sq * Sk / 2)
        flops = 4 * B * Hq * pairs * D
        results = []
        for cand in report.candidates:
            if cand.rejections or (cand.backend == "reference" and Sq * Sk * B * Hq > 2**31):
                continue
            spec = runtime.registry.kernel(cand.kernel_id)
            run, _ = bind_kernel(spec, ctx, ATTENTION.bind, ATTENTION.transforms)
            try:
                err = check_dense(run, q, k, v, causal, 0)
                ms = time_ms(lambda q, k, v: run(q, k, v, None, causal, 0.0, None, None, 0.0, None), sets)
            except Exception as e:  # a kernel that fails is reported, not fatal
                print(f"  {name}: {cand.kernel_id} raised {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            ok = err < (2e-2 if dtype == torch.bfloat16 else 4e-3)
            results.append((cand.kernel_id, ms, err, ok))
        rows.append(summarize(name, f"B{B} Sq{Sq} Sk{Sk} H{Hq}/{Hkv} D{D}{' causal' if causal else ''}",
                              results, pick, flops, nbytes, decode=Sq == 1))


def bench_paged(dtype, shapes, rows):
    for name, B, Sq, ctx_len, Hq, Hkv, D, ps in shapes:
        elem = torch.finfo(dtype).bits // 8
        pages_per_seq = ctx_len // ps
        num_pages = B * pages_per_seq
        kc = torch.randn(num_pages, ps, Hkv, D, device="cuda", dtype=dtype)
        vc = torch.randn(num_pages, ps, Hkv, D, device="cuda", dtype=dtype)
        page_table = torch.randperm(num_pages, device="cuda", dtype=torch.int32).reshape(B, pages_per_seq)
        seq_lens = torch.full((B,), ctx_len, device="cuda", dtype=torch.int32)
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype)
        nbytes = 2 * num_pages * ps * Hkv * D * elem
        report = lz.explain("paged_attention", q, kc, vc, page_table, seq_lens)
        results = []
        for cand in report.candidates:
            if cand.rejections or cand.backend == "reference":
                continue
            spec = runtime.registry.kernel(cand.kernel_id)
            run, _ = bind_kernel(spec, report.context, PAGED_ATTENTION.bind, PAGED_ATTENTION.transforms)
            args = (q, kc, vc, page_table, seq_lens, True, None, None, 0.0, "NHD")
            try:
                out = run(*args)
                ref = R.paged_attention(q[:1].double(), kc.double(), vc.double(), page_table[:1], seq_lens[:1],
                                        True, None, None, 0.0, "NHD")
                err = float((out[:1].double() - ref).abs().max())
                ms = time_ms(run, [args])
            except Exception as e:
                print(f"  {name}: {cand.kernel_id} raised {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            results.append((cand.kernel_id, ms, err, err < (2e-2 if dtype == torch.bfloat16 else 4e-3)))
        flops = 4 * B * Hq * Sq * ctx_len * D
        rows.append(summarize(name, f"B{B} Sq{Sq} ctx{ctx_len} H{Hq}/{Hkv} D{D} page{ps}", results,
                              report.selected_kernel, flops, nbytes, decode=True))


def summarize(name, shape, results, pick, flops, nbytes, decode):
    correct = [r for r in results if r[3]]
    best = min(correct, key=lambda r: r[1]) if correct else None
    pick_ms = next((r[1] for r in results if r[0] == pick), float("nan"))
    lines = []
    for kid, ms, err, ok in sorted(results, key=lambda r: r[1]):
        rate = f"{nbytes / ms / 1e6:7.0f} GB/s" if decode else f"{flops / ms / 1e9:7.1f} TFLOP/s"
        mark = ("*" if kid == pick else " ") + ("" if ok else " WRONG")
        lines.append(f"| {name} | {shape} | {kid}{mark} | {ms:.4f} | {rate} | {err:.1e} |")
    ratio = pick_ms / best[1] if best else float("nan")
    return name, shape, pick, best[0] if best else "-", ratio, lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention.md") if os.environ.get("OUT") else None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    dense = DENSE[::3] if args.quick else DENSE
    paged = PAGED[:1] if args.quick else PAGED
    rows: list = []
    bench_dense(dtype, dense, rows)
    bench_paged(dtype, paged, rows)
    head = [f"# Attention benchmark, {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
            f"{datetime.date.today()}", "",
            "`*` = LayerZero's pick (no tuning). Errors: max abs vs float64 reference on a slice.", "",
            "| case | shape | kernel | median ms | rate | max err |", "|---|---|---|---|---|---|"]
    body = [line for r in rows for line in r[5]]
    summary = ["", "| case | pick | fastest correct | pick / fastest |", "|---|---|---|---|"]
    summary += [f"| {r[0]} | {r[2]} | {r[3]} | {r[4]:.2f} |" for r in rows]
    worst = max((r[4] for r in rows if not math.isnan(r[4])), default=float("nan"))
    summary += ["", f"worst pick/fastest ratio: {worst:.2f} (target <= 1.25)"]
    text = "\n".join(head + body + summary)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
