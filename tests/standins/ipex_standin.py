"""STAND-IN for Intel Extension for PyTorch's `ipex.llm.functional`, for CPU tests of LayerZero's
argument mapping (backends/ipex.py).

This is NOT IPEX. It implements in torch, naively, what IPEX 2.x's CPU code does for the five
functions our backend calls, as read from its sources (llm/functional/fusions.py,
transformers/models/cpu/fusions/mha_fusion.py, csrc RotaryPositionEmbedding kernel):
- rms_norm / fast_layer_norm: float32 statistics, output in x's dtype; rms_norm needs a weight.
- rotary_embedding: asserts sin/cos last dim is D or D/2, builds the [sin half | cos half] table
  in float32, picks row s (no position_ids) or row position_ids[b or 0, s], pairs (i, i + R/2)
  with rotary_half else (2i, 2i + 1), and writes the result INTO query and key.
- varlen_attention: pads to (B, max_seqlen), repeats k/v heads for GQA, runs torch SDPA with its
  DEFAULT scale (softmax_scale is ignored, as in IPEX's CPU code) and top-left causal, writes
  `out`. A mapping bug gives a wrong output the tests catch; it never replaces a run of IPEX.
Every call is recorded in CALLS.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch
import torch.nn.functional as F

CALLS: list[tuple[str, dict]] = []


def rms_norm(hidden_states, weight, eps):
    CALLS.append(("rms_norm", {"weight_dtype": weight.dtype, "eps": eps}))
    x = hidden_states.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(hidden_states.dtype)


def fast_layer_norm(hidden_states, normalized_shape, weight, bias, eps):
    CALLS.append(("fast_layer_norm", {"normalized_shape": tuple(normalized_shape)}))
    return F.layer_norm(hidden_states, normalized_shape, weight, bias, eps)


def rotary_embedding(query, key, sin, cos, rotary_dim, rotary_half, position_ids=None):
    head_dim = query.size(-1)
    assert query.dim() == 4 and key.dim() == 4, "stand-in: BSHD query/key"
    assert sin.size(-1) in (head_dim, head_dim // 2) and sin.size(-1) == cos.size(-1), \
        "rotary embedding only supports sin/cos last dim == head_dim or head_dim / 2"
    CALLS.append(("rotary_embedding", {"rotary_dim": rotary_dim, "rotary_half": rotary_half,
                                       "position_ids": position_ids, "key_heads": key.size(2),
                                       "sin_shape": tuple(sin.shape)}))
    half = head_dim // 2
    s_tab = sin[..., :half].reshape(-1, half).float()
    c_tab = cos[..., :half].reshape(-1, half).float()
    B, S = query.shape[:2]
    if position_ids is None:
        rows = torch.arange(S).expand(B, S)
    else:
        rows = position_ids.long().expand(B, S) if position_ids.size(0) == 1 else position_ids.long()
    s, c = s_tab[rows][:, :, None], c_tab[rows][:, :, None]  # (B, S, 1, half)
    first, second = (slice(0, half), slice(half, rotary_dim)) if rotary_half else (
        slice(0, rotary_dim, 2), slice(1, rotary_dim, 2))
    for t in (query, key):
        x1, x2 = t[..., first].float(), t[..., second].float()
        new1, new2 = x1 * c - x2 * s, x2 * c + x1 * s
        t[..., first], t[..., second] = new1.to(t.dtype), new2.to(t.dtype)
    return query, key


def varlen_attention(query, key, value, out, seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, pdropout,
                     softmax_scale, zero_tensors, is_causal, return_softmax, gen_):
    assert not return_softmax and gen_ is None and not zero_tensors and pdropout == 0.0
    assert out.shape == query.shape and out.dtype == query.dtype
    CALLS.append(("varlen_attention", {"softmax_scale": softmax_scale, "is_causal": is_causal,
                                       "max_seqlen": (max_seqlen_q, max_seqlen_k)}))
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    for b in range(seqlen_q.numel() - 1):
        q0, q1 = int(seqlen_q[b]), int(seqlen_q[b + 1])
        k0, k1 = int(seqlen_k[b]), int(seqlen_k[b + 1])
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (query[q0:q1], key[k0:k1], value[k0:k1]))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal)  # default scale, top-left causal
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def make_ipex() -> types.ModuleType:
    """A module named `intel_extension_for_pytorch` with `llm.functional` (put it into sys.modules in a test only)."""
    mod = types.ModuleType("intel_extension_for_pytorch")
    mod.__spec__ = importlib.machinery.ModuleSpec("intel_extension_for_pytorch", None)
    functional = types.SimpleNamespace(rms_norm=rms_norm, fast_layer_norm=fast_layer_norm,
                                       rotary_embedding=rotary_embedding, varlen_attention=varlen_attention)
    mod.llm = types.SimpleNamespace(functional=functional)  # type: ignore[attr-defined]
    return mod
