"""One module per op family. Each exposes its public functions and an OpFamily for selection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import SelectionContext
from ..kernel import KernelSpec


@dataclass(frozen=True, slots=True)
class OpFamily:
    """How selection talks to an op family.

    key: call arguments -> the plan-cache key (cheap, hot path).
    context: call arguments -> SelectionContext (validates inputs; miss path only).
    bind: (spec, ctx) -> (callable in the public calling convention, transform names).
    transforms: (spec, ctx) -> transform names the plan would need (scored against the kernel).
    """

    name: str
    key: Callable[..., Any]
    context: Callable[..., SelectionContext]
    bind: Callable[[KernelSpec, SelectionContext], tuple[Callable[..., Any], tuple[str, ...]]]
    transforms: Callable[[KernelSpec, SelectionContext], tuple[str, ...]]


FAMILIES: dict[str, OpFamily] = {}


def register_family(family: OpFamily) -> OpFamily:
    FAMILIES[family.name] = family
    return family


def traced_ops() -> Any:
    """The torch.library ops that torch.compile/export trace in place of `lz.*` (imported on first trace)."""
    from ..integrations import torch_ops

    return torch_ops
