"""Inputs for measuring an op family: random tensors for a shape, and the reference to check against.

Each family declares its workloads (OpFamily.workloads, ops/family.py Workload) in its own module:
attention (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal) and attention_ext (with window
and softcap) in ops/attention.py with paged_attention; rms_norm and layer_norm (rows, hidden) in
ops/norm.py; rope_qk in ops/posenc.py; swiglu in ops/activation.py. This module is what measuring
(tune, warmup, bench, solve) does with them, for any family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import KernelSpec, check_constraints
from ..ops import FAMILIES, OpFamily
from ..ops.family import CONTEXT_FIELDS, Args, Shape, Workload
from ..selection.engine import REFERENCE_BACKEND, ExecutionPlan
from ..state import runtime
from .perfdb import Bucket

__all__ = ["CONTEXT_FIELDS", "Args", "Shape", "Workload", "WORKLOADS", "OP_WORKLOADS"]

# Workload name -> the workload and the family it calls
WORKLOADS: dict[str, Workload] = {w.name: w for f in FAMILIES.values() for w in f.workloads}
_FAMILY_OF: dict[str, OpFamily] = {w.name: f for f in FAMILIES.values() for w in f.workloads}
# Op id -> (its workload, the dims the id fixes). Shapes given for an attention op id may also take the
# spec's short form (batch, seq, heads, head_dim): seq keys (seq queries but for decode), as many kv
# heads as heads, causal as the id says.
OP_WORKLOADS: dict[str, tuple[str, dict[str, int]]] = {
    op: (w.name, fixed) for w in WORKLOADS.values() for op, fixed in w.op_ids.items()
}


def workload(name: str) -> Workload:
    found = WORKLOADS.get(name)
    if found is None:
        raise UnknownNameError("operation with a perf workload", name, WORKLOADS)
    return found


def resolve(operation: str) -> tuple[str, dict[str, int]]:
    """(workload family, dims fixed by the name) for a family name or an op id."""
    if not isinstance(operation, str):
        raise InvalidInputError("operation", "an op id such as 'attention.causal' or a family name", repr(operation))
    if operation in WORKLOADS:
        return operation, {}
    found = OP_WORKLOADS.get(operation)
    if found is None:
        raise UnknownNameError("operation with a perf workload", operation, [*WORKLOADS, *OP_WORKLOADS])
    return found


def op_shape(operation: str, shape: Any) -> tuple[str, Shape]:
    """(workload family, full workload shape) of a shape given for `operation` (family name or op id)."""
    name, fixed = resolve(operation)
    wl = workload(name)
    if isinstance(shape, str) and fixed:  # "1x512x32x128" as the CLI gives it
        shape = tuple(int(x) for x in shape.replace(",", "x").split("x") if x)
    short = name == "attention" and fixed and isinstance(shape, tuple | list) and len(shape) == 4
    if short:
        batch, seq, heads, head_dim = shape
        shape = (batch, fixed.get("seq_q", seq), seq, heads, heads, head_dim, fixed.get("causal", 0))
    try:
        full = wl.check_shape(shape)
    except InvalidInputError:
        if name != "attention" or not fixed:
            raise
        raise InvalidInputError(
            "shape",
            f"(batch, seq, heads, head_dim) or {len(wl.dims)} non-negative ints ({', '.join(wl.dims)}) for {operation}",
            shape,
        ) from None
    for dim, value in fixed.items():
        if full[wl.dims.index(dim)] != value:
            raise InvalidInputError("shape", f"{dim} {value} for {operation} ({', '.join(wl.dims)})", shape)
    return name, full


def family(name: str) -> OpFamily:
    """The OpFamily of a family name, or of the family a workload calls."""
    found = FAMILIES.get(name) or _FAMILY_OF.get(name)
    if found is None:
        raise UnknownNameError("operation", name, FAMILIES)
    return found


def public_op(name: str) -> Callable[..., Any]:
    """The public function of a family (`lz.attention` for "attention") or of the family a workload calls."""
    function = family(name).function
    assert function is not None, name
    return function


def run_args(name: str, args: Args, options: dict[str, Any] | None = None) -> Args:
    """The arguments the public op passes to its plan's `run` for `op(*args, **options)` (the kernel
    convention).

    Captured by calling the op once with a recording plan in the cache slot of this call, so this
    follows each op's convention without restating it.
    """
    options = options or {}
    fam = family(name)
    key = runtime.scoped_key(fam.key(*args, **options))
    captured: list[Args] = []
    with runtime.plans.pinned(key, ExecutionPlan("perf.capture", "", lambda *a: captured.append(a))):
        public_op(name)(*args, **options)
    if not captured:
        raise RuntimeError(f"{name}: could not capture the run arguments")
    return captured[0]


def context_for(
    name: str, shape: Shape, dtype: torch.dtype, device: torch.device, options: dict[str, Any] | None = None
) -> SelectionContext:
    """The SelectionContext of `shape` without allocating it (tiny tensors, then the real sizes);
    `options`: the op's keyword arguments (attention: window_size, softcap, ...)."""
    wl = workload(name)
    shape = wl.check_shape(shape)
    tiny = tuple(1 if d in wl.ranged else x for d, x in zip(wl.dims, shape, strict=True))
    args = wl.make(tiny, dtype, device, torch.Generator(device=device).manual_seed(0))
    ctx = family(name).context(*args, **(options or {}))
    sizes = dict(zip(wl.dims, shape, strict=True))
    return ctx.replace(**{CONTEXT_FIELDS[d]: sizes[d] for d in wl.ranged})


def shape_of(name: str, ctx: SelectionContext) -> Shape | None:
    """The workload shape that reproduces a call's context (same op and bucket), or None."""
    wl = workload(name)
    shape = tuple(int(getattr(ctx, CONTEXT_FIELDS[d])) for d in wl.dims)
    try:
        made = context_for(
            name,
            shape,
            ctx.dtype,
            torch.device(ctx.device_type, ctx.device_index)
            if ctx.device_type == "cuda"
            else torch.device(ctx.device_type),
        )
    except Exception:  # noqa: BLE001 - a context the workload cannot build is simply not reproducible
        return None

    return shape if made.op == ctx.op and Bucket.of(made) == Bucket.of(ctx) else None


def reference_spec(ctx: SelectionContext) -> KernelSpec:
    runtime.ensure_loaded()
    for spec in runtime.registry.candidates(ctx.op):
        if spec.backend == REFERENCE_BACKEND and not check_constraints(spec, ctx):
            return spec
    known = [s.id for s in runtime.registry.candidates(ctx.op)]
    raise UnknownNameError(f"reference kernel for {ctx.op}", ctx.op, known)


def reference_output(name: str, args: Args, options: dict[str, Any] | None = None) -> tuple[Any, Callable[[Any], Any]]:
    """(reference output, slicer): the reference on float64 (CPU) / float32 (GPU) copies of the
    inputs, and the function that cuts the kernel's full output down to what it covers."""
    wl = workload(name)
    view, cut = wl.reference_view(args) if wl.reference_view is not None else (args, lambda out: out)
    wide = torch.float64
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in view):
        wide = torch.float32
    up = tuple(a.to(wide) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in view)
    fam = family(name)
    ctx = fam.context(*up, **(options or {}))
    run, _ = fam.bind(reference_spec(ctx), ctx)
    return run(*run_args(name, up, options)), cut
