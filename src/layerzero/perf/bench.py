"""The timing harness: check a kernel against the reference, then time it.

Timing: a few warm-up calls, then `repeats` samples; each sample runs the kernel `iters` times
(calibrated so a sample lasts at least `min_sample_s`) over a rotating set of inputs whose total
size exceeds twice the L2 cache, so that no call finds its inputs already cached. CUDA events time
GPU samples, `time.perf_counter` CPU ones. The per-call time of a sample is its time / iters; the
median, p95 and variance are over samples.
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
from ..kernel import KernelSpec
from . import workloads
from .perfdb import Bucket, PerfRecord, current_signature

# Absolute and relative tolerance per dtype for a kernel's output vs the wide reference.
TOLERANCE = {
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float32: (2e-4, 2e-4),
    torch.float64: (1e-7, 1e-7),
}


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


def time_calls(fn: Callable[..., Any], inputs: Sequence[tuple[Any, ...]], device: torch.device, *,
               warmup: int = 3, repeats: int = 10, min_sample_s: float = 1e-3) -> Timing:
    """Time `fn(*inputs[i])`, cycling through `inputs`; see the module docstring."""
    n = len(inputs)
    for i in range(max(1, warmup)):
        fn(*inputs[i % n])
    _sync(device)
    t0 = time.perf_counter()
    fn(*inputs[0])
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    iters = max(1, min(10_000, math.ceil(min_sample_s / once)))
    per_call: list[float] = []
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    j = 0
    for _ in range(repeats):
        if cuda:
            start.record()
            for _ in range(iters):
                fn(*inputs[j % n])
                j += 1
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(*inputs[j % n])
                j += 1
            per_call.append((time.perf_counter() - t0) * 1e6 / iters)
    ordered = sorted(per_call)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    variance = statistics.variance(per_call) if len(per_call) > 1 else 0.0
    return Timing(statistics.median(per_call), p95, variance, len(per_call), iters)


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


def measure(op_family: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            kernels: Sequence[KernelSpec], *, repeats: int = 10, warmup: int = 3, min_sample_s: float = 1e-3,
            seed: int = 0) -> tuple[SelectionContext, list[PerfRecord]]:
    """Check every kernel in `kernels` against the reference on fresh random inputs, then time the
    correct ones. A kernel that raises or is wrong gets a record with correct=False and no time."""
    wl = workloads.workload(op_family)
    fam = workloads.family(op_family)
    gen = torch.Generator(device=device).manual_seed(seed)
    args = wl.make(shape, dtype, device, gen)
    ctx = fam.context(*args)
    run = workloads.run_args(op_family, args)
    reference, cut = workloads.reference_output(op_family, args)
    sets = [run] + [workloads.run_args(op_family, wl.make(shape, dtype, device, gen))
                    for _ in range(rotation_count(_nbytes(run), device) - 1)]
    sig = current_signature(ctx.device_type, ctx.device_index)
    bucket = Bucket.of(ctx)
    from ..state import runtime

    records = []
    for spec in kernels:
        version = runtime.registry.backend(spec.backend).availability[1] or ""
        failed = PerfRecord(spec.id, ctx.op, ctx.dtype_name, bucket, sig, version, median_us=math.inf,
                            p95_us=math.inf, samples=0, variance=0.0, correct=False, max_error=math.inf,
                            shape=wl.label(shape), created=time.time())
        fn, _ = fam.bind(spec, ctx)
        try:
            out = fn(*run)
            _sync(device)
            ok, err = compare(cut(out), reference, dtype)
            if not ok:
                records.append(replace(failed, max_error=err))
                continue
            t = time_calls(fn, sets, device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s)
        except Exception as e:  # noqa: BLE001 - a failing kernel is recorded, never fatal to tuning
            records.append(replace(failed, error=f"{type(e).__name__}: {e}"[:500]))
            continue
        records.append(replace(failed, median_us=t.median_us, p95_us=t.p95_us, samples=t.samples,
                               variance=t.variance, correct=True, max_error=err))
    return ctx, records
