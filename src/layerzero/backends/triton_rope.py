"""Our own Triton RoPE: q and k rotated in one launch, read through any strides, written contiguous.

Why it exists: in a fused-QKV model (layerzero.serve, and any model that splits one projection),
q and k are strided views of the projection's output. Liger's rope_forward rotates in place, so it
needs its own contiguous copy of each (one extra read and write of q and k per layer); torch's
eager RoPE is several kernels. This kernel reads q and k where they lie and writes the rotated
result once: one pass over q and k, one launch for both. Math in float32, one rounding, both the
NeoX/Llama (half) and GPT-J (interleaved) pairings, partial rotary (dims R..D copied through).

Calling convention of posenc.rope / posenc.rope_interleaved (see ops/posenc.py):
impl(q, k, cos, sin) -> (q_out, k_out), q/k (B, S, H, D) in BSHD (any strides), k may be None,
cos/sin (1 or B, S, R) of any float dtype and strides; only their first R/2 entries are read.
Triton is imported only when the kernel first runs; it compiles once per dtype and block shape.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..kernel import FLOAT_DTYPES, Backend, KernelSpec
from .triton_act import _non_empty

# Elements of one half-row block a program handles (heads x R/2), rounded to powers of two.
_BLOCK_ELEMS = 1024


@functools.cache
def _kernel() -> Any:
    from . import _triton_rope_jit

    return _triton_rope_jit.rope_qk_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q_out, k_out) as new contiguous BSHD tensors; q/k/cos/sin may have any strides."""
    B, S, Hq, D = q.shape
    Hk = 0 if k is None else k.shape[2]
    half = cos.shape[-1] // 2
    qo = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    ko = None if k is None else torch.empty((B, S, Hk, D), dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return qo, ko
    block_half = _pow2(half)
    block_h = max(1, min(_pow2(max(Hq, Hk)), _BLOCK_ELEMS // block_half))
    q_blocks = -(-Hq // block_h)
    k_blocks = -(-Hk // block_h)
    rest = D - 2 * half
    kk = q if k is None else k  # an unused pointer when k is None (no k blocks are launched)
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)  # cos/sin (1, S, R) serve every batch row
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    _kernel()[(B * S, q_blocks + k_blocks)](
        q,
        kk,
        qo,
        qo if ko is None else ko,
        cos,
        sin,
        S,
        Hq,
        Hk,
        q_blocks,
        *q.stride(),
        *kk.stride(),
        cb,
        cos.stride(1),
        cos.stride(2),
        sb,
        sin.stride(1),
        sin.stride(2),
        D=D,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_REST=_pow2(rest) if rest else 0,
        INTERLEAVED=interleaved,
        num_warps=4,
    )
    return qo, ko


def rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate_qk(q, k, cos, sin, False)


def rope_interleaved(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate_qk(q, k, cos, sin, True)


# Priority 74, above Liger's rope (70): on the H100 (bf16, 2026-11-26, benchmarks/results/norms_rope-h100.md)
# it was 1.8-2.0x faster than Liger on contiguous q/k from 4 to 65536 tokens and 2.3-2.7x on strided
# q/k views (which Liger's adapter must copy first).
def _spec(name: str, ops: tuple[str, ...], impl: object, description: str) -> KernelSpec:
    return KernelSpec(
        id=f"triton_rope.{name}",
        ops=ops,
        impl=impl,
        priority=74,
        platforms=frozenset({"cuda"}),
        min_sm=80,  # type: ignore[arg-type]
        dtypes=FLOAT_DTYPES,
        layout="BSHD",
        requires_contiguous=False,
        needs_jit=True,
        check=_non_empty,
        description=description,
    )


BACKEND = Backend(
    name="triton_rope",
    module="triton",
    distribution="triton",
    description="LayerZero's Triton RoPE (q and k in one launch, strided inputs, float32 math)",
    probes=(("triton_rope.rope", "rope"),),
    kernels=(
        _spec("rope", ("posenc.rope",), rope, "q and k rotated in one launch from any strides (NeoX pairs)"),
        _spec(
            "rope_interleaved",
            ("posenc.rope_interleaved",),
            rope_interleaved,
            "q and k rotated in one launch from any strides (GPT-J pairs)",
        ),
    ),
)
