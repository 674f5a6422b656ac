"""Hot-path cost of the runtime guard and of telemetry: per call, telemetry off vs on.

Per case it times (minimum over repeats, microseconds per call, tiny inputs so overhead shows;
the no-op kernel case isolates LayerZero's own cost):
  kernel       the selected kernel's impl called directly (no LayerZero at all)
  plan.run     the bound plan with its fallback guard (what the hot path calls last)
  lz off       the public op, telemetry disabled (key + dict lookup + guarded plan)
  lz on        the public op, telemetry enabled (adds one call counter per call)

    PYTHONPATH=src python3 benchmarks/telemetry_overhead.py [--device cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import timeit
from pathlib import Path

import torch

import layerzero as lz
from layerzero.state import runtime


def per_call_us(fn, args: tuple, number: int, repeat: int) -> float:
    """Minimum over repeats (robust to other load on the machine), microseconds per call of fn(*args)."""
    fn(*args)
    return min(timeit.repeat(lambda: fn(*args), number=number, repeat=repeat)) / number * 1e6


def _noop_rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x


def cases(device: torch.device) -> dict[str, tuple]:
    """case -> (public op, its args, the plan's run args, the kernel's args in BHSD, register a no-op kernel)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(4, 64, device=device, dtype=dtype)
    w = torch.randn(64, device=device, dtype=dtype)
    q = torch.randn(1, 8, 2, 16, device=device, dtype=dtype)
    qt = q.transpose(1, 2)
    return {
        "rms_norm, no-op kernel": (lz.rms_norm, (x, w), (x, w, 1e-6), (x, w, 1e-6), True),
        "rms_norm": (lz.rms_norm, (x, w), (x, w, 1e-6), (x, w, 1e-6), False),
        "attention": (lz.attention, (q, q, q), (q, q, q, None, False, 0.0, None), (qt, qt, qt, None, False, 0.0, None),
                      False),
    }


def measure(device: torch.device, number: int, repeat: int, real: bool) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, (op, args, plan_args, bhsd_args, noop) in cases(device).items():
        if not (noop or real):
            continue
        lz.reset()
        if noop:  # isolates LayerZero's own cost: the kernel does nothing
            lz.register_kernel(id="bench.noop_rms", ops=("norm.rms",), impl=_noop_rms, priority=10_000,
                               platforms=frozenset({device.type}), dtypes=frozenset({args[0].dtype}))
        plan = lz.select(op, *args)
        spec = runtime.registry.kernel(plan.kernel_id)
        kernel_args = bhsd_args if spec.layout == "BHSD" else plan_args
        row = {"case": name, "kernel": plan.kernel_id}
        row["kernel_us"] = per_call_us(spec.impl, kernel_args, number, repeat)
        row["plan_run_us"] = per_call_us(plan.run, plan_args, number, repeat)
        row["lz_off_us"] = per_call_us(op, args, number, repeat)
        lz.enable_telemetry(prometheus=False, opentelemetry=False)
        row["lz_on_us"] = per_call_us(op, args, number, repeat)
        lz.disable_telemetry()
        sync()
        row["telemetry_cost_us"] = row["lz_on_us"] - row["lz_off_us"]
        row["guard_cost_us"] = row["plan_run_us"] - row["kernel_us"]
        rows.append(row)
    lz.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--real", action="store_true", help="also time real kernels (noisy on a loaded machine)")
    parser.add_argument("--out", default=None, help="directory for JSON + markdown results")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = measure(device, args.number, args.repeat, args.real)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {"device": f"{device.type}: {name}", "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "number": args.number, "repeat": args.repeat}
    header = ("| case | kernel | kernel µs | plan.run µs | lz (telemetry off) µs | lz (telemetry on) µs "
              "| telemetry cost µs |")
    lines = [f"# Telemetry overhead on the hot path ({meta['device']}, torch {meta['torch']}, {meta['date']})", "",
             "Minimum over repeats, per call, tiny inputs; `plan.run - kernel` is the fallback guard's cost.", "",
             header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel']} | {r['kernel_us']:.2f} | {r['plan_run_us']:.2f} | "
                     f"{r['lz_off_us']:.2f} | {r['lz_on_us']:.2f} | {r['telemetry_cost_us']:+.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"telemetry-overhead-{device.type}"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
