"""The timing harness: check a kernel against the reference, then time it in both regimes.

Both regimes time N back-to-back calls of the kernel's bound plan callable (what a user call runs,
minus the health guard every kernel shares) over a rotating set of inputs whose total size exceeds
twice the L2 cache, so that no call finds its inputs already cached:
- eager: the N calls between two CUDA events (perf_counter on CPU); per call = elapsed / N, about
  max(host time, device time), which is what a model's forward sees;
- graph (CUDA, graph-safe kernels): the same N calls captured in one CUDA graph and replayed between
  two events; per call = replay time / N, the device time. A kernel that fails to capture, or whose
  replay differs from its eager call, gets no graph figure and a note saying why.
N is calibrated so a sample lasts at least `min_sample_s` (and, on CUDA, N >= MIN_CUDA_CALLS unless
fewer calls last MIN_CUDA_SAMPLE_S, so the host time before the first launch is a small part of a sample). Each regime takes `repeats` samples,
and more (up to `max_repeats`) while p95 / median exceeds `spread`; median, p95 and variance are over
samples.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..context import SelectionContext
from ..graphs import warmup_for_capture
from ..kernel import KernelSpec
from ..selection.engine import bind_kernel
from ..state import runtime
from . import workloads
from .perfdb import Bucket, PerfRecord, current_signature

# Absolute and relative tolerance per dtype for a kernel's output vs the wide reference.
TOLERANCE = {
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float32: (2e-4, 2e-4),
    torch.float64: (1e-7, 1e-7),
}


# Calls per CUDA sample at least MIN_CUDA_CALLS, or as many as last MIN_CUDA_SAMPLE_S when fewer do: the host
# time before the first launch (tens of us), which no later call hides, is then a small part of a sample.
MIN_CUDA_CALLS = 10
MIN_CUDA_SAMPLE_S = 0.02
MAX_CALLS = 10_000


@dataclass(frozen=True, slots=True)
class Timing:
    """Microseconds per call over `samples` samples of `iters` calls each."""

    median_us: float
    p95_us: float
    variance: float
    samples: int
    iters: int


def l2_bytes(device: torch.device) -> int:
    """The L2 cache size of `device` (GPU from its properties, CPU from sysfs); a guess if unknown."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 2 << 20


