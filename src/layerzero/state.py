"""The one runtime object: kernel registry, policy, plan cache, health. Tests reset it."""

from __future__ import annotations

import fnmatch
import importlib
import logging
import threading
import time
from collections.abc import Hashable
from typing import Any

from .context import SelectionContext
from .descriptors import Descriptors, discover_environment
from .errors import UnknownNameError
from .kernel import Backend, KernelSpec, priority_for
from .monitor.health import Health
from .monitor.memory import MemoryGuard
from .monitor.probe import Probes
from .monitor.telemetry import Telemetry
from .perf.perfdb import Figure, Measurements, default_path
from .policy.model import Policy, PolicyLayers
from .reasons import Reason, Rejection
from .selection.cache import PlanCache
from .selection.engine import ExecutionPlan, SelectionEngine, SelectionReport

log = logging.getLogger("layerzero")



def builtin_backend_modules() -> list[str]:
    """Every module of layerzero.backends; each defines BACKEND or BACKENDS (none imports its library)."""
    import pkgutil

    package = importlib.import_module("layerzero.backends")
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


class Registry:
    """Backends and their kernels, indexed by id and by op."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.kernels: dict[str, KernelSpec] = {}
        self.by_op: dict[str, list[KernelSpec]] = {}
        self.aliases: dict[str, str] = {}
        self.groups: dict[str, str] = {}  # group name -> kernel-id glob (Backend.groups)
        self.descriptors: Any = None  # capabilities.Descriptors of the runtime: applied when an op is first seen

    def add_backend(self, backend: Backend) -> None:
        """Add (or replace: same name) a backend and register its kernels."""
        self.backends[backend.name] = backend
        for alias in backend.aliases:
            self.aliases[alias] = backend.name
        self.groups.update(backend.groups)
        for spec in backend.kernels:
            self.add_kernel(spec)

    def add_kernel(self, spec: KernelSpec) -> None:
        if spec.backend not in self.backends:
            self.backends[spec.backend] = Backend(spec.backend, ())
        old = self.kernels.get(spec.id)
        if old is not None:
            for op in old.ops:
                self.by_op[op] = [s for s in self.by_op[op] if s.id != spec.id]
        self.kernels[spec.id] = spec
        for op in spec.ops:
            self.by_op.setdefault(op, []).append(spec)

    def backend_name(self, name: str) -> str:
        """Canonical backend name for a name or alias (`torch_sdpa` -> `torch`)."""
        if name in self.backends:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise UnknownNameError("backend", name, list(self.backends) + list(self.aliases))

    def group(self, name: str) -> tuple[str, ...] | None:
        """The kernel ids a group name stands for as a policy target (`torch_sdpa`), or None."""
        pattern = self.groups.get(name)
        if pattern is None:
            return None
        return tuple(sorted(k for k in self.kernels if fnmatch.fnmatchcase(k, pattern)))

    def backend(self, name: str) -> Backend:
        return self.backends[self.backend_name(name)]

    def kernel(self, kernel_id: str) -> KernelSpec:
        spec = self.kernels.get(kernel_id)
        if spec is None:
            raise UnknownNameError("kernel", kernel_id, self.kernels)
        return spec

    def candidates(self, op: str) -> list[KernelSpec]:
        if self.descriptors is not None and self.descriptors.pending:
            self.descriptors.resolve(self, op)
        return self.by_op.get(op, [])


class Runtime:
    """All mutable state of LayerZero in one place."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.registry = Registry()
        self.descriptors = self.registry.descriptors = Descriptors()  # capabilities descriptors (lazy)
        self.policy = Policy()
        self.plans = PlanCache()
        self.engine = SelectionEngine(self)
        self.disabled_backends: frozenset[str] = frozenset()  # "*": every backend but the reference
        self.policy_layers = PolicyLayers()  # code > env > file; `policy` is their merge
        self.policy_watcher: Any = None  # policy.config.PolicyWatcher of lz.watch_policy
        self.health = Health(self)
        self.probes = Probes(self)  # availability by proof: backends verified once per device
        self.telemetry = Telemetry(self)
        self.memory = MemoryGuard()
        self._warned: set[Hashable] = set()
        self._loaded = False
        self.measurements = Measurements(default_path(), self._backend_version)
        self.trace: list[tuple[str, SelectionContext]] | None = None  # lz.perf.tune.record_trace
        # layerzero.distributed.InvariantMode while TP-invariant: no rank-local state (own PerfDB, health,
        # free memory) may change a choice; it supplies shared measurements, exclusions and tp_size/tp_rank.
        self.invariant: Any = None

    @property
    def generation(self) -> int:
        return self.plans.generation

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            for name in builtin_backend_modules():
                module = importlib.import_module(f"layerzero.backends.{name}")
                for backend in getattr(module, "BACKENDS", None) or (getattr(module, "BACKEND", None),):
                    if backend is not None:
                        self.registry.add_backend(backend)
            discover_environment(self.descriptors)  # LAYERZERO_DESCRIPTORS: read and hashed, parsed on first use
            from .policy.config import load_environment

            load_environment(self)  # LAYERZERO_* variables; PolicyValidationError if invalid
            self._loaded = True

    def bump(self) -> None:
        """Invalidate every cached plan (policy, registry, health or perf data changed)."""
        self.plans.invalidate()

    def set_policy(self, policy: Policy) -> None:
        with self._lock:
            self.policy = policy
            self.bump()

    def register(self, item: Backend | KernelSpec) -> None:
        self.ensure_loaded()
        with self._lock:
            if isinstance(item, Backend):
                self.registry.add_backend(item)
            else:
                self.registry.add_kernel(item)
            self.bump()

    def regime(self, ctx: SelectionContext) -> str:
        """The timing regime whose PerfDB figures score a selection for `ctx`: LAYERZERO_REGIME when
        set, else "graph" for a call that may be captured (ctx.graph_capture: CUDA stream capture or
        a compiled graph, see capture.graph_mode), else "eager". Read on the miss path only."""
        return self.policy.regime or ("graph" if ctx.graph_capture else "eager")

    def score(self, spec: KernelSpec, ctx: SelectionContext, measured: bool = True,
              regime: str = "eager") -> tuple[float, str]:
        """(score, what decided it): measured speed relative to the bucket's fastest in `regime`
        (PerfDB, when confident; decided by "eager" or "graph", the figure used), else the priority
        ("priority"), or a prefer rule's priority ("prefer").

        measured=False: the caller knows the PerfDB has no rows for ctx.op (skips the lookup).
        """
        if self.policy.prefers:
            prefer = self.policy.prefer_rule(spec, ctx)  # lz.prefer / prefer rules override both
            if prefer is not None:
                return prefer.priority, "prefer"
        scored = self.perf.score(spec.id, ctx, regime) if measured else None
        if scored is None:
            return float(priority_for(spec, ctx)), "priority"
        return scored[0], scored[1].regime

    @property
    def perf(self) -> Measurements:
        """The measurements scoring reads: the local PerfDB, or the shared view in TP-invariant mode."""
        return self.measurements if self.invariant is None else self.invariant.measurements

    def measured(self, spec: KernelSpec, ctx: SelectionContext, regime: str = "eager") -> Figure | None:
        """The PerfDB figure of a correct kernel that scoring uses in `regime` (see PerfRecord.figure_for)."""
        record = self.perf.lookup(spec.id, ctx)
        return None if record is None or not record.correct else record.figure_for(regime)

    def measured_us(self, spec: KernelSpec, ctx: SelectionContext) -> float | None:
        """Microseconds per call in the regime of `ctx` (see `regime`), when measured."""
        figure = self.measured(spec, ctx, self.regime(ctx))
        return None if figure is None else figure.median_us

    def perf_rejections(self, spec: KernelSpec, ctx: SelectionContext) -> list[Rejection]:
        record = self.perf.lookup(spec.id, ctx)
        if record is None or record.correct:
            return []
        detail = record.error or f"max error {record.max_error:.3g} vs the reference on shape {record.shape}"
        return [Rejection(Reason.PERF_INCORRECT, detail)]

    def set_measurements(self, measurements: Measurements) -> None:
        """Use another PerfDB view (lz.perfdb(path)); cached plans are dropped."""
        with self._lock:
            self.measurements = measurements
            self.bump()

    def _backend_version(self, kernel_id: str) -> str | None:
        backend = self.registry.backends.get(kernel_id.split(".", 1)[0])
        return None if backend is None else backend.availability[1]

    def backend_rejection(self, name: str, ctx: SelectionContext, probe: bool = True) -> Rejection | None:
        """Why backend `name` cannot run ctx's calls: not installed or broken (its availability), or its
        probe on ctx's device failed or cannot run now (monitor/probe.py; probe=False: not asked)."""
        backend = self.registry.backend(name)
        available, _, why = backend.availability
        if not available:
            return why or Rejection(Reason.BACKEND_NOT_INSTALLED, name)
        return self.probes.rejection(backend, ctx) if probe else None

    def health_rejections(self, spec: KernelSpec, ctx: SelectionContext | None = None) -> list[Rejection]:
        """Open circuit breakers (monitor/health.py) and, given a context, the memory headroom."""
        if self.invariant is not None:  # rank-local: the same on every rank instead
            return self.invariant.rejections(spec)
        out = self.health.rejections(spec)
        if ctx is not None and spec.workspace_bytes is not None:
            out.extend(self.memory.rejections(spec, ctx))
        return out

    def warn_once(self, key: Hashable, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message)

    def plan(self, family: Any, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExecutionPlan:
        """The miss path: build the context, select, bind, cache (once per key and generation)."""
        self.ensure_loaded()

        def compute() -> ExecutionPlan:
            start = time.perf_counter()
            ctx = family.context(*args, **kwargs)
            if self.invariant is not None:
                ctx = self.invariant.context(ctx)
            if self.trace is not None:
                self.trace.append((family.name, ctx))

            def guard(spec: KernelSpec, run: Any, report: SelectionReport) -> Any:
                return self.health.guard(spec, run, report, ctx, family)  # runtime fallback, call counting

            plan, _ = self.engine.select(ctx, family.bind, family.transforms, guard)
            self.telemetry.selected(ctx, plan, time.perf_counter() - start)
            return plan

        self.telemetry.miss(family.name)
        return self.plans.get_or_compute(key, compute)

    def explain(self, family: Any, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SelectionReport:
        self.ensure_loaded()
        ctx = family.context(*args, **kwargs)
        if self.invariant is not None:
            ctx = self.invariant.context(ctx)
        report = self.engine.evaluate(ctx, family.transforms)
        cached = self.plans.data.get(key)
        report.cached = cached is not None and cached.kernel_id == report.selected_kernel
        return report


runtime = Runtime()


def reset() -> None:
    """Fresh runtime state (tests): registry reloaded, policy cleared, caches empty."""
    global runtime
    runtime.telemetry.close()
    if runtime.policy_watcher is not None:
        runtime.policy_watcher.stop()
    runtime.plans.close()
    fresh = Runtime()
    runtime.__dict__.update(fresh.__dict__)
    runtime.engine.runtime = runtime
    runtime.health.runtime = runtime.telemetry.runtime = runtime.probes.runtime = runtime
