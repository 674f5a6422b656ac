"""STAND-INS for flash-attn (v2, v3, v4) and xFormers, for CPU tests of LayerZero's argument mapping.

These are NOT the libraries. They implement, naively and in float64, the semantics the libraries
document for the entry points our adapters call (BSHD tensors, bottom-right causal, window
conventions, GQA by head groups, paged caches, xFormers BMGHK inputs and mask objects), and record
every call. A mapping bug in an adapter (a transposed layout, a wrong window convention, a swapped
argument) then gives a wrong output that the tests catch. They never replace a GPU run.
"""

from __future__ import annotations

import math
import types

import torch

CALLS: list[tuple[str, dict]] = []


def _naive(q, k, v, scale, causal, left, right, softcap=0.0, alibi=None):
    """q (Sq, H, D), k/v (Sk, Hk, D) of one sequence; left/right None = unbounded."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    g = h // hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(sq, h, v.shape[-1], dtype=torch.float64)
    pos = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed &= j <= pos
    if left is not None:
        allowed &= j >= pos - left
    if right is not None:
        allowed &= j <= pos + right
    for head in range(h):
        s = q[:, head].double() @ k[:, head // g].double().T * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if alibi is not None:
            s = s - alibi[head] * (pos - j).abs()
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, head] = p @ v[:, head // g].double()
    return out.to(q.dtype)


def _fa_window(window_size, unbounded):
    left, right = window_size
    return (None if left == unbounded else left), (None if right == unbounded else right)


def _dense(q, k, v, scale, causal, left, right, softcap=0.0, alibi=None):
    assert q.dim() == 4 and k.dim() == 4, "flash-attn takes (B, S, H, D)"
    outs = []
    for b in range(q.shape[0]):
        a = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        outs.append(_naive(q[b], k[b], v[b], scale, causal, left, right, softcap, a))
    return torch.stack(outs)


def _varlen(q, k, v, cu_q, cu_k, scale, causal, left, right, softcap):
    assert q.dim() == 3, "varlen takes (total, H, D)"
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        out[bq[i]:bq[i + 1]] = _naive(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]], scale, causal,
                                      left, right, softcap)
    return out


def _paged(q, k_cache, v_cache, cache_seqlens, table, scale, causal, left, right, softcap):
    ps = k_cache.shape[1]
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        pages = table[b, : -(-n // ps)].long()
        kb = k_cache[pages].reshape(-1, k_cache.shape[2], k_cache.shape[3])[:n]
        vb = v_cache[pages].reshape(-1, v_cache.shape[2], v_cache.shape[3])[:n]
        outs.append(_naive(q[b], kb, vb, scale, causal, left, right, softcap))
    return torch.stack(outs)


def make_flash_attn_v2() -> types.ModuleType:
    """STAND-IN for `flash_attn` 2.x (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache)."""
    mod = types.ModuleType("flash_attn")
    mod.__path__ = []  # a package, so that `flash_attn.cute` can hang below it

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        CALLS.append(("flash_attn.flash_attn_func", dict(causal=causal, window_size=window_size, softcap=softcap)))
        return _dense(q, k, v, softmax_scale, causal, *_fa_window(window_size, -1), softcap, alibi_slopes)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False):
        CALLS.append(("flash_attn.flash_attn_varlen_func", dict(max_seqlen_q=max_seqlen_q)))
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, *_fa_window(window_size, -1),
                       softcap)

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        assert k is None and v is None
        assert block_table is not None and k_cache.shape[1] % 256 == 0, "paged KV needs page size % 256 == 0"
        CALLS.append(("flash_attn.flash_attn_with_kvcache", dict(causal=causal)))
        return _paged(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal,
                      *_fa_window(window_size, -1), softcap)

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    return mod


def make_flash_attn_v3() -> types.ModuleType:
    """STAND-IN for FA3's `flash_attn_interface` (3.0 betas return (out, lse) from flash_attn_func)."""
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0):
        CALLS.append(("flash_attn_interface.flash_attn_func", dict(causal=causal, window_size=window_size)))
        out = _dense(q, k, v, softmax_scale, causal, *_fa_window(window_size, -1), softcap)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):
        CALLS.append(("flash_attn_interface.flash_attn_varlen_func", {}))
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, *_fa_window(window_size, -1),
                       softcap)

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                                cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                                scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False):
        CALLS.append(("flash_attn_interface.flash_attn_with_kvcache", {}))
        return _paged(q, k_cache, v_cache, cache_seqlens, page_table, softmax_scale, causal,
                      *_fa_window(window_size, -1), softcap)

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    return mod


