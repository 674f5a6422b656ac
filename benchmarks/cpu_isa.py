"""CPU benchmark: every eligible CPU kernel for attention, norms and RoPE in float32 and bfloat16,
its median latency, and the kernel LayerZero picks against the fastest, with the CPU's ISA.

    source .venv/bin/activate && python benchmarks/cpu_isa.py [--quick] [--out FILE.md]

Candidates: every registered kernel whose constraints accept the call (reference and FlexAttention
left out: the reference is float64 math, flex compiles for minutes on a small CPU), plus
`upcast fp32 (bench only)` for bfloat16: the call in float32 through the same kernel and cast
back, to see whether bf16 emulation costs more than the casts on a CPU without native bf16
(for float16 that is the registered kernel torch.sdpa_flash_cpu_fp32). float16: attention only. Each output is
checked against the float64 reference first; a wrong candidate is reported, not timed.
Timing: time.perf_counter around single calls, median of `--reps` after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.device import device_info
from layerzero.kernel import check_constraints
from layerzero.ops import FAMILIES
from layerzero.state import runtime

HIDDEN = 4096
HQ, HK = 8, 8


def cases(dtype: torch.dtype, quick: bool) -> Iterator[tuple[str, str, tuple, tuple, Callable[[], tuple]]]:
    """(op family, shape label, public args, kernel args, float64 reference)."""
    attn = [(1, 128, 128, 64, True), (1, 512, 512, 128, True), (1, 1024, 1024, 64, True), (4, 1, 1024, 128, True),
            (1, 16, 1024, 128, False), (1, 256, 256, 64, False)]
    if quick:
        attn = attn[:1] + attn[3:4]
    for b, sq, sk, d, causal in attn:
        q = torch.randn(b, sq, HQ, d, dtype=dtype)
        k, v = torch.randn(b, sk, HK, d, dtype=dtype), torch.randn(b, sk, HK, d, dtype=dtype)
        label = f"B{b} Sq{sq} Sk{sk} H{HQ} D{d}{' causal' if causal else ''}"
        yield ("attention", label, (q, k, v, None, causal), (q, k, v, None, causal, 0.0, None),
               lambda q=q, k=k, v=v, c=causal: (_reference_attention(q, k, v, c),))
    if dtype == torch.float16:
        return  # float16: attention only (where the ISA changes the pick)
    for rows in ([1, 1024] if quick else [1, 64, 1024, 8192]):
        x, w = torch.randn(rows, HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
        yield ("rms_norm", f"rows {rows} x {HIDDEN}", (x, w, 1e-6), (x, w, 1e-6),
               lambda x=x, w=w: (R.rms_norm(x.double(), w.double(), 1e-6),))
    for tokens in ([1, 1024] if quick else [1, 128, 1024]):
        q, k = torch.randn(1, tokens, 32, 128, dtype=dtype), torch.randn(1, tokens, 8, 128, dtype=dtype)
        cos, sin = lz.rope_cache(tokens, 128)
        yield ("rope_qk", f"tokens {tokens}, 32+8 heads, D128", (q, k, cos, sin), (q, k, cos[None], sin[None]),
               lambda q=q, k=k, c=cos, s=sin: R.rope(q.double(), k.double(), c[None].double(), s[None].double()))


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # the reference takes BHSD
    return R.attention(qh, kh, vh, None, causal, 0.0, None).transpose(1, 2)


def candidates(name: str, public_args: tuple, kernel_args: tuple) -> Iterator[tuple[str, Callable[[], tuple]]]:
    family = FAMILIES[name]
    ctx = family.context(*public_args)
    def post(o: object) -> tuple:
        return tuple(t for t in o if t is not None) if isinstance(o, tuple) else (o,)

    for spec in runtime.registry.candidates(ctx.op):
        if spec.backend in ("reference", "flex") or not runtime.registry.backend(spec.backend).availability[0]:
            continue
        if check_constraints(spec, ctx):
            continue
        run, _ = family.bind(spec, ctx)
        yield spec.id, (lambda run=run: post(run(*kernel_args)))
        if ctx.dtype == torch.bfloat16:
            up = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in kernel_args)

            def upcast(run=run, up=up) -> tuple:
                return tuple(t.to(torch.bfloat16) for t in post(run(*up)))

            yield f"{spec.id} upcast fp32 (bench only)", upcast


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    deadline = time.perf_counter() + 2.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    runtime.ensure_loaded()
    info = device_info(torch.device("cpu"))
    lines = [f"# CPU kernels by ISA: {info.name}, {datetime.date.today()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads",
             "", f"ISA seen by LayerZero: {' '.join(sorted(info.isa))}",
             "", "Times: median us of single calls (time.perf_counter). `pick / best` is the time of LayerZero's "
             "pick over the fastest correct candidate.",
             "", "| op | dtype | shape | candidate | us | correct | LayerZero pick | pick / best |",
             "|---|---|---|---|---|---|---|---|"]
    summary = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for name, label, public_args, kernel_args, reference in cases(dtype, args.quick):
            picked = lz.which(name, *public_args)
            ref = reference()
            timings, rows = {}, []
            for cand, fn in candidates(name, public_args, kernel_args):
                try:
                    ok = all(torch.allclose(o.double(), r, **tol) for o, r in zip(fn(), ref, strict=True))
                    us = median_us(fn, args.reps) if ok else float("nan")
                except Exception as error:  # a broken candidate is reported, never fatal
                    ok, us = False, float("nan")
                    print(f"{name} {label} {cand}: {type(error).__name__}: {error}", file=sys.stderr)
                if ok:
                    timings[cand] = us
                rows.append((cand, us, ok))
            best = min(timings.values())
            fastest = min(timings, key=timings.__getitem__)
            ratio = timings.get(picked, float("nan")) / best
            dt = str(dtype).removeprefix("torch.")
            summary.append((name, dt, label, picked, fastest, ratio))
            for cand, us, ok in rows:
                mark = " **best**" if ok and us == best else ""
                lines.append(f"| {name} | {dt} | {label} | {cand}{mark} | {us:.0f} | {'yes' if ok else 'NO'} "
                             f"| {picked} | {ratio:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", "| op | dtype | shape | LayerZero pick | fastest | pick / best |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {s} | {p} | {f} | {x:.2f} |" for n, d, s, p, f, x in summary]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
