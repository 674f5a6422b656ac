"""FlexAttention (`torch.nn.attention.flex_attention`): causal, sliding window, ALiBi, soft-cap and
GQA through block masks and score_mods, compiled by inductor into one fused kernel.

Kernel ids: `flex.attention` (CUDA) and `flex.attention_cpu` (inductor's CPU template; it compiles
for 8-30 s on first use and runs ~2x slower than torch's CPU flash kernel, so it ranks below it and
is picked on CPU only for what that kernel lacks: soft-cap). `flex_attention()` below runs
arbitrary user `score_mod` / `mask_mod` (not through selection: only FlexAttention can run them).

Compiled once per shape bucket. `torch.compile(flex_attention)` keeps one guard cache per code
object and, past `torch._dynamo.config.recompile_limit` (8) entries, silently runs the unfused eager
path (~7x slower). We never let one code object collect entries:
- shapes are dynamic (`dynamic=True`); the values that change per call (bottom-right offset, window,
  soft-cap, scale, ALiBi slopes) are captured as tensors, which dynamo does not guard by value;
- the compile runs with duck sizing off (no guards tying sizes that happen to be equal); what
  dynamo still specializes on (sizes equal to 1) is part of our bucket key, and each bucket gets
  its own compiled function with its own code object, so it holds exactly one cache entry. `cache_entries()` exposes the counts (tests read it).
Block masks of causal / window bands are built analytically per (Sq, Sk, window) from block
bounds (no Sq x Sk mask is materialized) and cached.
"""

from __future__ import annotations

import functools
import math
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import FLOAT_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection

BLOCK_SIZE = 128  # flex's sparse block size (rows and columns of one block-mask entry)
_MAX_CACHED_MASKS = 64

_lock = threading.Lock()
_compiled: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
_masks: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_flex: Any = None  # torch.nn.attention.flex_attention.flex_attention, bound on first use
_warned: set[Any] = set()


def _module() -> Any:
    from torch.nn.attention import flex_attention as module

    return module


def _call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Any, block_mask: Any, enable_gqa: bool
) -> torch.Tensor:
    return _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa)


def _run(key: tuple[Any, ...], *args: Any) -> torch.Tensor:
    """Call the compiled flex of one bucket; the first call (the compile) runs without duck sizing."""
    fn = _compiled.get(key)
    if fn is not None:
        return fn(*args)
    from torch.fx.experimental import _config as fx_config

    fn = _new_bucket(key)
    with fx_config.patch(use_duck_shape=False):  # no guards tying unrelated sizes that happen to be equal
        return fn(*args)


def _new_bucket(key: tuple[Any, ...]) -> Callable[..., torch.Tensor]:
    """A compiled flex call with a code object of its own, so its dynamo cache is its own."""
    global _flex
    with _lock:
        fn = _compiled.get(key)
        if fn is None:
            if _flex is None:
                _flex = _module().flex_attention
            code = _call.__code__.replace(co_name=f"lz_flex_bucket_{len(_compiled)}")
            fn = torch.compile(types.FunctionType(code, globals(), code.co_name), dynamic=True, fullgraph=True)
            fn.__lz_code__ = code  # type: ignore[attr-defined]
            _compiled[key] = fn
    return fn


