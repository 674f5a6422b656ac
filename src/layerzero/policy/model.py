"""The policy model: rules with an operation pattern, kernel/backend targets and a condition."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from ..context import SelectionContext
from ..kernel import KernelSpec

Condition = Callable[[SelectionContext], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule. `kind` is lock, allow, deny or boost.

    A rule targets kernels by backend name (`backends`) or by kernel id (`kernels`); a lock
    names exactly one target. `condition` restricts the rule to matching calls.
    """

    kind: str
    operation: str = "*"
    backends: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    condition: Condition | None = field(default=None, compare=False)
    condition_text: str = ""
    boost_factor: float = 1.0
    source: str = "code"

    def applies(self, ctx: SelectionContext) -> bool:
        """The rule's operation pattern and condition match this call."""
        if not fnmatch.fnmatchcase(ctx.op, self.operation):
            return False
        return self.condition is None or bool(self.condition(ctx))

    def targets(self, spec: KernelSpec) -> bool:
        return spec.backend in self.backends or spec.id in self.kernels

    def describe(self) -> str:
        target = ",".join(self.kernels + self.backends) or "*"
        cond = f" if {self.condition_text}" if self.condition_text else ""
        extra = f" x{self.boost_factor:g}" if self.kind == "boost" else ""
        return f"{self.kind} {self.operation} -> {target}{extra}{cond} [{self.source}]"


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules in force. Immutable: changing policy means building a new one and swapping it."""

    locks: tuple[Rule, ...] = ()
    allows: tuple[Rule, ...] = ()
    denies: tuple[Rule, ...] = ()
    boosts: tuple[Rule, ...] = ()
    strict: bool = False

    def lock_for(self, ctx: SelectionContext) -> Rule | None:
        """The first lock that applies to this call (earlier rules win)."""
        for rule in self.locks:
            if rule.applies(ctx):
                return rule
        return None

    def allow_rules(self, ctx: SelectionContext) -> list[Rule]:
        return [r for r in self.allows if r.applies(ctx)]

    def deny_rule(self, spec: KernelSpec, ctx: SelectionContext) -> Rule | None:
        for rule in self.denies:
            if rule.targets(spec) and rule.applies(ctx):
                return rule
        return None

    def boost(self, spec: KernelSpec, ctx: SelectionContext) -> tuple[float, list[Rule]]:
        factor, matched = 1.0, []
        for rule in self.boosts:
            if rule.targets(spec) and rule.applies(ctx):
                factor *= rule.boost_factor
                matched.append(rule)
        return factor, matched

    def __bool__(self) -> bool:
        return bool(self.locks or self.allows or self.denies or self.boosts or self.strict)
