"""SelectionEngine: lock -> candidates -> allow/deny -> constraints -> score -> ExecutionPlan."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..context import SelectionContext
from ..errors import NoKernelFoundError
from ..frozen import fast_frozen_init
from ..kernel import KernelSpec, call_rejection, check_constraints, fits_device, priority_for
from ..reasons import Reason, Rejection

if TYPE_CHECKING:
    from ..state import Runtime

log = logging.getLogger("layerzero")

REFERENCE_BACKEND = "reference"


def reraise(error: BaseException, *args: Any) -> Any:
    """The `recover` of a plan whose `run` handles its own failures (or whose kernel is the reference)."""
    raise error


@fast_frozen_init  # one plan per miss: 0.4 us instead of 1.1 with the generated frozen __init__
@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """The chosen kernel for one call signature, bound with its transforms into `run`.

    `run` is the bare prepared callable (no wrapper frame on the hot path); a call site catches what
    it raises and hands it to `recover(error, *args)`, which records the failure and returns the
    result of the next kernel (monitor/health.py), or raises. Call sites:
        try:
            return plan.run(*args)
        except Exception as error:
            return plan.recover(error, *args)
    """

    kernel_id: str
    op: str
    run: Callable[..., Any] = field(repr=False, compare=False)
    transforms: tuple[str, ...] = ()
    score: float = 0.0
    generation: int = 0
    fallback: bool = False
    recover: Callable[..., Any] = field(default=reraise, repr=False, compare=False)

    def __call__(self, *args: Any) -> Any:
        try:
            return self.run(*args)
        except Exception as error:
            return self.recover(error, *args)


def bind_kernel(
    spec: KernelSpec,
    ctx: SelectionContext,
    bind: Binder,
    transforms_of: Callable[[KernelSpec, SelectionContext], tuple[str, ...]],
) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The callable that runs `spec` for `ctx` in the op's calling convention: the kernel's own
    prepared one (KernelSpec.prepare) when it has one for this context, else the family's binding."""
    if spec.prepare is not None:
        prepared = spec.prepare(ctx)
        if prepared is not None:
            return prepared, transforms_of(spec, ctx)
    return bind(spec, ctx)


@dataclass(slots=True)
class Candidate:
    """One kernel's fate in a selection: rejections, or the score it got and why."""

    kernel_id: str
    backend: str
    priority: int
    rejections: list[Rejection] = field(default_factory=list)
    score: float | None = None
    transforms: tuple[str, ...] = ()
    rules: list[str] = field(default_factory=list)
    measured_us: float | None = None  # PerfDB median for this bucket in the report's regime, when measured
    measured_regime: str | None = None  # the figure measured_us is: "eager" or "graph" (see PerfRecord.figure_for)
    decided_by: str = ""  # what the score came from: "eager" or "graph" (a PerfDB figure), "priority", "prefer"

    @property
    def eligible(self) -> bool:
        return not self.rejections