def make_flash_attn_v4() -> types.ModuleType:
    """STAND-IN for FA4's `flash_attn.cute` (windows use None for unbounded; returns (out, lse))."""
    mod = types.ModuleType("flash_attn.cute")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, return_lse=False):
        assert all(w is None or w >= 0 for w in window_size), "FA4 spells unbounded windows as None"
        CALLS.append(("flash_attn.cute.flash_attn_func", dict(window_size=window_size)))
        return _dense(q, k, v, softmax_scale, causal, window_size[0], window_size[1], softcap), None

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, seqused_q=None, seqused_k=None, page_table=None,
                               softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, return_lse=False):
        CALLS.append(("flash_attn.cute.flash_attn_varlen_func", {}))
        if page_table is not None:  # FA4 reads a paged cache in batch form, lengths in seqused_k
            assert cu_seqlens_q is None and cu_seqlens_k is None and q.dim() == 4
            return _paged(q, k, v, seqused_k, page_table, softmax_scale, causal, window_size[0], window_size[1],
                          softcap), None
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size[0], window_size[1],
                       softcap), None

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


def make_xformers() -> dict[str, types.ModuleType]:
    """STAND-IN for `xformers.ops` (memory_efficient_attention, fmha.attn_bias mask classes)."""
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")

    class LowerTriangularFromBottomRightMask:
        pass

    class LowerTriangularFromBottomRightLocalAttentionMask:
        def __init__(self, window_size):  # keys j with pos - window_size < j <= pos
            self.window_size = window_size

    class LocalAttentionFromBottomRightMask:
        def __init__(self, window_left, window_right):
            self.window_left, self.window_right = window_left, window_right

    for cls in (LowerTriangularFromBottomRightMask, LowerTriangularFromBottomRightLocalAttentionMask,
                LocalAttentionFromBottomRightMask):
        setattr(attn_bias, cls.__name__, cls)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
        CALLS.append(("xformers.ops.memory_efficient_attention", dict(dim=query.dim(), bias=type(attn_bias).__name__)))
        five = query.dim() == 5
        if five:  # BMGHK: key/value broadcast over H (stride 0), one KV head per group
            assert key.stride(3) == 0, "k/v must be expanded over the query heads of each group"
            B, M, G, H, K = query.shape
            q4, k4, v4 = query.reshape(B, M, G * H, K), key[:, :, :, 0], value[:, :, :, 0]
        else:
            q4, k4, v4 = query, key, value
        causal, left, right, tensor = False, None, None, None
        if isinstance(attn_bias, LowerTriangularFromBottomRightMask):
            causal = True
        elif isinstance(attn_bias, LowerTriangularFromBottomRightLocalAttentionMask):
            causal, left = True, attn_bias.window_size - 1
        elif isinstance(attn_bias, LocalAttentionFromBottomRightMask):
            left, right = attn_bias.window_left, attn_bias.window_right
        elif isinstance(attn_bias, torch.Tensor):
            assert attn_bias.stride(-1) == 1 and attn_bias.stride(-2) % 8 == 0, "bias rows must be 8-aligned"
            tensor = attn_bias.reshape(q4.shape[0], q4.shape[2], q4.shape[1], k4.shape[1]) if five else attn_bias
        outs = []
        for b in range(q4.shape[0]):
            if tensor is None:
                outs.append(_naive(q4[b], k4[b], v4[b], scale, causal, left, right))
                continue
            g = q4.shape[2] // k4.shape[2]
            per_head = []
            for h in range(q4.shape[2]):
                s = q4[b, :, h].double() @ k4[b, :, h // g].double().T * (scale or 1 / math.sqrt(q4.shape[-1]))
                s = s + tensor[b, h].double()
                per_head.append(torch.softmax(s, -1).nan_to_num(0.0) @ v4[b, :, h // g].double())
            outs.append(torch.stack(per_head, 1).to(q4.dtype))
        out = torch.stack(outs)
        return out.reshape(query.shape[:-1] + (value.shape[-1],)) if five else out

    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = fmha
    fmha.attn_bias = attn_bias
    xformers.ops = ops
    return {"xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": attn_bias}


# xformers 0.0.35 under torch 2.11 on the H200 (../shared/gpu/README.md): it imports, prints "xFormers can't
# load C++/CUDA extensions", and every memory_efficient_attention call raises this (abridged).
NO_OPERATOR = ("No operator found for `memory_efficient_attention_forward` with inputs:\n"
               "     query       : shape=(1, 16, 4, 128) (torch.float32)\n"
               "`fa3F@0.0.0` is not supported because:\n    xFormers wasn't build with CUDA support\n"
               "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support")


def make_broken_xformers(mode: str) -> dict[str, types.ModuleType]:
    """STAND-IN for an xformers that imports but cannot run: mode "raises" raises NotImplementedError
    like xformers 0.0.35 under torch 2.11 (NO_OPERATOR); mode "wrong" returns the query, numbers that
    are not attention. Modules carry a __spec__, so find_spec sees the library as installed."""
    import importlib.machinery

    modules = make_xformers()

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
        CALLS.append(("xformers.ops.memory_efficient_attention", {"broken": mode}))
        if mode == "raises":
            raise NotImplementedError(NO_OPERATOR)
        return query.clone()

    modules["xformers.ops"].memory_efficient_attention = memory_efficient_attention
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules
