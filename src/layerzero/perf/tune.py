"""`lz.tune`: measure every valid kernel for given shapes (or a recorded trace), store the timings
in PerfDB, and report a table and a PNG heatmap of time per kernel per shape.

    report = lz.tune("attention", shapes=[(1, 4096, 4096, 32, 8, 128, 1)], dtypes=[torch.bfloat16])
    print(report); report.write("tune_report/")

    with lz.record_trace() as trace:      # every distinct call signature of the model, once
        model(inputs)
    lz.tune(trace=trace)
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import ConfigurationError, InvalidInputError
from ..kernel import KernelSpec, check_constraints
from ..selection.engine import REFERENCE_BACKEND
from ..state import runtime
from . import workloads
from .bench import measure
from .perfdb import REGIMES, Measurements, PerfDB, PerfRecord

TraceEntry = tuple[str, SelectionContext]


@dataclass(frozen=True, slots=True)
class ShapeResult:
    """The measurements of one (op family, shape, dtype)."""

    family: str
    shape: tuple[int, ...]
    dtype: str
    op: str
    records: tuple[PerfRecord, ...]

    @property
    def best(self) -> PerfRecord | None:
        """The fastest correct kernel by the eager figure."""
        return self.best_in("eager")

    def best_in(self, regime: str) -> PerfRecord | None:
        """The fastest correct kernel among those measured in `regime` ("eager" or "graph")."""
        timed = [
            (f.median_us, r.kernel, r) for r in self.records if r.correct for f in (r.figure(regime),) if f is not None
        ]
        return min(timed, key=lambda t: t[:2])[2] if timed else None

    @property
    def label(self) -> str:
        return f"{self.op} {self.dtype} {'x'.join(map(str, self.shape))}"


@dataclass(slots=True)
class TuneReport:
    """What `lz.tune` measured (also stored in PerfDB), with notes on what it skipped."""

    results: list[ShapeResult]
    perfdb: Path | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kernels(self) -> list[str]:
        return sorted({r.kernel for res in self.results for r in res.records})

    @property
    def regimes(self) -> list[str]:
        """The regimes with at least one figure: eager, and graph when some kernel was captured."""
        return [g for g in REGIMES if any(r.figure(g) for res in self.results for r in res.records)]

    def table(self) -> str:
        """A markdown table: microseconds per call per kernel per shape, "eager / graph" (graph: CUDA-graph
        replay, "-" where there is none); * = fastest in that regime, wrong = failed the reference check."""
        kernels = self.kernels
        lines = [
            "| shape | " + " | ".join(kernels) + " | best eager | best graph |",
            "|---|" + "---|" * (len(kernels) + 2),
        ]
        for res in self.results:
            by_kernel = {r.kernel: r for r in res.records}
            best = {g: res.best_in(g) for g in REGIMES}
            cells = []
            for k in kernels:
                r = by_kernel.get(k)
                if r is None:
                    cells.append("-")
                elif not r.correct:
                    cells.append("error" if r.error else f"wrong ({r.max_error:.2g})")
                else:
                    parts = []
                    for g in REGIMES:
                        f = r.figure(g)
                        parts.append("-" if f is None else f"{f.median_us:.4g}{'*' if best[g] is r else ''}")
                    cells.append(" / ".join(parts))
            picks = " | ".join(getattr(best[g], "kernel", "-") for g in REGIMES)
            lines.append(f"| {res.label} | " + " | ".join(cells) + f" | {picks} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        where = f" stored in {self.perfdb}" if self.perfdb else ""
        head = (
            f"tuned {len(self.results)} shape(s) in {self.seconds:.1f} s{where}; us per call, eager "
            "(N back-to-back calls) / graph (the same calls replayed from a CUDA graph: device time)"
        )
        return "\n".join([head, self.table(), *(f"note: {n}" for n in self.notes)])

    def heatmap(self, path: str | Path) -> Path:
        """A PNG of time / fastest per kernel (columns) per shape (rows), one panel per regime
        measured (eager, graph); needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kernels = self.kernels
        regimes = self.regimes or ["eager"]
        fig, axes = plt.subplots(
            1,
            len(regimes),
            squeeze=False,
            figsize=(len(regimes) * (2 + 1.6 * len(kernels)), 1 + 0.5 * len(self.results)),
        )
        for ax, regime in zip(axes[0], regimes, strict=True):
            grid = [[math.nan] * len(kernels) for _ in self.results]
            text = [[""] * len(kernels) for _ in self.results]
            for i, res in enumerate(self.results):
                best = res.best_in(regime)
                for r in res.records:
                    j = kernels.index(r.kernel)
                    f = r.figure(regime)
                    if not r.correct:
                        text[i][j] = "wrong"
                    elif f is not None and best is not None:
                        grid[i][j] = f.median_us / best.figure(regime).median_us  # type: ignore[union-attr]
                        text[i][j] = f"{f.median_us:.3g}"
                    else:
                        text[i][j] = "-"
            image = ax.imshow(grid, cmap="viridis_r", aspect="auto", norm=matplotlib.colors.LogNorm(vmin=1.0))
            ax.set_xticks(range(len(kernels)), kernels, rotation=30, ha="right")
            ax.set_yticks(range(len(self.results)), [res.label for res in self.results])
            for i, row in enumerate(text):
                for j, cell in enumerate(row):
                    ax.text(
                        j, i, cell, ha="center", va="center", color="white" if cell == "wrong" else "black", fontsize=8
                    )
            fig.colorbar(image, ax=ax, label="time / fastest (us in cells)")
            ax.set_title(f"LayerZero tune, {regime}: us per call")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, directory: str | Path) -> list[Path]:
        """Write tune_report.md (and tune_heatmap.png when matplotlib is installed) to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = [directory / "tune_report.md"]
        try:
            written.append(self.heatmap(directory / "tune_heatmap.png"))
        except ImportError:
            self.notes.append("no heatmap: pip install matplotlib (or layerzero[plot])")
        written[0].write_text(str(self) + "\n")
        return written


@contextmanager
def record_trace() -> Iterator[list[TraceEntry]]:
    """Record the (op family, SelectionContext) of every distinct call made inside the block.

    Cached plans are dropped on entry so each distinct call signature passes through selection
    once; the hot path is untouched.
    """
    entries: list[TraceEntry] = []
    runtime.trace = entries
    runtime.bump()
    try:
        yield entries
    finally:
        runtime.trace = None


def save_trace(trace: Iterable[TraceEntry], path: str | Path) -> Path:
    """Write a trace as JSON (op family, shape, dtype per distinct call) for `lz.tune(trace=path)`."""
    rows = []
    for name, ctx in trace:
        shape = workloads.shape_of(name, ctx) if name in workloads.WORKLOADS else None
        rows.append(
            {
                "op": name,
                "context": ctx.summary(),
                "shape": None if shape is None else list(shape),
                "dtype": ctx.dtype_name,
                "device": ctx.device_type,
            }
        )
    path = Path(path)
    path.write_text(json.dumps(rows, indent=1))
    return path


Problem = tuple[str, tuple[int, ...], torch.dtype, str]  # family, shape, dtype, device type


def _problems_from_trace(trace: Iterable[TraceEntry] | str | Path, notes: list[str]) -> list[Problem]:
    out = []
    if isinstance(trace, str | Path):
        for row in json.loads(Path(trace).read_text()):
            if row.get("shape") is None:
                notes.append(f"trace: skipped {row.get('context', row)} (no workload reproduces it)")
                continue
            out.append((row["op"], tuple(row["shape"]), getattr(torch, row["dtype"]), row.get("device", "cpu")))
        return out
    for name, ctx in trace:
        shape = workloads.shape_of(name, ctx) if name in workloads.WORKLOADS else None
        if shape is None:
            notes.append(f"trace: skipped {name} {ctx.summary()} (no workload reproduces it)")
            continue
        out.append((name, shape, ctx.dtype, ctx.device_type))
    return out


def tunable_kernels(ctx: SelectionContext, pattern: str = "*", include_reference: bool = False) -> list[KernelSpec]:
    """Kernels that can run `ctx` here (installed, healthy, constraints met); policy is not applied."""
    out = []
    for spec in runtime.registry.candidates(ctx.op):
        if spec.backend == REFERENCE_BACKEND and not include_reference:
            continue
        if not fnmatch.fnmatchcase(spec.id, pattern) and not fnmatch.fnmatchcase(spec.backend, pattern):
            continue
        if not runtime.registry.backend(spec.backend).availability[0]:
            continue
        if runtime.health_rejections(spec) or check_constraints(spec, ctx):
            continue
        out.append(spec)
    return out


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def tune(
    operation: str | None = None,
    shapes: Sequence[Any] = (),
    dtypes: Sequence[torch.dtype] = (),
    *,
    trace: Iterable[TraceEntry] | str | Path | None = None,
    device: str | torch.device | None = None,
    kernels: str = "*",
    repeats: int = 20,
    warmup: int = 3,
    min_sample_s: float | None = None,
    perfdb: str | Path | None = None,
    report: str | Path | None = None,
    progress: bool = True,
    include_reference: bool = False,
    graphs: bool = True,
    max_repeats: int | None = None,
) -> TuneReport:
    """Measure every valid kernel for each (shape, dtype) of `operation` (or each call of a `trace`),
    check it against the reference first, store the timings in PerfDB and return the report.

    Each kernel gets an eager figure (N back-to-back calls: what eager calls pay) and, on CUDA for
    graph-safe kernels (graphs=True), a graph figure (the same calls replayed from a CUDA graph:
    device time); selection reads the one of the regime each call runs in (see perf/bench.py).
    operation: an op id (`"attention.causal"`, `"norm.rms"`) or a family name (`"attention"`).
    shapes: tuples or "AxBx..." strings in the workload's dims (attention: batch, seq_q, seq_k,
    heads, kv_heads, head_dim, causal, or for an attention op id (batch, seq, heads, head_dim);
    norms: rows, hidden). kernels: glob on kernel ids or backends. repeats: samples per figure, more
    (up to max_repeats, default 5 * repeats) while p95 / median > 1.1. perfdb: a path to use instead
    of the runtime's PerfDB (it becomes the runtime's). report: a directory for tune_report.md and
    tune_heatmap.png. Cached plans are dropped after.
    """
    started = time.perf_counter()
    dev = torch.device(device) if device is not None else _default_device()
    if perfdb is not None:
        runtime.set_measurements(Measurements(perfdb, runtime.measurements.version_of))
    runtime.ensure_loaded()
    db: PerfDB | None = runtime.measurements.db
    if db is None:
        raise ConfigurationError("PerfDB is off (LAYERZERO_PERFDB=off); pass perfdb=PATH to lz.tune")
    notes: list[str] = []
    problems: list[Problem] = []
    if trace is not None:
        problems.extend(_problems_from_trace(trace, notes))
    if operation is not None:
        if not shapes:
            wl = workloads.workload(workloads.resolve(operation)[0])
            raise InvalidInputError("shapes", f"at least one shape ({', '.join(wl.dims)}) for {operation}", shapes)
        resolved = [workloads.op_shape(operation, s) for s in shapes]
        for dtype in dtypes or [torch.bfloat16 if dev.type == "cuda" else torch.float32]:
            problems.extend((name, shape, dtype, dev.type) for name, shape in resolved)
    elif trace is None:
        raise InvalidInputError("operation", "an op id or family name (or trace=...)", None)
    seen, unique = set(), []
    for p in problems:  # one measurement per (family, shape, dtype)
        if p not in seen:
            seen.add(p)
            unique.append(p)
    results = []
    sample_s = min_sample_s if min_sample_s is not None else (1e-3 if dev.type == "cuda" else 2e-3)
    for i, (name, shape, dtype, device_type) in enumerate(unique, 1):
        where = dev if device_type == dev.type else torch.device(device_type)
        ctx = workloads.context_for(name, shape, dtype, where)
        specs = tunable_kernels(ctx, kernels, include_reference)
        if progress:
            print(
                f"\r[{i}/{len(unique)}] {name} {ctx.dtype_name} {'x'.join(map(str, shape))}: {len(specs)} kernel(s)   ",
                end="",
                file=sys.stderr,
                flush=True,
            )
        if not specs:
            notes.append(f"{name} {'x'.join(map(str, shape))} {ctx.dtype_name}: no kernel besides the reference")
            continue
        ctx, records = measure(
            name,
            shape,
            dtype,
            where,
            specs,
            repeats=repeats,
            warmup=warmup,
            min_sample_s=sample_s,
            seed=i,
            graphs=graphs,
            max_repeats=max_repeats,
        )
        db.record(records)  # one transaction per shape: an interrupted tune keeps what it finished
        results.append(ShapeResult(name, shape, ctx.dtype_name, ctx.op, tuple(records)))
    if progress and unique:
        print(file=sys.stderr)
    runtime.measurements.reload()
    runtime.bump()
    out = TuneReport(results, db.path, notes, time.perf_counter() - started)
    if report is not None:
        out.write(report)
    return out


def perfdb(path: str | Path | None = None) -> PerfDB | None:
    """The PerfDB that selection reads (None when LAYERZERO_PERFDB=off); with `path`, switch the
    runtime to that file first (cached plans are dropped)."""
    if path is not None:
        runtime.set_measurements(Measurements(path, runtime.measurements.version_of))
    return runtime.measurements.db
