"""Offline multi-op planner: choose the kernels of a block (norm -> rope -> attention -> norm) jointly.

Per-call selection picks each op's fastest kernel and converts the data to and from that kernel's
layout around it. In a block, a kernel that is slightly faster alone can cost more than it saves
once the transposes between ops are counted; the planner minimises

    sum(kernel time) + sum(transform time between consecutive ops, and at the block's ends)

Build/warm-up time only, never on the hot path. Kernel times come from the PerfDB (measured
medians) or, unmeasured, from a priority-based estimate; transform times from a bandwidth model
(or the caller's function). Small blocks are searched exhaustively; larger ones by dynamic
programming over the data layout between ops, which is also exact for a chain (the cost of a
step depends only on the layout it receives). `method="greedy"` is per-op selection, the baseline.
Plans are cached by block signature and registry/policy/PerfDB generation; `BlockPlan.apply()`
feeds the choice to the solver as `lz.lock`s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..context import SelectionContext
from ..errors import ConfigurationError, InvalidInputError
from ..kernel import LAYOUTS, KernelSpec, priority_for
from ..ops import FAMILIES
from ..policy.config import lock
from ..state import Runtime, runtime

Estimator = Callable[[KernelSpec, SelectionContext], float]
TransformCost = Callable[[str, str, SelectionContext], float]

EXACT_LIMIT = 4096  # exhaustive search up to this many kernel combinations
BANDWIDTH_BYTES_PER_US = 100e3  # 100 GB/s: a rough device-memory transpose rate for the default model
TRANSFORM_LAUNCH_US = 2.0


@dataclass(frozen=True, slots=True)
class BlockStep:
    """One op of a block: the public op name (family) and the context of its call."""

    family: str
    ctx: SelectionContext

    @staticmethod
    def of(family: str, *args: Any, **kwargs: Any) -> BlockStep:
        """The step of a call `family(*args, **kwargs)` (e.g. BlockStep.of("attention", q, k, v, is_causal=True))."""

        if family not in FAMILIES:
            raise InvalidInputError("family", f"one of {sorted(FAMILIES)}", family)
        return BlockStep(family, FAMILIES[family].context(*args, **kwargs))


@dataclass(frozen=True, slots=True)
class PlannedStep:
    family: str
    op: str
    kernel: str
    layout: str | None  # the layout the kernel runs in; None: any (it passes its input through)
    kernel_us: float
    transform_in_us: float  # converting the incoming data to this kernel's layout


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Kernels chosen for a block and the estimated time, transforms included."""

    steps: tuple[PlannedStep, ...]
    total_us: float
    transform_out_us: float
    method: str
    signature: tuple[Any, ...] = field(repr=False, compare=False)

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(s.kernel for s in self.steps)

    def locks(self) -> dict[str, str]:
        """{op id: kernel id}; ConfigurationError when one op id needs two kernels in this block."""
        out: dict[str, str] = {}
        for s in self.steps:
            if out.setdefault(s.op, s.kernel) != s.kernel:
                raise ConfigurationError(
                    f"block plan runs {s.op} with {out[s.op]} and {s.kernel}: a lock per op "
                    "cannot express it; use the plan's kernels directly"
                )
        return out

    def apply(self) -> dict[str, str]:
        """Lock every op of the block to its planned kernel (the solver then emits these)."""

        locks = self.locks()
        for op, kernel in locks.items():
            lock(op, kernel)
        return locks

    def __str__(self) -> str:
        lines = [f"block plan ({self.method}): {self.total_us:.3g} us"]
        for s in self.steps:
            extra = f" + transform {s.transform_in_us:.3g} us" if s.transform_in_us else ""
            lines.append(f"  {s.family:<12} {s.kernel:<28} {s.layout or 'any':<5} {s.kernel_us:.3g} us{extra}")
        if self.transform_out_us:
            lines.append(f"  output transform {self.transform_out_us:.3g} us")
        return "\n".join(lines)


def default_estimate(rt: Runtime) -> Estimator:
    """PerfDB median when measured, else 100 / priority microseconds (a rank order, not a time)."""

    def estimate(spec: KernelSpec, ctx: SelectionContext) -> float:
        measured = rt.measured_us(spec, ctx)
        return measured if measured is not None else 100.0 / max(priority_for(spec, ctx), 1)

    return estimate


def default_transform_cost(src: str, dst: str, ctx: SelectionContext) -> float:
    """A layout change reads and writes q, k and v once: bytes / bandwidth + a launch."""
    if src == dst:
        return 0.0
    itemsize = ctx.dtype.itemsize
    heads = ctx.num_heads + 2 * (ctx.num_kv_heads or ctx.num_heads)
    moved = 2 * itemsize * max(ctx.batch, 1) * max(ctx.seq_len_q, ctx.seq_len_k, 1) * heads * max(ctx.head_dim, 1)
    return TRANSFORM_LAUNCH_US + moved / BANDWIDTH_BYTES_PER_US


@dataclass(frozen=True, slots=True)
class _Option:
    spec: KernelSpec
    layout: str | None
    us: float


