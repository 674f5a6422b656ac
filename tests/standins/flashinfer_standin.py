"""STAND-IN for FlashInfer's plan/run attention wrappers and its sampling functions, for CPU tests
of LayerZero's argument mapping.

This is NOT FlashInfer. It implements, naively and in float64, the semantics FlashInfer 0.7.2
documents for the three wrappers our backend calls (BatchPrefillWithRaggedKVCacheWrapper,
BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper): CSR indptr /
indices / last_page_len paged caches read through the tensors' own strides, NHD and HND layouts,
bottom-right causal, `window_left` (key j seen from position p when j >= p - window_left),
logits_soft_cap * tanh(score * sm_scale / cap), GQA by head groups, plan-time sm_scale and window,
and the decode module's supported GQA group sizes. Like FlashInfer it copies host indptr arrays at
plan time but keeps a device kv_indices tensor by reference. It records every call. A mapping bug
gives a wrong output the tests catch; it never replaces the GPU run.

`flashinfer.sampling` here has the 0.7.2 signatures of the five functions our sampling kernels
call (sampling_from_logits, top_k_sampling_from_probs, top_p_sampling_from_probs,
min_p_sampling_from_probs, top_k_top_p_sampling_from_logits) and their documented input rules:
float32 (B, V) inputs, top_k an int or int32 (B,) tensor, top_p / min_p a float or float32 (B,)
tensor, int32 output. It computes the filtered distribution in float64 (top-k: the k largest;
top-p: the smallest top set with mass >= p; min-p: p >= min_p * max p; top-k-first for the joint
call), records it with the arguments, and draws from it with torch.multinomial and the generator.
"""

from __future__ import annotations

import importlib.machinery
import math
import types

import torch

CALLS: list[tuple[str, dict]] = []
DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)


def _attend(q, k, v, causal, window_left, softcap, sm_scale):
    """q (qo_len, Hq, D), k/v (kv_len, Hkv, D) of one request, FlashInfer's mask conventions."""
    qo, kv, hq = q.shape[0], k.shape[0], q.shape[1]
    g = hq // k.shape[1]
    qi = torch.arange(qo)[:, None]
    kj = torch.arange(kv)[None, :]
    allowed = torch.ones(qo, kv, dtype=torch.bool)
    if causal:
        allowed &= kj + qo <= kv + qi
    if window_left >= 0:
        allowed &= kj + qo + window_left >= kv + qi
    out = torch.zeros(qo, hq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        s = q[:, h].double() @ k[:, h // g].double().T * sm_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        out[:, h] = p @ v[:, h // g].double()
    return out


def _pages(cache, layout, indices, indptr, last, b, page_size):
    n = int(indptr[b + 1] - indptr[b])
    length = 0 if n == 0 else (n - 1) * page_size + int(last[b])
    pages = indices[int(indptr[b]):int(indptr[b + 1])].long()
    assert pages.numel() == 0 or int(pages.max()) < cache.shape[0], "page id beyond the cache"
    blocks = cache[pages]
    if layout == "HND":
        blocks = blocks.transpose(1, 2)
    return blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1])[:length]


class _Wrapper:
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, backend="auto", **kw):
        assert kv_layout in ("NHD", "HND")
        assert float_workspace_buffer.dtype == torch.uint8
        self.kv_layout = kv_layout
        self.backend = backend
        self.plans = 0
        CALLS.append((type(self).__name__ + ".__init__", {"kv_layout": kv_layout, "backend": backend, **kw}))

    def _plan_common(self, num_qo_heads, num_kv_heads, head_dim, window_left, logits_soft_cap, sm_scale,
                     q_data_type, kv_data_type):
        assert num_qo_heads % num_kv_heads == 0
        self.heads = (num_qo_heads, num_kv_heads, head_dim)
        self.window_left = window_left
        self.softcap = logits_soft_cap or 0.0
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dtypes = (q_data_type, kv_data_type or q_data_type)
        self.plans += 1

    def _check(self, q, k):
        assert (q.dtype, k.dtype) == self.dtypes, "dtypes differ from plan()"
        assert q.shape[1] == self.heads[0] and q.shape[-1] == self.heads[2]


