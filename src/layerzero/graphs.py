"""CUDA graph safety.

Each KernelSpec declares `graph_safe`. While the current stream is capturing, the selection
context has `graph_capture=True` and unsafe kernels are rejected (NOT_GRAPH_SAFE); a plan for
an unsafe kernel cached outside capture re-selects when it finds itself under capture (see
health.Health.guard), so a graph only ever records capture-safe kernels.

Capture protocol (what `validate_graph_capture` does, and what serving code should do):
1. warm up: run the step eagerly a few times on a side stream, so cuBLAS/cuDNN handles,
   workspaces, Triton/JIT compilation and autotuning happen outside the capture;
2. capture with the inputs as static buffers;
3. per step, copy new inputs into those buffers and replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CudaGraphUnsafeError, InvalidInputError
from .selection.inspect import select
from .state import runtime

# Tolerances between a replayed graph and eager execution: under capture a different (safe)
# kernel may run than eagerly, so the comparison allows each dtype's rounding.
_TOLERANCE = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-7, 1e-9),
}


def is_graph_safe(kernel_or_op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether a kernel (by id) may be captured, or whether the kernel that `op(*args, **kwargs)`
    selects now (outside capture) may be.

    `lz.is_graph_safe("torch.sdpa_flash")`; `lz.is_graph_safe("rms_norm", x, w)`.
    """

    runtime.ensure_loaded()
    if isinstance(kernel_or_op, str) and not args and not kwargs and kernel_or_op in runtime.registry.kernels:
        return runtime.registry.kernels[kernel_or_op].graph_safe
    if isinstance(kernel_or_op, str) and not args and not kwargs:
        runtime.registry.kernel(kernel_or_op)  # raises UnknownNameError with close matches
    plan = select(kernel_or_op, *args, **kwargs)
    return runtime.registry.kernel(plan.kernel_id).graph_safe


@dataclass(frozen=True, slots=True)
class GraphValidation:
    """What `validate_graph_capture` found: replays that matched eager, and the largest error."""

    replays: int
    max_abs_error: float
    fallbacks_during_capture: int


def warmup_for_capture(fn: Callable[..., Any], *args: Any, iterations: int = 3, **kwargs: Any) -> None:
    """Run `fn` eagerly `iterations` times on a side stream, then wait for it (capture protocol step 1).

    Initializes the cuBLAS handle and workspace, cuDNN, lazy modules and JIT kernels, and fills
    the plan cache for the eager keys.
    """
    if not torch.cuda.is_available():
        raise InvalidInputError("device", "a CUDA device (graph capture needs one)", "none available")
    torch.cuda.current_blas_handle()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(iterations):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def validate_graph_capture(
    fn: Callable[..., Any], *args: Any, replays: int = 5, warmup: int = 3, seed: int = 0
) -> GraphValidation:
    """Capture `fn(*args)` in a CUDA graph, replay it on fresh inputs, compare with eager.

    `args`' tensors are the graph's static input buffers: replay i > 0 copies new random values
    into their floating-point ones (restored afterwards). Raises CudaGraphUnsafeError if the
    capture fails or a replay differs from eager beyond the dtype's tolerance.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        got = sorted({t.device.type for t in tensors}) or "no tensors"
        raise InvalidInputError("args", "CUDA tensors (the graph's static input buffers)", got)

    warmup_for_capture(fn, *args, iterations=warmup)
    fallbacks_before = runtime.health.fallbacks
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = fn(*args)
    except Exception as e:
        raise CudaGraphUnsafeError(f"capturing {getattr(fn, '__name__', fn)!r} failed: {type(e).__name__}: {e}") from e
    fallbacks = runtime.health.fallbacks - fallbacks_before

    saved = [t.clone() for t in tensors]
    generator = torch.Generator(device="cuda").manual_seed(seed)
    worst = 0.0
    try:
        for i in range(replays):
            if i:
                for t in tensors:
                    if t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype))
            graph.replay()
            torch.cuda.synchronize()
            eager = fn(*args)
            worst = max(worst, compare_outputs(static_out, eager, f"replay {i}"))
    finally:
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
        torch.cuda.synchronize()
    return GraphValidation(replays, worst, fallbacks)


def compare_outputs(graphed: Any, eager: Any, where: str = "replay") -> float:
    """Largest absolute difference between two outputs (tensors, or tuples/lists/dicts of them).

    Raises CudaGraphUnsafeError when structures differ or a tensor is off beyond tolerance.
    """
    worst = 0.0
    for path, g, e in _pairs(graphed, eager, "out"):
        if not isinstance(g, torch.Tensor) or not isinstance(e, torch.Tensor):
            if g != e:
                raise CudaGraphUnsafeError(f"{where}: {path} is {g!r} from the graph, {e!r} eagerly")
            continue
        if g.shape != e.shape or g.dtype != e.dtype:
            raise CudaGraphUnsafeError(
                f"{where}: {path} has shape/dtype {tuple(g.shape)}/{g.dtype} from the graph, "
                f"{tuple(e.shape)}/{e.dtype} eagerly"
            )
        if g.numel() == 0:
            continue
        rtol, atol = _TOLERANCE.get(g.dtype, (0.0, 0.0))
        gf, ef = g.detach().double(), e.detach().double()
        diff = (gf - ef).abs()
        err = float(diff.max())
        if not torch.isfinite(diff).all() and not torch.equal(gf.isnan(), ef.isnan()):
            raise CudaGraphUnsafeError(f"{where}: {path} has NaN/Inf where eager does not")
        bad = diff > atol + rtol * ef.abs()
        if bool(bad.any()):
            raise CudaGraphUnsafeError(
                f"{where}: {path} differs from eager by up to {err:.3g} "
                f"(rtol {rtol}, atol {atol}, {int(bad.sum())} elements)"
            )
        worst = max(worst, err)
    return worst


def _pairs(a: Any, b: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            raise CudaGraphUnsafeError(f"{path} has {len(a)} items from the graph, {len(b)} eagerly")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _pairs(x, y, f"{path}[{i}]")
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise CudaGraphUnsafeError(f"{path} has keys {sorted(a)} from the graph, {sorted(b)} eagerly")
        for k in a:
            yield from _pairs(a[k], b[k], f"{path}[{k!r}]")
    else:
        yield path, a, b
