"""LayerZero's public tensor ops as torch.library custom ops in the `layerzero` namespace.

`torch.ops.layerzero.attention`, `rms_norm`, `layer_norm`, `group_norm`, `rope`, `rope_qk`, `silu`,
`gelu`, `swiglu`, `geglu` and `fused_mlp` take the arguments of the `lz.*` function of the same
name. Their real kernel is that eager function (plan-cache hit, then the selected kernel); their
fake (meta) kernel validates the inputs from metadata alone and returns an empty tensor of the
output's shape, so torch.compile and torch.export see one opaque node per call.

Routing: `lz.*` functions call these ops only while torch.compile/export traces them
(`torch.compiler.is_compiling()`; this module is imported on the first trace). Eager calls do
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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..capture import graph_call
from ..errors import InvalidInputError
from ..ops import activation as _act
from ..ops import attention as _attn
from ..ops import norm as _norm
from ..ops import posenc as _pos

NAMESPACE = "layerzero"

_SCHEMAS = {
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool is_causal=False, "
                 "float dropout_p=0.0, float? scale=None, str? layout=None, int[]? window_size=None, "
                 "float softcap=0.0, Tensor? alibi_slopes=None) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor? weight=None, float eps=1e-6) -> Tensor",
    "layer_norm": "layer_norm(Tensor x, Tensor? weight=None, Tensor? bias=None, float eps=1e-5) -> Tensor",
    "group_norm": "group_norm(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
                  "float eps=1e-5) -> Tensor",
    "rope": "rope(Tensor x, Tensor cos, Tensor sin, bool interleaved=False, Tensor? position_ids=None, "
            "str layout='BSHD') -> Tensor",
    "rope_qk": "rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False, "
               "Tensor? position_ids=None, str layout='BSHD') -> (Tensor, Tensor)",
    "silu": "silu(Tensor x) -> Tensor",
    "gelu": "gelu(Tensor x, str approximate='none') -> Tensor",
    "swiglu": "swiglu(Tensor gate, Tensor up) -> Tensor",
    "geglu": "geglu(Tensor gate, Tensor up, str approximate='none') -> Tensor",
    "fused_mlp": "fused_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, str activation='swiglu', "
                 "str approximate='none') -> Tensor",
}


# ----------------------------------------------------------------------------- real kernels

def _attention_bshd_memory(out: torch.Tensor, layout: str | None) -> torch.Tensor:
    if layout == "BHSD":
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out.contiguous()


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
                    layout: str | None = None, window_size: Sequence[int] | None = None, softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    window = None if window_size is None else (int(window_size[0]), int(window_size[1]))
    out = _attn.attention(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, alibi_slopes)
    return _attention_bshd_memory(out, layout)


def _contiguous(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: Any) -> torch.Tensor:
        return fn(*args).contiguous()

    return run


def _rope_qk_impl(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                  position_ids: torch.Tensor | None = None, layout: str = "BSHD") -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = _pos.rope_qk(q, k, cos, sin, interleaved, position_ids, layout)
    return qo.contiguous(), ko.contiguous()


def _in_graph_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The real kernel of a compiled graph's node: selects graph-safe kernels only (capture.graph_mode)."""
    def run(*args: Any) -> Any:
        with graph_call():
            return fn(*args)

    return run


_IMPLS: dict[str, Callable[..., Any]] = {
    "attention": _attention_impl,
    "rms_norm": _contiguous(_norm.rms_norm),
    "layer_norm": _contiguous(_norm.layer_norm),
    "group_norm": _contiguous(_norm.group_norm),
    "rope": _contiguous(_pos.rope),
    "rope_qk": _rope_qk_impl,
    "silu": _contiguous(_act.silu),
    "gelu": _contiguous(_act.gelu),
    "swiglu": _contiguous(_act.swiglu),
    "geglu": _contiguous(_act.geglu),
    "fused_mlp": _contiguous(_act.fused_mlp),
}


# ----------------------------------------------------------------------------- fake (meta) kernels