class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None,
             custom_mask=None, packed_custom_mask=None, causal=False, pos_encoding_mode="NONE",
             use_fp16_qk_reduction=False, window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None,
             rope_theta=None, q_data_type="float16", kv_data_type=None, **kw):
        assert pos_encoding_mode == "NONE" and custom_mask is None
        self._plan_common(num_qo_heads, num_kv_heads, head_dim_qk, window_left, logits_soft_cap, sm_scale,
                          q_data_type, kv_data_type)
        self.qo_indptr, self.kv_indptr, self.causal = qo_indptr.clone(), kv_indptr.clone(), causal
        CALLS.append(("ragged.plan", dict(qo_indptr=qo_indptr, kv_indptr=kv_indptr, causal=causal,
                                          window_left=window_left, logits_soft_cap=logits_soft_cap,
                                          sm_scale=sm_scale, heads=(num_qo_heads, num_kv_heads, head_dim_qk))))

    def run(self, q, k, v, *args, **kw):
        self._check(q, k)
        assert self.kv_layout == "NHD" and k.shape[1] == self.heads[1]
        assert q.shape[0] == int(self.qo_indptr[-1]) and k.shape[0] == int(self.kv_indptr[-1])
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
        for b in range(len(self.qo_indptr) - 1):
            qs, qe = int(self.qo_indptr[b]), int(self.qo_indptr[b + 1])
            ks, ke = int(self.kv_indptr[b]), int(self.kv_indptr[b + 1])
            out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], self.causal, self.window_left, self.softcap,
                                 self.sm_scale)
        CALLS.append(("ragged.run", {"q_stride": q.stride(), "k_stride": k.stride()}))
        return out.to(q.dtype)


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None,
             causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
             logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             **kw):
        assert pos_encoding_mode == "NONE" and custom_mask is None
        self._plan_common(num_qo_heads, num_kv_heads, head_dim_qk, window_left, logits_soft_cap, sm_scale,
                          q_data_type, kv_data_type)
        self.qo_indptr, self.causal, self.page_size = qo_indptr.clone(), causal, page_size
        self.indptr, self.last = paged_kv_indptr.clone(), paged_kv_last_page_len.clone()
        self.indices = paged_kv_indices  # a device tensor is kept by reference (`.to(device)` is a no-op)
        CALLS.append(("paged_prefill.plan", dict(qo_indptr=qo_indptr, indptr=paged_kv_indptr,
                                                 indices=paged_kv_indices, last=paged_kv_last_page_len,
                                                 page_size=page_size, causal=causal, window_left=window_left,
                                                 logits_soft_cap=logits_soft_cap, sm_scale=sm_scale)))

    def run(self, q, paged_kv_cache, *args, **kw):
        k_cache, v_cache = paged_kv_cache
        self._check(q, k_cache)
        assert k_cache.stride() == v_cache.stride()
        page_size = k_cache.shape[1] if self.kv_layout == "NHD" else k_cache.shape[2]
        assert page_size == self.page_size, "page size of the cache differs from plan()"
        assert q.shape[0] == int(self.qo_indptr[-1])
        out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=torch.float64)
        for b in range(len(self.qo_indptr) - 1):
            qs, qe = int(self.qo_indptr[b]), int(self.qo_indptr[b + 1])
            k = _pages(k_cache, self.kv_layout, self.indices, self.indptr, self.last, b, page_size)
            v = _pages(v_cache, self.kv_layout, self.indices, self.indptr, self.last, b, page_size)
            out[qs:qe] = _attend(q[qs:qe], k, v, self.causal, self.window_left, self.softcap, self.sm_scale)
        CALLS.append(("paged_prefill.run", {}))
        return out.to(q.dtype)


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 backend="auto", **kw):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, use_tensor_cores=use_tensor_cores)
        assert int(float_workspace_buffer.abs().sum()) == 0, "the decode workspace must be zero-initialized"

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *args,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
             kv_data_type=None, sm_scale=None, **kw):
        assert not args, "optional plan() arguments are keyword-only in 0.7"
        assert pos_encoding_mode == "NONE"
        assert num_qo_heads // num_kv_heads in DECODE_GROUP_SIZES, "Unsupported group_size"
        self._plan_common(num_qo_heads, num_kv_heads, head_dim, window_left, logits_soft_cap, sm_scale,
                          q_data_type, kv_data_type)
        self.indptr, self.last, self.page_size = indptr.clone(), last_page_len.clone(), page_size
        self.indices = indices
        CALLS.append(("decode.plan", dict(indptr=indptr, indices=indices, last=last_page_len, page_size=page_size,
                                          window_left=window_left, logits_soft_cap=logits_soft_cap,
                                          sm_scale=sm_scale)))

    def run(self, q, paged_kv_cache, *args, **kw):
        k_cache, v_cache = paged_kv_cache
        self._check(q, k_cache)
        assert q.dim() == 3 and q.shape[0] == len(self.last), "decode q is (batch, heads, head_dim)"
        assert k_cache.stride() == v_cache.stride(), "K/V strides differ"
        page_size = k_cache.shape[1] if self.kv_layout == "NHD" else k_cache.shape[2]
        assert page_size == self.page_size
        out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=torch.float64)
        for b in range(q.shape[0]):
            k = _pages(k_cache, self.kv_layout, self.indices, self.indptr, self.last, b, page_size)
            v = _pages(v_cache, self.kv_layout, self.indices, self.indptr, self.last, b, page_size)
            out[b] = _attend(q[b : b + 1], k, v, False, self.window_left, self.softcap, self.sm_scale)[0]
        CALLS.append(("decode.run", {"q_stride": q.stride(), "k_stride": k_cache.stride()}))
        return out.to(q.dtype)


