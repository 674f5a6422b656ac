"""The `layerzero` command: doctor, list, backends, explain, tune, solve, warmup, canary.

Each subcommand is a function `add(subparsers)` that declares its parser with `add_command` and
the function that runs it; the library modules a subcommand needs are imported when it runs, and
no library module imports this one. SUBCOMMANDS names them ("module:function"): a plug-in adds its
own there; a module that fails to import costs its subcommand, not the CLI.

    layerzero doctor [--json] [--no-smoke]
    layerzero list [PATTERN] [--json]
    layerzero backends [--json]
    layerzero explain attention --shape 1x512x512x32x8x128x1 --dtype float16 --device cuda [--json]
    layerzero warmup attention --shape 8x2048x2048x32x8x128x1 --dtype bfloat16 [--jobs N] [--serial]
    layerzero tune attention --shape 1x512x512x32x8x128x1 --dtype bfloat16 [--report DIR]
    layerzero solve attention --dim batch=1:64 --dim heads=32 ... --out solved.py
    layerzero canary torch [--device cpu]
    layerzero --version             (python -m layerzero is the same command)

Every error is one line on stderr that says what to change, with exit code 2 (a usage or input
error) or 1 (the check ran and failed, or the backend to check is not installed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .capabilities import canary, load_descriptors
from .device import local_device_types
from .doctor import doctor, table
from .errors import BackendNotAvailableError, InvalidInputError, LayerZeroError, NoKernelFoundError
from .kernel import dtype_name
from .selection.inspect import list_backends, list_kernels
from .state import runtime
from .version import __version__

SUBCOMMANDS: list[str] = [
    "layerzero.cli:add_doctor",
    "layerzero.cli:add_list",
    "layerzero.cli:add_backends",
    "layerzero.cli:add_explain",
    "layerzero.cli:add_tune",
    "layerzero.cli:add_solve",
    "layerzero.cli:add_warmup",
    "layerzero.cli:add_canary",
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


def parse_dtype(name: str, argument: str = "--dtype") -> Any:
    """The torch dtype of `name`, spelled as policy conditions spell it: float16, bf16, fp32,
    torch.float64, ..."""
    import torch

    canonical = dtype_name(name) if isinstance(name, str) else None
    if canonical is None:
        raise InvalidInputError(
            argument, "a torch dtype name such as float16, bfloat16, float32 (or fp16, bf16, fp32)", repr(name)
        )
    return getattr(torch, canonical)


def parse_device(value: str | None, argument: str = "--device") -> Any:
    """The torch.device of `value` (default: cuda if this torch has it, else cpu), checked to exist here."""
    import torch

    here = local_device_types()
    if value is None:
        return torch.device("cuda" if "cuda" in here else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidInputError(argument, "a device such as cpu, cuda or cuda:1", repr(value)) from None
    if device.type not in here:
        raise InvalidInputError(
            argument,
            f"a device of this machine ({', '.join(here)})",
            repr(value),
            f"this torch {torch.__version__} cannot run on {device.type}; pass --device cpu",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidInputError(argument, f"a CUDA device index below {torch.cuda.device_count()}", repr(value))
    return device


# -- doctor ----------------------------------------------------------------------------------------


def add_doctor(sub: Any) -> None:
    p = add_command(
        sub, "doctor", "device, driver, torch, backends, breakers, caches, PerfDB; exit 1 if not ready", _doctor
    )
    p.add_argument("--no-smoke", action="store_true", help="skip the attention/rms_norm smoke test")


def _doctor(args: argparse.Namespace) -> int:

    report = doctor(smoke=not args.no_smoke)
    emit(args, report.to_dict(), str(report))
    return 0 if report.ready else 1


# -- list and backends -----------------------------------------------------------------------------


def add_list(sub: Any) -> None:
    p = add_command(sub, "list", "registered kernels (glob on kernel id or op id)", _list)
    p.add_argument("pattern", nargs="?", default="*", help="e.g. 'torch.*' or 'attention.*' (default: all)")


def _list(args: argparse.Namespace) -> int:

    kernels = list_kernels(args.pattern)
    rows = [[k.id, _where(k), k.priority, ",".join(k.ops)] for k in kernels]
    data = [
        {
            "id": k.id,
            "backend": k.backend,
            "available": k.available,
            "devices": list(k.devices),
            "platforms": sorted(k.platforms),
            "priority": k.priority,
            "ops": list(k.ops),
            "description": k.description,
        }
        for k in kernels
    ]
    emit(args, data, "\n".join(table(["kernel", "available on", "priority", "ops"], rows)))
    return 0


def _where(kernel: Any) -> str:
    """ "cpu", "cpu,cuda", or why the kernel runs on no device of this machine."""
    if kernel.devices:
        return ",".join(kernel.devices)
    if not kernel.available:
        return "no (backend not installed)"
    return f"no (runs on {'/'.join(sorted(kernel.platforms))})"


def add_backends(sub: Any) -> None:
    add_command(sub, "backends", "every backend with its version or why it is unavailable", _backends)


def _backends(args: argparse.Namespace) -> int:

    backends = list_backends()
    rows = [
        [b.name, "yes" if b.available else "no", b.version or "-", len(b.kernels), b.reason or b.probe or ""]
        for b in backends
    ]
    data = [
        {
            "name": b.name,
            "available": b.available,
            "version": b.version,
            "reason": b.reason,
            "probe": b.probe,
            "kernels": list(b.kernels),
        }
        for b in backends
    ]
    emit(args, data, "\n".join(table(["backend", "available", "version", "kernels", "reason / probe"], rows)))
    return 0


# -- explain ---------------------------------------------------------------------------------------


def add_explain(sub: Any) -> None:
    p = add_command(sub, "explain", "every candidate kernel for an op and shape, with its reasons or score", _explain)
    p.add_argument("op", help="an op id or family with a workload: attention.causal, norm.rms, attention, ...")
    p.add_argument(
        "--shape",
        required=True,
        help="the workload's dims joined by x: attention batch x seq_q x seq_k x heads x kv_heads x "
        "head_dim x causal(0/1); rms_norm/layer_norm rows x hidden",
    )
    p.add_argument(
        "--dtype",
        default="float16",
        help="float16, bfloat16, float32, float64 or fp16, bf16, fp32, fp64 (default float16)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _explain(args: argparse.Namespace) -> int:
    from .perf.workloads import context_for, family, op_shape

    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device)
    runtime.ensure_loaded()
    name, shape = op_shape(args.op, args.shape)
    ctx = context_for(name, shape, dtype, device)
    report = runtime.engine.evaluate(ctx, family(name).transforms)
    data = {
        "op": report.op,
        "selected": report.selected_kernel,
        "score": report.score,
        "fallback": report.fallback,
        "context": ctx.summary(),
        "notes": report.notes,
        "regime": report.regime,
        "decided_by": report.decided_by,
        "candidates": [
            {
                "kernel": c.kernel_id,
                "score": c.score,
                "transforms": list(c.transforms),
                "rules": c.rules,
                "measured_us": c.measured_us,
                "measured_regime": c.measured_regime,
                "decided_by": c.decided_by,
                "rejections": [{"reason": r.reason.value, "detail": r.detail} for r in c.rejections],
            }
            for c in report.candidates
        ],
    }
    emit(args, data, str(report))
    return 0


# -- tune, solve, warmup --------------------------------------------------------------------------


def add_tune(sub: Any) -> None:
    """`layerzero tune OP --shape AxBx... [--dtype ...] [--report DIR]`."""
    p = add_command(sub, "tune", "measure every valid kernel for shapes, store in PerfDB, report", _tune)
    p.add_argument("op", nargs="?", help="attention, rms_norm, layer_norm")
    p.add_argument("--shape", action="append", default=[], help="dims joined by x (repeat for several shapes)")
    p.add_argument(
        "--dtype", action="append", default=[], help="float16, bfloat16, float32 or bf16, fp32, ... (repeatable)"
    )
    p.add_argument("--trace", help="a trace JSON written by lz.save_trace")
    p.add_argument("--device", default=None)
    p.add_argument("--kernels", default="*", help="glob on kernel ids or backends")
    p.add_argument("--repeats", type=int, default=20, help="samples per figure (more while p95/median > 1.1)")
    p.add_argument(
        "--no-graphs", dest="graphs", action="store_false", help="eager figures only (no CUDA-graph replay timing)"
    )
    p.add_argument("--perfdb", default=None, help="PerfDB file (default: $LAYERZERO_PERFDB or the cache dir)")
    p.add_argument("--report", default=None, help="directory for tune_report.md and tune_heatmap.png")


def _tune(args: argparse.Namespace) -> int:
    from .perf.tune import tune

    dtypes = [parse_dtype(name) for name in args.dtype]
    device = parse_device(args.device) if args.device is not None else None
    report = tune(
        args.op,
        shapes=args.shape,
        dtypes=dtypes,
        trace=args.trace,
        device=device,
        kernels=args.kernels,
        repeats=args.repeats,
        perfdb=args.perfdb,
        report=args.report,
        graphs=args.graphs,
    )
    data = [
        {
            "op": r.op,
            "shape": list(r.shape),
            "dtype": r.dtype,
            "best": r.best.kernel if r.best else None,
            "best_graph": getattr(r.best_in("graph"), "kernel", None),
            "kernels": {x.kernel: (x.median_us if x.correct else "wrong") for x in r.records},
            "graph_us": {x.kernel: x.graph_us for x in r.records if x.correct},
            "graph_notes": {x.kernel: x.graph_note for x in r.records if x.graph_note},
        }
        for r in report.results
    ]
    emit(args, data, str(report))
    return 0


def add_solve(sub: Any) -> None:
    """`layerzero solve OP --dim batch=1:64 --dim heads=32 ... --out solved.py`."""
    p = add_command(sub, "solve", "write a standalone module dispatching an op by shape buckets", _solve)
    p.add_argument("op", help="attention, rms_norm, layer_norm")
    p.add_argument("--dim", action="append", default=[], help="NAME=LO:HI for a ranged dim, NAME=V1,V2 for exact")
    p.add_argument("--dtype", action="append", default=[], help="repeatable; default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="path of the module to write")


def _solve(args: argparse.Namespace) -> int:
    from .perf.solve import solve

    dims: dict[str, Any] = {}
    for item in args.dim:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError("--dim", "NAME=LO:HI or NAME=V1,V2", item)
        try:
            if ":" in value:
                lo, hi = value.split(":", 1)
                dims[name] = (int(lo), int(hi))
            else:
                dims[name] = [int(v) for v in value.split(",") if v]
        except ValueError:
            raise InvalidInputError("--dim", "NAME=LO:HI or NAME=V1,V2 with integers", item) from None
    dtypes = [parse_dtype(d) for d in args.dtype]
    device = parse_device(args.device) if args.device is not None else None
    result = solve(args.op, args.out, dtypes=dtypes, device=device, **dims)
    emit(
        args,
        {
            "path": str(result.path),
            "kernels": result.kernels,
            "buckets": result.buckets,
            "branches": result.branches,
            "notes": list(result.notes),
        },
        str(result),
    )
    return 0


def add_warmup(sub: Any) -> None:
    p = add_command(
        sub, "warmup", "build the JIT variants of given shapes in parallel, then pre-select and run each once", _warmup
    )
    p.add_argument("op", help="an op with a workload: attention, rms_norm, layer_norm, rope_qk, paged_attention")
    p.add_argument(
        "--shape",
        action="append",
        required=True,
        help="the workload's dims joined by x (repeatable), e.g. attention 8x1x4096x32x8x128x1",
    )
    p.add_argument("--dtype", action="append", default=None, help="float16, bfloat16, float32 (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes at once (default: cores and free RAM)")
    p.add_argument("--serial", action="store_true", help="no worker processes: compile in this process")
    p.add_argument("--window", default=None, help="attention window_size as LEFT,RIGHT (-1 = unbounded)")
    p.add_argument("--softcap", type=float, default=None, help="attention logits soft cap")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _warmup(args: argparse.Namespace) -> int:
    import torch

    from .perf.warmup import warmup

    dtypes = []
    for name in args.dtype or []:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError("--dtype", "a torch dtype name such as bfloat16", name)
        dtypes.append(dtype)
    options: dict[str, Any] = {}
    if args.window:
        options["window_size"] = tuple(int(x) for x in args.window.split(","))
    if args.softcap:
        options["softcap"] = args.softcap
    report = warmup(
        args.op,
        args.shape,
        dtypes,
        args.device,
        options=options,
        parallel=not args.serial,
        jobs=args.jobs,
        progress=not args.quiet,
    )
    data = {
        "seconds": report.seconds,
        "compile_seconds": report.compile_seconds,
        "processes": report.processes,
        "variants": [
            {"label": v.label, "kernel": v.kernel, "seconds": v.seconds, "ok": v.ok, "error": v.error}
            for v in report.variants
        ],
        "entries": [
            {
                "shape": list(e.shape),
                "dtype": e.dtype,
                "kernel": e.kernel,
                "select_ms": e.select_ms,
                "first_ms": e.first_ms,
                "second_ms": e.second_ms,
                "compiled": e.compiled,
            }
            for e in report.entries
        ],
    }
    emit(args, data, str(report))
    return 0 if all(v.ok for v in report.variants) else 1


# -- canary ----------------------------------------------------------------------------------------


def add_canary(sub: Any) -> None:
    """`layerzero canary BACKEND [--device D] [--json]`: exit 1 when a declared capability does not hold."""
    p = add_command(
        sub, "canary", "run a backend's declared capabilities against the reference; exit 1 on a lie", _canary
    )
    p.add_argument("backend", help="a backend name or alias, e.g. torch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--descriptors", default=None, help="a descriptor file or directory to load first")


def _canary(args: argparse.Namespace) -> int:

    if args.descriptors:
        load_descriptors(args.descriptors)
    report = canary(args.backend, parse_device(args.device))
    emit(args, report.to_dict(), str(report))
    if not report.claims:  # nothing was checked: not a pass
        runtime.ensure_loaded()
        platforms = sorted(
            {p for s in runtime.registry.kernels.values() if s.backend == report.backend for p in s.platforms}
        )
        print(
            f"layerzero canary: no claim of {report.backend} can be checked on {report.device} (its kernels run on "
            f"{'/'.join(platforms) or 'no platform'}, or are of ops the canary has no runner for)",
            file=sys.stderr,
        )
        return 1
    return 0 if report.ok else 1


# -- main ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:

    parser = _Parser(prog="layerzero", description="LayerZero: which kernel runs each op, and why")
    parser.add_argument("--version", action="version", version=f"layerzero {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an unexpected error, print the traceback (for a bug report) instead of one line",
    )
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
    """Entry point of the `layerzero` script and of `python -m layerzero`; returns the exit code.

    Errors are one line: a LayerZeroError's first line (it names the argument, the expected and the
    given value), exit code 2; BackendNotAvailableError (nothing to check here) exit code 1; any
    other exception its type and first line, exit code 2 (--traceback shows where it came from).
    """

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    where = f"layerzero {args.command}"
    try:
        return int(args.run(args))
    except BackendNotAvailableError as e:
        print(f"{where}: {_first_line(e)}", file=sys.stderr)
        return 1
    except LayerZeroError as e:
        more = "; `layerzero explain` lists every kernel's reasons" if isinstance(e, NoKernelFoundError) else ""
        print(f"{where}: error: {_first_line(e)}{more}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.traceback:
            raise
        print(
            f"{where}: error: {type(e).__name__}: {_first_line(e)} (if the arguments are right, this is a bug: "
            "report it with the output of --traceback)",
            file=sys.stderr,
        )
        return 2


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
