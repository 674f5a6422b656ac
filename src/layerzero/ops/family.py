"""What an op family is (OpFamily), the helpers op modules share, and the table of op ids.

The families themselves are the other modules of this package; `layerzero.ops` imports them all,
so FAMILIES is complete once that package is imported.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import SelectionContext
from ..kernel import KernelSpec

# Every `lz.*` call first asks whether torch.compile / torch.export is tracing it (then it becomes one
# custom op node, ops/library.py), as
#     if dynamo_compiling() or compile_flags._is_compiling_flag:
#         from .library import trace  # an import, which dynamo runs for real: registers the ops
#         return trace(FAMILY, *args)
# the two facts torch.compiler.is_compiling() reads (export's flag, dynamo's folded call) without its
# two Python frames: 70 ns instead of 200 on the CPU VM, more on the GPU host. On a torch without the
# flag (< 2.5) only dynamo is seen.
dynamo_compiling = torch.compiler.is_dynamo_compiling
compile_flags = (torch.compiler if hasattr(torch.compiler, "_is_compiling_flag")
                 else types.SimpleNamespace(_is_compiling_flag=False))


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


Binder = Callable[[KernelSpec, SelectionContext], tuple[Callable[..., Any], tuple[str, ...]]]


@dataclass(frozen=True, slots=True, eq=False)
class OpFamily:
    """One op family: what selection, inspection, tracing, measuring and solving know about its calls.

    key: call arguments -> the plan-cache key (cheap: the hot path computes it on every call; select,
        explain and solve use the same function).
    context: call arguments -> SelectionContext (validates inputs; miss path only).
    bind: (spec, ctx) -> (callable in the kernels' calling convention, transform names).
    transforms: (spec, ctx) -> transform names the plan would need (scored against the kernel).
    function: the public `lz.<name>`; its signature is the calling convention of key and context.
    library: the call is also a torch.library custom op `torch.ops.layerzero.<name>` (library.py), the
        one node torch.compile/export trace in its place (library.trace). Its schema is inferred from
        the type hints of `real` (or `function`); `real` is the op's real kernel when it is not
        `function` with a contiguous output; `fake` its fake (meta) kernel when not "validate with
        `context`, return an empty tensor like the first argument".
    """

    name: str
    key: Callable[..., Any]
    context: Callable[..., SelectionContext]
    bind: Binder = bind_contiguous
    transforms: Callable[[KernelSpec, SelectionContext], tuple[str, ...]] = contiguous_transforms
    function: Callable[..., Any] | None = None
    library: bool = False
    real: Callable[..., Any] | None = None
    fake: Callable[..., Any] | None = None


FAMILIES: dict[str, OpFamily] = {}


# Op id -> the families whose calls can have that id, the usual one first. Inspection and policy calls
# take an op id (or a glob of them) where they take a family name through this table; the call's own
# context then says which id it is. tests/test_api_spec.py checks it covers every registered op id.
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "attention.causal": ("attention",), "attention.full": ("attention",), "attention.masked": ("attention",),
    "attention.sliding_window": ("attention",), "attention.varlen": ("attention_varlen",),
    "attention.paged": ("paged_attention",), "attention.decode": ("paged_attention", "attention"),
    "norm.rms": ("rms_norm",), "norm.layer": ("layer_norm",), "norm.group": ("group_norm",),
    "posenc.rope": ("rope", "rope_qk"), "posenc.rope_interleaved": ("rope", "rope_qk"),
    "activation.silu": ("silu",), "activation.gelu": ("gelu",), "activation.gelu_tanh": ("gelu",),
    "activation.swiglu": ("swiglu",), "activation.geglu": ("geglu",), "activation.geglu_tanh": ("geglu",),
    "mlp.swiglu": ("fused_mlp",), "mlp.geglu": ("fused_mlp",), "mlp.geglu_tanh": ("fused_mlp",),
    "sampling.greedy": ("sample_greedy", "sample"), "sampling.topk": ("sample_topk", "sample"),
    "sampling.topp": ("sample_topp", "sample"), "sampling.plain": ("sample",), "sampling.minp": ("sample",),
    "sampling.topk_topp": ("sample",), "sampling.combined": ("sample",),
    "quant.quantize": ("quantize",), "quant.dequantize": ("dequantize",), "quant.linear": ("quant_linear",),
    "embedding.lookup": ("embedding",),
}
# Arguments an op id implies for a family's call when the call does not give them:
# lz.which("attention.causal", q, k, v) is lz.which("attention", q, k, v, is_causal=True).
IMPLIED: dict[tuple[str, str], dict[str, Any]] = {
    ("attention.causal", "attention"): {"is_causal": True},
    ("posenc.rope_interleaved", "rope"): {"interleaved": True},
    ("posenc.rope_interleaved", "rope_qk"): {"interleaved": True},
    ("activation.gelu_tanh", "gelu"): {"approximate": "tanh"},
    ("activation.geglu_tanh", "geglu"): {"approximate": "tanh"},
    ("mlp.geglu", "fused_mlp"): {"activation": "geglu"},
    ("mlp.geglu_tanh", "fused_mlp"): {"activation": "geglu", "approximate": "tanh"},
}


def is_op_id(name: str) -> bool:
    """An op id or a glob of them (`attention.causal`, `attention.*`), not a family name (`rms_norm`)."""
    return "." in name or any(c in name for c in "*?[")


def families_for(op: str) -> list[str]:
    """The families whose calls can have an op id matching `op` (an id or glob), usual ones first."""
    out: dict[str, None] = {}
    for op_id, names in OP_FAMILIES.items():
        if fnmatch.fnmatchcase(op_id, op):
            out.update(dict.fromkeys(names))
    return list(out)


def op_matches(op: str, ctx: SelectionContext) -> bool:
    """Is a call described by `ctx` an `op` call (an op id or glob)? A dense attention call with one
    query row is also a decode (`attention.decode`), as the kernels that serve decode see it."""
    if fnmatch.fnmatchcase(ctx.op, op):
        return True
    return op == "attention.decode" and ctx.op.startswith("attention.") and ctx.seq_len_q == 1


def register_family(family: OpFamily) -> OpFamily:
    FAMILIES[family.name] = family
    return family
