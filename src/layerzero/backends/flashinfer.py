"""FlashInfer (flashinfer-python 0.7.x): dense, varlen and paged attention through its plan/run wrappers.

Every kernel here runs one of two compiled FlashInfer modules:
- the batch *prefill* module (FA3 on Hopper, FA2 elsewhere), whose ragged and paged entry points
  serve `flashinfer.prefill` (dense lz.attention), `flashinfer.ragged_prefill`
  (lz.attention_varlen) and `flashinfer.paged_prefill` (lz.paged_attention with Sq > 1);
- the batch *decode* module (CUDA-core decode), serving `flashinfer.decode` (dense, Sq == 1) and
  `flashinfer.paged_decode`.
Dense prefill goes through BatchPrefillWithRaggedKVCacheWrapper rather than one
single_prefill_with_kv_cache call per sequence: one launch for the whole batch, a plan that never
changes for a shape (so no host sync), and one compiled module shared with the varlen and paged
kernels (each FlashInfer prefill module costs 75-110 s of nvcc on first use).
Dense decode views the (B, Sk, H, D) keys as a paged cache whose pages are runs of P tokens of each
sequence (any strides; no copy), so that the decode planner can split long sequences over CTAs.

Semantics mapped (ops/attention.py): FlashInfer's causal mask is bottom-right aligned like ours;
its sliding window has only a left bound (`window_left`: key j is seen by the query at position p
when j >= p - window_left), so a window (left, right) maps to causal=True when is_causal or
right == 0, to causal=False when right == -1, and is not supported otherwise (Sq > 1).
`logits_soft_cap` and `sm_scale` are ours. No masks, dropout, ALiBi slopes (FlashInfer's ALiBi
computes its own slopes), or backward.

Modules compile on first use. A variant (Variant: prefill/decode, dtype, head_dim, window,
softcap) is selected only when it is known compiled: run in this process, compiled by
`warmup(...)` or `lz.warmup` (worker processes, in parallel: perf/warmup.py), found in FlashInfer's
JIT cache on disk ($FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<version>/<arch>/cached_ops/<uri>/<uri>.so),
or shipped ahead of time: FlashInfer loads `<aot dir>/<uri>/<uri>.so` before any JIT (jit/core.py,
JitSpec.is_aot), the aot dir being the `jit_cache/` of the flashinfer-jit-cache package when it is
installed (and its version starts with flashinfer's: FlashInfer refuses it otherwise), else
flashinfer's own data/aot. flashinfer-cubin only ships cubins that FlashInfer would download
(trtllm-gen kernels); none of the modules used here loads one. LAYERZERO_ALLOW_JIT=1 lets selection
pick an uncompiled variant anyway (the first call then compiles).

Plans hold their FlashInfer state (KernelSpec.prepare): each plan of a FlashInfer kernel owns one
wrapper, made on its first call and planned again only when what the plan depends on changes (the
lengths of varlen and paged calls, the scale and soft cap): a cache hit calls the prepared function,
which goes straight to the wrapper. The plan cache is the only cache: lz.reset() and invalidation
drop plans, and their wrappers with them. At most MAX_WRAPPERS wrappers live at once (each holds
INT_WORKSPACE_BYTES on the device and as much pinned host memory); past that, the plan that planned
least recently gives its wrapper up and makes a new one if it runs again. One float workspace per
device is shared by all wrappers (FlashInfer's advice), and the set of variants compiled in this
process is kept for the process. A direct call of a kernel function (not through a plan) plans and
runs once. FlashInfer plans on the host, so varlen and paged calls copy cu_seqlens / seq_lens to
the host once per call (one sync); the page indices are rebuilt on the GPU every call. The shared
workspace assumes the kernels of one device run on one stream.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import BackendNotAvailableError, InvalidInputError
from ..kernel import HALF_DTYPES, Backend, JitVariant, KernelSpec
from ..reasons import Reason, Rejection
from .flashinfer_sampling import SAMPLING_KERNELS

HEAD_DIMS = frozenset({64, 128, 256})  # FA3 prefill instantiates only these; FA2 and decode are tested on them
DECODE_GROUP_SIZES = frozenset({1, 2, 3, 4, 6, 8, 16})  # DISPATCH_GQA_GROUP_SIZE of the decode module
DENSE_OPS = ("attention.causal", "attention.full", "attention.sliding_window")
WORKSPACE_BYTES = 128 << 20  # float workspace (split-KV partial results), one per device; FlashInfer's advice
INT_WORKSPACE_BYTES = 8 << 20  # each wrapper allocates this on the device (and as much pinned host memory)
MAX_WRAPPERS = 16
ALLOW_JIT_ENV = "LAYERZERO_ALLOW_JIT"


# ----------------------------------------------------------------------------- compiled variants


@dataclass(frozen=True, slots=True)
class Variant:
    """One FlashInfer module that nvcc builds on first use (causal and scale are run-time arguments)."""

    kind: str  # "prefill" (batch prefill: ragged + paged) | "decode" (batch decode, CUDA cores)
    backend: str  # "fa3" | "fa2" for prefill; "fa2" for decode
    dtype: torch.dtype
    head_dim: int
    sliding_window: bool
    softcap: bool

    @property
    def uri(self) -> str:
        """The module's name in FlashInfer's JIT cache (jit/attention/modules.py of 0.7.2)."""
        dt = {torch.float16: "f16", torch.bfloat16: "bf16"}[self.dtype]
        common = (
            f"dtype_q_{dt}_dtype_kv_{dt}_dtype_o_{dt}_dtype_idx_i32_head_dim_qk_{self.head_dim}_"
            f"head_dim_vo_{self.head_dim}_posenc_0_use_swa_{self.sliding_window}_"
            f"use_logits_cap_{self.softcap}"
        )
        if self.kind == "decode":
            return f"batch_decode_with_kv_cache_{common}"
        suffix = "_sm90" if self.backend == "fa3" else "_kv_stride_equal"
        return f"batch_prefill_with_kv_cache_{common}_f16qk_False{suffix}"


def prefill_backend(sm: int) -> str:
    """What FlashInfer's `auto` picks for our inputs (fp16/bf16, head_dim 64/128/256, no custom mask)."""
    cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return "fa3" if sm // 10 == 9 and cuda >= (12, 3) else "fa2"