def rotation_count(bytes_per_set: int, device: torch.device, max_sets: int = 64, max_bytes: int = 2 << 30) -> int:
    """How many input sets to rotate so that together they exceed twice the L2 cache."""
    want = math.ceil(2 * l2_bytes(device) / max(bytes_per_set, 1)) + 1
    return max(1, min(want, max_sets, max(1, max_bytes // max(bytes_per_set, 1))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _sampled(sample: Callable[[], float], iters: int, repeats: int, max_repeats: int | None, spread: float) -> Timing:
    """`repeats` samples of `sample()` (us per call), then more, half as many at a time, while
    p95 / median > spread and fewer than max_repeats (default 5 * repeats) were taken."""
    cap = max(repeats, 5 * repeats if max_repeats is None else max_repeats)
    per_call = [sample() for _ in range(max(1, repeats))]
    while len(per_call) < cap and _p95(per_call) > spread * statistics.median(per_call):
        per_call.extend(sample() for _ in range(min(max(1, repeats // 2), cap - len(per_call))))
    variance = statistics.variance(per_call) if len(per_call) > 1 else 0.0
    return Timing(statistics.median(per_call), _p95(per_call), variance, len(per_call), iters)


def calls_per_sample(
    fn: Callable[..., Any], inputs: Sequence[tuple[Any, ...]], device: torch.device, min_sample_s: float
) -> int:
    """N: back-to-back calls that last at least `min_sample_s` (estimated from 4 streamed calls)."""
    n = len(inputs)
    _sync(device)
    t0 = time.perf_counter()
    for j in range(4):
        fn(*inputs[j % n])
    _sync(device)
    once = max((time.perf_counter() - t0) / 4, 1e-7)
    floor = min(MIN_CUDA_CALLS, math.ceil(MIN_CUDA_SAMPLE_S / once)) if device.type == "cuda" else 1
    return max(floor, min(MAX_CALLS, math.ceil(min_sample_s / once)))


def time_calls(
    fn: Callable[..., Any],
    inputs: Sequence[tuple[Any, ...]],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_sample_s: float = 1e-3,
    max_repeats: int | None = None,
    spread: float = 1.1,
    calls: int | None = None,
) -> Timing:
    """The eager figure of `fn(*inputs[i])`, cycling through `inputs`: `calls` (default: calibrated)
    back-to-back calls per sample between two CUDA events (perf_counter on CPU); see the module doc."""
    n = len(inputs)
    for i in range(max(1, warmup)):
        fn(*inputs[i % n])
    iters = calls if calls is not None else calls_per_sample(fn, inputs, device, min_sample_s)
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    j = 0

    def sample() -> float:
        nonlocal j
        if cuda:
            _sync(device)  # the device starts idle: the first launch's host time is inside the sample
            start.record()
            for _ in range(iters):
                fn(*inputs[j % n])
                j += 1
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(*inputs[j % n])
            j += 1
        return (time.perf_counter() - t0) * 1e6 / iters

    return _sampled(sample, iters, repeats, max_repeats, spread)


class GraphCaptureFailed(Exception):
    """`time_graph` could not capture the calls, or their replay differs from the eager call."""


def time_graph(
    fn: Callable[..., Any],
    inputs: Sequence[tuple[Any, ...]],
    device: torch.device,
    calls: int,
    *,
    dtype: torch.dtype | None = None,
    repeats: int = 20,
    max_repeats: int | None = None,
    spread: float = 1.1,
) -> Timing:
    """The graph figure: `calls` back-to-back calls of `fn` over `inputs` captured in one CUDA graph,
    replayed once per sample between two events; per call = replay time / calls (device time).

    The capture protocol of graphs.py: warm up on a side stream, capture, replay. The last
    captured call's output is compared with an eager call on the same inputs after the replays (a
    kernel that keeps host state would replay stale work). Raises GraphCaptureFailed with the reason.
    """

    n = len(inputs)
    warmup_for_capture(lambda: [fn(*inputs[j % n]) for j in range(min(n, calls))], iterations=1)
    graph = torch.cuda.CUDAGraph()
    try:
        try:
            with torch.cuda.graph(graph):
                out = None
                for j in range(calls):
                    out = fn(*inputs[j % n])
            graph.replay()
            _sync(device)
        except Exception as e:  # noqa: BLE001 - any capture failure means "no graph figure"
            raise GraphCaptureFailed(f"capture failed: {type(e).__name__}: {e}"[:300]) from e
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample() -> float:
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / calls

        timing = _sampled(sample, calls, repeats, max_repeats, spread)
        eager = fn(*inputs[(calls - 1) % n])
        _sync(device)
        ok, err = compare(out, eager, dtype or _dtype_of(eager))
        if not ok:
            raise GraphCaptureFailed(f"replay differs from the eager call (max error {err:.3g})")
        return timing
    finally:
        try:
            graph.reset()
        except Exception:  # noqa: BLE001, S110 - after a failed capture there may be nothing to reset
            pass


def _dtype_of(out: Any) -> torch.dtype:
    if isinstance(out, tuple | list) and out:
        return _dtype_of(out[0])
    return out.dtype if isinstance(out, torch.Tensor) else torch.float32


def compare(out: Any, ref: Any, dtype: torch.dtype) -> tuple[bool, float]:
    """(within tolerance, max abs error) of a kernel output vs the reference, in float64.

    Tuples (rope_qk's (q, k)) compare element by element: all must hold, the error is the largest."""
    if isinstance(out, tuple | list) and isinstance(ref, tuple | list):
        if len(out) != len(ref) or not out:
            return False, math.inf
        parts = [compare(o, r, dtype) for o, r in zip(out, ref, strict=True)]
        return all(ok for ok, _ in parts), max(err for _, err in parts)
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return False, math.inf
    if out.shape != ref.shape:
        return False, math.inf
    atol, rtol = TOLERANCE.get(dtype, (1e-2, 1e-2))
    a, b = out.detach().double(), ref.detach().double()
    err = (a - b).abs()
    finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    max_err = float(torch.nan_to_num(err, nan=math.inf).max()) if err.numel() else 0.0
    return finite and bool((err <= atol + rtol * b.abs()).all()), max_err


def _nbytes(args: tuple[Any, ...]) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def measure(
    op_family: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    kernels: Sequence[KernelSpec],
    *,
    repeats: int = 20,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
    seed: int = 0,
    graphs: bool = True,
    max_repeats: int | None = None,
    spread: float = 1.1,
) -> tuple[SelectionContext, list[PerfRecord]]:
    """Check every kernel in `kernels` against the reference on fresh random inputs, then time the
    correct ones: the eager figure always, the graph figure on CUDA for graph-safe kernels (unless
    graphs=False). A kernel that raises or is wrong gets a record with correct=False and no time."""
    wl = workloads.workload(op_family)
    fam = workloads.family(op_family)
    gen = torch.Generator(device=device).manual_seed(seed)
    args = wl.make(shape, dtype, device, gen)
    ctx = fam.context(*args)
    run = workloads.run_args(op_family, args)
    reference, cut = workloads.reference_output(op_family, args)
    sets = [run] + [
        workloads.run_args(op_family, wl.make(shape, dtype, device, gen))
        for _ in range(rotation_count(_nbytes(run), device) - 1)
    ]
    sig = current_signature(ctx.device_type, ctx.device_index)
    bucket = Bucket.of(ctx)

    records = []
    for spec in kernels:
        version = runtime.registry.backend(spec.backend).availability[1] or ""
        failed = PerfRecord(
            spec.id,
            ctx.op,
            ctx.dtype_name,
            bucket,
            sig,
            version,
            median_us=math.inf,
            p95_us=math.inf,
            samples=0,
            variance=0.0,
            correct=False,
            max_error=math.inf,
            shape=wl.label(shape),
            created=time.time(),
        )
        fn, _ = bind_kernel(spec, ctx, fam.bind, fam.transforms)  # what a plan runs (prepared calls)
        try:
            out = fn(*run)
            _sync(device)
            ok, err = compare(cut(out), reference, dtype)
            if not ok:
                records.append(replace(failed, max_error=err))
                continue
            t = time_calls(
                fn,
                sets,
                device,
                warmup=warmup,
                repeats=repeats,
                min_sample_s=min_sample_s,
                max_repeats=max_repeats,
                spread=spread,
            )
        except Exception as e:  # noqa: BLE001 - a failing kernel is recorded, never fatal to tuning
            records.append(replace(failed, error=f"{type(e).__name__}: {e}"[:500]))
            continue
        record = replace(
            failed,
            median_us=t.median_us,
            p95_us=t.p95_us,
            samples=t.samples,
            variance=t.variance,
            correct=True,
            max_error=err,
            calls=t.iters,
        )
        records.append(
            _with_graph_figure(record, spec, fn, sets, device, dtype, graphs, t.iters, repeats, max_repeats, spread)
        )
    return ctx, records


def _with_graph_figure(
    record: PerfRecord,
    spec: KernelSpec,
    fn: Callable[..., Any],
    sets: Sequence[tuple[Any, ...]],
    device: torch.device,
    dtype: torch.dtype,
    graphs: bool,
    calls: int,
    repeats: int,
    max_repeats: int | None,
    spread: float,
) -> PerfRecord:
    """`record` with its graph figure, or with a note saying why it has none."""
    if device.type != "cuda":
        return replace(record, graph_note=f"no CUDA graphs on {device.type}")
    if not graphs:
        return replace(record, graph_note="graph timing off")
    if not spec.graph_safe:
        return replace(record, graph_note="not graph-safe (KernelSpec.graph_safe=False)")
    note, g = "", None
    try:
        g = time_graph(fn, sets, device, calls, dtype=dtype, repeats=repeats, max_repeats=max_repeats, spread=spread)
    except Exception as e:  # noqa: BLE001 - no graph figure is a result, not an error
        note = str(e) if isinstance(e, GraphCaptureFailed) else f"graph timing failed: {type(e).__name__}: {e}"
    try:
        _sync(device)
        torch.cuda.empty_cache()  # the graph's private memory pool, released by reset, goes back to the device
    except Exception:  # noqa: BLE001, S110 - a sticky CUDA error shows up in the next kernel's record
        pass
    if g is None:
        return replace(record, graph_note=note[:300])
    return replace(
        record, graph_us=g.median_us, graph_p95_us=g.p95_us, graph_samples=g.samples, graph_variance=g.variance
    )
