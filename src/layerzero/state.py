"""The one runtime object: kernel registry, policy, plan cache, health. Tests reset it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Hashable, Mapping
from contextvars import Token
from dataclasses import replace
from typing import Any

from .backends import Registry, builtin_backends
from .context import SelectionContext
from .descriptors import Descriptors, discover_environment
from .kernel import Backend, KernelSpec, priority_for
from .monitor.health import Health
from .monitor.memory import MemoryGuard
from .monitor.probe import Probes
from .monitor.telemetry import Telemetry
from .perf.perfdb import Figure, Measurements, default_path
from .policy.loader import environment_policy, load_policy_file
from .policy.model import SCOPE, Change, Policy, PolicyLayers, Scope
from .reasons import Reason, Rejection
from .selection.cache import PlanCache
from .selection.engine import ExecutionPlan, SelectionEngine, SelectionReport

log = logging.getLogger("layerzero")


class Runtime:
    """All mutable state of LayerZero in one place."""

    def __init__(self) -> None:
        self._build()

    def _build(self) -> None:
        """Fresh components, each given this runtime to read what it needs from the others."""
        self._lock = threading.RLock()
        self.registry = Registry(on_change=self.bump)
        self.descriptors = self.registry.descriptors = Descriptors()  # capabilities descriptors (lazy)
        self._policy = Policy()  # the process-wide policy; `policy` adds the thread's scoped overrides
        self.plans = PlanCache()
        self.engine = SelectionEngine(self)
        self._disabled: frozenset[str] = frozenset()  # "*": every backend but the reference
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

    def reset(self) -> None:
        """Fresh state (tests, lz.reset): stop the threads of the old components, then build new ones.
        Whoever holds this object (the ops) sees the new components on its next call."""
        self.telemetry.close()
        if self.policy_watcher is not None:
            self.policy_watcher.stop()
        self.plans.close()
        self._build()

    @property
    def generation(self) -> int:
        return self.plans.generation

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            for backend in builtin_backends():
                self.registry.add_backend(backend)
            discover_environment(self.descriptors)  # LAYERZERO_DESCRIPTORS: read and hashed, parsed on first use
            self.load_environment()  # LAYERZERO_* variables; PolicyValidationError if invalid
            self._loaded = True

    def load_environment(self, environ: Mapping[str, str] | None = None) -> None:
        """Read LAYERZERO_* into the env layer of the policy (and LAYERZERO_POLICY into the file layer).

        Uses the registry directly (never ensure_loaded). Nothing changes unless everything is valid.
        """
        environ = os.environ if environ is None else environ
        env_policy = environment_policy(environ, self.registry)
        path = environ.get("LAYERZERO_POLICY") or None
        with self._lock:
            layers = self.policy_layers
            if path is not None:
                layers = replace(layers, file=load_policy_file(path, self.registry), file_path=path)
            self.set_layers(replace(layers, env=env_policy))

    def bump(self) -> None:
        """Invalidate every cached plan (policy, registry, health or perf data changed)."""
        self.plans.invalidate()

    def set_policy(self, policy: Policy) -> None:
        """Install the process-wide policy (every thread); drops cached plans."""
        with self._lock:
            self._policy = policy
            self.bump()

    # ---- the policy in force: process-wide, and the scoped overrides of this thread or task

    @property
    def policy(self) -> Policy:
        """The policy in force for the calling thread or task (process-wide, with its blocks' changes)."""
        scope = SCOPE.get()
        return self._policy if scope is None else self._scoped(scope)[0]

    @property
    def disabled_backends(self) -> frozenset[str]:
        """Backend names and kernel ids lz.disabled switched off for the calling thread or task."""
        scope = SCOPE.get()
        return self._disabled if scope is None else self._scoped(scope)[1]

    @property
    def process_disabled(self) -> frozenset[str]:
        """What lz.disabled switched off for every thread (blocks' changes aside)."""
        return self._disabled

    @disabled_backends.setter
    def disabled_backends(self, names: frozenset[str]) -> None:
        """Switch off for every thread (the statement forms of lz.disabled / lz.enabled); drops plans."""
        with self._lock:
            self._disabled = frozenset(names)
            self.bump()

    def _scoped(self, scope: Scope) -> tuple[Policy, frozenset[str]]:
        """(policy, disabled set) of a scope: its blocks' changes on the process-wide ones, kept until
        those change (the generation moves)."""
        generation = self.plans.generation  # read first: a change after it makes the next call recompute
        effect = scope.effect
        if effect is None or effect[0] != generation:
            code, disabled = scope.apply(self.policy_layers.code, self._disabled)
            effect = scope.effect = (generation, replace(self.policy_layers, code=code).merged(), disabled)
        return effect[1], effect[2]

    def enter_scope(self, change: Change) -> tuple[Token[Scope | None], PlanCache]:
        """Begin a block whose `change` applies to this thread or task only (policy/config.py)."""
        plans = self.plans
        plans.enter_scope()  # before the scope exists: no call of it may read the shared plans
        token = SCOPE.set(Scope(SCOPE.get(), change))
        self.bump()  # like every policy change (the plans of the scope are new anyway)
        return token, plans

    def leave_scope(self, token: Token[Scope | None], plans: PlanCache) -> None:
        SCOPE.reset(token)
        plans.leave_scope()  # the cache the block began in (lz.reset may have replaced it since)
        self.bump()

    def scoped_key(self, key: Hashable) -> Hashable:
        """A call's plan-cache key as filed for the calling thread or task: (scope, key) inside a block."""
        scope = SCOPE.get()
        return key if scope is None else (scope, key)

    def set_layers(self, layers: PolicyLayers) -> None:
        """Install new policy layers (code > env > file); the policy in force becomes their merge."""
        with self._lock:
            self.policy_layers = layers
            self.set_policy(layers.merged())

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

    def score(
        self, spec: KernelSpec, ctx: SelectionContext, measured: bool = True, regime: str = "eager"
    ) -> tuple[float, str]:
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
        """The miss path: build the context, select, bind, cache (once per key and generation).

        While a scoped-override block is active anywhere, every call comes here (the hit path's view
        is empty, see selection/cache.py): its plan is looked up first, filed under (scope, key) for
        a call inside a block.
        """
        self.ensure_loaded()
        scope = SCOPE.get()
        if scope is not None:
            key = (scope, key)
        if self.plans.scopes:
            plan = self.plans.get(key)
            if plan is not None:
                return plan

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
        cached = self.plans.get(self.scoped_key(key))
        report.cached = cached is not None and cached.kernel_id == report.selected_kernel
        return report


runtime = Runtime()


def reset() -> None:
    """Fresh runtime state (tests): registry reloaded, policy cleared, caches empty."""
    runtime.reset()
