"""Inspection and registration: select, explain, dry_run, which, list_kernels, validate, register_kernel.

Each takes the op as an op id (`attention.causal`, globs where a set makes sense), a family name
(`attention`) or the function, first or as `operation=`, and the call's inputs or a SelectionContext.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..backends.hub import hub_kernel_specs
from ..context import SelectionContext
from ..device import local_device_types
from ..errors import InvalidInputError, LayerZeroError, UnknownNameError
from ..kernel import Backend, KernelSpec, runs_on
from ..ops import FAMILIES, IMPLIED, OP_FAMILIES, OpFamily, families_for, is_op_id, op_matches
from ..reasons import Rejection
from ..state import runtime
from .engine import ExecutionPlan, SelectionReport


def _family(op: str | Callable[..., Any]) -> OpFamily:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    family = FAMILIES.get(name)
    if family is None:
        raise UnknownNameError("operation", name, [*FAMILIES, *OP_FAMILIES])
    return family


Op = str | Callable[..., Any]

# What an op id asks of a call, said when the inputs are another op's.
_EXPECTS = {
    "attention.decode": " (seq_len_q 1: one new token per sequence)",
    "attention.causal": " (is_causal=True)",
    "attention.masked": " (an attn_mask)",
    "attention.sliding_window": " (a window_size)",
    "attention.full": " (no mask, not causal)",
}


@dataclass(frozen=True, slots=True)
class _Call:
    """A call resolved to its family: the arguments (with what an op id implies) and, when an op id
    was given, the context that was checked against it."""

    family: OpFamily
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    ctx: SelectionContext | None = None


def _split(op: Any, args: tuple[Any, ...], operation: Op | None) -> tuple[Op | None, tuple[Any, ...]]:
    """(op, inputs) for both orders: the op first (`lz.which("attention.causal", q, k, v)`) or the
    inputs first with `operation=` (`lz.explain(q, k, v, operation="attention.causal")`)."""
    if op is not None and not isinstance(op, str) and not callable(op):
        args, op = (op, *args), None
    if operation is not None:
        if op is not None and op != operation:
            raise InvalidInputError("operation", f"{op!r} (the op given first) or nothing", repr(operation))
        op = operation
    return op, args


def _describe(ctx: SelectionContext) -> str:
    return f"{ctx.op} inputs ({ctx.summary().removeprefix(f'op={ctx.op}').strip()})"


def resolve_call(op: Op | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    """The family of a call given by family name, function, or op id / glob (`attention.causal`).

    An op id picks among the families that can have it (`attention.decode`: paged, then dense) the
    first whose signature takes the arguments and whose context is that op; arguments the id implies
    (`is_causal=True` for attention.causal) are added when the call leaves them out. Inputs of
    another op are an InvalidInputError that says what they are.
    """
    if op is None:
        raise InvalidInputError(
            "operation", "an op id such as 'attention.causal', a family name or an lz function", "nothing"
        )
    if not isinstance(op, str) or not is_op_id(op):
        return _Call(_family(op), args, kwargs)
    runtime.ensure_loaded()
    names = families_for(op)
    if not names:
        raise UnknownNameError("operation", op, [*FAMILIES, *OP_FAMILIES])
    problem: Exception | None = None
    other: SelectionContext | None = None
    for name in names:
        public = FAMILIES[name].function
        try:
            bound = inspect.signature(public).bind(*args, **kwargs)
        except TypeError as exc:
            problem = problem or InvalidInputError(
                "arguments", f"the arguments of lz.{name}{inspect.signature(public)}", str(exc)
            )
            continue
        implied = {k: v for k, v in IMPLIED.get((op, name), {}).items() if k not in bound.arguments}
        call_kwargs = {**kwargs, **implied}
        family = FAMILIES[name]
        try:
            ctx = family.context(*args, **call_kwargs)
        except LayerZeroError as exc:
            problem = problem or exc
            continue
        if op_matches(op, ctx):
            return _Call(family, args, call_kwargs, ctx)
        other = other or ctx
    if other is not None:
        raise InvalidInputError("operation", f"inputs of {op}{_EXPECTS.get(op, '')}", _describe(other))
    raise problem if problem is not None else UnknownNameError("operation", op, [*FAMILIES, *OP_FAMILIES])


def context_family(op: Op | None, context: Any) -> OpFamily:
    """The family that selects for `context` (a SelectionContext), checked against `op` when given."""
    if not isinstance(context, SelectionContext):
        raise InvalidInputError("context", "a layerzero.SelectionContext", type(context).__name__)
    runtime.ensure_loaded()
    names = families_for(context.op) if "." in context.op else []
    if not names:
        raise UnknownNameError("operation (context.op)", context.op, OP_FAMILIES)
    if op is not None:
        if isinstance(op, str) and is_op_id(op):
            ok = op_matches(op, context)
        else:
            ok = _family(op).name in names
        if not ok:
            raise InvalidInputError(
                "context",
                f"a context of {op if isinstance(op, str) else _family(op).name}",
                f"a context of {_describe(context)}",
            )
    return FAMILIES[names[0]]


def select(
    op: Any = None, /, *args: Any, operation: Op | None = None, context: SelectionContext | None = None, **kwargs: Any
) -> ExecutionPlan:
    """The ExecutionPlan a call would run (cached like a real call).

    `op`: an op id (`"attention.causal"`, `"norm.rms"`), a family name (`"attention"`) or the function;
    or pass the inputs first and `operation=`. With `context=` (a SelectionContext) instead of inputs:
    the plan selected for that context now, not cached, bound in the kernels' calling convention.
    """
    op, args = _split(op, args, operation)
    if context is not None:
        if args or kwargs:
            raise InvalidInputError("context", "a context or the call's inputs, not both", "both")
        family = context_family(op, context)
        plan, _ = runtime.engine.select(context, family.bind, family.transforms)
        return plan
    call = resolve_call(op, args, kwargs)
    key = call.family.key(*call.args, **call.kwargs)
    plan = runtime.plans.data.get(key)
    return plan if plan is not None else runtime.plan(call.family, key, call.args, call.kwargs)


def explain(
    op: Any = None, /, *args: Any, operation: Op | None = None, context: SelectionContext | None = None, **kwargs: Any
) -> SelectionReport:
    """Every candidate kernel for a call with its rejection reasons or score; nothing runs.

    `lz.explain("attention", q, k, v, is_causal=True)`, `lz.explain("attention.causal", q, k, v)`,
    `lz.explain(q, k, v, operation="attention.causal")`, or `lz.explain(operation=..., context=ctx)`.
    """
    op, args = _split(op, args, operation)
    if context is not None:
        if args or kwargs:
            raise InvalidInputError("context", "a context or the call's inputs, not both", "both")
        family = context_family(op, context)
        return runtime.engine.evaluate(context, family.transforms)
    call = resolve_call(op, args, kwargs)
    return runtime.explain(call.family, call.family.key(*call.args, **call.kwargs), call.args, call.kwargs)


def dry_run(
    operation: Op | None = None, context: SelectionContext | None = None, *args: Any, **kwargs: Any
) -> SelectionReport:
    """The selection report for an op and a context (or the call's inputs) without running any kernel:
    the spec's name for `lz.explain(operation=..., context=...)`."""
    return explain(operation, *args, context=context, **kwargs)


def which(
    op: Any = None, /, *args: Any, operation: Op | None = None, context: SelectionContext | None = None, **kwargs: Any
) -> str:
    """The id of the kernel a call runs (`lz.which("attention.causal", q, k, v)`); see `select`."""
    return select(op, *args, operation=operation, context=context, **kwargs).kernel_id


@dataclass(frozen=True, slots=True)
class KernelInfo:
    """One registered kernel. available: its backend is installed; devices: the device types of this
    machine it can run on (empty when it is not installed or declares only other platforms)."""

    id: str
    backend: str
    ops: tuple[str, ...]
    priority: int
    available: bool
    description: str
    platforms: frozenset[str] = frozenset()
    devices: tuple[str, ...] = ()


def list_kernels(pattern: str = "*", *, operation: str | None = None) -> list[KernelInfo]:
    """Registered kernels whose id or one of whose op ids matches the glob `pattern`, and, with
    `operation=` (an op id or glob: `"attention.*"`), that implement a matching op."""
    runtime.ensure_loaded()
    here = local_device_types()
    if operation is not None:
        if not isinstance(operation, str):
            raise InvalidInputError("operation", "an op id or glob such as 'attention.*'", repr(operation))
        if not any(fnmatch.fnmatchcase(op, operation) for op in runtime.registry.by_op):
            raise UnknownNameError("operation", operation, runtime.registry.by_op)
    out = []
    for spec in runtime.registry.kernels.values():
        if operation is not None and not any(fnmatch.fnmatchcase(op, operation) for op in spec.ops):
            continue
        if fnmatch.fnmatchcase(spec.id, pattern) or any(fnmatch.fnmatchcase(op, pattern) for op in spec.ops):
            available = runtime.registry.backend(spec.backend).availability[0]
            devices = tuple(d for d in here if runs_on(spec, d)) if available else ()
            out.append(
                KernelInfo(
                    spec.id, spec.backend, spec.ops, spec.priority, available, spec.description, spec.platforms, devices
                )
            )
    return sorted(out, key=lambda k: k.id)


def validate(
    kernel_id: str,
    op: Any = None,
    /,
    *args: Any,
    operation: Op | None = None,
    context: SelectionContext | None = None,
    **kwargs: Any,
) -> tuple[bool, list[Rejection]]:
    """Can `kernel_id` run a call (`op` and its inputs, as for `select`) or a `context=`? Returns
    (ok, rejections): the same `Rejection`s (reason code and values) that `explain` lists for the
    kernel, policy rules aside."""
    runtime.ensure_loaded()
    spec = runtime.registry.kernel(kernel_id)
    op, args = _split(op, args, operation)
    if context is not None:
        if args or kwargs:
            raise InvalidInputError("context", "a context or the call's inputs, not both", "both")
        context_family(op, context)
        ctx = context
    else:
        call = resolve_call(op, args, kwargs)
        ctx = call.ctx if call.ctx is not None else call.family.context(*call.args, **call.kwargs)
    rejections = runtime.engine.kernel_rejections(spec, ctx)
    if runtime.registry.backend(spec.backend).availability[0] and runtime.perf.has_rows(ctx.op):
        rejections.extend(runtime.perf_rejections(spec, ctx))  # measured wrong on this shape (PERF_INCORRECT)
    return not rejections, rejections


def register_kernel(spec: KernelSpec | None = None, /, **fields: Any) -> KernelSpec:
    """Add a user kernel; it competes in selection like the built-in ones.

    Pass a KernelSpec, or its fields: `lz.register_kernel(id="mine.rms", ops=("norm.rms",),
    impl=fn, priority=90)`. The impl takes the op's calling convention (see the op modules).
    `platforms` (device types, e.g. "cpu" or {"cpu", "cuda"}) defaults to every device type.
    Op ids are checked against the registered ones (UnknownNameError with close matches), field
    types by KernelSpec. Replaces a kernel with the same id. Cached plans are dropped.
    """
    if spec is None:
        spec = KernelSpec(**fields)
    elif fields:
        raise TypeError("pass a KernelSpec or keyword fields, not both")
    elif not isinstance(spec, KernelSpec):
        raise InvalidInputError("spec", "a KernelSpec (or keyword fields)", type(spec).__name__)
    runtime.ensure_loaded()
    for op in spec.ops:
        if op not in runtime.registry.by_op:
            raise UnknownNameError(
                "operation", op, runtime.registry.by_op, where=f"register_kernel({spec.id!r}): ops: "
            )
    runtime.register(spec)
    return spec


def register_backend(backend: Backend) -> Backend:
    """Add a whole backend (a library with several kernels)."""
    runtime.register(backend)
    return backend


def register_hub_kernels(
    repo_id: str,
    path: str | os.PathLike[str],
    revision: str | None = None,
    lockfile: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Register a hub repository's kernels (backend "hub", backends/hub.py); they compete in selection.
    Returns their ids.

    path: the local repository (a checkout or a Hub cache snapshot). lockfile: a kernels.lock that
    pins the revision and variant hashes; a mismatch raises HubLockError and registers nothing.
    """
    specs = hub_kernel_specs(repo_id, path, revision, lockfile)
    runtime.ensure_loaded()
    with runtime._lock:
        for spec in specs:
            runtime.registry.add_kernel(spec)
        runtime.bump()
    return [s.id for s in specs]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    available: bool
    version: str | None
    reason: str | None
    kernels: tuple[str, ...]
    probe: str | None = None  # what its probe on the device verified (monitor/probe.py), if it ran


def list_backends(device: str | torch.device | None = None, probe: bool = True) -> list[BackendInfo]:
    """Every registered backend with its version or the reason it is unavailable.

    probe: first prove each installed backend that has kernels for `device` (default: the current
    CUDA device, else the CPU) with its tiny calls (cached on disk), so a library that imports but
    cannot run is listed unavailable (BACKEND_BROKEN) with its own error text.
    """
    runtime.ensure_loaded()
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    )
    out = []
    for b in runtime.registry.backends.values():
        result = runtime.probes.probe(b, dev) if probe and b.probes and b.availability[0] else None
        ok, version, why = b.availability
        out.append(
            BackendInfo(
                b.name,
                ok,
                version,
                None if why is None else str(why),
                tuple(k.id for k in b.kernels),
                None if result is None else result.describe(),
            )
        )
    return out
