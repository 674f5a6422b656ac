"""FlashAttention v2 (`flash_attn`), v3 (`flash_attn_interface`, Hopper) and v4 (`flash_attn.cute`,
Hopper/Blackwell), routed by GPU generation.

Facts from the libraries' interfaces (flash-attn 2.7/2.8, FA3 hopper/, FA4 flash_attn/cute/interface.py):
- All take BSHD tensors (B, S, H, D), fp16/bf16, GQA by fewer k/v heads, causal aligned bottom-right,
  `softmax_scale`, `softcap`. v2 also has dropout, ALiBi (`alibi_slopes`, fp32 (H,) or (B, H)) and
  windows as `window_size=(left, right)` with -1 = unbounded; v4 spells unbounded as None.
- v2 runs on SM 8.0+ (Ampere, Ada, Hopper), head_dim <= 256; its paged path
  (`flash_attn_with_kvcache(block_table=...)`) needs page sizes that are multiples of 256.
- v3 runs on SM 9.0 only (never Blackwell), head_dim <= 256 (multiple of 8); `flash_attn_func` returns
  the output, or (output, lse) in the 3.0 betas; paged KV through `page_table` with any page size.
- v4 (CuTe DSL) runs on SM 9.x/10.x/11.x, head_dim <= 256 (multiple of 8), returns (output, lse); it is
  the one preferred on Blackwell.
None of them could be installed on the H100 we measure on (see ../shared/gpu/README.md): these adapters
are verified on CPU by tests/test_flash_attn_mapping.py with a stand-in module, not on a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..context import SelectionContext
from ..kernel import HALF_DTYPES, Backend, JitVariant, KernelSpec
from ..reasons import Reason, Rejection

_CUDA = frozenset({"cuda"})
DENSE_OPS = ("attention.causal", "attention.full", "attention.sliding_window")
PAGED_OPS = ("attention.paged", "attention.decode")


def _window(window: tuple[int, int] | None, unbounded: Any = -1) -> tuple[Any, Any]:
    if window is None:
        return (unbounded, unbounded)
    return tuple(unbounded if w < 0 else w for w in window)  # type: ignore[return-value]


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple | list) else result


# ------------------------------------------------------------------------------------------ v2


def v2_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(
        q,
        k,
        v,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=is_causal,
        window_size=_window(window),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )


def v2_varlen(
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
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=scale,
        causal=is_causal,
        window_size=_window(window),
        softcap=softcap,
    )


def v2_paged(
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
    from flash_attn import flash_attn_with_kvcache

    # The new tokens are already in the cache: cache_seqlens counts them, no k/v to append.
    return flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=seq_lens,
        block_table=page_table,
        softmax_scale=scale,
        causal=is_causal,
        window_size=_window(window),
        softcap=softcap,
    )


# ------------------------------------------------------------------------------------------ v3


def v3_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    return _first(
        flash_attn_func(q, k, v, softmax_scale=scale, causal=is_causal, window_size=_window(window), softcap=softcap)
    )


def v3_varlen(
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
    from flash_attn_interface import flash_attn_varlen_func

    return _first(
        flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale=scale,
            causal=is_causal,
            window_size=_window(window),
            softcap=softcap,
        )
    )


def v3_paged(
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
    from flash_attn_interface import flash_attn_with_kvcache

    return _first(
        flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            cache_seqlens=seq_lens,
            page_table=page_table,
            softmax_scale=scale,
            causal=is_causal,
            window_size=_window(window),
            softcap=softcap,
        )
    )


# ------------------------------------------------------------------------------------------ v4


def v4_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    return _first(
        flash_attn_func(
            q, k, v, softmax_scale=scale, causal=is_causal, window_size=_window(window, None), softcap=softcap
        )
    )


def v4_varlen(
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
    from flash_attn.cute import flash_attn_varlen_func

    return _first(
        flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            softmax_scale=scale,
            causal=is_causal,
            window_size=_window(window, None),
            softcap=softcap,
        )
    )


def v4_paged(
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
    from flash_attn.cute import flash_attn_varlen_func

    # FA4 reads a paged cache through its varlen entry point: q in batch form (B, Sq, H, D), the
    # cache (num_pages, page_size, Hkv, D), lengths as seqused_k (the new tokens included)
    return _first(
        flash_attn_varlen_func(
            q,
            k_cache,
            v_cache,
            seqused_k=seq_lens,
            page_table=page_table,
            softmax_scale=scale,
            causal=is_causal,
            window_size=_window(window, None),
            softcap=softcap,
        )
    )


FA4_DISK_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def _v4_jit_variant(ctx: SelectionContext) -> JitVariant | None:
    """FA4 compiles each variant with the CuTe DSL on its first call (1.5-2.5 s on the H200). A compile
    outlives its process only with FA4's disk cache on (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1, read
    when flash_attn.cute is imported; FLASH_ATTENTION_CUTE_DSL_CACHE_DIR moves it): then lz.warmup's
    worker processes can build variants in parallel for this one. Without it: None (lz.warmup
    compiles in this process). Whether a variant is on disk already is FA4's business (a worker then
    just loads it); the key groups calls that compile the same kernel as far as our context tells."""
    if os.environ.get(FA4_DISK_CACHE_ENV) != "1" or ctx.device_type != "cuda":
        return None
    key = (
        "flash_attn4",
        ctx.dtype,
        ctx.head_dim,
        ctx.head_dim_v,
        ctx.is_causal,
        ctx.window,
        ctx.softcap > 0,
        ctx.gqa_ratio,
        ctx.seq_len_q == 1,
    )
    dtype = str(ctx.dtype).removeprefix("torch.")
    return JitVariant(
        key,
        f"flash_attn4 {dtype} d{ctx.head_dim} {'causal' if ctx.is_causal else 'full'}"
        f" gqa{ctx.gqa_ratio}{' decode' if ctx.seq_len_q == 1 else ''}",
    )


def _v2_check(ctx: SelectionContext) -> list[Rejection]:
    """FA2 has no ALiBi together with softcap (the two score modifiers are exclusive in its kernels)."""
    if ctx.alibi and ctx.softcap:
        return [Rejection(Reason.SOFTCAP_UNSUPPORTED, "flash_attn v2 takes ALiBi or softcap, not both")]
    return []


_common: dict[str, Any] = dict(
    platforms=_CUDA,
    dtypes=HALF_DTYPES,
    max_head_dim=256,
    layout="BSHD",
    supports_window=True,
    supports_softcap=True,
    deterministic=False,
)

BACKENDS = (
    Backend(
        # FlashAttention-2 is found by its compiled extension, not by the `flash_attn` package:
        # flash-attn-4 installs a `flash_attn` package holding only `flash_attn.cute`.
        name="flash_attn",
        module="flash_attn",
        requires=("flash_attn_2_cuda",),
        distribution="flash-attn",
        aliases=("flash_attn2", "fa2"),
        description="FlashAttention-2 (Ampere, Ada, Hopper)",
        probes=(("flash_attn.v2", "prefill"), ("flash_attn.v2_kvcache", "paged")),
        kernels=(
            KernelSpec(
                id="flash_attn.v2",
                ops=DENSE_OPS,
                impl=v2_dense,
                priority=82,
                min_sm=80,
                supports_dropout=True,
                supports_alibi=True,
                supports_backward=True,
                check=_v2_check,
                description="flash_attn_func",
                **_common,
            ),
            KernelSpec(
                id="flash_attn.v2_varlen",
                ops=("attention.varlen",),
                impl=v2_varlen,
                priority=82,
                min_sm=80,
                supports_backward=True,
                description="flash_attn_varlen_func",
                **_common,
            ),
            KernelSpec(
                id="flash_attn.v2_kvcache",
                ops=PAGED_OPS,
                impl=v2_paged,
                priority=70,
                min_sm=80,
                kv_layouts=frozenset({"NHD"}),
                min_page_size=256,
                page_sizes=frozenset(range(256, 65537, 256)),
                description="flash_attn_with_kvcache(block_table=...)",
                **_common,
            ),
        ),
    ),
    Backend(
        name="flash_attn3",
        module="flash_attn_interface",
        distribution="flash-attn-3",
        aliases=("fa3",),
        description="FlashAttention-3 (Hopper only)",
        probes=(("flash_attn3.fwd", "prefill"), ("flash_attn3.kvcache", "paged")),
        kernels=(
            KernelSpec(
                id="flash_attn3.fwd",
                ops=DENSE_OPS,
                impl=v3_dense,
                priority=90,
                min_sm=90,
                max_sm=90,
                head_dim_multiple=8,
                supports_backward=True,
                description="FA3 flash_attn_func",
                **_common,
            ),
            KernelSpec(
                id="flash_attn3.varlen",
                ops=("attention.varlen",),
                impl=v3_varlen,
                priority=90,
                min_sm=90,
                max_sm=90,
                head_dim_multiple=8,
                supports_backward=True,
                description="FA3 flash_attn_varlen_func",
                **_common,
            ),
            KernelSpec(
                id="flash_attn3.kvcache",
                ops=PAGED_OPS,
                impl=v3_paged,
                priority=88,
                min_sm=90,
                max_sm=90,
                head_dim_multiple=8,
                kv_layouts=frozenset({"NHD"}),
                description="FA3 flash_attn_with_kvcache(page_table=...)",
                **_common,
            ),
        ),
    ),
    Backend(
        name="flash_attn4",
        module="flash_attn.cute",
        distribution="flash-attn-4",
        aliases=("fa4",),
        description="FlashAttention-4, CuTe DSL (Hopper, Blackwell)",
        probes=(("flash_attn4.fwd", "prefill"),),
        kernels=(
            # Priorities from the H200 (2026-12-04, bf16; benchmarks/results/attention-h200-quick.md): FA4
            # was correct in 60/60 cases but launches with ~0.15 ms of host work (CuTe DSL), so it loses
            # decode (16x4k: 0.15 vs torch flash 0.11 ms; D256 8x8k: 0.44 vs 0.31) and short prefills
            # (1x512: 0.18 vs cuDNN 0.04 ms), and wins long ones: 4x2048 D256 0.32 ms vs torch flash 0.53
            # (cuDNN takes D <= 128 only), and 12-13 % over cuDNN on GQA D128 prefill at 2k-8k tokens in
            # device time (../shared/gpu/README). So: 86 (above torch flash's 80 - 2, below cuDNN's
            # 89 - 2 for the BSHD->BHSD transpose, and the first choice on Blackwell, as before), decode
            # 70, and 88 from 4096 query rows (above cuDNN).
            KernelSpec(
                id="flash_attn4.fwd",
                ops=DENSE_OPS,
                impl=v4_dense,
                priority=86,
                decode_priority=70,
                seq_priorities=((4096, 88),),
                min_sm=90,
                max_sm=119,
                head_dim_multiple=8,
                generations=frozenset({"hopper", "blackwell"}),
                needs_jit=True,
                jit_variant=_v4_jit_variant,
                description="flash_attn.cute.flash_attn_func (preferred on Blackwell)",
                **_common,
            ),
            KernelSpec(
                id="flash_attn4.varlen",
                ops=("attention.varlen",),
                impl=v4_varlen,
                priority=86,
                min_sm=90,
                max_sm=119,
                head_dim_multiple=8,
                generations=frozenset({"hopper", "blackwell"}),
                needs_jit=True,
                description="flash_attn.cute.flash_attn_varlen_func",
                **_common,
            ),
            KernelSpec(
                id="flash_attn4.paged",
                ops=PAGED_OPS,
                impl=v4_paged,
                priority=60,
                min_sm=90,
                max_sm=119,
                head_dim_multiple=8,
                generations=frozenset({"hopper", "blackwell"}),
                needs_jit=True,
                kv_layouts=frozenset({"NHD"}),
                description="flash_attn.cute.flash_attn_varlen_func(page_table=..., seqused_k=...)",
                **_common,
            ),
        ),
    ),
)
