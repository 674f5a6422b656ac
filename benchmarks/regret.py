"""Selection regret before and after tuning, vs single-backend policies (H100; runs on CPU too).

    PYTHONPATH=src python3 benchmarks/regret.py [--quick] [--out benchmarks/results/regret-h100.md]
    PYTHONPATH=src python3 benchmarks/regret.py --render benchmarks/results/regret-h100.json --out ...md

For every shape of the standard list (attention prefill and decode, paged-KV decode and chunked
prefill, rms_norm, layer_norm, rope; any
other op family that registers a perf workload joins through `layerzero.perf.workloads`), and
every kernel registered for it that can run here (so FlashInfer, Liger, Triton, ... kernels join
automatically):
1. "before": the kernel LayerZero picks from priorities alone (an empty PerfDB);
2. tune: every candidate is checked against the reference, then timed; results go to a fresh PerfDB;
3. "after": the kernel LayerZero picks with those measurements;
4. ground truth: every candidate is checked and timed again in a second, independent pass; the
   best correct candidate per shape is the baseline, and each pick's ratio is its time / best.
Single-backend policies ("always torch", "always flashinfer", ...) pick their backend's highest
priority kernel that can run the shape; a backend with none there runs torch's (what a user without
LayerZero has), and where torch has none either (paged KV), LayerZero's default pick. Regret is the
geometric mean of ratios. Targets (issue 6): after-tuning geomean <= 1.03, every shape <= 1.10,
and a lower geomean than every single-backend policy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

import layerzero as lz
from layerzero.kernel import priority_for
from layerzero.perf import workloads
from layerzero.perf.bench import measure
from layerzero.perf.tune import tunable_kernels
from layerzero.state import runtime

# (family, shape) in the workload dims; attention: batch, seq_q, seq_k, heads, kv_heads, head_dim, causal
SHAPES = [
    ("attention", (1, 4096, 4096, 32, 8, 128, 1)),    # prefill, GQA 4
    ("attention", (4, 2048, 2048, 32, 8, 128, 1)),
    ("attention", (8, 512, 512, 32, 32, 128, 1)),     # short prefill, MHA
    ("attention", (1, 8192, 8192, 32, 8, 128, 1)),    # long prefill
    ("attention", (2, 1024, 1024, 16, 16, 64, 0)),    # non-causal (encoder)
    ("attention", (1, 2048, 2048, 32, 8, 256, 1)),    # head_dim 256
    ("attention", (32, 1, 4096, 32, 8, 128, 1)),     # decode
    ("attention", (64, 1, 2048, 32, 8, 128, 1)),
    ("attention", (8, 1, 16384, 32, 8, 128, 1)),     # long-context decode
    ("attention", (16, 4, 2048, 32, 8, 128, 1)),     # speculative decode (4 draft tokens)
    ("rms_norm", (1, 4096)),                          # decode step
    ("rms_norm", (4096, 4096)),                       # prefill
    ("rms_norm", (16384, 8192)),
    ("layer_norm", (256, 1024)),
    ("layer_norm", (4096, 4096)),
    # paged KV (shuffled pages): batch, seq_q, seq_k, heads, kv_heads, head_dim, page_size
    ("paged_attention", (32, 1, 8192, 32, 8, 128, 16)),     # decode, 1 GiB of KV
    ("paged_attention", (8, 1, 32768, 32, 8, 128, 16)),     # long-context decode, 1 GiB of KV
    ("paged_attention", (128, 1, 1024, 32, 8, 128, 16)),    # many short sequences
    ("paged_attention", (4, 128, 4096, 32, 8, 128, 16)),    # chunked prefill on the cache
    # rope, q and k together: batch, seq, heads, kv_heads, head_dim
    ("rope_qk", (64, 1, 32, 8, 128)),                       # decode step
    ("rope_qk", (1, 4096, 32, 8, 128)),                     # prefill
    ("rope_qk", (4, 8192, 32, 8, 128)),
]
QUICK = [SHAPES[0], SHAPES[6], SHAPES[10], SHAPES[11], SHAPES[13], SHAPES[15], SHAPES[20]]
CPU_SHAPES = [("attention", (1, 256, 256, 8, 2, 64, 1)), ("attention", (4, 1, 1024, 8, 2, 64, 1)),
              ("rms_norm", (64, 1024)), ("layer_norm", (64, 1024)), ("rope_qk", (2, 64, 8, 2, 64))]


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def pick(ctx: lz.SelectionContext, name: str) -> str:
    return runtime.engine.evaluate(ctx, workloads.family(name).transforms).selected_kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="five shapes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="markdown file (a .json beside it gets the raw data)")
    parser.add_argument("--render", default=None, help="re-render the report of a saved .json (no measuring); "
                        "its title is the first line of the .md beside it")
    args = parser.parse_args()
    if args.render:
        saved = Path(args.render)
        text = render(json.loads(saved.read_text()), saved.with_suffix(".md").read_text().splitlines()[0])
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (QUICK if args.quick else SHAPES) if device.type == "cuda" else CPU_SHAPES
    shapes = [(n, s) for n, s in shapes if n in workloads.WORKLOADS]
    min_sample_s = 2e-3 if device.type == "cuda" else 5e-3
    lz.perfdb(Path(tempfile.mkdtemp()) / "regret_perfdb.sqlite")  # fresh: "before" is priorities only
    runtime.ensure_loaded()

    rows = []
    for i, (name, shape) in enumerate(shapes, 1):
        ctx = workloads.context_for(name, shape, dtype, device)
        specs = tunable_kernels(ctx)
        label = f"{ctx.op} {'x'.join(map(str, shape))}"
        print(f"[{i}/{len(shapes)}] {label}: {', '.join(s.id for s in specs)}", file=sys.stderr, flush=True)
        if not specs:
            continue
        before = pick(ctx, name)
        _, tuned = measure(name, shape, dtype, device, specs, repeats=args.repeats, min_sample_s=min_sample_s, seed=1)
        lz.perfdb().record(tuned)
        runtime.measurements.reload()
        runtime.bump()
        after = pick(ctx, name)
        _, truth = measure(name, shape, dtype, device, specs, repeats=args.repeats, min_sample_s=min_sample_s, seed=2)
        times = {r.kernel: r.median_us for r in truth if r.correct}
        wrong = sorted(r.kernel for r in truth if not r.correct)
        if not times:
            continue
        best = min(times, key=times.get)
        policies = {}  # only backends with a correct, timed kernel here (render() fills the others in)
        for backend in sorted({s.backend for s in specs}):
            own = sorted((s for s in specs if s.backend == backend), key=lambda s: (-priority_for(s, ctx), s.id))
            own = [s for s in own if s.id in times]
            if own:
                policies[backend] = own[0].id

        def ratio(kernel: str, times: dict[str, float] = times, best: str = best) -> float:
            return times.get(kernel, math.inf) / times[best]  # a wrong or failed pick is infinite

        rows.append({"op": ctx.op, "shape": list(shape), "label": label, "best": best, "best_us": times[best],
                     "before": before, "before_ratio": ratio(before), "after": after, "after_ratio": ratio(after),
                     "tuned_confident": all(r.confident for r in tuned if r.correct),
                     "policies": {b: [k, ratio(k)] for b, k in policies.items()}, "wrong": wrong,
                     "times_us": times,
                     "tuned_us": {r.kernel: [r.median_us, r.samples, (r.variance ** 0.5) / r.median_us]
                                  for r in tuned if r.correct}})  # median, samples, CV of the tuning pass

    title = (f"# selection regret on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
             f"{str(dtype).removeprefix('torch.')}, torch {torch.__version__}, {datetime.date.today()}")
    text = render(rows, title)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


def render(rows: list[dict], title: str) -> str:
    """The markdown report of `rows` (also of a saved JSON: --render)."""
    backends = sorted({b for r in rows for b in r["policies"]} - {"reference"})
    for r in rows:
        # A backend with no kernel for a shape runs what a user without LayerZero would: torch's kernel
        # (torch's own policy, where torch has none, falls back to LayerZero's default pick).
        own = {b: k for b, k in r["policies"].items() if k[0].split(".", 1)[0] == b}
        fallback = own.get("torch", [r["before"], r["before_ratio"]])
        r["policies"] = {b: own.get(b, fallback) for b in backends}
    lines = [title, "", "ratio = time of the pick / time of the best correct candidate (second, independent timing "
             "pass); policy columns: always that backend (its highest-priority kernel that runs the shape; where "
             "it has none, torch's; where torch has none either, LayerZero's default pick)", "",
             "| shape | best (us) | before | after | " + " | ".join(f"always {b}" for b in backends) + " |",
             "|---|---|---|---|" + "---|" * len(backends)]
    for r in rows:
        pol = " | ".join(f"{r['policies'][b][1]:.3f}" for b in backends)
        flag = "" if r["tuned_confident"] else " (noisy: priorities kept)"
        lines.append(f"| {r['label']} | {r['best']} ({r['best_us']:.4g}) | {r['before']} {r['before_ratio']:.3f} | "
                     f"{r['after']} {r['after_ratio']:.3f}{flag} | {pol} |")
    g_before = geomean([r["before_ratio"] for r in rows])
    g_after = geomean([r["after_ratio"] for r in rows])
    worst = max((r["after_ratio"] for r in rows), default=float("nan"))
    g_pol = {b: geomean([r["policies"][b][1] for r in rows]) for b in backends}
    lines += ["", f"geomean regret: before tuning {g_before:.3f}, after tuning {g_after:.3f} (worst shape {worst:.3f})",
              "single-backend policies: " + ", ".join(f"always {b} {g:.3f}" for b, g in g_pol.items()),
              f"targets: after geomean <= 1.03: {'PASS' if g_after <= 1.03 else 'FAIL'}; every shape <= 1.10: "
              f"{'PASS' if worst <= 1.10 else 'FAIL'}; better than every single-backend policy: "
              f"{'PASS' if all(g_after < g for g in g_pol.values()) else 'FAIL'}"]
    wrong = sorted({k for r in rows for k in r["wrong"]})
    if wrong:
        lines.append("kernels that failed the reference check on some shape (never selected there): "
                     + ", ".join(wrong))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