def variant_for(kind: str, ctx: SelectionContext) -> Variant:
    backend = prefill_backend(ctx.sm) if kind == "prefill" else "fa2"
    window = ctx.window is not None and ctx.window[0] >= 0
    return Variant(kind, backend, ctx.dtype, ctx.head_dim, window, ctx.softcap > 0)


def _variant_of(
    kind: str, device: torch.device, dtype: torch.dtype, head_dim: int, window_left: int, softcap: float
) -> Variant:
    sm = _sm(device)
    backend = prefill_backend(sm) if kind == "prefill" else "fa2"
    return Variant(kind, backend, dtype, head_dim, window_left >= 0, softcap > 0)


def _sm(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _flashinfer_version() -> str | None:
    try:
        return importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def jit_cache_dir() -> str:
    """FlashInfer's JIT cache root (jit/env.py): $FLASHINFER_WORKSPACE_BASE or ~, then .cache/flashinfer."""
    base = os.environ.get("FLASHINFER_WORKSPACE_BASE") or os.path.expanduser("~")
    return os.path.join(base, ".cache", "flashinfer")


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def aot_dir() -> str | None:
    """Where FlashInfer loads ahead-of-time modules from (jit/env.py of 0.7), found without importing:
    flashinfer-jit-cache's `jit_cache/` when installed with a matching version, else flashinfer/data/aot."""
    try:
        spec = importlib.util.find_spec("flashinfer_jit_cache")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        package, ours = _distribution_version("flashinfer-jit-cache"), _flashinfer_version()
        if package and ours and not package.startswith(ours):
            return None  # FlashInfer raises on import with a mismatched flashinfer-jit-cache
        return os.path.join(list(spec.submodule_search_locations)[0], "jit_cache")
    try:
        spec = importlib.util.find_spec("flashinfer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "aot")


def aot_packages() -> dict[str, str | None]:
    """The versions of FlashInfer's ahead-of-time packages (None: not installed)."""
    return {name: _distribution_version(name) for name in ("flashinfer-jit-cache", "flashinfer-cubin")}


def compiled_on_disk(variant: Variant, sm: int) -> bool:
    """Whether this module is built for this GPU: shipped ahead of time (aot_dir()/<uri>/<uri>.so) or in
    FlashInfer's JIT cache (`<version>/<arch>/cached_ops/<uri>/<uri>.so`)."""
    aot = aot_dir()
    if aot is not None and os.path.exists(os.path.join(aot, variant.uri, variant.uri + ".so")):
        return True
    version = _flashinfer_version() or "*"
    pattern = os.path.join(glob.escape(jit_cache_dir()), version, "*", "cached_ops", variant.uri, variant.uri + ".so")
    arch = f"{sm // 10}{sm % 10}"
    for path in glob.glob(pattern):
        arch_dir = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(path))))
        if any(token.startswith(arch) for token in arch_dir.split("_")):
            return True
    return False


