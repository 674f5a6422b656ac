"""Kernel health: circuit breakers per kernel and per backend, and the runtime fallback.

A kernel that raises costs one warning, never a crash or a wrong result: the plan's guard
records the failure, re-selects without that kernel for the same call, and returns the next
kernel's result (the reference last). Failures feed a breaker per kernel and one per backend:

    closed --N failures within window_s--> open --cooldown_s--> half_open --success--> closed
                                                                          --failure--> open

An open breaker rejects its kernels (KERNEL_UNHEALTHY / BACKEND_UNHEALTHY); every state change
bumps the plan-cache generation so no plan chosen under the old state is served, and is logged
once. Successes are only recorded by plans that probe a half-open breaker, so the success path
of a healthy kernel costs one try block.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..capture import graph_mode
from ..context import SelectionContext
from ..errors import ConfigurationError, CudaGraphUnsafeError, KernelExecutionError, NoKernelFoundError
from ..kernel import KernelSpec, check_constraints
from ..reasons import Reason, Rejection
from ..selection.engine import REFERENCE_BACKEND, SelectionReport, bind_kernel, reraise

if TYPE_CHECKING:
    from ..ops import OpFamily
    from ..state import Runtime

log = logging.getLogger("layerzero")

# torch exceptions that steer a computation instead of reporting a kernel's failure. Non-reentrant
# checkpointing ends its recomputation by raising _StopRecomputationError from a saved-tensor hook,
# inside whichever op saves the last tensor it needs; CheckpointError reports a forward/recompute
# mismatch (the caller's code); a tracer with symbolic shapes raises GuardOnDataDependentSymNode to
# ask about a data-dependent value. Taking them for a failure would run the call again on another
# kernel (under checkpointing the reference then crashes on the stopped frame) and charge a healthy
# kernel's breaker: they pass through untouched. Matched by name, so that checking imports nothing.
# BaseExceptions (KeyboardInterrupt, SystemExit, GeneratorExit) are never caught in the first place.
_CONTROL_FLOW = frozenset(
    {
        ("torch.utils.checkpoint", "_StopRecomputationError"),
        ("torch.utils.checkpoint", "CheckpointError"),
        ("torch.fx.experimental.symbolic_shapes", "GuardOnDataDependentSymNode"),
    }
)


def is_control_flow(error: BaseException) -> bool:
    """Whether `error` is torch steering the computation (see _CONTROL_FLOW), not a kernel failing."""
    return any((c.__module__, c.__qualname__) in _CONTROL_FLOW for c in type(error).__mro__)


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Breaker thresholds and whether a failing kernel falls back (off: the error is raised).

    `clock` returns seconds (monotonic); tests pass a fake one.
    """

    failure_threshold: int = 5
    backend_failure_threshold: int = 15
    window_s: float = 60.0
    cooldown_s: float = 30.0
    fallback: bool = True
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "backend_failure_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("window_s", "cooldown_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ConfigurationError(f"{name}: expected a finite number of seconds > 0, got {value!r}")


