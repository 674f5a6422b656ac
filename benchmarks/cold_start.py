"""Cold start: time to the first call of FlashInfer's five standard prefill variants and one decode
variant, from an empty JIT cache, before and after `lz.warmup`.

    # on the H200, after `source .gpu/activate.sh` (FlashInfer). Each phase is one fresh process with its
    # own empty caches (under --workdir); run them as separate
    # commands. The serial phase takes ~10 min: --only splits it (each part starts from empty caches too,
    # and the variants share no module), and its JSON is rewritten after every variant.
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/cold_start.py --phase before --only 0,1,2 --json $OUT/cold_before_a.json
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/cold_start.py --phase before --only 3,4,5 --json $OUT/cold_before_b.json
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/cold_start.py --phase after --json $OUT/cold_after.json
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/cold_start.py --render $OUT/cold_before_a.json $OUT/cold_before_b.json \\
        $OUT/cold_after.json --out benchmarks/results/cold_start-h200.md
    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/cold_start.py --phase both --json $OUT/cold.json          # both, in subprocesses

before: each variant compiled by its own first call, one after the other (what a server without warmup
        pays; FlashInfer's ninja builds each module with one nvcc per core). LAYERZERO_ALLOW_JIT=1
        lets selection pick an unbuilt variant.
after:  the machinery of lz.warmup: the six variants found (perf.warmup.jit_tasks) and built in
        parallel worker processes (perf.warmup.compile_parallel, sized to cores and free RAM, with
        its progress bar), then each shape selected and called (lz.warmup without workers). The
        total is the wall time from the start to the last first call.
The variants are those of tests/gpu/test_flashinfer_gpu.py: prefill bf16 d128, bf16 d64, bf16 d128
window+softcap, bf16 d256, fp16 d128; decode bf16 d128. Attention is locked to the backend, so every
variant is the backend's (the kernel that ran is printed). --backend flash_attn4 runs the same six
through FlashAttention-4 (CuTe DSL; after-phase workers need its disk cache, which this script turns
on in a fresh directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, workload shape: batch, seq_q, seq_k, heads, kv_heads, head_dim, causal; dtype; op keyword arguments)
VARIANTS = [
    ("prefill bf16 d128", (1, 1024, 1024, 32, 8, 128, 1), "bfloat16", {}),
    ("prefill bf16 d64", (1, 1024, 1024, 32, 8, 64, 1), "bfloat16", {}),
    ("prefill bf16 d128 window+softcap", (1, 1024, 1024, 32, 8, 128, 1), "bfloat16",
     {"window_size": (256, 0), "softcap": 30.0}),
    ("prefill bf16 d256", (1, 1024, 1024, 16, 4, 256, 1), "bfloat16", {}),
    ("prefill fp16 d128", (1, 1024, 1024, 32, 8, 128, 1), "float16", {}),
    ("decode bf16 d128", (8, 1, 4096, 32, 8, 128, 1), "bfloat16", {}),
]


def _environment(phase: str, workdir: Path, backend: str) -> None:
    """Empty caches for this phase; set before torch, FlashInfer or FA4 are imported."""
    base = workdir / phase
    base.mkdir(parents=True, exist_ok=True)
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(base / "flashinfer")
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = str(base / "fa4")
    os.environ["LAYERZERO_PROBE_CACHE"] = str(base / "probes.json")
    if phase == "before":
        os.environ["LAYERZERO_ALLOW_JIT"] = "1"
        os.environ.pop("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", None)
    else:
        os.environ.pop("LAYERZERO_ALLOW_JIT", None)
        if backend == "flash_attn4":
            os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"


def _machine() -> dict:
    import importlib.metadata

    import torch

    from layerzero.perf.warmup import compile_slots

    slots, cores, free = compile_slots()
    versions = {}
    for dist in ("flashinfer-python", "flashinfer-jit-cache", "flashinfer-cubin", "flash-attn-4"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cores": cores,
            "free_ram_gib": round(free / 2**30, 1), "compile_slots": slots, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), **versions}


def _inputs(shape: tuple, dtype_name: str):
    import torch

    from layerzero.perf import workloads

    dtype = getattr(torch, dtype_name)
    return workloads.workload("attention").make(shape, dtype, torch.device("cuda"),
                                                torch.Generator(device="cuda").manual_seed(0))


def run_before(backend: str, only: list[int], save: Path | None) -> dict:
    import torch

    import layerzero as lz

    lz.lock("attention.*", backend)
    rows, start = [], time.perf_counter()
    result = {"phase": "before", "backend": backend, "rows": rows, "machine": _machine()}
    for label, shape, dtype, options in (VARIANTS[i] for i in only):
        args = _inputs(shape, dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        error = ""
        try:
            lz.attention(*args, **options)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - recorded: the table says which variant failed
            error = f"{type(e).__name__}: {e}"[:200]
        seconds = time.perf_counter() - t0
        kernel = lz.which("attention", *args, **options)
        rows.append({"label": label, "kernel": kernel, "first_call_s": seconds, "error": error})
        print(f"[before] {label:<34} {kernel:<22} first call {seconds:8.2f} s {error}", file=sys.stderr, flush=True)
        result.update(total_s=time.perf_counter() - start, fallbacks=lz.health().fallbacks)
        if save is not None:  # kept if the command is stopped at its time limit
            save.write_text(json.dumps(result, indent=1))
    return result


def run_after(backend: str, jobs: int | None, only: list[int]) -> dict:
    import torch

    import layerzero as lz
    from layerzero.perf import warmup as W
    from layerzero.state import runtime

    lz.lock("attention.*", backend)
    device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    variants = [VARIANTS[i] for i in only]
    needs = [W.jit_task("attention", (shape, getattr(torch, dtype), dict(options)), device)
             for _, shape, dtype, options in variants]
    tasks = list({t.key: t for t in needs if t is not None}.values())
    t0 = time.perf_counter()
    built, processes = W.compile_parallel(tasks, jobs=jobs) if tasks else ([], 0)
    build_s = time.perf_counter() - t0
    runtime.bump()
    rows = []
    for (label, shape, dtype, options), task in zip(variants, needs, strict=True):
        report = lz.warmup("attention", [(shape, options)], [getattr(torch, dtype)], device, parallel=False)
        entry = report.entries[0]
        variant = next((b for b in built if task is not None and b.label == task.label), None)
        rows.append({"label": label, "kernel": entry.kernel, "first_call_ms": entry.first_ms,
                     "variant": None if variant is None else variant.label,
                     "built_s": None if variant is None else variant.seconds,
                     "error": "" if variant is None or variant.ok else variant.error})
        print(f"[after] {label:<34} {entry.kernel:<22} first call {entry.first_ms:8.1f} ms", file=sys.stderr, flush=True)
    return {"phase": "after", "backend": backend, "rows": rows, "total_s": time.perf_counter() - start,
            "build_wall_s": build_s, "processes": processes, "fallbacks": lz.health().fallbacks}


def merge(results: list[dict]) -> tuple[dict, dict]:
    """One before and one after result from phase files (a serial phase may come in parts)."""
    before = [r for r in results if r["phase"] == "before"]
    after = [r for r in results if r["phase"] == "after"]
    if not before or len(after) != 1:
        raise SystemExit("--render needs the before file(s) and one after file")
    rows = [row for r in before for row in r["rows"]]
    order = [v[0] for v in VARIANTS]
    rows.sort(key=lambda row: order.index(row["label"]))
    total = sum(row["first_call_s"] for row in rows)  # serial first calls: their sum is the time to the last
    merged = {**before[0], "rows": rows, "total_s": total, "fallbacks": sum(r.get("fallbacks", 0) for r in before)}
    return merged, after[0]


def render(before: dict, after: dict) -> str:
    m = after.get("machine") or before.get("machine") or {}
    lines = [f"# Cold start: {before['backend']}, five prefill variants and one decode variant",
             "",
             f"{m.get('gpu')}, {m.get('cores')} cores, {m.get('free_ram_gib')} GiB free RAM, {m.get('date')}; "
             f"torch {m.get('torch')}, flashinfer {m.get('flashinfer-python')}, flashinfer-jit-cache "
             f"{m.get('flashinfer-jit-cache')}, flash-attn-4 {m.get('flash-attn-4')}. Empty JIT caches in both phases.",
             f"Before: each variant compiled by its own first call, serially. After: `lz.warmup`'s workers, "
             f"{after.get('processes')} processes at once (compile slots {m.get('compile_slots')}), then each "
             "shape selected and called.",
             "",
             "| variant | kernel (before / after) | before: first call (s) | after: built in a worker (s) | after: first call (ms) |",
             "|---|---|---|---|---|"]
    for b, a in zip(before["rows"], after["rows"], strict=True):
        built = "-" if a["built_s"] is None else f"{a['built_s']:.1f}"
        note = "".join(f" ({x})" for x in (b["error"], a["error"]) if x)
        lines.append(f"| {b['label']} | {b['kernel']} / {a['kernel']} | {b['first_call_s']:.1f} | {built} | "
                     f"{a['first_call_ms']:.1f}{note} |")
    lines.append(f"| **total** | | **{before['total_s']:.1f}** (serial) | **{after['build_wall_s']:.1f}** wall "
                 f"(all variants at once) | **{after['total_s']:.1f} s** from the start to the last first call |")
    lines.append("")
    lines.append(f"Time to first call of all six: {before['total_s']:.1f} s before, {after['total_s']:.1f} s after "
                 f"({before['total_s'] / max(after['total_s'], 1e-9):.2f}x). Fallbacks during the runs: "
                 f"before {before.get('fallbacks')}, after {after.get('fallbacks')}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["before", "after", "both"])
    parser.add_argument("--backend", default="flashinfer", choices=["flashinfer", "flash_attn4"])
    parser.add_argument("--jobs", type=int, default=None, help="worker processes at once (default: sized)")
    parser.add_argument("--workdir", default=None, help="where the empty caches go (default: a new temporary dir)")
    parser.add_argument("--json", default=None, help="write the phase's results (both: {before, after}) here")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="print the table from the phases' files")
    parser.add_argument("--only", default=None, help="indices of the variants to run, e.g. 0,1,2 (default: all six)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    only = [int(i) for i in args.only.split(",")] if args.only else list(range(len(VARIANTS)))
    if args.render:
        text = render(*merge([json.loads(Path(f).read_text()) for f in args.render]))
    elif args.phase == "both":
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lz-cold-"))
        results = {}
        for phase in ("before", "after"):
            out = workdir / f"{phase}.json"
            cmd = [sys.executable, __file__, "--phase", phase, "--backend", args.backend, "--workdir", str(workdir),
                   "--json", str(out)] + (["--jobs", str(args.jobs)] if args.jobs else []) + (
                   ["--only", args.only] if args.only else [])
            subprocess.run(cmd, check=True)
            results[phase] = json.loads(out.read_text())
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        text = render(*merge([results["before"], results["after"]]))
    elif args.phase:
        _environment(args.phase, Path(args.workdir or tempfile.mkdtemp(prefix="lz-cold-")), args.backend)
        save = Path(args.json) if args.json else None
        result = (run_before(args.backend, only, save) if args.phase == "before"
                  else run_after(args.backend, args.jobs, only))
        result["machine"] = _machine()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        text = json.dumps(result, indent=1)
    else:
        parser.error("give --phase or --render")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