# Variants known compiled in this process (run, warmed, or found on disk): a fact about the process.
COMPILED: set[Variant] = set()


def is_compiled(variant: Variant, sm: int) -> bool:
    """Known compiled: run or warmed in this process, or in the JIT cache on disk."""
    if variant in COMPILED:
        return True
    if compiled_on_disk(variant, sm):
        COMPILED.add(variant)
        return True
    return False


# ----------------------------------------------------------------------------- planned wrappers


class _Planned:
    """The FlashInfer wrapper of one plan and what its current plan was made for (see the module doc)."""

    __slots__ = ("lock", "wrapper", "variant", "data_key", "indices", "ran", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wrapper: Any = None
        self.variant: Variant | None = None
        self.data_key: Hashable = None  # what the wrapper's plan was made for; None = not planned
        self.indices: torch.Tensor | None = None  # the kv_indices tensor the plan reads (paged kernels)
        self.ran = False


# The states that hold a wrapper, least recently planned first (weak: a dropped plan frees its entry).
_LIVE: OrderedDict[int, weakref.ref[_Planned]] = OrderedDict()
_LIVE_LOCK = threading.Lock()
_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def live_wrappers() -> int:
    """How many FlashInfer wrappers plans hold now."""
    with _LIVE_LOCK:
        return sum(1 for ref in _LIVE.values() if (st := ref()) is not None and st.wrapper is not None)


def reset(forget_compiled: bool = False) -> None:
    """Drop the shared workspaces and every plan's wrapper (and, if asked, what this process knows to be
    compiled); plans make new wrappers when they run again."""
    with _LIVE_LOCK:
        states = [ref() for ref in _LIVE.values()]
        _LIVE.clear()
        _WORKSPACES.clear()
    for st in states:
        if st is not None:
            st.wrapper = st.data_key = st.indices = None
    if forget_compiled:
        COMPILED.clear()


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _WORKSPACES.get(device)
    if ws is None:  # zeroed: the decode wrapper asks for a zero-initialized buffer on first use
        ws = _WORKSPACES[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _wrapper(
    st: _Planned, make: Callable[[Any, torch.Tensor], Any], kind: str, q: torch.Tensor, window_left: int, softcap: float
) -> Any:
    """The state's wrapper (under st.lock), made on first use or after it was given up."""
    if st.wrapper is not None:
        return st.wrapper
    try:
        import flashinfer
    except Exception as e:  # a broken install must raise a LayerZero error, never crash
        raise BackendNotAvailableError(f"flashinfer failed to import: {type(e).__name__}: {e}") from e
    with _LIVE_LOCK:
        workspace = _workspace(q.device)
    st.wrapper, st.data_key = make(flashinfer, workspace), None
    st.variant = _variant_of(kind, q.device, q.dtype, q.shape[-1], window_left, softcap)
    key = id(st)
    with _LIVE_LOCK:
        _LIVE[key] = weakref.ref(st, lambda _, key=key: _LIVE.pop(key, None))
        while len(_LIVE) > MAX_WRAPPERS:
            _, ref = _LIVE.popitem(last=False)
            old = ref()
            if old is not None:  # it makes a new wrapper (and plan) if it runs again
                old.wrapper = old.data_key = old.indices = None
    return st.wrapper


def _planned(st: _Planned) -> None:
    """The state planned again: it is now the most recently planned one."""
    with _LIVE_LOCK:
        if id(st) in _LIVE:
            _LIVE.move_to_end(id(st))


def _ran(st: _Planned) -> None:
    if not st.ran and st.variant is not None:
        st.ran = True
        if st.variant not in COMPILED:
            COMPILED.add(st.variant)
            BACKEND.changed()  # plans chosen while it was uncompiled may now pick it


# ----------------------------------------------------------------------------- argument mapping


def mask_args(is_causal: bool, window: tuple[int, int] | None, seq_len_q: int) -> tuple[bool, int]:
    """(causal, window_left) for FlashInfer from our is_causal and (left, right) window."""
    if window is None:
        return bool(is_causal), -1
    left, right = window
    if is_causal or right == 0 or seq_len_q == 1:  # one query token sees no key to its right anyway
        return bool(is_causal) or right == 0, left
    if right == -1:
        return False, left
    raise InvalidInputError(
        "window_size", "a right bound of 0 or -1 unless is_causal (FlashInfer has only window_left)", window
    )


def _scale(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def dense_page_size(seq_len_k: int) -> int:
    """Tokens per page when dense keys are viewed as a paged cache: a power of two <= 16 dividing Sk."""
    return min(seq_len_k & -seq_len_k, 16)


def dense_pages(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """BSHD (B, Sk, H, D) keys/values (any strides) as an NHD paged cache without copying.

    Page p holds tokens [p, p + P) of the flat token axis (page stride = token stride), so the
    pages of sequence b are b * (batch stride / token stride) + i * P. Returns the two cache views,
    the page size P and the batch stride in tokens.
    """
    B, Sk, H, D = k.shape
    if k.stride() != v.stride() or k.stride(1) <= 0 or k.stride(-1) != 1 or (B > 1 and k.stride(0) % k.stride(1)):
        k, v = k.contiguous(), v.contiguous()
    page = dense_page_size(Sk)
    ss, sh = k.stride(1), k.stride(2)
    per_batch = k.stride(0) // ss if B > 1 else Sk
    num_pages = (B - 1) * per_batch + Sk - page + 1  # the last page ends at the last token of the last sequence
    shape, strides = (num_pages, page, H, D), (ss, ss, sh, 1)
    return (
        k.as_strided(shape, strides, k.storage_offset()),
        v.as_strided(shape, strides, v.storage_offset()),
        page,
        per_batch,
    )


def paged_metadata(seq_lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Host (lengths, kv_indptr, kv_last_page_len, total pages) for FlashInfer's planner; one D2H copy."""
    lens = seq_lens.to("cpu", torch.int32)
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    indptr[1:] = pages.cumsum(0)
    last = lens - (pages - 1).clamp(min=0) * page_size  # 0 for an empty sequence
    return lens, indptr, last.to(torch.int32), int(indptr[-1])


def paged_indices(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, total: int) -> torch.Tensor:
    """CSR kv_indices: the used prefix of each row of the (B, max_pages) page table, on its device, no sync."""
    device = page_table.device
    pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    row = torch.repeat_interleave(torch.arange(page_table.shape[0], device=device), pages, output_size=total)
    start = torch.cumsum(pages, 0) - pages
    col = torch.arange(total, device=device) - start[row]
    return page_table[row, col].to(torch.int32)


def _check_same_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride():
        raise InvalidInputError(
            "v_cache",
            f"the strides of k_cache {k_cache.stride()} (FlashInfer reads both with one set of strides)",
            v_cache.stride(),
        )


# ----------------------------------------------------------------------------- kernels
# Each kernel is a function of a state (_Planned) and the op's calling convention. The kernel functions
# of the specs (impl) plan and run once with a new state; KernelSpec.prepare gives a plan a state of its own.


def _prefill(
    st: _Planned,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
) -> torch.Tensor:
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    causal, window_left = mask_args(is_causal, window, Sq)
    sm_scale = _scale(scale, D)
    data_key = (B, Sq, Sk, Hq, Hkv, D, q.dtype, causal, window_left, softcap, sm_scale)
    with st.lock:
        wrapper = _wrapper(
            st,
            lambda fi, ws: fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=prefill_backend(_sm(q.device))),
            "prefill",
            q,
            window_left,
            softcap,
        )
        if st.data_key != data_key:  # equal lengths: a plan's shapes are its key, so this plans once
            qo_indptr = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32)[: B + 1]
            kv_indptr = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32)[: B + 1]
            wrapper.plan(
                qo_indptr,
                kv_indptr,
                Hq,
                Hkv,
                D,
                causal=causal,
                window_left=window_left,
                logits_soft_cap=float(softcap),
                sm_scale=sm_scale,
                q_data_type=q.dtype,
                kv_data_type=k.dtype,
            )
            st.data_key = data_key
            _planned(st)
        out = wrapper.run(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, Hkv, D), v.reshape(B * Sk, Hkv, D))
    _ran(st)
    return out.view(B, Sq, Hq, out.shape[-1])


def prefill(
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
    """Dense BSHD attention: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) as a ragged batch of equal lengths."""
    return _prefill(_Planned(), q, k, v, is_causal, scale, window, softcap)


def _decode(
    st: _Planned,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window: tuple[int, int] | None,
    softcap: float,
) -> torch.Tensor:
    B, _, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    _, window_left = mask_args(is_causal, window, 1)
    k_pages, v_pages, page, per_batch = dense_pages(k, v)
    sm_scale = _scale(scale, D)
    data_key = (B, Sk, page, per_batch, Hq, Hkv, D, q.dtype, window_left, softcap, sm_scale)
    with st.lock:
        wrapper = _wrapper(
            st,
            lambda fi, ws: fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", backend="fa2"),
            "decode",
            q,
            window_left,
            softcap,
        )
        if st.data_key != data_key:
            n = Sk // page
            indices = (
                torch.arange(B, device=q.device, dtype=torch.int32)[:, None] * per_batch
                + torch.arange(0, Sk, page, device=q.device, dtype=torch.int32)[None, :]
            ).reshape(-1)
            indptr = torch.arange(0, (B + 1) * n, n, dtype=torch.int32)[: B + 1]
            last = torch.full((B,), page, dtype=torch.int32)
            wrapper.plan(
                indptr,
                indices,
                last,
                Hq,
                Hkv,
                D,
                page,
                window_left=window_left,
                logits_soft_cap=float(softcap),
                q_data_type=q.dtype,
                kv_data_type=k.dtype,
                sm_scale=sm_scale,
            )
            st.indices, st.data_key = indices, data_key
            _planned(st)
        out = wrapper.run(q[:, 0], (k_pages, v_pages))
    _ran(st)
    return out.unsqueeze(1)


def decode(
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
    """Dense decode: q (B, 1, Hq, D), k/v (B, Sk, Hkv, D) viewed as a paged cache (no copy)."""
    return _decode(_Planned(), q, k, v, is_causal, scale, window, softcap)


def _prepare_dense(kernel: Callable[..., torch.Tensor]) -> Callable[[SelectionContext], Callable[..., torch.Tensor]]:
    """KernelSpec.prepare of a dense kernel: a state of the plan's own, in the call's layout (BSHD or BHSD)."""

    def prepare(ctx: SelectionContext) -> Callable[..., torch.Tensor]:
        st = _Planned()
        if ctx.layout == "BHSD":

            def run(
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
                return kernel(
                    st, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal, scale, window, softcap
                ).transpose(1, 2)
        else:

            def run(
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
                return kernel(st, q, k, v, is_causal, scale, window, softcap)

        return run

    return prepare


def _ragged_prefill(
    st: _Planned,
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
    _, Hq, D = q.shape
    Hkv = k.shape[1]
    causal, window_left = mask_args(is_causal, window, max_seqlen_q)
    sm_scale = _scale(scale, D)
    host = torch.cat([cu_seqlens_q, cu_seqlens_k]).to("cpu", torch.int32)  # the planner needs them on the host
    data_key = (tuple(host.tolist()), Hq, Hkv, D, q.dtype, causal, window_left, softcap, sm_scale)
    with st.lock:
        wrapper = _wrapper(
            st,
            lambda fi, ws: fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=prefill_backend(_sm(q.device))),
            "prefill",
            q,
            window_left,
            softcap,
        )
        if st.data_key != data_key:
            n = cu_seqlens_q.numel()
            wrapper.plan(
                host[:n].clone(),
                host[n:].clone(),
                Hq,
                Hkv,
                D,
                causal=causal,
                window_left=window_left,
                logits_soft_cap=float(softcap),
                sm_scale=sm_scale,
                q_data_type=q.dtype,
                kv_data_type=k.dtype,
            )
            st.data_key = data_key
            _planned(st)
        out = wrapper.run(q, k, v)
    _ran(st)
    return out


def ragged_prefill(
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
    """Packed varlen attention: q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens (B + 1,) int32."""
    return _ragged_prefill(
        _Planned(), q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window, softcap
    )


def _paged(
    kind: str,
    st: _Planned,
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
    _check_same_strides(k_cache, v_cache)
    B, Sq, Hq, D = q.shape
    page_size, Hkv = (
        (k_cache.shape[1], k_cache.shape[2]) if kv_layout == "NHD" else (k_cache.shape[2], k_cache.shape[1])
    )
    causal, window_left = mask_args(is_causal, window, Sq)
    sm_scale = _scale(scale, D)
    if kind == "decode":
        make = lambda fi, ws: fi.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout, backend="fa2")  # noqa: E731
    else:
        make = lambda fi, ws: fi.BatchPrefillWithPagedKVCacheWrapper(  # noqa: E731
            ws, kv_layout, backend=prefill_backend(_sm(q.device))
        )
    lens, indptr, last, total = paged_metadata(seq_lens, page_size)
    indices = paged_indices(page_table, seq_lens, page_size, total)
    data_key = (
        tuple(lens.tolist()),
        Sq,
        Hq,
        Hkv,
        D,
        q.dtype,
        kv_layout,
        page_size,
        causal,
        window_left,
        softcap,
        sm_scale,
    )
    with st.lock:
        wrapper = _wrapper(st, make, kind, q, window_left, softcap)
        if st.data_key != data_key:
            if kind == "decode":
                wrapper.plan(
                    indptr,
                    indices,
                    last,
                    Hq,
                    Hkv,
                    D,
                    page_size,
                    window_left=window_left,
                    logits_soft_cap=float(softcap),
                    q_data_type=q.dtype,
                    kv_data_type=k_cache.dtype,
                    sm_scale=sm_scale,
                )
            else:
                qo_indptr = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32)[: B + 1]
                wrapper.plan(
                    qo_indptr,
                    indptr,
                    indices,
                    last,
                    Hq,
                    Hkv,
                    D,
                    page_size,
                    causal=causal,
                    window_left=window_left,
                    logits_soft_cap=float(softcap),
                    sm_scale=sm_scale,
                    q_data_type=q.dtype,
                    kv_data_type=k_cache.dtype,
                )
            st.indices, st.data_key = indices, data_key
            _planned(st)
        else:  # same lengths, maybe other pages: the plan reads st.indices (a device tensor, kept by reference)
            assert st.indices is not None
            st.indices.copy_(indices)
        if kind == "decode":
            out = wrapper.run(q[:, 0], (k_cache, v_cache)).unsqueeze(1)
        else:
            out = wrapper.run(q.reshape(B * Sq, Hq, D), (k_cache, v_cache)).view(B, Sq, Hq, -1)
    _ran(st)
    return out


def paged_prefill(
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
    """Chunked prefill over a paged cache: q (B, Sq, Hq, D); page_table (B, max_pages) -> CSR indices."""
    return _paged(
        "prefill", _Planned(), q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window, softcap, kv_layout
    )


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
) -> torch.Tensor:
    """Decode over a paged cache: q (B, 1, Hq, D); page_table (B, max_pages) -> CSR indices."""
    return _paged(
        "decode", _Planned(), q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window, softcap, kv_layout
    )


def _prepare_with_state(
    kernel: Callable[..., torch.Tensor],
) -> Callable[[SelectionContext], Callable[..., torch.Tensor]]:
    """KernelSpec.prepare of a varlen or paged kernel (layouts THD / paged: no transposes)."""

    def prepare(ctx: SelectionContext) -> Callable[..., torch.Tensor]:
        st = _Planned()
        return lambda *args: kernel(st, *args)

    return prepare


def _prepare_paged(kind: str) -> Callable[[SelectionContext], Callable[..., torch.Tensor]]:
    def prepare(ctx: SelectionContext) -> Callable[..., torch.Tensor]:
        st = _Planned()
        return lambda *args: _paged(kind, st, *args)

    return prepare


# ----------------------------------------------------------------------------- warmup


def warmup_variant(
    kind: str,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    *,
    sliding_window: bool = False,
    softcap: bool = False,
    device: torch.device | str | None = None,
) -> Variant:
    """Compile (or load from FlashInfer's JIT cache) one module by running it on tiny inputs.

    kind: "prefill" (serves flashinfer.prefill, ragged_prefill, paged_prefill) or "decode"
    (flashinfer.decode, paged_decode). Takes 13 s (decode) to 110 s (prefill) when nothing is cached.
    """
    if kind not in ("prefill", "decode"):
        raise InvalidInputError("kind", "'prefill' or 'decode'", kind)
    if dtype not in HALF_DTYPES:
        raise InvalidInputError("dtype", "torch.float16 or torch.bfloat16", dtype)
    if head_dim not in HEAD_DIMS:
        raise InvalidInputError("head_dim", f"one of {sorted(HEAD_DIMS)}", head_dim)
    dev = torch.device(device if device is not None else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 16, 1, head_dim, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    window = (8, 0) if sliding_window else None
    cap = 30.0 if softcap else 0.0
    if kind == "prefill":
        prefill(q, k, v, None, True, 0.0, None, window, cap)
    else:
        decode(q[:, :1], k, v, None, False, 0.0, None, window, cap)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return _variant_of(kind, dev, dtype, head_dim, 8 if sliding_window else -1, cap)


def warmup(ctx: SelectionContext) -> list[Variant]:
    """Compile the module the FlashInfer kernels need for an attention context (lz.warmup calls this).

    Decode contexts (Sq == 1 or op attention.decode) warm the decode module, others the prefill
    module. Contexts FlashInfer cannot run, or a missing FlashInfer, warm nothing.
    """
    if (
        ctx.device_type != "cuda"
        or ctx.dtype not in HALF_DTYPES
        or ctx.head_dim not in HEAD_DIMS
        or not BACKEND.availability[0]
        or not ctx.op.startswith("attention.")
    ):
        return []
    kind = "decode" if ctx.op == "attention.decode" or ctx.seq_len_q == 1 else "prefill"
    variant = variant_for(kind, ctx)
    if variant in COMPILED:
        return [variant]
    device = torch.device("cuda", ctx.device_index)
    return [
        warmup_variant(
            kind, ctx.dtype, ctx.head_dim, sliding_window=variant.sliding_window, softcap=variant.softcap, device=device
        )
    ]


# ----------------------------------------------------------------------------- constraints


def _checker(kind: str, dense_decode: bool = False) -> Callable[[SelectionContext], list[Rejection]]:
    """FlashInfer rules the generic constraints cannot say, and the JIT gate."""

    def check(ctx: SelectionContext) -> list[Rejection]:
        out: list[Rejection] = []
        if ctx.dtype == torch.bfloat16 and ctx.sm < 80:
            out.append(Rejection(Reason.DTYPE_UNSUPPORTED, f"bfloat16 needs sm 80+, device is sm {ctx.sm}"))
        if dense_decode and ctx.seq_len_q != 1:
            out.append(Rejection(Reason.SEQ_LEN_TOO_LONG, f"the decode kernel takes seq_len_q 1, got {ctx.seq_len_q}"))
        if kind == "decode" and ctx.gqa_ratio not in DECODE_GROUP_SIZES:
            out.append(
                Rejection(
                    Reason.GQA_UNSUPPORTED, f"decode group size {ctx.gqa_ratio} not in {sorted(DECODE_GROUP_SIZES)}"
                )
            )
        if ctx.window is not None and not ctx.is_causal and ctx.seq_len_q > 1 and ctx.window[1] not in (0, -1):
            out.append(
                Rejection(
                    Reason.WINDOW_UNSUPPORTED,
                    f"window {ctx.window}: FlashInfer has only a left bound (right must be 0 or -1 unless causal)",
                )
            )
        if out:
            return out
        if os.environ.get(ALLOW_JIT_ENV, "") not in ("", "0"):
            return out
        variant = variant_for(kind, ctx)
        if not is_compiled(variant, ctx.sm):
            out.append(
                Rejection(
                    Reason.NEEDS_JIT_COMPILE,
                    f"{variant.uri} is not compiled (about "
                    f"{'13' if kind == 'decode' else '100'} s of nvcc): build it with lz.warmup / "
                    f"`layerzero warmup`, or set {ALLOW_JIT_ENV}=1",
                )
            )
        return out

    return check


def _jit_variant(kind: str) -> Callable[[SelectionContext], JitVariant | None]:
    """The module a call needs built (for lz.warmup), None when it is compiled or the call is not FlashInfer's."""

    def jit_variant(ctx: SelectionContext) -> JitVariant | None:
        if ctx.device_type != "cuda" or ctx.dtype not in HALF_DTYPES or ctx.head_dim not in HEAD_DIMS:
            return None
        v = variant_for(kind, ctx)
        if is_compiled(v, ctx.sm):
            return None
        extras = "".join((" window" if v.sliding_window else "", " softcap" if v.softcap else ""))
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}[v.dtype]
        return JitVariant(v, f"flashinfer {v.kind} {dtype} d{v.head_dim}{extras} ({v.backend})")

    return jit_variant


def _workspace_bytes(ctx: SelectionContext) -> int:
    """A new wrapper's int workspace, plus the shared float workspace if this device has none yet."""
    device = torch.device(ctx.device_type, ctx.device_index) if ctx.device_type == "cuda" else torch.device("cpu")
    return INT_WORKSPACE_BYTES + (0 if device in _WORKSPACES else WORKSPACE_BYTES)


def _spec(
    name: str,
    ops: tuple[str, ...],
    impl: Callable[..., Any],
    priority: int,
    kind: str,
    description: str,
    dense_decode: bool = False,
    **kw: Any,
) -> KernelSpec:
    return KernelSpec(
        id=f"flashinfer.{name}",
        ops=ops,
        impl=impl,
        priority=priority,
        platforms=frozenset({"cuda"}),
        min_sm=75,
        dtypes=HALF_DTYPES,
        head_dims=HEAD_DIMS,
        supports_window=True,
        supports_softcap=True,
        graph_safe=False,
        needs_jit=True,
        check=_checker(kind, dense_decode),
        workspace_bytes=_workspace_bytes,
        jit_variant=_jit_variant(kind),
        description=description,
        **kw,
    )


BACKEND = Backend(
    name="flashinfer",
    module="flashinfer",
    distribution="flashinfer-python",
    description="FlashInfer plan/run attention kernels (JIT-compiled per variant) and sampling kernels",
    # Each probe runs once its variant (bf16 or fp16, head_dim 128) is compiled; until then the JIT gate
    # keeps the kernels out anyway and importing flashinfer is the probe.
    probes=(("flashinfer.prefill", "prefill"), ("flashinfer.decode", "decode")),
    kernels=(
        # H100, bf16, 2026-11-26 (benchmarks/results/attention-h100.md, regret-h100.md). prefill 86: with GQA
        # it ran 1.6-2.1x faster than torch.sdpa_flash (D128 and D256); with MHA and D <= 128 torch.sdpa_cudnn
        # (89, 87 after its transform penalty) beat it by 1.12-1.29x; for one query row it loses to every
        # decode kernel (decode priority 70).
        # decode 77: torch.sdpa_flash (80, 78 after its BSHD->BHSD transform penalty) was 1.05-1.38x faster
        # on every dense decode shape (1k-32k keys, D128 and D256), so this serves what sdpa_flash cannot
        # (window, softcap). Both are selected only once their variant is compiled.
        _spec(
            "prefill",
            DENSE_OPS,
            prefill,
            86,
            "prefill",
            layout="BSHD",
            decode_priority=70,
            prepare=_prepare_dense(_prefill),
            description="dense prefill as an equal-length ragged batch (BatchPrefillWithRaggedKVCacheWrapper)",
        ),
        _spec(
            "decode",
            DENSE_OPS,
            decode,
            77,
            "decode",
            dense_decode=True,
            layout="BSHD",
            prepare=_prepare_dense(_decode),
            description="dense decode (Sq == 1) over keys viewed as pages (BatchDecodeWithPagedKVCacheWrapper)",
        ),
        _spec(
            "ragged_prefill",
            ("attention.varlen",),
            ragged_prefill,
            84,
            "prefill",
            prepare=_prepare_with_state(_ragged_prefill),
            description="packed varlen attention (BatchPrefillWithRaggedKVCacheWrapper)",
        ),
        _spec(
            "paged_prefill",
            ("attention.paged",),
            paged_prefill,
            91,
            "prefill",
            prepare=_prepare_paged("prefill"),
            description="chunked prefill over a paged KV cache (BatchPrefillWithPagedKVCacheWrapper)",
        ),
        _spec(
            "paged_decode",
            ("attention.decode",),
            paged_decode,
            92,
            "decode",
            prepare=_prepare_paged("decode"),
            description="decode over a paged KV cache (BatchDecodeWithPagedKVCacheWrapper)",
        ),
        *SAMPLING_KERNELS,  # backends/flashinfer_sampling.py
    ),
)
