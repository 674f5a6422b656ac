"""Attention: `lz.attention(q, k, v, ...)` over BSHD (default) or BHSD tensors.

Causal masking is aligned to the bottom-right corner when seq_len_q != seq_len_k (query i sees
keys up to i + seq_len_k - seq_len_q), as in flash-attn and FlashInfer: that is what decoding
with a KV cache needs. With seq_len_q == seq_len_k it is the usual lower-triangular mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import LAYOUTS, KernelSpec
from ..state import runtime
from . import OpFamily, register_family

_capturing = torch.cuda.is_current_stream_capturing
_grad_enabled = torch.is_grad_enabled


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str = "BSHD",
) -> torch.Tensor:
    """Scaled dot-product attention with the fastest kernel that can run these inputs.

    q: (B, Sq, Hq, D) in BSHD or (B, Hq, Sq, D) in BHSD; k, v: the same with Sk and Hkv heads,
    Hq a multiple of Hkv (GQA/MQA). attn_mask: bool (True = attend) or additive float,
    broadcastable to (B, Hq, Sq, Sk), in either layout. Returns the output in q's layout.
    """
    try:
        key = _key(q, k, v, attn_mask, is_causal, dropout_p, scale, layout)
    except AttributeError:
        _check_tensors(q=q, k=k, v=v, attn_mask=attn_mask)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(ATTENTION, key, (q, k, v, attn_mask, is_causal, dropout_p, scale, layout), {})
    return plan.run(q, k, v, attn_mask, is_causal, dropout_p, scale)


def _key(q: Any, k: Any, v: Any, attn_mask: Any = None, is_causal: bool = False, dropout_p: float = 0.0,
         scale: float | None = None, layout: str = "BSHD") -> tuple[Any, ...]:
    """The plan-cache key: everything selection depends on, nothing it does not (not scale)."""
    return (
        "attention", layout, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device),
        is_causal, dropout_p > 0.0,
        _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        q.is_cuda and _capturing(),
    )


def _check_tensors(**tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, seq, heads, head_dim) of a 4-D tensor in `layout`."""
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "BSHD" else (b, y, x, d)


def _shape_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> InvalidInputError | None:
    B, Sq, Hq, D = _dims(q, layout)
    Bk, Sk, Hk, Dk = _dims(k, layout)
    Bv, Sv, Hv, Dv = _dims(v, layout)
    if Bk != B:
        return InvalidInputError("k", f"batch {B} (as q)", Bk)
    if Bv != B:
        return InvalidInputError("v", f"batch {B} (as q)", Bv)
    if Dk != D:
        return InvalidInputError("k", f"head_dim {D} (as q)", Dk)
    if Sv != Sk:
        return InvalidInputError("v", f"seq_len {Sk} (as k) in {layout}", Sv)
    if Hv != Hk:
        return InvalidInputError("v", f"{Hk} heads (as k) in {layout}", Hv)
    if Hk == 0 or Hq % Hk:
        return InvalidInputError("k", f"a head count dividing q's {Hq} heads (GQA/MQA) in {layout}", Hk)
    return None


def _context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
             layout: str = "BSHD") -> SelectionContext:
    """Validate the inputs and describe the call (miss path only)."""
    _check_tensors(q=q, k=k, v=v, attn_mask=attn_mask)
    if layout not in LAYOUTS:
        raise UnknownNameError("layout", str(layout), LAYOUTS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(name, f"a 4-D tensor ({'B, S, H, D' if layout == 'BSHD' else 'B, H, S, D'})",
                                    f"{t.dim()}-D shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise InvalidInputError("q", "a floating-point dtype", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidInputError(name, f"dtype {q.dtype} (as q)", t.dtype)
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (as q)", t.device)
    problem = _shape_problem(q, k, v, layout)
    if problem is not None:
        other = "BHSD" if layout == "BSHD" else "BSHD"
        if _shape_problem(q, k, v, other) is None:
            raise InvalidInputError(problem.argument, problem.expected, problem.got,
                                    f"the shapes fit layout={other!r}; pass layout={other!r} if that is what they are")
        raise problem
    B, Sq, Hq, D = _dims(q, layout)
    _, Sk, Hk, _ = _dims(k, layout)
    Dv = v.shape[-1]
    mask_kind = "none"
    if attn_mask is not None:
        if is_causal:
            raise InvalidInputError("attn_mask", "None when is_causal=True (give a mask or is_causal, not both)",
                                    f"a {tuple(attn_mask.shape)} mask")
        if attn_mask.dtype == torch.bool:
            mask_kind = "bool"
        elif attn_mask.dtype == q.dtype:
            mask_kind = "float"
        else:
            raise InvalidInputError("attn_mask", f"dtype torch.bool or {q.dtype} (additive, as q)", attn_mask.dtype)
        if attn_mask.device != q.device:
            raise InvalidInputError("attn_mask", f"device {q.device} (as q)", attn_mask.device)
        target = (B, Hq, Sq, Sk)
        shape = tuple(attn_mask.shape)
        if not 2 <= len(shape) <= 4 or any(m not in (1, t) for m, t in zip(reversed(shape), reversed(target), strict=False)):
            raise InvalidInputError("attn_mask", f"a shape broadcastable to (B, Hq, Sq, Sk) = {target}", shape)
    if not 0.0 <= dropout_p < 1.0:
        raise InvalidInputError("dropout_p", "a probability in [0, 1)", dropout_p)
    op = "attention.causal" if is_causal else ("attention.masked" if attn_mask is not None else "attention.full")
    return SelectionContext(
        op=op,
        **SelectionContext.device_fields(q.device),  # type: ignore[arg-type]
        dtype=q.dtype, batch=B, seq_len_q=Sq, seq_len_k=Sk, num_heads=Hq, num_kv_heads=Hk,
        head_dim=D, head_dim_v=Dv, layout=layout, is_causal=bool(is_causal), mask_kind=mask_kind,
        dropout=dropout_p > 0.0,
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )


def _transforms(spec: KernelSpec, ctx: SelectionContext) -> tuple[str, ...]:
    out = []
    if spec.layout != ctx.layout:
        out.append(f"{ctx.layout}->{spec.layout}")
    if spec.requires_contiguous:
        out.append("contiguous")
    return tuple(out)


def _bind(spec: KernelSpec, ctx: SelectionContext) -> tuple[Callable[..., torch.Tensor], tuple[str, ...]]:
    impl = spec.impl
    transforms = _transforms(spec, ctx)
    contiguous = spec.requires_contiguous
    if spec.layout == ctx.layout and not contiguous:
        return impl, transforms
    transpose = spec.layout != ctx.layout

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            is_causal: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
        if transpose:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = impl(q, k, v, attn_mask, is_causal, dropout_p, scale)
        return out.transpose(1, 2) if transpose else out

    return run, transforms


ATTENTION = register_family(OpFamily("attention", _key, _context, _bind, _transforms))
