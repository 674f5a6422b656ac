"""Inspection and registration: select, explain, which, list_kernels, validate, register_kernel."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..device import local_device_types
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import Backend, KernelSpec, runs_on
from ..ops import FAMILIES, OpFamily
from ..reasons import Rejection
from ..state import runtime
from .engine import ExecutionPlan, SelectionReport


def _family(op: str | Callable[..., Any]) -> OpFamily:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    family = FAMILIES.get(name)
    if family is None:
        raise UnknownNameError("operation", name, FAMILIES)
    return family


def select(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> ExecutionPlan:
    """The ExecutionPlan a call `op(*args, **kwargs)` would run (cached like a real call)."""
    family = _family(op)
    key = family.key(*args, **kwargs)
    plan = runtime.plans.data.get(key)
    return plan if plan is not None else runtime.plan(family, key, args, kwargs)


def explain(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> SelectionReport:
    """Every candidate kernel for `op(*args, **kwargs)` with its rejection reasons or score.

    `op` is a public op name ("attention", "rms_norm", ...) or the function itself (lz.attention).
    """
    family = _family(op)
    return runtime.explain(family, family.key(*args, **kwargs), args, kwargs)


def which(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The id of the kernel that `op(*args, **kwargs)` runs."""
    return select(op, *args, **kwargs).kernel_id


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


def list_kernels(pattern: str = "*") -> list[KernelInfo]:
    """Registered kernels whose id or one of whose op ids matches the glob `pattern`."""
    runtime.ensure_loaded()
    here = local_device_types()
    out = []
    for spec in runtime.registry.kernels.values():
        if fnmatch.fnmatchcase(spec.id, pattern) or any(fnmatch.fnmatchcase(op, pattern) for op in spec.ops):
            available = runtime.registry.backend(spec.backend).availability[0]
            devices = tuple(d for d in here if runs_on(spec, d)) if available else ()
            out.append(KernelInfo(spec.id, spec.backend, spec.ops, spec.priority, available, spec.description,
                                  spec.platforms, devices))
    return sorted(out, key=lambda k: k.id)


def validate(kernel_id: str, op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, list[Rejection]]:
    """Can `kernel_id` run `op(*args, **kwargs)`? Returns (ok, rejections): the same `Rejection`s
    (reason code and values) that `explain` lists for the kernel, policy rules aside."""
    runtime.ensure_loaded()
    spec = runtime.registry.kernel(kernel_id)
    ctx = _family(op).context(*args, **kwargs)
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
            raise UnknownNameError("operation", op, runtime.registry.by_op,
                                   where=f"register_kernel({spec.id!r}): ops: ")
    runtime.register(spec)
    return spec


def register_backend(backend: Backend) -> Backend:
    """Add a whole backend (a library with several kernels)."""
    runtime.register(backend)
    return backend


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    available: bool
    version: str | None
    reason: str | None
    kernels: tuple[str, ...]
    probe: str | None = None  # what its probe on the device verified (runtime/probe.py), if it ran


def list_backends(device: str | torch.device | None = None, probe: bool = True) -> list[BackendInfo]:
    """Every registered backend with its version or the reason it is unavailable.

    probe: first prove each installed backend that has kernels for `device` (default: the current
    CUDA device, else the CPU) with its tiny calls (cached on disk), so a library that imports but
    cannot run is listed unavailable (BACKEND_BROKEN) with its own error text.
    """
    runtime.ensure_loaded()
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    out = []
    for b in runtime.registry.backends.values():
        result = runtime.probes.probe(b, dev) if probe and b.probes and b.availability[0] else None
        ok, version, why = b.availability
        out.append(BackendInfo(b.name, ok, version, None if why is None else str(why), tuple(k.id for k in b.kernels),
                               None if result is None else result.describe()))
    return out
