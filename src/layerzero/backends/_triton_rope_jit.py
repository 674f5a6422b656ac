"""The Triton source of backends/triton_rope.py, imported only when that kernel first runs.

A separate module because Triton resolves the helper a kernel calls among the module's globals.
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    o_ptr,
    c,
    s,
    jm,
    j,
    b,
    t,
    head0,
    H,
    sxb,
    sxs,
    sxh,
    sxd,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    hm = heads < H
    m = hm[:, None] & jm[None, :]
    src = x_ptr + b * sxb + t * sxs + heads[:, None].to(tl.int64) * sxh
    dst = o_ptr + heads[:, None].to(tl.int64) * D
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    x1 = tl.load(src + i1[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    tl.store(dst + i1[None, :], (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=m)
    tl.store(dst + i2[None, :], (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=m)
    if BLOCK_REST > 0:  # partial rotary: dims 2 * HALF .. D pass through
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        rm = hm[:, None] & (r < D)[None, :]
        tl.store(dst + r[None, :], tl.load(src + r[None, :] * sxd, mask=rm), mask=rm)


@triton.jit
def rope_qk_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    S,
    Hq,
    Hk,
    q_blocks,
    sqb,
    sqs,
    sqh,
    sqd,
    skb,
    sks,
    skh,
    skd,
    scb,
    scs,
    scr,
    ssb,
    sss,
    ssr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b * S + t
    block = tl.program_id(1)  # head block: q's first, then k's
    b = token // S
    t = token % S
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    c = tl.load(cos_ptr + b * scb + t * scs + j * scr, mask=jm, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + b * ssb + t * sss + j * ssr, mask=jm, other=0.0).to(tl.float32)[None, :]
    if block < q_blocks:
        _rotate_heads(
            q_ptr,
            qo_ptr + token * Hq * D,
            c,
            s,
            jm,
            j,
            b,
            t,
            block * BLOCK_H,
            Hq,
            sqb,
            sqs,
            sqh,
            sqd,
            D,
            HALF,
            BLOCK_H,
            BLOCK_REST,
            INTERLEAVED,
        )
    else:
        _rotate_heads(
            k_ptr,
            ko_ptr + token * Hk * D,
            c,
            s,
            jm,
            j,
            b,
            t,
            (block - q_blocks) * BLOCK_H,
            Hk,
            skb,
            sks,
            skh,
            skd,
            D,
            HALF,
            BLOCK_H,
            BLOCK_REST,
            INTERLEAVED,
        )
