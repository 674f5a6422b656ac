"""Torch reference implementations: run anywhere, compute in float32 or better, never denied.

They are the fallback when no accelerated kernel can run a call, and the ground truth of tests.
"""

from __future__ import annotations

import math

import torch

from ..kernel import ALL_FLOAT_DTYPES, Backend, KernelSpec

_ANY_DEVICE = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(seq_len_q: int, seq_len_k: int, device: torch.device) -> torch.Tensor:
    """Bool (Sq, Sk) mask, True = attend, aligned bottom-right."""
    return torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=device).tril(seq_len_k - seq_len_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
    """BHSD attention in float32/64; GQA by head repetition; fully masked rows give zeros."""
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * s
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(ct)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key gives 0
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, vf).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(ct)
    return out.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    ct = _compute_dtype(x.dtype)
    n, c = x.shape[:2]
    xf = x.to(ct).reshape(n, num_groups, -1)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = ((xf - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.to(ct).reshape(shape)
    if bias is not None:
        out = out + bias.to(ct).reshape(shape)
    return out.to(x.dtype)


def _spec(name: str, ops: tuple[str, ...], impl: object, **kw: object) -> KernelSpec:
    return KernelSpec(
        id=f"reference.{name}", ops=ops, impl=impl, priority=0, platforms=_ANY_DEVICE,
        dtypes=ALL_FLOAT_DTYPES, supports_backward=True, same_head_dim_v=False,
        description="torch reference (float32 or better)", **kw,  # type: ignore[arg-type]
    )


BACKEND = Backend(
    name="reference",
    description="pure torch reference implementations, always available",
    kernels=(
        _spec("attention", ("attention.causal", "attention.full", "attention.masked"), attention,
              mask_kinds=frozenset({"none", "bool", "float"}), supports_dropout=True),
        _spec("rms_norm", ("norm.rms",), rms_norm),
        _spec("layer_norm", ("norm.layer",), layer_norm),
        _spec("group_norm", ("norm.group",), group_norm),
    ),
)
