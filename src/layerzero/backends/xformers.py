"""xFormers `memory_efficient_attention`.

Facts from xformers.ops.fmha: inputs are BMHK (= BSHD); GQA/MQA is expressed with 5-D BMGHK inputs
whose key/value are expanded (stride 0) over the H query heads of each group; `attn_bias` is either a
tensor broadcast to (B, G, H, M, N) (additive, its last dimension padded to a multiple of 8 for
alignment) or a mask object: `LowerTriangularFromBottomRightMask` (bottom-right causal, as ours),
`LowerTriangularFromBottomRightLocalAttentionMask(left)` and `LocalAttentionFromBottomRightMask(left,
right)` for windows. `p` is dropout, `scale` the softmax scale. fp16/bf16/fp32, CUDA.
xFormers wheels are built against other torch versions than the GPU machine's, so this adapter is
verified on CPU by tests/test_xformers_mapping.py with a stand-in module, not on a GPU.
"""

from __future__ import annotations

import torch

from ..kernel import FLOAT_DTYPES, Backend, KernelSpec
from .reference import band_mask

_UNBOUNDED = 1 << 30


def _bias(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    window: tuple[int, int] | None,
    groups: int,
) -> object:
    """The attn_bias for our mask/causal/window arguments (q, k in BSHD)."""
    from xformers.ops import fmha

    masks = fmha.attn_bias
    if attn_mask is None:
        if window is None:
            return masks.LowerTriangularFromBottomRightMask() if is_causal else None
        left, right = window
        if is_causal or right == 0:
            if left < 0:
                return masks.LowerTriangularFromBottomRightMask()
            # window_size counts the query's own key: window_size = left + 1
            return masks.LowerTriangularFromBottomRightLocalAttentionMask(left + 1)
        return masks.LocalAttentionFromBottomRightMask(
            left if left >= 0 else _UNBOUNDED, right if right >= 0 else _UNBOUNDED
        )
    # A tensor bias: additive, broadcast to (B, Hq, Sq, Sk), last dim padded to a multiple of 8.
    B, Sq, Hq, _ = q.shape
    Sk = k.shape[1]
    bias = torch.zeros(B, Hq, Sq, -(-Sk // 8) * 8, dtype=q.dtype, device=q.device)[..., :Sk]
    full = attn_mask.expand(B, Hq, Sq, Sk)
    if attn_mask.dtype == torch.bool:
        bias.masked_fill_(~full, float("-inf"))
    else:
        bias.copy_(full)
    keep = band_mask(Sq, Sk, is_causal, window, q.device)
    if keep is not None:
        bias.masked_fill_(~keep, float("-inf"))
    return bias.view(B, Hq // groups, groups, Sq, Sk) if groups > 1 else bias


def memory_efficient(
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
    from xformers.ops import memory_efficient_attention

    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    bias = _bias(q, k, attn_mask, is_causal, window, groups)
    if groups == 1:
        return memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
    # BMGHK: G = key/value heads, H = query heads per group, k/v broadcast over H with stride 0.
    q5 = q.reshape(B, Sq, Hkv, groups, D)
    k5 = k[:, :, :, None, :].expand(B, Sk, Hkv, groups, D)
    v5 = v[:, :, :, None, :].expand(B, Sk, Hkv, groups, v.shape[-1])
    out = memory_efficient_attention(q5, k5, v5, attn_bias=bias, p=dropout_p, scale=scale)
    return out.reshape(B, Sq, Hq, v.shape[-1])


BACKEND = Backend(
    name="xformers",
    module="xformers",
    distribution="xformers",
    description="xFormers memory_efficient_attention (cutlass / flash dispatch inside xformers)",
    # xformers 0.0.35 imports under torch 2.11 but its extension does not load: every call raises
    # "No operator found". The probe finds that before a user call does (BACKEND_BROKEN).
    probes=(("xformers.memory_efficient", "prefill"),),
    kernels=(
        KernelSpec(
            id="xformers.memory_efficient",
            impl=memory_efficient,
            priority=65,
            ops=("attention.causal", "attention.full", "attention.masked", "attention.sliding_window"),
            platforms=frozenset({"cuda"}),
            min_sm=50,
            dtypes=FLOAT_DTYPES,
            max_head_dim=256,
            head_dim_multiple=8,
            layout="BSHD",
            mask_kinds=frozenset({"none", "bool", "float"}),
            supports_dropout=True,
            supports_window=True,
            supports_backward=True,
            deterministic=False,
            description="xformers.ops.memory_efficient_attention with BMHK / BMGHK inputs",
        ),
    ),
)