class BlockPlanner:
    """Joint kernel choice for blocks of ops; plans cached by block signature and runtime generation."""

    def __init__(
        self,
        estimate: Estimator | None = None,
        transform_cost: TransformCost | None = None,
        exact_limit: int = EXACT_LIMIT,
        rt: Runtime | None = None,
    ) -> None:
        self.runtime = rt or runtime
        self.estimate = estimate or default_estimate(self.runtime)
        self.transform_cost = transform_cost or default_transform_cost
        self.exact_limit = exact_limit
        self.cache: dict[tuple[Any, ...], BlockPlan] = {}

    def options(self, step: BlockStep) -> list[_Option]:
        """The kernels that can run the step (after policy, health, constraints), with their time."""

        rt = self.runtime
        rt.ensure_loaded()
        family = FAMILIES[step.family]
        report = rt.engine.evaluate(step.ctx, family.transforms)
        eligible = [c for c in report.candidates if c.score is not None]
        pool = [c for c in eligible if c.backend != "reference"] or eligible
        out = []
        for c in sorted(pool, key=lambda c: c.kernel_id):
            spec = rt.registry.kernel(c.kernel_id)
            layout = spec.layout if step.ctx.layout in LAYOUTS else None
            out.append(_Option(spec, layout, float(self.estimate(spec, step.ctx))))
        return out

    def plan(self, steps: Sequence[BlockStep], layout: str = "BSHD", method: str = "auto") -> BlockPlan:
        """Plan `steps` for data arriving and leaving in `layout`. method: auto | exact | dp | greedy."""
        if method not in ("auto", "exact", "dp", "greedy"):
            raise ConfigurationError(f"method: expected auto, exact, dp or greedy, got {method!r}")
        if layout not in LAYOUTS:
            raise InvalidInputError("layout", f"one of {LAYOUTS}", layout)
        if not steps:
            raise InvalidInputError("steps", "at least one BlockStep", 0)
        signature = (tuple((s.family, s.ctx) for s in steps), layout, method, self.runtime.generation)
        cached = self.cache.get(signature)
        if cached is not None:
            return cached
        options = [self.options(s) for s in steps]
        if method == "auto":
            combos = 1
            for o in options:
                combos *= len(o)
            method = "exact" if combos <= self.exact_limit else "dp"
        if method == "greedy":
            choice = [min(o, key=lambda x: (x.us, x.spec.id)) for o in options]
        elif method == "exact":
            choice = list(min(itertools.product(*options), key=lambda c: (self._cost(steps, c, layout), _ids(c))))
        else:
            choice = self._dp(steps, options, layout)
        plan = self._build(steps, choice, layout, method, signature)
        self.cache[signature] = plan
        return plan

    def _cost(self, steps: Sequence[BlockStep], choice: Iterable[_Option], layout: str) -> float:
        current, total = layout, 0.0
        for step, opt in zip(steps, choice, strict=True):
            if opt.layout is not None:
                total += self.transform_cost(current, opt.layout, step.ctx)
                current = opt.layout
            total += opt.us
        return total + self.transform_cost(current, layout, steps[-1].ctx)

    def _dp(self, steps: Sequence[BlockStep], options: list[list[_Option]], layout: str) -> list[_Option]:
        # best[layout] = (cost so far, choices) for data currently in that layout
        best: dict[str, tuple[float, list[_Option]]] = {layout: (0.0, [])}
        for step, opts in zip(steps, options, strict=True):
            nxt: dict[str, tuple[float, list[_Option]]] = {}
            for current, (cost, chosen) in best.items():
                for opt in opts:
                    out = opt.layout or current
                    c = cost + opt.us + (0.0 if opt.layout is None else self.transform_cost(current, out, step.ctx))
                    if out not in nxt or (c, _ids(chosen + [opt])) < (nxt[out][0], _ids(nxt[out][1])):
                        nxt[out] = (c, chosen + [opt])
            best = nxt
        final = min(
            best.items(), key=lambda kv: (kv[1][0] + self.transform_cost(kv[0], layout, steps[-1].ctx), _ids(kv[1][1]))
        )
        return final[1][1]

    def _build(
        self,
        steps: Sequence[BlockStep],
        choice: Sequence[_Option],
        layout: str,
        method: str,
        signature: tuple[Any, ...],
    ) -> BlockPlan:
        planned, current = [], layout
        for step, opt in zip(steps, choice, strict=True):
            move = 0.0
            if opt.layout is not None:
                move = self.transform_cost(current, opt.layout, step.ctx)
                current = opt.layout
            planned.append(PlannedStep(step.family, step.ctx.op, opt.spec.id, opt.layout, opt.us, move))
        out = self.transform_cost(current, layout, steps[-1].ctx)
        total = sum(p.kernel_us + p.transform_in_us for p in planned) + out
        return BlockPlan(tuple(planned), total, out, method, signature)


def _ids(choice: Iterable[_Option]) -> tuple[str, ...]:
    return tuple(o.spec.id for o in choice)


def plan_block(
    steps: Sequence[BlockStep], layout: str = "BSHD", method: str = "auto", planner: BlockPlanner | None = None
) -> BlockPlan:
    """Plan one block with a fresh (or the given) BlockPlanner."""
    return (planner or BlockPlanner()).plan(steps, layout, method)
