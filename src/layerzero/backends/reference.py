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


def band_mask(seq_len_q: int, seq_len_k: int, is_causal: bool, window: tuple[int, int] | None,
              device: torch.device) -> torch.Tensor | None:
    """Bool (Sq, Sk) mask for causal and/or a (left, right) window, bottom-right aligned; None if no limit."""
    if not is_causal and window is None:
        return None
    pos = torch.arange(seq_len_q, device=device)[:, None] + (seq_len_k - seq_len_q)
    j = torch.arange(seq_len_k, device=device)[None, :]
    keep = torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=device)
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        keep &= j >= pos - left
    if right >= 0:
        keep &= j <= pos + right
    return keep


def alibi_bias(alibi_slopes: torch.Tensor, seq_len_q: int, seq_len_k: int) -> torch.Tensor:
    """Float32 bias (B or 1, H, Sq, Sk) = -slope * |p - j|, bottom-right aligned positions."""
    pos = torch.arange(seq_len_q, device=alibi_slopes.device)[:, None] + (seq_len_k - seq_len_q)
    j = torch.arange(seq_len_k, device=alibi_slopes.device)[None, :]
    dist = (pos - j).abs().to(torch.float32)
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
    return -slopes[:, :, None, None] * dist


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, dropout_p: float, scale: float | None, window: tuple[int, int] | None = None,
              softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """BHSD attention in float32/64; GQA by head repetition; a row that sees no key gives zeros."""
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * s
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.shape[2], k.shape[2]).to(ct)
    keep = band_mask(q.shape[2], k.shape[2], is_causal, window, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(ct)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, vf).to(q.dtype)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
                     scale: float | None, window: tuple[int, int] | None, softcap: float) -> torch.Tensor:
    """Packed (total, H, D) attention, one sequence at a time."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if qe == qs:
            continue
        seq = attention(q[None, qs:qe].transpose(1, 2), k[None, ks:ke].transpose(1, 2), v[None, ks:ke].transpose(1, 2),
                        None, is_causal, 0.0, scale, window, softcap)
        out[qs:qe] = seq.transpose(1, 2)[0]
    return out


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int, kv_layout: str) -> torch.Tensor:
    """(length, H, D) tokens of one sequence from a paged cache."""
    blocks = cache[pages]  # (n, page_size, H, D) for NHD, (n, H, page_size, D) for HND
    if kv_layout == "HND":
        blocks = blocks.transpose(1, 2)
    return blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1])[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                    seq_lens: torch.Tensor, is_causal: bool, scale: float | None, window: tuple[int, int] | None,
                    softcap: float, kv_layout: str) -> torch.Tensor:
    """(B, Sq, Hq, D) attention over each sequence's cached tokens, gathered page by page."""
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    out = torch.empty_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        pages = page_table[b, : -(-length // page_size)].long()
        k = gather_pages(k_cache, pages, length, kv_layout)
        v = gather_pages(v_cache, pages, length, kv_layout)
        seq = attention(q[b : b + 1].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), None,
                        is_causal, 0.0, scale, window, softcap)
        out[b] = seq.transpose(1, 2)[0]
    return out


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
        _spec("attention", ("attention.causal", "attention.full", "attention.masked", "attention.sliding_window"),
              attention, mask_kinds=frozenset({"none", "bool", "float"}), supports_dropout=True,
              supports_window=True, supports_softcap=True, supports_alibi=True),
        _spec("attention_varlen", ("attention.varlen",), attention_varlen, supports_window=True,
              supports_softcap=True, graph_safe=False),
        _spec("paged_attention", ("attention.paged", "attention.decode"), paged_attention, supports_window=True,
              supports_softcap=True, graph_safe=False),
        _spec("rms_norm", ("norm.rms",), rms_norm),
        _spec("layer_norm", ("norm.layer",), layer_norm),
        _spec("group_norm", ("norm.group",), group_norm),
    ),
)