class CircuitBreaker:
    """The breaker of one kernel or backend. Mutated only under Health's lock."""

    __slots__ = (
        "name",
        "kind",
        "threshold",
        "state",
        "recent",
        "total_failures",
        "times_opened",
        "retry_at",
        "last_error",
    )

    def __init__(self, name: str, kind: str, threshold: int) -> None:
        self.name = name
        self.kind = kind  # "kernel" | "backend"
        self.threshold = threshold
        self.state = BreakerState.CLOSED
        self.recent: deque[float] = deque()
        self.total_failures = 0
        self.times_opened = 0
        self.retry_at = math.inf
        self.last_error = ""

    def failure(self, now: float, config: HealthConfig, error: str) -> BreakerState | None:
        """Count a failure; the new state if it changed."""
        self.total_failures += 1
        self.last_error = error
        self.recent.append(now)
        while self.recent and self.recent[0] <= now - config.window_s:
            self.recent.popleft()
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and len(self.recent) >= self.threshold
        ):
            self.state = BreakerState.OPEN
            self.times_opened += 1
            self.retry_at = now + config.cooldown_s
            return self.state
        return None

    def success(self) -> BreakerState | None:
        if self.state is not BreakerState.HALF_OPEN:
            return None
        self.state = BreakerState.CLOSED
        self.recent.clear()
        self.retry_at = math.inf
        return self.state

    def tick(self, now: float) -> BreakerState | None:
        """Open -> half-open once the cooldown has passed."""
        if self.state is BreakerState.OPEN and now >= self.retry_at:
            self.state = BreakerState.HALF_OPEN
            return self.state
        return None


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """One breaker as `lz.health()` reports it."""

    name: str
    kind: str
    state: BreakerState
    recent_failures: int
    total_failures: int
    times_opened: int
    retry_in_s: float | None
    last_error: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every breaker that has seen a failure, and the runtime's failure and fallback counts."""

    breakers: tuple[BreakerInfo, ...]
    failures: int
    fallbacks: int
    config: HealthConfig

    @property
    def healthy(self) -> bool:
        return all(b.state is BreakerState.CLOSED for b in self.breakers)

    def breaker(self, name: str) -> BreakerInfo | None:
        """The breaker of kernel id or backend name `name` (None: it never failed)."""
        return next((b for b in self.breakers if b.name == name), None)

    def state(self, name: str) -> BreakerState:
        info = self.breaker(name)
        return BreakerState.CLOSED if info is None else info.state

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "failures": self.failures,
            "fallbacks": self.fallbacks,
            "breakers": [
                {
                    "name": b.name,
                    "kind": b.kind,
                    "state": b.state.value,
                    "recent_failures": b.recent_failures,
                    "total_failures": b.total_failures,
                    "times_opened": b.times_opened,
                    "retry_in_s": b.retry_in_s,
                    "last_error": b.last_error,
                }
                for b in self.breakers
            ],
        }

    def __str__(self) -> str:
        head = f"health: {'ok' if self.healthy else 'degraded'} ({self.failures} failures, {self.fallbacks} fallbacks)"
        lines = [head]
        for b in self.breakers:
            retry = f", retry in {b.retry_in_s:.1f}s" if b.retry_in_s is not None else ""
            lines.append(
                f"  {b.kind:<7} {b.name:<28} {b.state.value:<9} failures {b.recent_failures} recent / "
                f"{b.total_failures} total, opened {b.times_opened}x{retry}; last: {b.last_error}"
            )
        return "\n".join(lines)


class _Recover:
    """The `recover` of a plan whose `run` is the bare kernel: the failure costs one warning and the
    call runs on the next kernel (Health.recover).

    An object, not a closure: two objects kept alive per plan instead of six (function, cell tuple,
    cells), which the cyclic GC visits after every selection miss. It runs only after a failure;
    the hot path never enters it.
    """

    __slots__ = ("health", "spec", "ctx", "family")

    def __init__(self, health: Health, spec: KernelSpec, ctx: SelectionContext, family: OpFamily) -> None:
        self.health, self.spec, self.ctx, self.family = health, spec, ctx, family

    def __call__(self, error: Exception, *args: Any) -> Any:
        return self.health.recover(self.spec, self.ctx, self.family, args, {}, error)


