"""Norms, RoPE and SwiGLU benchmark (GPU): every eligible kernel over a row-count sweep, its median
latency and GB/s, and the kernel LayerZero picks, to show where the winner changes with rows.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 benchmarks/norms_rope.py [--quick]

Candidates: every registered kernel whose constraints accept the call (Liger, torch eager, torch
compiled, our Triton gate*act), plus `compiled (bench only)` for the norms (torch.compile of the
reference math; not a registered kernel). Each is checked against the float64 reference first; a
wrong kernel is reported, not timed. Timing: triton.testing.do_bench, median. Writes
$OUT/norms_rope.md when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.kernel import check_constraints
from layerzero.ops import FAMILIES
from layerzero.selection.engine import bind_kernel
from layerzero.state import runtime

ROWS = [4, 64, 512, 4096, 16384, 65536]
HIDDEN = 4096  # norms
D_FF = 8192  # swiglu width
HQ, HK, D = 32, 8, 128  # rope heads


def cases(rows: int, dtype: torch.dtype):
    """(case name (op name first), public args, kernel args, bytes moved, float64 reference of the outputs)."""
    dev = "cuda"
    x = torch.randn(rows, HIDDEN, device=dev, dtype=dtype)
    w = torch.randn(HIDDEN, device=dev, dtype=dtype)
    b = torch.randn(HIDDEN, device=dev, dtype=dtype)
    nbytes = 2 * x.numel() * x.element_size()
    yield ("rms_norm", (x, w, 1e-6), (x, w, 1e-6), nbytes, lambda: R.rms_norm(x.double(), w.double(), 1e-6))
    yield ("layer_norm", (x, w, b, 1e-5), (x, w, b, 1e-5), nbytes,
           lambda: R.layer_norm(x.double(), w.double(), b.double(), 1e-5))
    # rope: rows = tokens (B=1, S=rows), q and k together
    q = torch.randn(1, rows, HQ, D, device=dev, dtype=dtype)
    k = torch.randn(1, rows, HK, D, device=dev, dtype=dtype)
    cos, sin = lz.rope_cache(rows, D, device=dev)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    yield ("rope_qk", (q, k, cos, sin), (q, k, cos[None], sin[None]), nbytes,
           lambda: R.rope(q.double(), k.double(), cos[None].double(), sin[None].double()))
    # the same, with q and k strided views of one fused QKV projection (as layerzero.serve calls it)
    qkv = torch.randn(1, rows, (HQ + 2 * HK) * D, device=dev, dtype=dtype)
    qv, kv = qkv[..., :HQ * D].unflatten(-1, (HQ, D)), qkv[..., HQ * D:(HQ + HK) * D].unflatten(-1, (HK, D))
    yield ("rope_qk (qkv views)", (qv, kv, cos, sin), (qv, kv, cos[None], sin[None]), nbytes,
           lambda: R.rope(qv.double(), kv.double(), cos[None].double(), sin[None].double()))
    gate = torch.randn(rows, D_FF, device=dev, dtype=dtype)
    up = torch.randn(rows, D_FF, device=dev, dtype=dtype)
    yield ("swiglu", (gate, up), (gate, up), 3 * gate.numel() * gate.element_size(),
           lambda: R.swiglu(gate.double(), up.double()))


SKIP_COMPILED = False  # --no-compile: leave torch.compile'd candidates out (their compiles cost minutes)


def _compiled_norm(name: str):
    fn = {"rms_norm": R.rms_norm, "layer_norm": R.layer_norm}[name]
    return torch.compile(fn, dynamic=True)


def candidates(name: str, public_args: tuple, kernel_args: tuple):
    """(label, callable with no arguments) for every eligible registered kernel, plus bench-only ones."""
    family = FAMILIES[name]
    ctx = family.context(*public_args)
    for spec in runtime.registry.candidates(ctx.op):
        if spec.backend == "reference" or not runtime.registry.backend(spec.backend).availability[0]:
            continue
        if SKIP_COMPILED and spec.id.endswith("_compiled"):
            continue
        if check_constraints(spec, ctx):
            continue
        run, _ = bind_kernel(spec, ctx, family.bind, family.transforms)
        yield spec.id, (lambda run=run: run(*kernel_args))
    if name in ("rms_norm", "layer_norm") and not SKIP_COMPILED:
        compiled = _compiled_norm(name)
        yield "compiled (bench only)", (lambda: compiled(*kernel_args))


def as_tuple(out):
    return tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="rows 4, 4096, 65536 only")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd candidates")
    args = parser.parse_args()
    global SKIP_COMPILED
    SKIP_COMPILED = args.no_compile
    import triton.testing

    runtime.ensure_loaded()
    dtype = getattr(torch, args.dtype)
    rows_list = [4, 4096, 65536] if args.quick else ROWS
    lines = [f"# Norms, RoPE, SwiGLU: {torch.cuda.get_device_name()}, {args.dtype}, "
             f"{datetime.date.today()}, torch {torch.__version__}",
             "", f"rms/layer norm hidden {HIDDEN}; rope q {HQ} heads + k {HK} heads, head_dim {D}, rows = tokens; "
             f"swiglu width {D_FF}. Times: median us (triton.testing.do_bench); GB/s = bytes read + written / time.",
             "", "| op | rows | candidate | us | GB/s | correct | LayerZero pick | pick / best |",
             "|---|---|---|---|---|---|---|---|"]
    summary = []
    for rows in rows_list:
        for name, public_args, kernel_args, nbytes, reference in cases(rows, dtype):
            op = name.split()[0]  # "rope_qk (qkv views)" is rope_qk on other strides
            picked = lz.which(op, *public_args)
            ref = as_tuple(reference())
            timings = {}
            rows_out = []
            for label, fn in candidates(op, public_args, kernel_args):
                try:
                    out = as_tuple(fn())
                    tol = {"rtol": 2e-2, "atol": 2e-2}
                    ok = all(torch.allclose(o.double(), r, **tol) for o, r in zip(out, ref, strict=True))
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") if ok else float("nan")
                except Exception as error:  # a broken candidate is reported, never fatal
                    ok, ms = False, float("nan")
                    print(f"{name} rows={rows} {label}: {type(error).__name__}: {error}", file=sys.stderr)
                if ok:
                    timings[label] = ms
                rows_out.append((label, ms, ok))
            best = min(timings.values()) if timings else float("nan")
            ratio = timings.get(picked, float("nan")) / best if timings else float("nan")
            summary.append((name, rows, picked, ratio))
            for label, ms, ok in rows_out:
                gbs = nbytes / (ms * 1e-3) / 1e9 if ok else float("nan")
                mark = " **best**" if ok and ms == best else ""
                lines.append(f"| {name} | {rows} | {label}{mark} | {ms * 1e3:.1f} | {gbs:.0f} | {'yes' if ok else 'NO'} "
                             f"| {picked} | {ratio:.2f} |")
            del public_args, kernel_args
            torch.cuda.empty_cache()
    lines += ["", "| op | rows | pick | pick time / best time |", "|---|---|---|---|"]
    lines += [f"| {n} | {r} | {p} | {x:.2f} |" for n, r, p, x in summary]
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "norms_rope.md"), "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