def cache_entries() -> dict[tuple[Any, ...], int]:
    """Bucket key -> number of dynamo cache entries of its compiled code (1 when compiled once)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return {key: len(_debug_get_cache_entry_list(fn.__lz_code__)) for key, fn in _compiled.items()}  # type: ignore[attr-defined]


def clear_caches() -> None:
    """Forget compiled buckets and block masks (tests)."""
    with _lock:
        _compiled.clear()
        _masks.clear()


def _size_class(*sizes: int) -> tuple[bool, ...]:
    """What dynamo still specializes dynamic sizes on (duck sizing is off): which of them are 1."""
    return tuple(s == 1 for s in sizes)


@functools.lru_cache(maxsize=512)
def _scalar(value: float | int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- masks and score_mods


def _band(is_causal: bool, window: tuple[int, int] | None) -> tuple[int, int]:
    """(left, right) limits of kv - p (p the bottom-right aligned query position); -1 = unbounded."""
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _band_mask_mod(off: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> Callable[..., Any]:
    def band(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        d = kv_idx - (q_idx + off)
        if left is None:
            return d <= right
        if right is None:
            return d >= -left
        return (d >= -left) & (d <= right)

    return band


def _pack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, indices) of the True blocks of each query block row, True ones first (flex's format)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def band_block_mask(
    seq_len_q: int, seq_len_k: int, is_causal: bool, window: tuple[int, int] | None, device: torch.device
) -> Any:
    """The BlockMask of a causal and/or window band (bottom-right aligned), or None when unbounded.

    Block (i, j) is visited when some (p, kv) pair in it lies in the band, and needs no mask_mod
    ("full") when every pair does: over a block, kv - p ranges over [k_lo - p_hi, k_hi - p_lo].
    """
    left, right = _band(is_causal, window)
    if left < 0 and right < 0:
        return None
    key = (seq_len_q, seq_len_k, left, right, device)
    mask = _masks.get(key)
    if mask is not None:
        _masks.move_to_end(key)
        return mask
    off = seq_len_k - seq_len_q
    q0 = torch.arange(0, seq_len_q, BLOCK_SIZE, device=device)
    k0 = torch.arange(0, seq_len_k, BLOCK_SIZE, device=device)
    p_lo, p_hi = q0 + off, (q0 + BLOCK_SIZE).clamp(max=seq_len_q) - 1 + off
    k_hi = (k0 + BLOCK_SIZE).clamp(max=seq_len_k) - 1
    d_min = k0[None, :] - p_hi[:, None]
    d_max = k_hi[None, :] - p_lo[:, None]
    visit = torch.ones_like(d_min, dtype=torch.bool)
    full = torch.ones_like(visit)
    if left >= 0:
        visit &= d_max >= -left
        full &= d_min >= -left
    if right >= 0:
        visit &= d_min <= right
        full &= d_max <= right
    mod = _band_mask_mod(
        _scalar(off, torch.int64, device),
        _scalar(left, torch.int64, device) if left >= 0 else None,
        _scalar(right, torch.int64, device) if right >= 0 else None,
    )
    mask = _module().BlockMask.from_kv_blocks(
        *_pack(visit & ~full), *_pack(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=mod, seq_lengths=(seq_len_q, seq_len_k)
    )
    with _lock:
        _masks[key] = mask
        while len(_masks) > _MAX_CACHED_MASKS:
            _masks.popitem(last=False)
    return mask


def _score_mod(
    ratio: torch.Tensor | None, cap: torch.Tensor | None, slopes: torch.Tensor | None, off: torch.Tensor | None
) -> Callable[..., Any]:
    """Scale correction, then soft-cap, then ALiBi (the order of backends/reference.py)."""
    per_batch = slopes is not None and slopes.dim() == 2

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if ratio is not None:
            score = score * ratio
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            slope = slopes[b, h] if per_batch else slopes[h]
            score = score - slope * (q_idx + off - kv_idx).abs()
        return score

    return score_mod


def _scale_ratio(scale: float | None, head_dim: int, device: torch.device) -> torch.Tensor | None:
    """flex applies 1/sqrt(D); another scale is a multiply in the score_mod (a float arg would be guarded)."""
    if scale is None or math.isclose(scale * math.sqrt(head_dim), 1.0, rel_tol=1e-12):
        return None
    return _scalar(float(scale) * math.sqrt(head_dim), torch.float32, device)


# ----------------------------------------------------------------------------- lz.attention kernel


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
    """BHSD attention with causal/window as a block mask and scale/soft-cap/ALiBi as a score_mod."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    device = q.device
    block_mask = band_block_mask(Sq, Sk, is_causal, window, device)
    ratio = _scale_ratio(scale, D, device)
    cap = _scalar(float(softcap), torch.float32, device) if softcap else None
    off = _scalar(Sk - Sq, torch.int64, device) if alibi_slopes is not None else None
    needs_mod = ratio is not None or cap is not None or alibi_slopes is not None
    score_mod = _score_mod(ratio, cap, alibi_slopes, off) if needs_mod else None
    nq, nk = -(-Sq // BLOCK_SIZE), -(-Sk // BLOCK_SIZE)
    left, right = _band(is_causal, window)
    key = (
        "attention",
        device,
        q.dtype,
        Hq,
        Hk,
        D,
        v.shape[-1],
        block_mask is not None,
        left >= 0,
        right >= 0,
        ratio is not None,
        cap is not None,
        None if alibi_slopes is None else alibi_slopes.dim(),
        _size_class(B, Sq, Sk, nq, nk),
    )
    return _run(key, q, k, v, score_mod, block_mask, Hq != Hk)


def _check(ctx: SelectionContext) -> list[Rejection]:
    ratio = ctx.gqa_ratio
    if ratio & (ratio - 1):
        # flex's decoding template (small Sq) needs a power-of-2 number of query heads per KV head
        return [Rejection(Reason.GQA_UNSUPPORTED, f"{ratio} query heads per KV head is not a power of 2")]
    return []


# ----------------------------------------------------------------------------- user score_mod / mask_mod


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    *,
    scale: float | None = None,
    layout: str = "BSHD",
    mask_depends_on_batch_head: bool = False,
) -> torch.Tensor:
    """Attention with an arbitrary FlexAttention `score_mod(score, b, h, q_idx, kv_idx)` and/or
    `mask_mod(b, h, q_idx, kv_idx) -> bool` (True = attend), compiled once per shape bucket.

    q: (B, Sq, Hq, D) in BSHD or (B, Hq, Sq, D) in BHSD; k, v alike with Hkv heads (Hq a multiple).
    Positions q_idx/kv_idx are 0-based from the start of each sequence (no bottom-right shift).
    The block mask is built once per (mask_mod, Sq, Sk) with the mask broadcast over batch and
    heads, unless mask_depends_on_batch_head=True. Capture changing values in the mods as tensors,
    not Python numbers: dynamo compiles again for every new Python value it sees.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            raise InvalidInputError(name, "a 4-D tensor", f"{t.dim()}-D shape {tuple(t.shape)}")
    if layout not in ("BSHD", "BHSD"):
        raise UnknownNameError("layout", str(layout), ("BSHD", "BHSD"))
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise InvalidInputError(name, "None or a callable", type(fn).__name__)
    if layout == "BSHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.dtype not in FLOAT_DTYPES:
        raise InvalidInputError("q", f"dtype in {sorted(str(d) for d in FLOAT_DTYPES)}", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise InvalidInputError(name, f"dtype {q.dtype} on {q.device} (as q)", f"{t.dtype} on {t.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or k.shape[3] != D:
        raise InvalidInputError(
            "k/v", f"shapes (B={B}, Hkv, Sk, D={D}) in BHSD order, alike", f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    Hk, Sk = k.shape[1], k.shape[2]
    if Hq % Hk:
        raise InvalidInputError("k", f"a head count dividing q's {Hq} heads", Hk)
    if D < 16:
        raise InvalidInputError("q", "head_dim >= 16 (FlexAttention's minimum)", D)
    device = q.device
    block_mask = None
    if mask_mod is not None:
        dims = (B, Hq) if mask_depends_on_batch_head else (None, None)
        mkey = ("user", mask_mod, *dims, Sq, Sk, device)
        block_mask = _masks.get(mkey)
        if block_mask is None:
            block_mask = _module().create_block_mask(mask_mod, dims[0], dims[1], Sq, Sk, device=device)
            with _lock:
                _masks[mkey] = block_mask
                while len(_masks) > _MAX_CACHED_MASKS:
                    _masks.popitem(last=False)
    ratio = _scale_ratio(scale, D, device)
    user_mod = score_mod
    if ratio is not None:

        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            score = score * ratio
            return score if user_mod is None else user_mod(score, b, h, q_idx, kv_idx)

    nq, nk = -(-Sq // BLOCK_SIZE), -(-Sk // BLOCK_SIZE)
    key = (
        "user",
        device,
        q.dtype,
        Hq,
        Hk,
        D,
        v.shape[-1],
        getattr(user_mod, "__code__", user_mod),
        getattr(mask_mod, "__code__", mask_mod),
        mask_depends_on_batch_head,
        ratio is not None,
        _size_class(B, Sq, Sk, nq, nk),
    )
    out = _run(key, q, k, v, score_mod, block_mask, Hq != Hk)
    _warn_if_recompiling(key, _compiled[key])
    return out.transpose(1, 2) if layout == "BSHD" else out


def _warn_if_recompiling(key: tuple[Any, ...], fn: Any) -> None:
    """User mods that capture changing Python numbers recompile per value: say so before the limit."""
    if key in _warned:
        return
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    if len(_debug_get_cache_entry_list(fn.__lz_code__)) > 2:
        import logging

        _warned.add(key)
        logging.getLogger("layerzero").warning(
            "flex_attention: the score_mod/mask_mod compiled %d times for one shape bucket; they capture Python "
            "values that change between calls. Capture tensors instead: past torch._dynamo.config.recompile_limit "
            "torch runs the unfused, much slower path.",
            len(_debug_get_cache_entry_list(fn.__lz_code__)),
        )


_OPS = ("attention.causal", "attention.full", "attention.sliding_window")
_COMMON: dict[str, Any] = dict(
    ops=_OPS,
    impl=attention,
    dtypes=FLOAT_DTYPES,
    min_head_dim=16,
    max_head_dim=256,
    head_dim_multiple=8,
    supports_window=True,
    supports_softcap=True,
    supports_alibi=True,
    graph_safe=False,
    needs_jit=True,
    check=_check,
)

BACKEND = Backend(
    name="flex",
    module="torch.nn.attention.flex_attention",
    distribution="torch",
    min_version="2.5",
    aliases=("torch_flex", "flex_attention"),
    description="torch FlexAttention compiled by inductor (block-sparse masks, score_mods)",
    kernels=(
        KernelSpec(
            id="flex.attention",
            platforms=frozenset({"cuda"}),
            min_sm=80,
            priority=62,
            description="FlexAttention triton template: causal/window block masks, soft-cap/ALiBi score_mod",
            **_COMMON,
        ),
        KernelSpec(
            id="flex.attention_cpu",
            platforms=frozenset({"cpu"}),
            priority=30,
            description="FlexAttention inductor CPU template (slower than torch's CPU flash kernel; has soft-cap)",
            **_COMMON,
        ),
    ),
)
