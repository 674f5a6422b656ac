"""LayerZero's public tensor ops as torch.library custom ops in the `layerzero` namespace.

Each op family with `library=True` (attention, rms_norm, layer_norm, group_norm, rope, rope_qk,
silu, gelu, swiglu, geglu, fused_mlp) is `torch.ops.layerzero.<name>`, taking the arguments of the
`lz.*` function of the same name; its schema is inferred from the type hints of the family's real
kernel (OpFamily.real, else the public function). The real kernel is that eager function (plan-cache
hit, then the selected kernel); the fake (meta) kernel validates the inputs from metadata alone and
returns an empty tensor of the output's shape, so torch.compile and torch.export see one opaque node
per call. What is particular to an op (attention's window and memory order, rope's position ids)
is written in its family's module.

Routing: `lz.*` functions call these ops only while torch.compile/export traces them (`trace`;
this module is imported on the first trace and registers the ops of every family). Eager calls do
not go through the dispatcher. Measured on CPU (shared 2-core box, torch 2.13, (4, 64) rows):
`lz.rms_norm` 22-27 us per call, the same call through `torch.ops.layerzero.rms_norm` 34 us; an
empty Library op costs ~4 us and a `torch.library.custom_op` ~25 us of dispatch alone, while the
`is_compiling()` check costs ~0.15 us. Under compile the graph holds the custom op and the kernel
is the one the plan cache picks for those shapes at the first real call (selection is per shape
bucket, so a compiled graph keeps calling the kernel chosen for it); with CUDA graphs
(mode="reduce-overhead") the replay contains the kernels only. Because any compiled graph may be
run with CUDA graphs, these real kernels select graph-safe kernels only (`capture.graph_mode`): on
the H100, FlashInfer's persistent workspace, allocated during the CUDA-graph warm-up, broke
mode="reduce-overhead". Eager calls keep every kernel.

Outputs have fixed strides, as inductor requires of a custom op: contiguous, except attention in
layout "BHSD", which returns a (B, H, S, D) view of a contiguous (B, S, H, D) tensor (the memory
order the following output projection wants). The real kernel copies only when the selected
kernel returned other strides.

Autograd: the ops have no backward. When an input requires grad under compile, the call runs the
eager function outside the graph (a graph break, correct gradients); `fullgraph=True` then
refuses, as it should.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..capture import graph_call
from .family import FAMILIES, OpFamily

NAMESPACE = "layerzero"
# torch >= 2.5 names it torch.library.infer_schema; before, it lives in torch._library
infer_schema = getattr(torch.library, "infer_schema", None)
if infer_schema is None:  # pragma: no cover - torch < 2.5
    from torch._library.infer_schema import infer_schema


def trace(family: OpFamily, *args: Any) -> Any:
    """What `lz.<name>` does while torch.compile/export traces it: one custom-op node. Inputs that need
    grad run the eager function outside the graph instead (the custom ops have no backward)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return torch._dynamo.disable(family.function, recursive=True)(*args)  # type: ignore[attr-defined]
    return getattr(torch.ops.layerzero, family.name).default(*args)


def _in_graph_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The real kernel of a compiled graph's node: selects graph-safe kernels only (capture.graph_mode)."""

    def run(*args: Any) -> Any:
        with graph_call():
            return fn(*args)

    return run


def _contiguous(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn with a contiguous output (the fixed strides inductor requires of a custom op)."""

    def run(*args: Any) -> torch.Tensor:
        return fn(*args).contiguous()

    return run


def _like_first(context: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """The fake kernel of an op whose output is like its first input: validate, then an empty contiguous tensor."""

    def fake(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        context(x, *rest)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    return fake


# Registered when this module is first imported: by the first trace of an lz.* call (an import inside
# the traced function, which dynamo runs for real), or by whoever wants torch.ops.layerzero.* now.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # held for the process: the registrations live with it
for _family in FAMILIES.values():
    if _family.library:
        _real = _family.real or _family.function
        _LIB.define(_family.name + infer_schema(_real, mutates_args=()))
        _LIB.impl(
            _family.name, _in_graph_mode(_family.real or _contiguous(_family.function)), "CompositeExplicitAutograd"
        )
        torch.library.register_fake(
            f"{NAMESPACE}::{_family.name}", _family.fake or _like_first(_family.context), lib=_LIB
        )