# ----------------------------------------------------------------------------- flashinfer.sampling

def _rows(x, name):
    assert isinstance(x, torch.Tensor) and x.dim() == 2, f"{name} is (batch_size, num_classes)"
    assert x.dtype == torch.float32, f"{name} must be float32 (FlashInfer: float32 inputs), got {x.dtype}"
    assert x.is_contiguous(), f"{name} must be contiguous"
    return x.double()


def _param(value, name, batch, dtype, lo, hi):
    """A per-row float64 column from a scalar or a (batch,) tensor of the documented dtype."""
    if isinstance(value, torch.Tensor):
        assert value.dtype == dtype, f"{name} tensor must be {dtype}, got {value.dtype}"
        assert tuple(value.shape) == (batch,), f"{name} tensor must be (batch_size,), got {tuple(value.shape)}"
        col = value.double().view(-1, 1)
    else:
        assert not isinstance(value, bool) and isinstance(value, (int, float)), f"{name}: {type(value).__name__}"
        col = torch.full((batch, 1), float(value), dtype=torch.float64)
    assert bool(((col >= lo) & (col <= hi)).all()), f"{name} outside [{lo}, {hi}]: {col.view(-1).tolist()}"
    return col


def _probs(p):
    assert bool(((p.sum(-1) - 1).abs() < 1e-4).all()), "probs rows must sum to 1"
    return p


def _keep_top_k(p, k):
    tau = p.sort(-1, descending=True).values.gather(-1, k.long() - 1)
    return torch.where(p >= tau, p, 0.0)


def _keep_top_p(p, top_p):
    p = p / p.sum(-1, keepdim=True)
    s = p.sort(-1, descending=True).values
    before = s.cumsum(-1) - s  # mass of the strictly larger tokens
    tau = torch.where(before < top_p, s, 2.0).min(-1, keepdim=True).values
    return torch.where(p >= tau, p, 0.0)