def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
                    layout: str | None = None, window_size: Sequence[int] | None = None, softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    window = None if window_size is None else (int(window_size[0]), int(window_size[1]))
    _attn._context(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, alibi_slopes)
    if layout == "BHSD":
        B, H, S, _ = q.shape
        return q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _like_first(context: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    def fake(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        context(x, *rest)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    return fake


def _rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
               position_ids: torch.Tensor | None = None, layout: str = "BSHD") -> torch.Tensor:
    if position_ids is None:
        _pos._context(x, None, cos, sin, interleaved, None, layout)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_qk_fake(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                  position_ids: torch.Tensor | None = None, layout: str = "BSHD") -> tuple[torch.Tensor, torch.Tensor]:
    if position_ids is None:  # with position_ids the checks read the positions: the real kernel does them
        _pos._context(q, k, cos, sin, interleaved, None, layout)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _mlp_fake(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              activation: str = "swiglu", approximate: str = "none") -> torch.Tensor:
    _act._mlp_context(x, w_gate, w_up, w_down, activation, approximate)
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


_FAKES: dict[str, Callable[..., Any]] = {
    "attention": _attention_fake,
    "rms_norm": _like_first(_norm._rms_context),
    "layer_norm": _like_first(_norm._layer_context),
    "group_norm": _like_first(_norm._group_context),
    "rope": _rope_fake,
    "rope_qk": _rope_qk_fake,
    "silu": _like_first(_act._silu_context),
    "gelu": _like_first(_act._gelu_context),
    "swiglu": _like_first(_act._swiglu_context),
    "geglu": _like_first(_act._geglu_context),
    "fused_mlp": _mlp_fake,
}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # held for the process: the registrations live with it
for _name, _schema in _SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, _in_graph_mode(_IMPLS[_name]), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name], lib=_LIB)


# ----------------------------------------------------------------------------- what lz.* calls while tracing

def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn run outside the traced graph (inputs that need grad: the custom ops have no backward)."""
    return torch._dynamo.disable(fn, recursive=True)  # type: ignore[attr-defined]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None, layout: str = "BSHD",
              window_size: tuple[int, int] | None = None, softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """`lz.attention` as one graph node (see the module doc)."""
    if _needs_grad(q, k, v):
        return _eager(_attn.attention)(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window_size,
                                       softcap, alibi_slopes)
    if window_size is not None and not (isinstance(window_size, tuple | list) and len(window_size) == 2):
        raise InvalidInputError("window_size", "(left, right) ints >= -1 (-1 = unbounded)", window_size)
    window = None if window_size is None else [int(window_size[0]), int(window_size[1])]
    return torch.ops.layerzero.attention.default(q, k, v, attn_mask, bool(is_causal), float(dropout_p),
                                                 None if scale is None else float(scale), layout, window,
                                                 float(softcap), alibi_slopes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    if _needs_grad(x, weight):
        return _eager(_norm.rms_norm)(x, weight, eps)
    return torch.ops.layerzero.rms_norm.default(x, weight, float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    if _needs_grad(x, weight, bias):
        return _eager(_norm.layer_norm)(x, weight, bias, eps)
    return torch.ops.layerzero.layer_norm.default(x, weight, bias, float(eps))


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    if _needs_grad(x, weight, bias):
        return _eager(_norm.group_norm)(x, num_groups, weight, bias, eps)
    return torch.ops.layerzero.group_norm.default(x, num_groups, weight, bias, float(eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
         position_ids: torch.Tensor | None = None, layout: str = "BSHD") -> torch.Tensor:
    if _needs_grad(x):
        return _eager(_pos.rope)(x, cos, sin, interleaved, position_ids, layout)
    return torch.ops.layerzero.rope.default(x, cos, sin, interleaved, position_ids, layout)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
            position_ids: torch.Tensor | None = None, layout: str = "BSHD") -> tuple[torch.Tensor, torch.Tensor]:
    if _needs_grad(q, k):
        return _eager(_pos.rope_qk)(q, k, cos, sin, interleaved, position_ids, layout)
    qo, ko = torch.ops.layerzero.rope_qk.default(q, k, cos, sin, interleaved, position_ids, layout)
    return qo, ko


def silu(x: torch.Tensor) -> torch.Tensor:
    if _needs_grad(x):
        return _eager(_act.silu)(x)
    return torch.ops.layerzero.silu.default(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if _needs_grad(x):
        return _eager(_act.gelu)(x, approximate)
    return torch.ops.layerzero.gelu.default(x, approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _needs_grad(gate, up):
        return _eager(_act.swiglu)(gate, up)
    return torch.ops.layerzero.swiglu.default(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if _needs_grad(gate, up):
        return _eager(_act.geglu)(gate, up, approximate)
    return torch.ops.layerzero.geglu.default(gate, up, approximate)


def fused_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              activation: str = "swiglu", approximate: str = "none") -> torch.Tensor:
    if _needs_grad(x, w_gate, w_up, w_down):
        return _eager(_act.fused_mlp)(x, w_gate, w_up, w_down, activation, approximate)
    return torch.ops.layerzero.fused_mlp.default(x, w_gate, w_up, w_down, activation, approximate)
