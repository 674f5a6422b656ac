"""One module per op family. Each exposes its public functions and an OpFamily for selection."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import SelectionContext
from ..kernel import KernelSpec

# Every `lz.*` call first asks whether torch.compile / torch.export is tracing it (then it becomes one
# custom op node, integrations/torch_ops.py), as
#     if dynamo_compiling() or compile_flags._is_compiling_flag:
# the two facts torch.compiler.is_compiling() reads (export's flag, dynamo's folded call) without its
# two Python frames: 70 ns instead of 200 on the CPU VM, more on the GPU host. On a torch without the
# flag (< 2.5) only dynamo is seen.
dynamo_compiling = torch.compiler.is_dynamo_compiling
compile_flags = (torch.compiler if hasattr(torch.compiler, "_is_compiling_flag")
                 else types.SimpleNamespace(_is_compiling_flag=False))


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


def contiguous_transforms(spec: KernelSpec, ctx: SelectionContext) -> tuple[str, ...]:
    """The transforms of families whose only one is a contiguous copy for kernels that need it."""
    return ("contiguous",) if spec.requires_contiguous else ()


def bind_contiguous(spec: KernelSpec, ctx: SelectionContext) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The kernel itself, or, when its spec requires contiguous inputs, a wrapper that makes every
    tensor argument contiguous (a no-op for tensors that already are)."""
    impl = spec.impl
    if not spec.requires_contiguous:
        return impl, ()

    def run(*args: Any, **kwargs: Any) -> Any:
        return impl(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

    return run, ("contiguous",)


def register_family(family: OpFamily) -> OpFamily:
    FAMILIES[family.name] = family
    return family


def traced_ops() -> Any:
    """The torch.library ops that torch.compile/export trace in place of `lz.*` (imported on first trace)."""
    from ..integrations import torch_ops

    return torch_ops