def _draw(name, p, generator, args):
    assert generator is None or isinstance(generator, torch.Generator)
    p = p / p.sum(-1, keepdim=True)
    CALLS.append((f"sampling.{name}", {**args, "dist": p, "generator": generator}))
    return torch.multinomial(p, 1, generator=generator).view(-1).to(torch.int32)


def sampling_from_logits(logits, indices=None, deterministic=True, generator=None, check_nan=False, seed=None,
                         offset=None):
    assert indices is None and seed is None and offset is None
    x = _rows(logits, "logits")
    return _draw("sampling_from_logits", torch.softmax(x, -1), generator, {"logits": logits})


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    assert indices is None and seed is None and offset is None and not return_valid
    p = _probs(_rows(probs, "probs"))
    k = _param(top_k, "top_k", p.shape[0], torch.int32, 1, p.shape[1])
    return _draw("top_k_sampling_from_probs", _keep_top_k(p, k), generator, {"probs": probs, "top_k": top_k})


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    assert indices is None and seed is None and offset is None and not return_valid
    p = _probs(_rows(probs, "probs"))
    tp = _param(top_p, "top_p", p.shape[0], torch.float32, 0.0, 1.0)
    return _draw("top_p_sampling_from_probs", _keep_top_p(p, tp), generator, {"probs": probs, "top_p": top_p})


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, return_valid=False):
    assert indices is None and seed is None and offset is None and not return_valid
    p = _probs(_rows(probs, "probs"))
    mp = _param(min_p, "min_p", p.shape[0], torch.float32, 0.0, 1.0)
    kept = torch.where(p >= mp * p.max(-1, keepdim=True).values, p, 0.0)
    return _draw("min_p_sampling_from_probs", kept, generator, {"probs": probs, "min_p": min_p})


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                     deterministic=True, generator=None, check_nan=False, seed=None, offset=None):
    assert indices is None and seed is None and offset is None
    assert filter_apply_order in ("top_k_first", "joint")
    p = torch.softmax(_rows(logits, "logits"), -1)
    k = _param(top_k, "top_k", p.shape[0], torch.int32, 1, p.shape[1])
    tp = _param(top_p, "top_p", p.shape[0], torch.float32, 0.0, 1.0)
    if filter_apply_order == "top_k_first":
        kept = _keep_top_p(_keep_top_k(p, k), tp)
    else:  # both filters on the full distribution
        kept = torch.where((_keep_top_k(p, k) > 0) & (_keep_top_p(p, tp) > 0), p, 0.0)
    return _draw("top_k_top_p_sampling_from_logits", kept, generator,
                 {"logits": logits, "top_k": top_k, "top_p": top_p, "filter_apply_order": filter_apply_order})


def make_sampling() -> types.ModuleType:
    """A module named `flashinfer.sampling` with the five sampling functions."""
    mod = types.ModuleType("flashinfer.sampling")
    mod.__spec__ = importlib.machinery.ModuleSpec("flashinfer.sampling", None)
    mod.__doc__ = "STAND-IN for flashinfer.sampling (tests/standins/flashinfer_standin.py); not the library"
    for fn in (sampling_from_logits, top_k_sampling_from_probs, top_p_sampling_from_probs, min_p_sampling_from_probs,
               top_k_top_p_sampling_from_logits):
        setattr(mod, fn.__name__, fn)
    return mod


def make_flashinfer() -> types.ModuleType:
    """A module named `flashinfer` with the three wrappers and `sampling` (put it and `sampling` into
    sys.modules in a test only: `import flashinfer.sampling` looks there)."""
    mod = types.ModuleType("flashinfer")
    mod.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
    mod.__doc__ = "STAND-IN for FlashInfer (tests/standins/flashinfer_standin.py); not the library"
    mod.BatchPrefillWithRaggedKVCacheWrapper = BatchPrefillWithRaggedKVCacheWrapper
    mod.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    mod.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    mod.sampling = make_sampling()
    return mod