class Health:
    """Breakers, failure recording and the fallback guard of one Runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = HealthConfig()
        self.kernels: dict[str, CircuitBreaker] = {}
        self.backends: dict[str, CircuitBreaker] = {}
        self.failures = 0
        self.fallbacks = 0
        self._lock = threading.Lock()

    # -- configuration and reading -------------------------------------------------------------

    def configure(self, **changes: Any) -> HealthConfig:
        """Change thresholds (see HealthConfig); breakers keep their state. Drops cached plans."""
        unknown = set(changes) - set(HealthConfig.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(
                f"unknown health setting(s) {sorted(unknown)}; "
                f"expected some of {sorted(HealthConfig.__dataclass_fields__)}"
            )
        self.config = replace(self.config, **changes)
        self.runtime.bump()
        return self.config

    def report(self) -> HealthReport:
        now = self.config.clock()
        with self._lock:
            changed = self._tick(now)
            infos = tuple(
                BreakerInfo(
                    b.name,
                    b.kind,
                    b.state,
                    len(b.recent),
                    b.total_failures,
                    b.times_opened,
                    None if b.state is not BreakerState.OPEN else max(0.0, b.retry_at - now),
                    b.last_error,
                )
                for b in [*self.kernels.values(), *self.backends.values()]
            )
            report = HealthReport(infos, self.failures, self.fallbacks, self.config)
        if changed:
            self.runtime.bump()
        return report

    def rejections(self, spec: KernelSpec) -> list[Rejection]:
        """KERNEL_UNHEALTHY / BACKEND_UNHEALTHY while the kernel's or its backend's breaker is open."""
        if not self.kernels:
            return []
        out = []
        with self._lock:
            changed = self._tick(self.config.clock())
            for breaker, reason in (
                (self.kernels.get(spec.id), Reason.KERNEL_UNHEALTHY),
                (self.backends.get(spec.backend), Reason.BACKEND_UNHEALTHY),
            ):
                if breaker is not None and breaker.state is BreakerState.OPEN:
                    out.append(
                        Rejection(
                            reason,
                            f"{breaker.kind} {breaker.name} breaker open after "
                            f"{breaker.total_failures} failure(s), last: {breaker.last_error}",
                        )
                    )
        if changed:  # plans that kept this kernel out must re-select now that it may be probed
            self.runtime.bump()
        return out

    # -- recording -----------------------------------------------------------------------------

    def record_failure(self, spec: KernelSpec, error: BaseException) -> None:
        """Count a failure of `spec` against its kernel and backend breakers."""
        cfg = self.config
        now = cfg.clock()
        text = f"{type(error).__name__}: {error}"[:300]
        with self._lock:
            self.failures += 1
            kernel = self.kernels.get(spec.id)
            if kernel is None:
                kernel = self.kernels[spec.id] = CircuitBreaker(spec.id, "kernel", cfg.failure_threshold)
            backend = self.backends.get(spec.backend)
            if backend is None:
                backend = self.backends[spec.backend] = CircuitBreaker(
                    spec.backend, "backend", cfg.backend_failure_threshold
                )
            changes = [(b, b.failure(now, cfg, text)) for b in (kernel, backend)]
        self.runtime.telemetry.failure(spec.id, type(error).__name__)
        if isinstance(error, ImportError):
            self._mark_import_failed(spec, text)
        self._changed(changes)

    def _mark_import_failed(self, spec: KernelSpec, text: str) -> None:
        """A library that is present but fails to import stays broken for this process: its
        backend becomes unavailable (BACKEND_IMPORT_FAILED) instead of cycling its breaker."""
        backend = self.runtime.registry.backends.get(spec.backend)
        if backend is None or not backend.availability[0]:
            return
        # availability is a cached_property of the Backend; overriding it is the process-wide verdict
        backend.__dict__["availability"] = (
            False,
            backend.availability[1],
            Rejection(Reason.BACKEND_IMPORT_FAILED, text),
        )
        self.runtime.warn_once(("import-failed", spec.backend), f"backend {spec.backend} failed to import: {text}")
        self.runtime.bump()

    def record_success(self, spec: KernelSpec) -> None:
        """A probe of a half-open breaker succeeded: close it (and its backend's)."""
        with self._lock:
            changes = [
                (b, b.success()) for b in (self.kernels.get(spec.id), self.backends.get(spec.backend)) if b is not None
            ]
        self._changed(changes)

    def refresh(self) -> None:
        """Move breakers whose cooldown has passed to half-open (bumps the generation if any did)."""
        with self._lock:
            changed = self._tick(self.config.clock())
        if changed:
            self.runtime.bump()

    def _tick(self, now: float) -> bool:
        changed = False
        for b in [*self.kernels.values(), *self.backends.values()]:
            if b.tick(now) is not None:
                changed = True
                log.info("layerzero: %s %s circuit breaker half-open: the next call probes it", b.kind, b.name)
                self.runtime.telemetry.transition(b.name, b.kind, BreakerState.HALF_OPEN.value)
        return changed

    def _changed(self, changes: list[tuple[CircuitBreaker, BreakerState | None]]) -> None:
        changed = False
        for b, state in changes:
            if state is None:
                continue
            changed = True
            self.runtime.telemetry.transition(b.name, b.kind, state.value)
            if state is BreakerState.OPEN:
                log.warning(
                    "layerzero: %s %s circuit breaker open after %d failure(s) (last: %s); calls go to "
                    "other kernels for %gs",
                    b.kind,
                    b.name,
                    len(b.recent),
                    b.last_error,
                    self.config.cooldown_s,
                )
            else:
                log.info("layerzero: %s %s circuit breaker closed after a successful probe", b.kind, b.name)
        if changed:
            self.runtime.bump()

    def _half_open(self, spec: KernelSpec) -> bool:
        if not self.kernels:  # no breaker exists yet
            return False
        return any(
            b is not None and b.state is BreakerState.HALF_OPEN
            for b in (self.kernels.get(spec.id), self.backends.get(spec.backend))
        )

    def _retry_deadline(self, report: SelectionReport) -> float | None:
        """When a breaker that kept a candidate out of `report` becomes half-open."""
        if not self.kernels:  # no kernel has failed yet: no breaker exists (the common case)
            return None
        names = set()
        for c in report.candidates:
            for r in c.rejections:
                if r.reason is Reason.KERNEL_UNHEALTHY:
                    names.add(("k", c.kernel_id))
                elif r.reason is Reason.BACKEND_UNHEALTHY:
                    names.add(("b", c.backend))
        if not names:
            return None
        with self._lock:
            times = [
                (self.kernels if kind == "k" else self.backends)[name].retry_at
                for kind, name in names
                if name in (self.kernels if kind == "k" else self.backends)
            ]
        finite = [t for t in times if t != math.inf]
        return min(finite) if finite else None

    # -- the plan guard and the fallback -------------------------------------------------------

    def guard(
        self,
        spec: KernelSpec,
        inner: Callable[..., Any],
        report: SelectionReport,
        ctx: SelectionContext,
        family: OpFamily,
    ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(run, recover) of a plan running `inner` (the bound `spec` for `ctx`): see ExecutionPlan.

        The common plan's run is `inner` itself: its call site catches a failure and passes it to
        recover, which falls back to the next kernel. Call counting, probing a half-open breaker
        and capture safety need a wrapper around `inner`, which then recovers by itself. The
        reference recovers nothing: it is the last resort, and an exception from it is the
        caller's (bad input the validation could not see).
        """
        rt = self.runtime
        calls = rt.telemetry.call_counter(spec.id, ctx.op) if rt.telemetry.enabled else None
        health = self
        recover: Callable[..., Any] = reraise

        if spec.backend == REFERENCE_BACKEND:
            if calls is None:
                run = inner
            else:

                def run(*args: Any, **kwargs: Any) -> Any:
                    next(calls)
                    return inner(*args, **kwargs)
        elif calls is not None or self._half_open(spec) or (ctx.device_type == "cuda" and not spec.graph_safe):
            run = self._careful_run(spec, ctx, family, inner, calls)
        else:
            run, recover = inner, _Recover(self, spec, ctx, family)

        deadline = self._retry_deadline(report)
        if deadline is not None:
            # Degraded mode: a breaker that kept a kernel out of this plan reopens for probing at
            # `deadline`; until then each call pays one clock read.
            clock, unchecked = self.config.clock, run

            def run(*args: Any, **kwargs: Any) -> Any:
                if clock() >= deadline:
                    health.refresh()
                return unchecked(*args, **kwargs)

        return run, recover

    def _careful_run(
        self, spec: KernelSpec, ctx: SelectionContext, family: OpFamily, inner: Callable[..., Any], calls: Any
    ) -> Callable[..., Any]:
        """The slow guard, which recovers by itself: counts calls (telemetry on), probes a half-open
        breaker, and keeps a capture-unsafe kernel out of a CUDA graph even when the op's cache key
        does not see the capture."""
        health = self
        probe = self._half_open(spec)
        unsafe = ctx.device_type == "cuda" and not spec.graph_safe

        def run(*args: Any, **kwargs: Any) -> Any:
            if calls is not None:
                next(calls)
            if unsafe and graph_mode():  # capturing, or inside a compiled graph
                return health.recover(spec, ctx.replace(graph_capture=True), family, args, kwargs, None)
            try:
                out = inner(*args, **kwargs)
            except Exception as error:
                return health.recover(spec, ctx, family, args, kwargs, error)
            if probe:
                health.record_success(spec)
            return out

        return run

    def recover(
        self,
        spec: KernelSpec,
        ctx: SelectionContext,
        family: OpFamily,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException | None,
    ) -> Any:
        """Run the call with the next kernel after `spec` failed (error) or cannot run under capture
        (error None). The caller's tensors are passed again as they were given. torch's control-flow
        exceptions (is_control_flow) are raised again as they are, counted nowhere."""
        if error is not None and is_control_flow(error):
            raise error
        rt = self.runtime
        first = spec
        if error is not None:
            self.record_failure(spec, error)
            if not self.config.fallback:
                raise KernelExecutionError(spec.id, error) from error
        excluded = {spec.id}
        while True:
            nxt = self._next_kernel(ctx, family, excluded)
            if nxt is None:
                if error is None:
                    raise CudaGraphUnsafeError(
                        f"{spec.id} is not capture-safe and strict policy leaves no other kernel for {ctx.op} "
                        f"under CUDA graph capture; see lz.explain"
                    )
                raise KernelExecutionError(spec.id, error) from error
            run, _ = bind_kernel(nxt, ctx, family.bind, family.transforms)
            try:
                out = run(*args, **kwargs)
            except Exception as next_error:
                if is_control_flow(next_error):
                    raise
                if nxt.backend == REFERENCE_BACKEND:
                    raise KernelExecutionError(nxt.id, next_error) from next_error
                self.record_failure(nxt, next_error)
                excluded.add(nxt.id)
                spec, error = nxt, next_error
                continue
            with self._lock:
                self.fallbacks += 1
            rt.telemetry.fallback(first.id, nxt.id)
            why = "is not capture-safe" if error is None and spec is first else f"failed ({type(error).__name__})"
            rt.warn_once(
                ("runtime-fallback", first.id, nxt.id),
                f"layerzero: {first.id} {why} on {ctx.op}; this call ran {nxt.id} instead (see lz.health())",
            )
            return out

    def _next_kernel(self, ctx: SelectionContext, family: OpFamily, excluded: set[str]) -> KernelSpec | None:
        """The best remaining kernel for `ctx`; the reference last (not in strict mode)."""
        rt = self.runtime
        try:
            candidates = rt.engine.evaluate(ctx, family.transforms).candidates
        except NoKernelFoundError as e:
            candidates = e.report.candidates if isinstance(e.report, SelectionReport) else []
        ranked = sorted(
            (c for c in candidates if c.score is not None and c.kernel_id not in excluded),
            key=lambda c: (c.backend == REFERENCE_BACKEND, -(c.score or 0.0), c.kernel_id),
        )
        strict = rt.policy.strict
        for c in ranked:
            if not (strict and c.backend == REFERENCE_BACKEND):
                return rt.registry.kernel(c.kernel_id)
        if strict:
            return None
        # A policy lock may have rejected the reference; it still runs any call it can.
        for s in rt.registry.candidates(ctx.op):
            if s.backend == REFERENCE_BACKEND and s.id not in excluded and not check_constraints(s, ctx):
                return s
        return None
