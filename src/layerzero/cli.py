"""The `layerzero` command: doctor, list, backends, explain (and the subcommands other modules add).

Each subcommand is a function `add(subparsers)` that declares its parser with `add_command`
and the function that runs it. To add one, write that function in your module and name it in
SUBCOMMANDS below ("module:function"); it is imported only when the CLI starts, and a module
that fails to import costs its subcommand, not the CLI.

    layerzero doctor [--json] [--no-smoke]
    layerzero list [PATTERN] [--json]
    layerzero backends [--json]
    layerzero explain attention --shape 1x512x512x32x8x128x1 --dtype float16 --device cuda [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

SUBCOMMANDS: list[str] = [
    "layerzero.cli:add_doctor",
    "layerzero.cli:add_list",
    "layerzero.cli:add_backends",
    "layerzero.cli:add_explain",
    "layerzero.perf.tune:add_tune_command",
    "layerzero.perf.solve:add_solve_command",
    "layerzero.capabilities:add_canary_command",
]

Runner = Callable[[argparse.Namespace], int]


def add_command(sub: Any, name: str, help: str, run: Runner) -> argparse.ArgumentParser:
    """A subcommand parser with the common `--json` flag, running `run(args) -> exit code`."""
    parser = sub.add_parser(name, help=help, description=help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=run)
    return parser


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print `data` as JSON with --json, else `text`."""
    print(json.dumps(data, indent=2, default=str) if args.json else text)


# -- doctor ----------------------------------------------------------------------------------------

def add_doctor(sub: Any) -> None:
    p = add_command(sub, "doctor", "device, driver, torch, backends, breakers, caches, PerfDB; exit 1 if not ready",
                    _doctor)
    p.add_argument("--no-smoke", action="store_true", help="skip the attention/rms_norm smoke test")


def _doctor(args: argparse.Namespace) -> int:
    from .runtime.doctor import doctor

    report = doctor(smoke=not args.no_smoke)
    emit(args, report.to_dict(), str(report))
    return 0 if report.ready else 1


# -- list and backends -----------------------------------------------------------------------------

def add_list(sub: Any) -> None:
    p = add_command(sub, "list", "registered kernels (glob on kernel id or op id)", _list)
    p.add_argument("pattern", nargs="?", default="*", help="e.g. 'torch.*' or 'attention.*' (default: all)")


def _list(args: argparse.Namespace) -> int:
    from .runtime.doctor import table
    from .selection.inspect import list_kernels

    kernels = list_kernels(args.pattern)
    rows = [[k.id, "yes" if k.available else "no", k.priority, ",".join(k.ops)] for k in kernels]
    data = [{"id": k.id, "backend": k.backend, "available": k.available, "priority": k.priority, "ops": list(k.ops),
             "description": k.description} for k in kernels]
    emit(args, data, "\n".join(table(["kernel", "available", "priority", "ops"], rows)))
    return 0


def add_backends(sub: Any) -> None:
    add_command(sub, "backends", "every backend with its version or why it is unavailable", _backends)


def _backends(args: argparse.Namespace) -> int:
    from .runtime.doctor import table
    from .selection.inspect import list_backends

    backends = list_backends()
    rows = [[b.name, "yes" if b.available else "no", b.version or "-", len(b.kernels), b.reason or ""]
            for b in backends]
    data = [{"name": b.name, "available": b.available, "version": b.version, "reason": b.reason,
             "kernels": list(b.kernels)} for b in backends]
    emit(args, data, "\n".join(table(["backend", "available", "version", "kernels", "reason"], rows)))
    return 0


# -- explain ---------------------------------------------------------------------------------------

def add_explain(sub: Any) -> None:
    p = add_command(sub, "explain", "every candidate kernel for an op and shape, with its reasons or score",
                    _explain)
    p.add_argument("op", help="an op id or family with a workload: attention.causal, norm.rms, attention, ...")
    p.add_argument("--shape", required=True,
                   help="the workload's dims joined by x: attention batch x seq_q x seq_k x heads x kv_heads x "
                        "head_dim x causal(0/1); rms_norm/layer_norm rows x hidden")
    p.add_argument("--dtype", default="float16", help="float16, bfloat16, float32, float64 (default float16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _explain(args: argparse.Namespace) -> int:
    import torch

    from .errors import InvalidInputError
    from .perf.workloads import context_for, family, op_shape
    from .state import runtime

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInputError("--dtype", "a torch dtype name such as float16", args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runtime.ensure_loaded()
    name, shape = op_shape(args.op, args.shape)
    ctx = context_for(name, shape, dtype, device)
    report = runtime.engine.evaluate(ctx, family(name).transforms)
    data = {
        "op": report.op, "selected": report.selected_kernel, "score": report.score, "fallback": report.fallback,
        "context": ctx.summary(), "notes": report.notes,
        "candidates": [{"kernel": c.kernel_id, "score": c.score, "transforms": list(c.transforms), "rules": c.rules,
                        "rejections": [{"reason": r.reason.value, "detail": r.detail} for r in c.rejections]}
                       for c in report.candidates],
    }
    emit(args, data, str(report))
    return 0


# -- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerzero", description="LayerZero: which kernel runs each op, and why")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in SUBCOMMANDS:
        module, _, name = entry.partition(":")
        try:
            add = getattr(importlib.import_module(module), name)
        except Exception as e:  # an optional module must not take the whole CLI down
            print(f"layerzero: subcommand {entry} unavailable: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `layerzero` script; returns the exit code."""
    from .errors import LayerZeroError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except LayerZeroError as e:
        print(f"layerzero {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
