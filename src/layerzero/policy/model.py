"""The policy model: rules with an operation pattern, kernel/backend targets and a condition.

Rules come from three sources ("layers"), in precedence order: code (`lz.lock`, `lz.prefer`,
`lz.configure(...)`), the environment (`LAYERZERO_*`), and a policy file. `PolicyLayers.merged`
concatenates them in that order, so the first lock that applies is the one of the highest
source, and each rule remembers its layer for the precedence checks below.

Blocks (`with lz.prefer(...)`, `with lz.lock(...)`, `with lz.disabled(...)`, `with lz.enabled(...)`)
change the code layer and the disabled set for the thread or task that runs them only: SCOPE holds
the innermost block's Scope, whose changes apply on top of the process-wide policy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..context import SelectionContext
from ..kernel import KernelSpec

Condition = Callable[[SelectionContext], bool]

LAYERS = ("code", "env", "file")  # precedence order, highest first


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule. `kind` is lock, allow, deny, boost or prefer.

    A rule targets kernels by backend name (`backends`) or by kernel id (`kernels`); a lock
    names exactly one target. `condition` restricts the rule to matching calls. `layer` is the
    source kind (code, env, file) and `source` says where exactly (`policy.yaml:12`).
    """

    kind: str
    operation: str = "*"
    backends: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    condition: Condition | None = field(default=None, compare=False)
    condition_text: str = ""
    boost_factor: float = 1.0
    priority: float = 0.0
    source: str = "code"
    layer: str = "code"

    @property
    def rank(self) -> int:
        """0 for code, 1 for env, 2 for file: lower wins."""
        return LAYERS.index(self.layer)

    def applies(self, ctx: SelectionContext) -> bool:
        """The rule's operation pattern and condition match this call."""
        if not fnmatch.fnmatchcase(ctx.op, self.operation):
            return False
        return self.condition is None or bool(self.condition(ctx))

    def targets(self, spec: KernelSpec) -> bool:
        return spec.backend in self.backends or spec.id in self.kernels

    @property
    def target(self) -> str:
        return ",".join(self.kernels + self.backends) or "*"

    def describe(self) -> str:
        cond = f" if {self.condition_text}" if self.condition_text else ""
        extra = {"boost": f" x{self.boost_factor:g}", "prefer": f" priority {self.priority:g}"}.get(self.kind, "")
        return f"{self.kind} {self.operation} -> {self.target}{extra}{cond} [{self.source}]"

    def to_dict(self) -> dict[str, Any]:
        """The rule in the policy-file schema, plus its source."""
        out: dict[str, Any] = {"operation": self.operation}
        if self.kernels:
            out["kernels"] = list(self.kernels)
        if self.backends:
            out["backends"] = list(self.backends)
        if self.condition_text:
            out["condition"] = self.condition_text
        if self.kind == "boost":
            out["boost_factor"] = self.boost_factor
        if self.kind == "prefer":
            out["priority"] = self.priority
        out["source"] = self.source
        return out


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules in force. Immutable: changing policy means building a new one and swapping it.

    `strict` None means "not set by this source"; the merged policy has True or False.
    `regime` ("eager" or "graph") forces the timing regime whose PerfDB figures score kernels;
    None lets each call's own regime decide (Runtime.regime).
    """

    locks: tuple[Rule, ...] = ()
    allows: tuple[Rule, ...] = ()
    denies: tuple[Rule, ...] = ()
    boosts: tuple[Rule, ...] = ()
    prefers: tuple[Rule, ...] = ()
    strict: bool | None = None
    regime: str | None = None

    def lock_for(self, ctx: SelectionContext) -> Rule | None:
        """The first lock that applies to this call (higher sources first, then earlier rules)."""
        for rule in self.locks:
            if rule.applies(ctx):
                return rule
        return None

    def allow_rules(self, ctx: SelectionContext) -> list[Rule]:
        """The allow rules in force for this call: those of the highest source that has any."""
        matched = [r for r in self.allows if r.applies(ctx)]
        if not matched:
            return matched
        top = min(r.rank for r in matched)
        return [r for r in matched if r.rank == top]

    def deny_rule(self, spec: KernelSpec, ctx: SelectionContext, above_rank: int | None = None) -> Rule | None:
        """The first deny rule for `spec` here; with `above_rank`, only rules of higher sources."""
        for rule in self.denies:
            if (above_rank is None or rule.rank < above_rank) and rule.targets(spec) and rule.applies(ctx):
                return rule
        return None

    def boost(self, spec: KernelSpec, ctx: SelectionContext) -> tuple[float, list[Rule]]:
        factor, matched = 1.0, []
        for rule in self.boosts:
            if rule.targets(spec) and rule.applies(ctx):
                factor *= rule.boost_factor
                matched.append(rule)
        return factor, matched

    def prefer_rule(self, spec: KernelSpec, ctx: SelectionContext) -> Rule | None:
        """The priority override for `spec` here (the highest source's, latest set first)."""
        for rule in self.prefers:
            if rule.targets(spec) and rule.applies(ctx):
                return rule
        return None

    def rules(self) -> tuple[Rule, ...]:
        return self.locks + self.allows + self.denies + self.boosts + self.prefers

    def __bool__(self) -> bool:
        return bool(self.rules()) or bool(self.strict)


@dataclass(frozen=True, slots=True)
class PolicyLayers:
    """The policy of each source; `merged()` is what the engine applies."""

    code: Policy = Policy()
    env: Policy = Policy()
    file: Policy = Policy()
    file_path: str | None = None

    def merged(self) -> Policy:
        layers = (self.code, self.env, self.file)
        strict = next((p.strict for p in layers if p.strict is not None), False)
        regime = next((p.regime for p in layers if p.regime is not None), None)
        return Policy(
            locks=tuple(r for p in layers for r in p.locks),
            allows=tuple(r for p in layers for r in p.allows),
            denies=tuple(r for p in layers for r in p.denies),
            boosts=tuple(r for p in layers for r in p.boosts),
            prefers=tuple(r for p in layers for r in p.prefers),
            strict=strict,
            regime=regime,
        )


# (code layer, disabled backends) -> the same with a block's change applied
Change = Callable[[Policy, frozenset[str]], tuple[Policy, frozenset[str]]]


class Scope:
    """The overrides in force in one thread or task: its innermost block's change on top of its parent's.

    Compared by identity (a scoped plan's key holds it: hashing stays one id). `effect` keeps the
    policy and disabled set it makes of the process-wide ones, with the plan-cache generation they
    were made at (Runtime._scoped recomputes them when it changed).
    """

    __slots__ = ("parent", "change", "effect", "__weakref__")

    def __init__(self, parent: Scope | None, change: Change) -> None:
        self.parent = parent
        self.change = change
        self.effect: tuple[int, Policy, frozenset[str]] | None = None

    def apply(self, code: Policy, disabled: frozenset[str]) -> tuple[Policy, frozenset[str]]:
        """The code layer and disabled set with every block's change applied, outermost first."""
        if self.parent is not None:
            code, disabled = self.parent.apply(code, disabled)
        return self.change(code, disabled)


SCOPE: ContextVar[Scope | None] = ContextVar("layerzero_scope", default=None)
