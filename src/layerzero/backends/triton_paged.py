"""Our own Triton paged-KV decode attention (`triton_paged.decode`) for `lz.paged_attention` with Sq == 1.

Flash-decoding in two kernels:
1. `_decode_split`: one program per (sequence, KV head, split). It loads the G = Hq / Hkv query
   heads that share the KV head as one (G_PAD, D) tile, so each K/V token is read once for all of
   them, walks its share of the sequence BLOCK_N tokens at a time (each token's page looked up in
   the page table), and keeps an online softmax in base 2. With one split it writes the output
   directly; otherwise it writes a normalized partial output and its log2-sum-exp per split.
2. `_decode_reduce`: one program per (sequence, query head) combines the splits.

Splits are sized per sequence inside the kernel (its length / num_splits, rounded to BLOCK_N), so
no host sync on seq_lens is needed; num_splits comes from shapes alone (enough programs to fill
the GPU). NHD and HND caches are the same kernel: only the token and head strides differ.
Decode is trivially causal (the query is the last token); a left window moves the first key to
L - 1 - left; soft-cap is cap * tanh(score / cap). Achieved bandwidth in the benchmark is bytes of
K and V read / time.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..context import SelectionContext
from ..kernel import HALF_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 64
MAX_GROUP_TILE = 8192  # G_PAD * D fp32 accumulator elements per program


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile-on-demand Triton kernels (triton is imported here, never at module import)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_split(
        Q,
        K,
        V,
        PT,
        LENS,
        O,
        PART_O,
        PART_LSE,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kp,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_vp,
        stride_vt,
        stride_vh,
        stride_vd,
        stride_pt,
        stride_ob,
        stride_oh,
        stride_od,
        num_heads,
        num_splits,
        score_scale,
        out_scale,
        window_left,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SOFTCAP: tl.constexpr,
        WINDOW: tl.constexpr,
        DIRECT: tl.constexpr,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(LENS + b)
        start = 0
        if WINDOW:
            start = tl.maximum(length - 1 - window_left, 0)
        per_split = tl.cdiv(tl.cdiv(length - start, num_splits), BLOCK_N) * BLOCK_N
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, length)

        rows = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = hk * G + rows
        row_ok = rows < G
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0
        )
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        k_head = K + hk * stride_kh
        v_head = V + hk * stride_vh
        table = PT + b.to(tl.int64) * stride_pt
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + tl.arange(0, BLOCK_N)
            valid = tok < hi
            page = tl.load(table + tok // PAGE, mask=valid, other=0).to(tl.int64)
            slot = tok % PAGE
            k = tl.load(
                k_head + page[:, None] * stride_kp + slot[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=valid[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k))  # (G_PAD, BLOCK_N), fp32
            if SOFTCAP:
                # cap * tanh(scale * qk / cap) in log2 units: out_scale = cap * log2(e), score_scale = scale / cap
                x = s * score_scale
                s = out_scale * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
            else:
                s = s * out_scale  # scale * log2(e)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(
                v_head + page[:, None] * stride_vp + slot[:, None] * stride_vt + d[None, :] * stride_vd,
                mask=valid[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        l_safe = tl.where(l > 0.0, l, 1.0)
        out = acc / l_safe[:, None]
        if DIRECT:
            tl.store(
                O + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                out.to(O.dtype.element_ty),
                mask=row_ok[:, None],
            )
        else:
            part = (b * num_heads + heads) * num_splits + split  # PART_O (B, Hq, splits, D), PART_LSE (B, Hq, splits)
            tl.store(PART_O + part[:, None] * D + d[None, :], out, mask=row_ok[:, None])
            lse = tl.where(l > 0.0, m + tl.log2(l_safe), float("-inf"))
            tl.store(PART_LSE + part, lse, mask=row_ok)

    @triton.jit
    def _decode_reduce(
        PART_O,
        PART_LSE,
        O,
        stride_ob,
        stride_oh,
        stride_od,
        num_heads,
        num_splits,
        D: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        used = sp < num_splits
        base = (b * num_heads + h) * num_splits
        lse = tl.load(PART_LSE + base + sp, mask=used, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top)  # 0 for empty splits
        parts = tl.load(PART_O + (base + sp[:, None]) * D + d[None, :], mask=used[:, None], other=0.0)
        den = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
        tl.store(O + b * stride_ob + h * stride_oh + d * stride_od, out.to(O.dtype.element_ty))

    return _decode_split, _decode_reduce


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 132


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_launch(
    batch: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    capacity: int,
    num_sms: int = 132,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> dict[str, int]:
    """Launch parameters from shapes alone (no look at seq_lens values, so capture-safe)."""
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    if num_splits is None:
        programs = batch * num_kv_heads
        # about eight programs per SM: on the H100 (benchmarks/results/paged_decode-h100.md sweep) four
        # left B=8 x 32k at 78% of copy bandwidth (9 splits) where 16-18 splits reach 91-96%
        wanted = 1 if programs >= 4 * num_sms else -(-8 * num_sms // programs)
        num_splits = max(1, min(wanted, -(-capacity // MIN_SPLIT_TOKENS), MAX_SPLITS))
    return {
        "block_n": block_n,
        "num_splits": num_splits,
        "g_pad": max(16, _next_pow2(group)),
        "num_warps": 4 if head_dim <= 128 else 8,
        "num_stages": 3,
    }


def paged_decode(
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
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache. q: (B, 1, Hq, D); caches NHD (P, page, Hkv, D) or HND
    (P, Hkv, page, D); page_table (B, max_pages) int32; seq_lens (B,) int32. Returns (B, 1, Hq, D).

    The keyword arguments override the launch heuristics (benchmarks sweep them).
    """
    split_kernel, reduce_kernel = _kernels()
    B, _, Hq, D = q.shape
    if kv_layout == "NHD":
        _, page_size, Hk, _ = k_cache.shape
        kt, kh, vt, vh = k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2)
    else:
        _, Hk, page_size, _ = k_cache.shape
        kt, kh, vt, vh = k_cache.stride(2), k_cache.stride(1), v_cache.stride(2), v_cache.stride(1)
    group = Hq // Hk
    launch = plan_launch(
        B,
        Hk,
        group,
        D,
        page_table.shape[1] * page_size,
        _num_sms(q.device.index or 0) if q.is_cuda else 132,
        block_n,
        num_splits,
    )
    splits = launch["num_splits"]
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    if softcap:
        score_scale, out_scale = s / softcap, softcap * LOG2E
    else:
        score_scale, out_scale = 1.0, s * LOG2E
    left = window[0] if window is not None else -1
    out = torch.empty_like(q)
    direct = splits == 1
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    split_kernel[(B, Hk, splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        seq_lens,
        out,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(2),
        q.stride(3),
        k_cache.stride(0),
        kt,
        kh,
        k_cache.stride(3),
        v_cache.stride(0),
        vt,
        vh,
        v_cache.stride(3),
        page_table.stride(0),
        out.stride(0),
        out.stride(2),
        out.stride(3),
        Hq,
        splits,
        score_scale,
        out_scale,
        max(left, 0),
        G=group,
        G_PAD=launch["g_pad"],
        D=D,
        PAGE=page_size,
        BLOCK_N=launch["block_n"],
        SOFTCAP=bool(softcap),
        WINDOW=left >= 0,
        DIRECT=direct,
        num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
    )
    if not direct:
        reduce_kernel[(B, Hq)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(2),
            out.stride(3),
            Hq,
            splits,
            D=D,
            SPLITS_PAD=max(2, _next_pow2(splits)),
            num_warps=4,
        )
    return out


def _check(ctx: SelectionContext) -> list[Rejection]:
    group = ctx.gqa_ratio
    tile = max(16, _next_pow2(group)) * ctx.head_dim
    if tile > MAX_GROUP_TILE:
        return [
            Rejection(
                Reason.GQA_UNSUPPORTED,
                f"{group} query heads per KV head x head_dim {ctx.head_dim} exceeds the register tile "
                f"({MAX_GROUP_TILE} accumulator elements)",
            )
        ]
    return []


def _impl(
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
    return paged_decode(q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window, softcap, kv_layout)


BACKEND = Backend(
    name="triton_paged",
    module="triton",
    distribution="triton",
    min_version="3.0",
    aliases=("triton_decode",),
    description="LayerZero's own Triton paged-KV decode attention (flash-decoding, GQA-grouped)",
    probes=(("triton_paged.decode", "paged"),),
    # H100, bf16 (benchmarks/results/attention-h100.md, paged_decode-h100.md): 1996-2346 GB/s vs FlashInfer's
    # paged decode 902-1598 GB/s on B32 x 8k / B8 x 32k with shuffled pages, hence priority 95 (> flashinfer.
    # paged_decode 92). Graph safe: the launch reads shapes only, and a CUDA-graph replay with new seq_lens
    # equals the eager call bit for bit (tests/gpu/test_triton_paged_gpu.py, H100, 2026-11-26; the earlier
    # "wrong rows" came from a test that asked for lengths past its page table).
    # num_stages 3: the launch sweep's best configs on the H100 all used 3 stages.
    kernels=(
        KernelSpec(
            id="triton_paged.decode",
            ops=("attention.decode",),
            impl=_impl,
            priority=95,
            platforms=frozenset({"cuda"}),
            min_sm=80,
            dtypes=HALF_DTYPES,
            head_dims=frozenset({64, 128, 256}),
            kv_layouts=frozenset({"NHD", "HND"}),
            min_page_size=16,
            supports_window=True,
            supports_softcap=True,
            graph_safe=True,
            needs_jit=True,
            check=_check,
            description="split-KV paged decode; one program reads each KV head once for its whole query group",
        ),
    ),
)