@dataclass(slots=True)
class SelectionReport:
    """What `lz.explain` returns: every candidate with its reasons or score, and the choice."""

    op: str
    context: SelectionContext
    selected_kernel: str
    score: float
    candidates: list[Candidate]
    cached: bool = False
    fallback: bool = False
    notes: list[str] = field(default_factory=list)
    regime: str = "eager"  # whose PerfDB figures scored: "graph" under capture / compile, or LAYERZERO_REGIME

    @property
    def decided_by(self) -> str:
        """What decided the selected kernel's score: "graph 16.7 us" / "eager 31 us" (its PerfDB
        figure), "priority" or "prefer"; "" when nothing was scored."""
        chosen = next((c for c in self.candidates if c.kernel_id == self.selected_kernel), None)
        if chosen is None or not chosen.decided_by:
            return ""
        if chosen.decided_by in ("eager", "graph") and chosen.measured_us is not None:
            return f"{chosen.decided_by} {chosen.measured_us:.4g} us"
        return chosen.decided_by

    @property
    def rejection_reasons(self) -> dict[str, list[Reason]]:
        return {c.kernel_id: [r.reason for r in c.rejections] for c in self.candidates if c.rejections}

    @property
    def scores(self) -> dict[str, float]:
        return {c.kernel_id: c.score for c in self.candidates if c.score is not None}

    def __str__(self) -> str:
        decided = self.decided_by
        lines = [
            f"op {self.op}: selected {self.selected_kernel} (score {self.score:g}"
            f"{', cached' if self.cached else ''}{', reference fallback' if self.fallback else ''})",
            f"  context: {self.context.summary()}",
            f"  regime: {self.regime}" + (f"; decided by {decided}" if decided else ""),
        ]
        ranked = sorted(self.candidates, key=lambda c: (c.score is None, -(c.score or 0.0), c.kernel_id))
        for c in ranked:
            mark = "*" if c.kernel_id == self.selected_kernel else " "
            if c.rejections:
                why = "; ".join(str(r) for r in c.rejections)
                lines.append(f" {mark} {c.kernel_id:<28} rejected: {why}")
            else:
                extra = f" transforms={'+'.join(c.transforms)}" if c.transforms else ""
                rules = f" rules: {'; '.join(c.rules)}" if c.rules else ""
                measured = (
                    ""
                    if c.measured_us is None
                    else f", measured {c.measured_us:.4g} us ({c.measured_regime}"
                    + (f"; no {self.regime} figure)" if c.measured_regime != self.regime else ")")
                )
                score = "not scored" if c.score is None else f"score {c.score:g}"  # strict mode stops before scoring
                lines.append(f" {mark} {c.kernel_id:<28} {score} (priority {c.priority}{measured}){extra}{rules}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


Binder = Callable[[KernelSpec, SelectionContext], tuple[Callable[..., Any], tuple[str, ...]]]

# Each transform (layout transpose, contiguous copy) costs a little against the priority score.
TRANSFORM_PENALTY = 2.0


_DISABLED = Rejection(Reason.BACKEND_DISABLED, "disabled by lz.disabled()")


def _disabled(spec: KernelSpec, disabled: frozenset[str]) -> bool:
    """The kernel or its backend is switched off by lz.disabled() (the reference never is)."""
    return (
        bool(disabled)
        and spec.backend != REFERENCE_BACKEND
        and (spec.backend in disabled or spec.id in disabled or "*" in disabled)
    )


class SelectionEngine:
    """Chooses kernels for contexts using the runtime's registry, policy and health."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Per generation: the kernels of (op, device type, SM, dtype) whose backend is installed and
        # whose platform/SM/dtype constraints hold, by declared priority (the reference last). The
        # miss path of a call only looks at these. The order only lets evaluate's early exit skip
        # kernels; decode and row-count priorities (not in the key) may reorder a call's ranking, and
        # every kernel is still checked against its own priority. One tuple, so a table is never
        # filed under a generation it was not started in.
        self._viable: tuple[int, dict[tuple[object, ...], list[KernelSpec]]] = (-1, {})

    def viable(self, ctx: SelectionContext) -> list[KernelSpec]:
        """Kernels for ctx.op that pass every shape-independent check (cached per generation)."""
        rt = self.runtime
        generation = rt.generation  # read first: registry state seen afterwards is at least this new
        cached, table = self._viable
        if cached != generation:
            table = {}
            self._viable = (generation, table)
        key = (ctx.op, ctx.device_type, ctx.device_index, ctx.sm, ctx.generation, ctx.isa, ctx.dtype)
        specs = table.get(key)
        if specs is None:
            # Each backend: installed, and verified on this device (monitor/probe.py: probed on first use).
            # One skipped only because it cannot be probed now (CUDA graph capture, torch.compile tracing)
            # makes the list temporary: it is not kept, and the next miss outside capture probes it.
            usable: dict[str, Rejection | None] = {}
            specs = []
            for s in rt.registry.candidates(ctx.op):
                if not fits_device(s, ctx):
                    continue
                if s.backend not in usable:
                    usable[s.backend] = rt.backend_rejection(s.backend, ctx)
                if usable[s.backend] is None:
                    specs.append(s)
            specs.sort(key=lambda s: (s.backend == REFERENCE_BACKEND, -s.priority))
            if not any(r is not None and r.reason is Reason.BACKEND_UNPROBED for r in usable.values()):
                table[key] = specs
        return specs

    def evaluate(
        self,
        ctx: SelectionContext,
        transforms_of: Callable[[KernelSpec, SelectionContext], tuple[str, ...]],
        complete: bool = True,
    ) -> SelectionReport:
        """Reject or score the kernels of `ctx.op` and choose one: the one routine of selection.

        complete=True (explain, solve, the fallback after a failure): every kernel registered for the
        op, each with all its reasons. complete=False (a call's miss path): the kernels viable on this
        device only (viable), each stopped at its first reason, with an early exit when priorities
        alone score (no policy rule, no PerfDB rows for the op): a kernel whose priority cannot beat
        the best accelerated score so far is skipped, and not listed. The winner is the same either
        way (tests/test_selection_agreement.py). When nothing can run, or strict mode refuses to run
        anything but a lock that cannot, the error carries the complete report.
        """
        rt = self.runtime
        policy = rt.policy
        specs = rt.registry.candidates(ctx.op) if complete else self.viable(ctx)
        measured = rt.perf.has_rows(ctx.op)  # False: every PerfDB lookup below would find nothing
        # Breakers and TP-invariant exclusions reject nothing until a kernel has failed or the mode is on;
        # memory headroom applies only to kernels that declare a workspace.
        ask_health = bool(rt.health.kernels) or rt.invariant is not None
        ruled = bool(policy.locks or policy.allows or policy.denies or policy.boosts or policy.prefers)
        early = not (complete or measured or ruled)  # priorities alone score: the early exit applies
        regime = rt.regime(ctx)  # whose PerfDB figures score: graph under capture / compile, else eager
        disabled = rt.disabled_backends
        candidates: dict[str, Candidate] = {}
        notes: list[str] = []

        def judge(spec: KernelSpec) -> Candidate:
            """The kernel's candidate with its reasons before policy (each kernel judged once)."""
            cand = candidates.get(spec.id)
            if cand is not None:
                return cand
            cand = candidates[spec.id] = Candidate(spec.id, spec.backend, spec.priority)
            if complete:
                why = self._backend_rejection(spec, ctx)
                if why is not None:  # the backend cannot run here: nothing else applies
                    cand.rejections.append(why)
                    return cand
                cand.rejections.extend(self._kernel_rejections(spec, ctx))
            else:  # viable(): installed, fits the device; stop at the first reason
                cand.rejections.extend(self._first_rejection(spec, ctx, ask_health))
                if cand.rejections:
                    return cand
            if measured:
                cand.rejections.extend(rt.perf_rejections(spec, ctx))
            if _disabled(spec, disabled):
                cand.rejections.append(_DISABLED)
            return cand

        if not early:  # every kernel is judged: in the order of `specs`, as reports list them
            for spec in specs:
                judge(spec)

        lock = policy.lock_for(ctx) if policy.locks else None
        locked_ok = False
        if lock is not None:
            locked = [s for s in specs if lock.targets(s)]
            for s in locked:  # a deny from a higher source than the lock's (code > env > file) wins
                deny = policy.deny_rule(s, ctx, above_rank=lock.rank) if s.backend != REFERENCE_BACKEND else None
                if deny is not None:
                    candidates[s.id].rejections.append(Rejection(Reason.POLICY_DENIED, deny.describe()))
            locked_ok = any(candidates[s.id].eligible for s in locked)
            if locked_ok:
                for spec in specs:
                    if not lock.targets(spec):
                        candidates[spec.id].rejections.append(Rejection(Reason.POLICY_LOCKED_OTHER, lock.describe()))
                    else:
                        candidates[spec.id].rules.append(lock.describe())
            else:
                msg = f"{lock.describe()} cannot run this call; " + (
                    "strict mode" if policy.strict else "selecting among the other kernels"
                )
                if policy.strict:
                    if not complete:  # the error lists every kernel of the op with all its reasons
                        return self.evaluate(ctx, transforms_of, complete=True)
                    for spec in specs:  # the others could run, but strict mode runs the locked one or none
                        cand = candidates[spec.id]
                        if cand.eligible and not lock.targets(spec):
                            cand.rejections.append(
                                Rejection(
                                    Reason.POLICY_LOCKED_OTHER, f"{lock.describe()}; strict mode runs only the lock"
                                )
                            )
                    report = SelectionReport(
                        ctx.op, ctx, "", 0.0, list(candidates.values()), notes=[msg], regime=regime
                    )
                    raise NoKernelFoundError(f"locked kernel for {ctx.op} cannot run these inputs", report)
                notes.append(msg)
                rt.warn_once(("lock", lock, ctx.op), msg)

        if not locked_ok and (policy.allows or policy.denies):
            allows = policy.allow_rules(ctx)
            for spec in specs:
                if spec.backend == REFERENCE_BACKEND:
                    continue  # the reference always stays: a call always runs
                cand = candidates[spec.id]
                if allows and not any(r.targets(spec) for r in allows):
                    cand.rejections.append(
                        Rejection(Reason.POLICY_NOT_ALLOWED, "; ".join(r.describe() for r in allows))
                    )
                cand.rules.extend(r.describe() for r in allows if r.targets(spec))
                deny = policy.deny_rule(spec, ctx)
                if deny is not None and not any(r.reason is Reason.POLICY_DENIED for r in cand.rejections):
                    cand.rejections.append(Rejection(Reason.POLICY_DENIED, deny.describe()))

        # Score the eligible kernels; the best is the highest accelerated score (ties: the larger id),
        # the reference only when nothing else can run.
        best: Candidate | None = None
        for spec in specs:
            reference = spec.backend == REFERENCE_BACKEND
            if (
                early
                and best is not None
                and best.backend != REFERENCE_BACKEND
                and (reference or priority_for(spec, ctx) < (best.score or 0.0))
            ):
                continue  # a score is at most the priority: it cannot win (specs come by declared priority)
            cand = judge(spec)
            if cand.rejections:
                continue
            factor = 1.0
            if policy.boosts:
                factor, rules = policy.boost(spec, ctx)
                cand.rules.extend(r.describe() for r in rules)
            if policy.prefers:
                prefer = policy.prefer_rule(spec, ctx)  # its priority replaces the score in rt.score
                if prefer is not None:
                    cand.rules.append(prefer.describe())
            cand.transforms = transforms_of(spec, ctx)
            if measured:
                figure = rt.measured(spec, ctx, regime)
                if figure is not None:
                    cand.measured_us, cand.measured_regime = figure.median_us, figure.regime
            score, cand.decided_by = rt.score(spec, ctx, measured, regime)
            cand.score = score * factor - TRANSFORM_PENALTY * len(cand.transforms)
            if best is None or (not reference, cand.score, cand.kernel_id) > (
                best.backend != REFERENCE_BACKEND,
                best.score,
                best.kernel_id,
            ):
                best = cand

        if best is None:
            if not complete:
                return self.evaluate(ctx, transforms_of, complete=True)  # raises, listing every kernel
            report = SelectionReport(ctx.op, ctx, "", 0.0, list(candidates.values()), notes=notes, regime=regime)
            raise NoKernelFoundError(f"no kernel can run {ctx.op}", report)
        fallback = best.backend == REFERENCE_BACKEND
        if fallback:
            notes.append("no accelerated kernel can run this call; the torch reference runs")
        return SelectionReport(
            ctx.op,
            ctx,
            best.kernel_id,
            best.score or 0.0,
            list(candidates.values()),
            fallback=fallback,
            notes=notes,
            regime=regime,
        )

    def kernel_rejections(self, spec: KernelSpec, ctx: SelectionContext) -> list[Rejection]:
        """Every reason, policy aside, why `spec` cannot run `ctx`: its backend is unavailable (that
        reason alone), its breaker is open, its workspace does not fit, its constraints do not hold.
        What explain lists for the kernel before policy and measurements, and lz.validate returns."""
        why = self._backend_rejection(spec, ctx)
        return [why] if why is not None else self._kernel_rejections(spec, ctx)

    def _backend_rejection(self, spec: KernelSpec, ctx: SelectionContext) -> Rejection | None:
        """Why spec's backend cannot run ctx's calls (not installed, broken, not probed), or None."""
        return self.runtime.backend_rejection(spec.backend, ctx, probe=fits_device(spec, ctx))

    def _kernel_rejections(self, spec: KernelSpec, ctx: SelectionContext) -> list[Rejection]:
        """The kernel's own reasons, its backend being usable: an open breaker, workspace, constraints."""
        return [*self.runtime.health_rejections(spec, ctx), *check_constraints(spec, ctx)]

    def _first_rejection(self, spec: KernelSpec, ctx: SelectionContext, ask_health: bool) -> list[Rejection]:
        """The miss path's check of a viable kernel: health (only when something can be unhealthy or
        the kernel needs workspace memory), else the first reason its constraints give; [] if none."""
        if ask_health or spec.workspace_bytes is not None:
            unhealthy = self.runtime.health_rejections(spec, ctx)
            if unhealthy:
                return unhealthy
        rejection = call_rejection(spec, ctx)
        return [] if rejection is None else [rejection]

    def select(
        self,
        ctx: SelectionContext,
        bind: Binder,
        transforms_of: Callable[[KernelSpec, SelectionContext], tuple[str, ...]],
        wrap: Callable[[KernelSpec, Callable[..., Any], SelectionReport], tuple[Callable[..., Any], Callable[..., Any]]]
        | None = None,
    ) -> tuple[ExecutionPlan, SelectionReport]:
        """Evaluate and bind the winner into an ExecutionPlan; `wrap` (the health guard) gives its
        run and recover."""
        generation = self.runtime.generation
        report = self.evaluate(ctx, transforms_of, complete=False)
        if report.fallback and self.runtime.policy.strict:
            report = self.evaluate(ctx, transforms_of, complete=True)  # every kernel of the op with its reasons
            report.notes.append("strict mode: the reference does not run")
            raise NoKernelFoundError(f"strict mode: only the reference can run {ctx.op}", report)
        if report.fallback:
            self.runtime.warn_once(
                ("fallback", ctx.op, ctx.device_type), f"{ctx.op}: {report.notes[-1]}; see lz.explain for reasons"
            )
        spec = self.runtime.registry.kernel(report.selected_kernel)
        run, transforms = bind_kernel(spec, ctx, bind, transforms_of)
        recover: Callable[..., Any] = reraise
        if wrap is not None:
            run, recover = wrap(spec, run, report)
        plan = ExecutionPlan(spec.id, ctx.op, run, transforms, report.score, generation, report.fallback, recover)
        return plan, report
