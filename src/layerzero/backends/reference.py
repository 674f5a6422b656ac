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


def band_mask(
    seq_len_q: int, seq_len_k: int, is_causal: bool, window: tuple[int, int] | None, device: torch.device
) -> torch.Tensor | None:
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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
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


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
) -> torch.Tensor:
    """Packed (total, H, D) attention, one sequence at a time."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if qe == qs:
            continue
        seq = attention(
            q[None, qs:qe].transpose(1, 2),
            k[None, ks:ke].transpose(1, 2),
            v[None, ks:ke].transpose(1, 2),
            None,
            is_causal,
            0.0,
            scale,
            window,
            softcap,
        )
        out[qs:qe] = seq.transpose(1, 2)[0]
    return out


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int, kv_layout: str) -> torch.Tensor:
    """(length, H, D) tokens of one sequence from a paged cache."""
    blocks = cache[pages]  # (n, page_size, H, D) for NHD, (n, H, page_size, D) for HND
    if kv_layout == "HND":
        blocks = blocks.transpose(1, 2)
    return blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1])[:length]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
    kv_layout: str,
) -> torch.Tensor:
    """(B, Sq, Hq, D) attention over each sequence's cached tokens, gathered page by page."""
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    out = torch.empty_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        pages = page_table[b, : -(-length // page_size)].long()
        k = gather_pages(k_cache, pages, length, kv_layout)
        v = gather_pages(v_cache, pages, length, kv_layout)
        seq = attention(
            q[b : b + 1].transpose(1, 2),
            k[None].transpose(1, 2),
            v[None].transpose(1, 2),
            None,
            is_causal,
            0.0,
            scale,
            window,
            softcap,
        )
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


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
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
        id=f"reference.{name}",
        ops=ops,
        impl=impl,
        priority=0,
        platforms=_ANY_DEVICE,
        dtypes=ALL_FLOAT_DTYPES,
        supports_backward=True,
        same_head_dim_v=False,
        description="torch reference (float32 or better)",
        **kw,  # type: ignore[arg-type]
    )


BACKEND = Backend(
    name="reference",
    description="pure torch reference implementations, always available",
    kernels=(
        _spec(
            "attention",
            ("attention.causal", "attention.full", "attention.masked", "attention.sliding_window"),
            attention,
            mask_kinds=frozenset({"none", "bool", "float"}),
            supports_dropout=True,
            supports_window=True,
            supports_softcap=True,
            supports_alibi=True,
        ),
        _spec(
            "attention_varlen",
            ("attention.varlen",),
            attention_varlen,
            supports_window=True,
            supports_softcap=True,
            graph_safe=False,
        ),
        _spec(
            "paged_attention",
            ("attention.paged", "attention.decode"),
            paged_attention,
            supports_window=True,
            supports_softcap=True,
            graph_safe=False,
        ),
        _spec("rms_norm", ("norm.rms",), rms_norm),
        _spec("layer_norm", ("norm.layer",), layer_norm),
        _spec("group_norm", ("norm.group",), group_norm),
    ),
)


# --- sampling, quantization, embedding (issue 5) ------------------------------------------------
# Calling conventions: see ops/sampling.py, ops/quant.py, ops/embedding.py. The helpers below are
# shared with backends/torch_ops.py, which runs the same math in float32 with faster primitives.

from collections.abc import Callable as _Callable  # noqa: E402

from ..context import SelectionContext  # noqa: E402
from ..reasons import Reason, Rejection  # noqa: E402

_NEG_INF = float("-inf")


def row_param(value: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor | float | int:
    """A per-row (B,) parameter as a (B, 1) tensor in `like`'s dtype; scalars pass through."""
    return value.to(like.dtype).view(-1, 1) if isinstance(value, torch.Tensor) else value


def tempered(
    logits: torch.Tensor, temperature: torch.Tensor | float, compute: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scaled logits, argmax, valid) for logits (B, V).

    Rows with no finite logit (all -inf, or NaN) are `valid` False and get zero logits so that
    later steps stay finite; rows with temperature 0 are left unscaled (they take the argmax).
    """
    x = logits.to(compute)
    best, greedy = x.max(-1)
    valid = best > _NEG_INF  # False for NaN too
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(compute).view(-1, 1)
        x = x / torch.where(t > 0, t, 1.0)
    elif temperature != 1.0:
        x = x / temperature
    return torch.where(valid.unsqueeze(-1), x, 0.0), greedy, valid


def finish_draws(
    draws: torch.Tensor, greedy: torch.Tensor, valid: torch.Tensor, temperature: torch.Tensor | float
) -> torch.Tensor:
    """int64 (B,): the argmax for temperature-0 rows, -1 for rows without a finite logit."""
    draws = draws.long()
    if isinstance(temperature, torch.Tensor):
        draws = torch.where(temperature.view(-1) > 0, draws, greedy)
    return draws.masked_fill(~valid, -1)


def filter_probs(
    probs: torch.Tensor,
    top_k: torch.Tensor | int | None,
    top_p: torch.Tensor | float | None,
    min_p: torch.Tensor | float | None,
) -> torch.Tensor:
    """Apply top-k, then top-p on the renormalized top-k distribution, then min-p; renormalize.

    probs (B, V). Thresholds are values, so tokens tied with the last kept one are kept too. Per-row
    top_k <= 0 or >= V keeps every token; top_p >= 1 keeps every token.
    """
    vocab = probs.shape[-1]
    if top_k is not None or top_p is not None:
        sorted_p = probs.sort(-1, descending=True).values
        if top_k is not None:
            if isinstance(top_k, torch.Tensor):
                k = top_k.long().view(-1, 1)
                k = torch.where(k > 0, k.clamp(max=vocab), vocab)
            else:
                k = torch.full((probs.shape[0], 1), min(top_k, vocab), device=probs.device)
            tau = sorted_p.gather(-1, k - 1)
            probs = torch.where(probs >= tau, probs, 0.0)
            sorted_p = torch.where(sorted_p >= tau, sorted_p, 0.0)
        if top_p is not None:
            p = row_param(top_p, probs)
            exclusive = sorted_p.cumsum(-1) - sorted_p
            count = (exclusive < p * sorted_p.sum(-1, keepdim=True)).sum(-1, keepdim=True).clamp(min=1)
            tau = sorted_p.gather(-1, count - 1)
            probs = torch.where((probs >= tau) & (probs > 0), probs, 0.0)
    if min_p is not None:
        floor = row_param(min_p, probs) * probs.amax(-1, keepdim=True)
        probs = torch.where(probs >= floor, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """int64 (B,) argmax of logits (B, V); -1 for rows without a finite logit."""
    best, idx = logits.max(-1)
    return idx.masked_fill(~(best > _NEG_INF), -1)


def sample(
    logits: torch.Tensor,
    top_k: torch.Tensor | int | None,
    top_p: torch.Tensor | float | None,
    min_p: torch.Tensor | float | None,
    temperature: torch.Tensor | float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Float64 sort-and-multinomial sampling: the ground truth of the statistical tests."""
    x, best, valid = tempered(logits, temperature, torch.float64)
    probs = filter_probs(torch.softmax(x, -1), top_k, top_p, min_p)
    draws = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return finish_draws(draws, best, valid, temperature)


def _reduce(
    x: torch.Tensor, granularity: str, block: tuple[int, int] | None, fn: _Callable[..., torch.Tensor]
) -> torch.Tensor:
    """Reduce x over each scale group: () per_tensor, (C, 1, ...) per_channel, (..., 1) per_token,
    (ceil(M/bm), ceil(N/bn)) block."""
    if granularity == "per_tensor":
        return fn(x)
    if granularity == "per_channel":
        return fn(x, dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
    if granularity == "per_token":
        return fn(x, dim=-1, keepdim=True)
    assert block is not None
    (m, n), (bm, bn) = x.shape, block
    padded = torch.nn.functional.pad(x, (0, -n % bn, 0, -m % bm))
    return fn(padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn), dim=(1, 3))


def expand_scale(s: torch.Tensor, shape: torch.Size, granularity: str, block: tuple[int, int] | None) -> torch.Tensor:
    """A scale (or zero point) broadcastable to the quantized tensor's shape."""
    if granularity != "block":
        return s
    assert block is not None
    return s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def quantize(
    x: torch.Tensor,
    fmt: object,
    granularity: str,
    block: tuple[int, int] | None,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    compute: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(data, float32 scale, int32 zero point or None). Values beyond the format saturate at its max.

    fmt has .dtype, .qmin, .qmax, .is_float, .symmetric (ops.quant.QuantFormat). Float formats are
    scaled in float32 and rounded by the cast (round to nearest even), integers with torch.round.
    """
    ct = torch.float32 if fmt.is_float else compute  # type: ignore[attr-defined]
    qmin, qmax = fmt.qmin, fmt.qmax  # type: ignore[attr-defined]
    xf = x.to(ct)
    if scale is None:
        if fmt.symmetric:  # type: ignore[attr-defined]
            scale = (_reduce(xf.abs(), granularity, block, torch.amax).clamp_min(1e-12) / qmax).float()
        else:
            lo = _reduce(xf, granularity, block, torch.amin).clamp_max(0)
            hi = _reduce(xf, granularity, block, torch.amax).clamp_min(0)
            scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12).float()
            zero_point = (qmin - torch.round(lo / scale.to(ct))).clamp(qmin, qmax).to(torch.int32)
    s = expand_scale(scale.to(ct), x.shape, granularity, block)
    if fmt.is_float:  # type: ignore[attr-defined]
        data = (xf / s).clamp(qmin, qmax).to(fmt.dtype)  # type: ignore[attr-defined]
    else:
        q = torch.round(xf / s)
        if zero_point is not None:
            q = q + expand_scale(zero_point.to(ct), x.shape, granularity, block)
        data = q.clamp(qmin, qmax).to(fmt.dtype)  # type: ignore[attr-defined]
    return data, scale.float(), zero_point


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8*word + _AWQ_ORDER[j]


def unpack_int32(words: torch.Tensor, bits: int, dim: int, interleave: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unpack `32 // bits` unsigned values per int32 along `dim` (value i at bits [i*bits, (i+1)*bits))."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., per)
    if interleave is not None:
        vals = vals[..., [interleave.index(c) for c in range(per)]]
    vals = vals.movedim(-1, dim + 1) if dim == 0 else vals
    shape = list(words.shape)
    shape[dim] *= per
    return vals.reshape(shape)


def dequantize_packed(w: object, compute: torch.dtype) -> torch.Tensor:
    """(N, K) weights of a GPTQ/AWQ QuantizedTensor (int32 words, grouped scales and zeros)."""
    fmt = w.packing  # type: ignore[attr-defined]
    bits = fmt.bits
    if fmt.kind == "gptq":
        q = unpack_int32(w.data, bits, 0)  # type: ignore[attr-defined]
        z = unpack_int32(w.zero_point, bits, 1) + fmt.zero_offset  # type: ignore[attr-defined]
    else:
        q = unpack_int32(w.data, bits, 1, _AWQ_ORDER)  # type: ignore[attr-defined]
        z = unpack_int32(w.zero_point, bits, 1, _AWQ_ORDER)  # type: ignore[attr-defined]
    k = q.shape[0]
    g_idx = w.g_idx if w.g_idx is not None else torch.arange(k, device=q.device) // fmt.group_size(k)  # type: ignore[attr-defined]
    g_idx = g_idx.long()
    out = (q.to(compute) - z.to(compute)[g_idx]) * w.scale.to(compute)[g_idx]  # type: ignore[attr-defined]
    return out.t()


def dequantize_parts(
    data: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    granularity: str,
    block: tuple[int, int] | None,
    out_dtype: torch.dtype,
    compute: torch.dtype,
) -> torch.Tensor:
    """(data - zero_point) * scale, each broadcast over its scale group."""
    d = data.to(compute)
    if zero_point is not None:
        d = d - expand_scale(zero_point.to(compute), d.shape, granularity, block)
    return (d * expand_scale(scale.to(compute), d.shape, granularity, block)).to(out_dtype)


def dequantize(w: object, out_dtype: torch.dtype, compute: torch.dtype = torch.float64) -> torch.Tensor:
    """The float tensor a QuantizedTensor (ops.quant) stands for, in out_dtype."""
    if getattr(w, "packing", None) is not None:
        return dequantize_packed(w, compute).to(out_dtype)
    return dequantize_parts(
        w.data,
        w.scale,
        w.zero_point,
        w.granularity,
        w.block,  # type: ignore[attr-defined]
        out_dtype,
        compute,
    )


def quant_linear(
    x: torch.Tensor,
    w: object,
    act: tuple[object, str, tuple[int, int] | None] | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x (M, K) @ dequantized w (N, K)^T + bias, in float64. With `act` = (format, granularity,
    block), x is first quantized that way and dequantized: what the fused kernels compute."""
    if act is None:
        xf = x.double()
    else:
        data, scale, zp = quantize(x, act[0], act[1], act[2], None, None)
        xf = dequantize_parts(data, scale, zp, act[1], act[2], torch.float64, torch.float64)
    out = xf @ dequantize(w, torch.float64).t()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def embedding(ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """table[ids] with rows of padding_idx set to zero: ids (...) int -> (..., D)."""
    out = table.index_select(0, ids.reshape(-1)).reshape(*ids.shape, table.shape[1])
    if padding_idx is not None:
        out = out.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    return out


_SAMPLING_OPS = (
    "sampling.plain",
    "sampling.topk",
    "sampling.topp",
    "sampling.minp",
    "sampling.topk_topp",
    "sampling.combined",
)


def _fp8_storage_check(ctx: SelectionContext) -> list[Rejection]:
    """torch has float8 storage on CPU and CUDA (any SM: the casts are emulated) but not elsewhere."""
    if (ctx.quant_format or "").startswith("fp8") and ctx.device_type not in ("cpu", "cuda", "meta"):
        return [
            Rejection(Reason.QUANT_FORMAT_UNSUPPORTED, f"{ctx.quant_format} has no float8 storage on {ctx.device_type}")
        ]
    return []


BACKEND.kernels = BACKEND.kernels + (
    _spec("greedy", ("sampling.greedy",), greedy),
    _spec("sample", _SAMPLING_OPS, sample),
    _spec("quantize", ("quant.quantize",), quantize, check=_fp8_storage_check),
    _spec("dequantize", ("quant.dequantize",), dequantize, check=_fp8_storage_check),
    _spec("quant_linear", ("quant.linear",), quant_linear),
    _spec("embedding", ("embedding.lookup",), embedding),
)


# --- position encodings, activations, gated MLP (issue 5 items 1-2) -----------------------------
# Calling conventions: see ops/posenc.py and ops/activation.py.

from collections.abc import Callable as _GatedFn  # noqa: E402


def rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BSHD RoPE in float32/64: pair i (half-rotation or interleaved) rotated by the angle of cos[..., i]."""
    return rotate(q, cos, sin, interleaved), None if k is None else rotate(k, cos, sin, interleaved)


def rope_interleaved(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rope(q, k, cos, sin, interleaved=True)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """One (B, S, H, D) tensor; cos/sin (1 or B, S, R); dims R..D pass through."""
    ct = _compute_dtype(x.dtype)
    half = cos.shape[-1] // 2
    c = cos[..., :half].to(ct)[:, :, None, :]
    s = sin[..., :half].to(ct)[:, :, None, :]
    out = x.to(ct, copy=True)
    first, second = (
        (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half), slice(half, 2 * half))
    )
    x1, x2 = out[..., first].clone(), out[..., second].clone()
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x2 * c + x1 * s
    return out.to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    return (xf * torch.sigmoid(xf)).to(x.dtype)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return torch.nn.functional.gelu(x.to(_compute_dtype(x.dtype)), approximate=approximate).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    ct = _compute_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    ct = _compute_dtype(gate.dtype)
    return (torch.nn.functional.gelu(gate.to(ct), approximate=approximate) * up.to(ct)).to(gate.dtype)


def gated_act(activation: str) -> _GatedFn[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The float32 gate*act of an mlp op suffix ("swiglu", "geglu", "geglu_tanh")."""
    if activation == "swiglu":
        return lambda g, u: torch.nn.functional.silu(g) * u
    approximate = "tanh" if activation == "geglu_tanh" else "none"
    return lambda g, u: torch.nn.functional.gelu(g, approximate=approximate) * u


def fused_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str
) -> torch.Tensor:
    """act(x @ w_gate.T, x @ w_up.T) @ w_down.T, all in float32/64, nn.Linear weight layout."""
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    hidden = gated_act(activation)(xf @ w_gate.to(ct).T, xf @ w_up.to(ct).T)
    return (hidden @ w_down.to(ct).T).to(x.dtype)


BACKEND.kernels = BACKEND.kernels + (
    _spec("rope", ("posenc.rope",), rope, layout="BSHD"),
    _spec("rope_interleaved", ("posenc.rope_interleaved",), rope_interleaved, layout="BSHD"),
    _spec("silu", ("activation.silu",), silu),
    _spec("gelu", ("activation.gelu", "activation.gelu_tanh"), gelu),
    _spec("swiglu", ("activation.swiglu",), swiglu),
    _spec("geglu", ("activation.geglu", "activation.geglu_tanh"), geglu),
    _spec("fused_mlp", ("mlp.swiglu", "mlp.geglu", "mlp.geglu_tanh"), fused_mlp),
)
