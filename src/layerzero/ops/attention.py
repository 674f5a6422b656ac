"""Attention: dense (`lz.attention`), variable-length packed (`lz.attention_varlen`) and paged
KV cache (`lz.paged_attention`).

Semantics shared by every kernel (kernels are tested against backends/reference.py):
- Causal masking is aligned to the bottom-right corner when seq_len_q != seq_len_k: query i sees
  keys up to i + seq_len_k - seq_len_q, as in flash-attn and FlashInfer (what decoding with a KV
  cache needs). With seq_len_q == seq_len_k it is the usual lower-triangular mask.
- window_size=(left, right), flash-attn style: query at position p (bottom-right aligned) sees keys
  in [p - left, p + right]; -1 means unbounded on that side.
- softcap > 0: scores become softcap * tanh(scores / softcap) before masking (Gemma-2).
- alibi_slopes (Hq,) or (B, Hq), float32: scores get -slope * |p - j| added.
- A query row that sees no key gives zeros.

Kernel calling conventions (what KernelSpec.impl receives, already in the kernel's layout):
- dense:  impl(q, k, v, attn_mask, is_causal, dropout_p, scale, window, softcap, alibi_slopes)
- varlen: impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
               window, softcap)            q: (total_q, Hq, D), k/v: (total_k, Hkv, D)
- paged:  impl(q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window, softcap, kv_layout)
          q: (B, Sq, Hq, D); caches (num_pages, page_size, Hkv, D) for NHD or
          (num_pages, Hkv, page_size, D) for HND; page_table (B, max_pages) int32; seq_lens (B,) int32
          counts every cached token of a sequence including the Sq new ones.
window is None or (left, right); softcap is a float (0 = off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..capture import GRAPH_CALL, stream_capturing
from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import LAYOUTS, KernelSpec
from ..state import runtime
from .family import (
    Args,
    OpFamily,
    Shape,
    SolveCode,
    Workload,
    compile_flags,
    dynamo_compiling,
    randn,
    register_family,
)

_grad_enabled = torch.is_grad_enabled
KV_LAYOUTS = ("NHD", "HND")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with the fastest kernel that can run these inputs.

    q: (B, Sq, Hq, D) in BSHD or (B, Hq, Sq, D) in BHSD; k, v: the same with Sk and Hkv heads,
    Hq a multiple of Hkv (GQA/MQA). layout: "BSHD" (None, the default, means BSHD) or "BHSD".
    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk) whatever
    the layout. Returns the output in q's layout. Tensors given without layout= whose strides are
    those of BHSD tensors (heads outer to the sequence, as after `.transpose(1, 2)`) cost a warning
    on the call's selection; pass layout= to say which they are.
    """
    if window_size is not None:  # lists are not hashable and (-1, -1) is no window: normalize before the key
        window_size = _check_options(window_size, softcap, scale)
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(
            ATTENTION, q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window_size, softcap, alibi_slopes
        )
    try:
        key = _key(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window_size, softcap, alibi_slopes)
    except AttributeError:
        _check_tensors(q=q, k=k, v=v, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        args = (q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window_size, softcap, alibi_slopes)
        plan = runtime.plan(ATTENTION, key, args, {})
    try:
        return plan.run(q, k, v, attn_mask, is_causal, dropout_p, scale, window_size, softcap, alibi_slopes)
    except Exception as error:
        return plan.recover(error, q, k, v, attn_mask, is_causal, dropout_p, scale, window_size, softcap, alibi_slopes)


# ----------------------------------------------------------------------------- the plan-cache key
# (the call above and lz.select / explain / which use this one function: OpFamily.key)


def _key(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str | None = None,
    window_size: Any = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
) -> tuple[Any, ...]:
    """The plan-cache key: everything selection depends on, nothing it does not (not scale).

    Hot path: every term is an attribute read or a C call (graph_mode inlined for CUDA tensors).
    Strides are not in it (reading them would cost every call): the BHSD-strides warning of
    _context fires on the miss of each key, so a plan first selected from tensors without that
    pattern (lz.warmup's, say) serves later calls of the same key silently. layout None (not
    given) and "BSHD" are different keys: only the first can warn.
    """
    return (
        "attention",
        layout,
        q.shape,
        k.shape,
        v.shape,
        q.dtype,
        k.dtype,
        v.dtype,
        q.device,
        k.device,
        v.device,
        None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device),
        is_causal,
        dropout_p > 0.0,
        None if window_size is None else tuple(window_size),
        softcap > 0.0,
        None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.dtype, alibi_slopes.device),
        _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        q.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _hashable(window_size: Any) -> Any:
    """A window as a key part: lists become tuples (explain/select build keys from raw arguments)."""
    return window_size if window_size is None or isinstance(window_size, tuple) else tuple(window_size)


# ----------------------------------------------------------------------------- the context (miss path only)


def _check_tensors(**tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, seq, heads, head_dim) of a 4-D tensor in `layout`."""
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "BSHD" else (b, y, x, d)


def _shape_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> InvalidInputError | None:
    B, Sq, Hq, D = _dims(q, layout)
    Bk, Sk, Hk, Dk = _dims(k, layout)
    Bv, Sv, Hv, Dv = _dims(v, layout)
    if Bk != B:
        return InvalidInputError("k", f"batch {B} (as q)", Bk)
    if Bv != B:
        return InvalidInputError("v", f"batch {B} (as q)", Bv)
    if Dk != D:
        return InvalidInputError("k", f"head_dim {D} (as q)", Dk)
    if Sv != Sk:
        return InvalidInputError("v", f"seq_len {Sk} (as k) in {layout}", Sv)
    return _heads_problem(Hq, Hk, Hv, f" in {layout}")


def _heads_problem(Hq: int, Hk: int, Hv: int, where: str = "") -> InvalidInputError | None:
    if Hv != Hk:
        return InvalidInputError("v", f"{Hk} heads (as k){where}", Hv)
    if Hk == 0 or Hq % Hk:
        return InvalidInputError("k", f"a head count dividing q's {Hq} heads (GQA/MQA){where}", Hk)
    return None


def _same_dtype_device(q: torch.Tensor, **others: torch.Tensor) -> None:
    if not q.is_floating_point():
        raise InvalidInputError("q", "a floating-point dtype", q.dtype)
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise InvalidInputError(name, f"dtype {q.dtype} (as q)", t.dtype)
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (as q)", t.device)


def _check_options(window_size: Any, softcap: float, scale: float | None) -> tuple[int, int] | None:
    """Validated window (None when unbounded on both sides)."""
    if window_size is not None:
        ok = (
            isinstance(window_size, tuple | list)
            and len(window_size) == 2
            and all(isinstance(w, int) and w >= -1 for w in window_size)
        )
        if not ok:
            raise InvalidInputError("window_size", "(left, right) ints >= -1 (-1 = unbounded)", window_size)
        window_size = (int(window_size[0]), int(window_size[1]))
        if window_size == (-1, -1):
            window_size = None
    if not isinstance(softcap, int | float) or softcap < 0:
        raise InvalidInputError("softcap", "a float >= 0 (0 = off)", softcap)
    if scale is not None and not isinstance(scale, int | float):
        raise InvalidInputError("scale", "None or a float", type(scale).__name__)
    return window_size


def _check_alibi(alibi_slopes: torch.Tensor | None, batch: int, heads: int, device: torch.device) -> None:
    if alibi_slopes is None:
        return
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise InvalidInputError("alibi_slopes", f"shape ({heads},) or ({batch}, {heads})", tuple(alibi_slopes.shape))
    if alibi_slopes.dtype != torch.float32:
        raise InvalidInputError("alibi_slopes", "dtype torch.float32", alibi_slopes.dtype)
    if alibi_slopes.device != device:
        raise InvalidInputError("alibi_slopes", f"device {device} (as q)", alibi_slopes.device)


def _op_id(is_causal: bool, window: Any, masked: bool) -> str:
    if window is not None:
        return "attention.sliding_window"
    if is_causal:
        return "attention.causal"
    return "attention.masked" if masked else "attention.full"


def _valid_dims(
    q: Any, k: Any, v: Any, attn_mask: Any, alibi_slopes: Any, layout: str
) -> tuple[int, int, int, int, int, int, int] | None:
    """(B, Sq, Hq, D, Sk, Hkv, Dv) when _checked_dims would accept q, k, v, else None.

    The same checks in one pass over each tensor's facts, for the common valid call (a third of
    the cost of _checked_dims); what it does not accept goes to _checked_dims for the error.
    """
    if not (
        isinstance(q, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and isinstance(v, torch.Tensor)
        and (attn_mask is None or isinstance(attn_mask, torch.Tensor))
        and (alibi_slopes is None or isinstance(alibi_slopes, torch.Tensor))
    ):
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    if layout == "BSHD":
        (B, Sq, Hq, D), (Bk, Sk, Hk, Dk), (Bv, Sv, Hv, Dv) = qs, ks, vs
    elif layout == "BHSD":
        (B, Hq, Sq, D), (Bk, Hk, Sk, Dk), (Bv, Hv, Sv, Dv) = qs, ks, vs
    else:
        return None
    dtype, device = q.dtype, q.device
    if not (
        dtype.is_floating_point
        and k.dtype is dtype
        and v.dtype is dtype
        and k.device == device
        and v.device == device
        and Bk == B
        and Bv == B
        and Dk == D
        and Sv == Sk
        and Hv == Hk
        and Hk
        and not Hq % Hk
    ):
        return None
    return B, Sq, Hq, D, Sk, Hk, Dv


def _checked_dims(
    q: Any, k: Any, v: Any, attn_mask: Any, alibi_slopes: Any, layout: str
) -> tuple[int, int, int, int, int, int, int]:
    """(B, Sq, Hq, D, Sk, Hkv, Dv) of q, k, v, checked one fact at a time: raises the error naming
    the first problem (argument types, layout, ranks, dtypes and devices, then shapes)."""
    _check_tensors(q=q, k=k, v=v, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
    if layout not in LAYOUTS:
        raise UnknownNameError("layout", str(layout), LAYOUTS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InvalidInputError(
                name,
                f"a 4-D tensor ({'B, S, H, D' if layout == 'BSHD' else 'B, H, S, D'})",
                f"{t.dim()}-D shape {tuple(t.shape)}",
            )
    _same_dtype_device(q, k=k, v=v)
    problem = _shape_problem(q, k, v, layout)
    if problem is not None:
        other = "BHSD" if layout == "BSHD" else "BSHD"
        if _shape_problem(q, k, v, other) is None:
            raise InvalidInputError(
                problem.argument,
                problem.expected,
                problem.got,
                f"the shapes fit layout={other!r}; pass layout={other!r} if that is what they are",
            )
        raise problem
    B, Sq, Hq, D = _dims(q, layout)
    _, Sk, Hk, _ = _dims(k, layout)
    return B, Sq, Hq, D, Sk, Hk, v.shape[-1]


def _bhsd_strides(*tensors: torch.Tensor) -> bool:
    """Whether a 4-D tensor read as BSHD has its heads axis outer to its sequence axis (stride(2) >
    stride(1), both longer than 1): the strides of a BHSD tensor made by `.view(B, S, H, D)
    .transpose(1, 2)`, the usual way models build q, k, v."""
    for t in tensors:
        _, s, h, _ = t.shape
        if s > 1 and h > 1 and t.stride(2) > t.stride(1):
            return True
    return False


def _warn_bhsd_strides(q: torch.Tensor) -> None:
    B, S, H, D = q.shape
    runtime.warn_once(
        ("attention-bhsd-strides",),
        (
            f"lz.attention: q, k, v given without layout= are read as BSHD (B, S, H, D): q {tuple(q.shape)} as B={B}, "
            f"S={S}, H={H}, D={D}; but their strides are those of BHSD tensors (heads outer to the sequence, as after "
            '.transpose(1, 2)). If they are (B, H, S, D), pass layout="BHSD" (the output is then BHSD too); if '
            'they are BSHD, pass layout="BSHD" to say so. (Warned once.)'
        ),
    )


def _context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> SelectionContext:
    """Validate the inputs and describe the call (miss path only)."""
    given = layout is not None
    if not given:
        layout = "BSHD"
    dims = _valid_dims(q, k, v, attn_mask, alibi_slopes, layout)
    if dims is None:
        dims = _checked_dims(q, k, v, attn_mask, alibi_slopes, layout)
    bhsd_strides = not given and _bhsd_strides(q, k, v)
    if bhsd_strides:
        _warn_bhsd_strides(q)
    B, Sq, Hq, D, Sk, Hk, Dv = dims
    window = _check_options(window_size, softcap, scale)
    dtype, device = q.dtype, q.device
    _check_alibi(alibi_slopes, B, Hq, device)
    mask_kind = "none"
    if attn_mask is not None:
        if is_causal:
            raise InvalidInputError(
                "attn_mask",
                "None when is_causal=True (give a mask or is_causal, not both)",
                f"a {tuple(attn_mask.shape)} mask",
            )
        if attn_mask.dtype == torch.bool:
            mask_kind = "bool"
        elif attn_mask.dtype == dtype:
            mask_kind = "float"
        else:
            raise InvalidInputError("attn_mask", f"dtype torch.bool or {dtype} (additive, as q)", attn_mask.dtype)
        if attn_mask.device != device:
            raise InvalidInputError("attn_mask", f"device {device} (as q)", attn_mask.device)
        target = (B, Hq, Sq, Sk)
        shape = tuple(attn_mask.shape)
        if not 2 <= len(shape) <= 4 or any(
            m not in (1, t) for m, t in zip(reversed(shape), reversed(target), strict=False)
        ):
            raise InvalidInputError("attn_mask", f"a shape broadcastable to (B, Hq, Sq, Sk) = {target}", shape)
    if not isinstance(dropout_p, int | float) or not 0.0 <= dropout_p < 1.0:
        raise InvalidInputError("dropout_p", "a probability in [0, 1)", dropout_p)
    return SelectionContext(
        op=_op_id(is_causal, window, attn_mask is not None),
        **SelectionContext.device_fields(device),  # type: ignore[arg-type]
        dtype=dtype,
        batch=B,
        seq_len_q=Sq,
        seq_len_k=Sk,
        num_heads=Hq,
        num_kv_heads=Hk,
        head_dim=D,
        head_dim_v=Dv,
        layout=layout,
        is_causal=bool(is_causal),
        mask_kind=mask_kind,
        window=window,
        softcap=float(softcap),
        alibi=alibi_slopes is not None,
        dropout=dropout_p > 0.0,
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        bhsd_strides=bhsd_strides,
    )


# ----------------------------------------------------------------------------- binding a kernel to the call


def _transforms(spec: KernelSpec, ctx: SelectionContext) -> tuple[str, ...]:
    out = []
    if ctx.layout in LAYOUTS and spec.layout != ctx.layout:
        out.append(f"{ctx.layout}->{spec.layout}")
    if spec.requires_contiguous:
        out.append("contiguous")
    return tuple(out)


def _bind(spec: KernelSpec, ctx: SelectionContext) -> tuple[Callable[..., torch.Tensor], tuple[str, ...]]:
    impl = spec.impl
    transforms = _transforms(spec, ctx)
    contiguous = spec.requires_contiguous
    if spec.layout == ctx.layout and not contiguous:
        return impl, transforms
    transpose = spec.layout != ctx.layout
    if not contiguous:  # the common wrapper (BSHD inputs, a BHSD kernel), with one cell for the GC to visit

        def transposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any) -> torch.Tensor:
            return impl(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *rest).transpose(1, 2)

        return transposed, transforms

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any) -> torch.Tensor:
        if transpose:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = impl(q.contiguous(), k.contiguous(), v.contiguous(), *rest)
        return out.transpose(1, 2) if transpose else out

    return run, transforms


# ----------------------------------------------------------------------------- torch.compile / torch.export


def _real(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str | None = None,
    window_size: Sequence[int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The real kernel of torch.ops.layerzero.attention (ops/library.py; its schema comes from these
    hints): lz.attention, its output in fixed strides (contiguous BSHD memory, in the layout of q)."""
    window = None if window_size is None else (int(window_size[0]), int(window_size[1]))
    out = attention(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, alibi_slopes)
    if layout == "BHSD":
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out.contiguous()


def _fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str | None = None,
    window_size: Sequence[int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Its fake kernel: the checks of _context, and an empty output with the real kernel's strides."""
    window = None if window_size is None else (int(window_size[0]), int(window_size[1]))
    _context(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, alibi_slopes)
    if layout == "BHSD":
        B, H, S, _ = q.shape
        return q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ----------------------------------------------------------------------------- measuring and solving
# How lz.tune / lz.warmup / benchmarks build attention calls (perf/workloads.py), and how lz.solve
# calls its kernels without the engine (perf/solve.py).


def _workload(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    b, sq, sk, hq, hkv, d, causal = shape
    q = randn((b, sq, hq, d), dtype, device, gen)
    k = randn((b, sk, hkv, d), dtype, device, gen)
    v = randn((b, sk, hkv, d), dtype, device, gen)
    return (q, k, v, None, bool(causal))


def _workload_view(args: Args) -> tuple[Args, Callable[[Any], Any]]:
    """Batch 0 and the query heads of the first KV head: memory Sq*Sk*group, whatever the batch."""
    q, k, v, *rest = args
    group = q.shape[2] // k.shape[2]
    return (q[:1, :, :group], k[:1, :, :1], v[:1, :, :1], *rest), lambda out: out[:1, :, :group]


def _workload_ext(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    """attention_ext: the options of Mistral / Gemma-2 layers. window > 0 is window_size=(window, 0)
    when causal, (window, window) otherwise; softcap > 0 caps the scores."""
    *dense, window, softcap = shape
    q, k, v, mask, causal = _workload(tuple(dense), dtype, device, gen)
    window_size = (window, 0 if causal else window) if window > 0 else None
    return (q, k, v, mask, causal, 0.0, None, "BSHD", window_size, float(softcap))


_DIMS = ("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "causal")
WORKLOADS = (
    Workload(
        "attention",
        _DIMS,
        ("batch", "seq_q", "seq_k"),
        _workload,
        _workload_view,
        op_ids={
            "attention.causal": {"causal": 1},
            "attention.full": {"causal": 0},
            "attention.decode": {"seq_q": 1, "causal": 0},
        },
    ),
    Workload(
        "attention_ext", (*_DIMS, "window", "softcap"), ("batch", "seq_q", "seq_k"), _workload_ext, _workload_view
    ),
)
SOLVE = SolveCode(
    handled=("q", "k", "v", "is_causal", "scale"),
    required=(),
    first="q",
    tensors=("q", "k", "v"),
    prologue=(
        "qs = q.shape",
        "ks = k.shape",
        "dt = q.dtype",
        "if len(qs) == 4 and len(ks) == 4 and v.shape == ks and k.dtype is dt and v.dtype is dt:",
        "    B, Sq, Hq, D = qs",
        "    Bk, Sk, Hkv, Dk = ks",
        "    if Bk == B and Dk == D:",
    ),
    names={
        "batch": "B",
        "seq_q": "Sq",
        "seq_k": "Sk",
        "heads": "Hq",
        "kv_heads": "Hkv",
        "head_dim": "D",
        "causal": "is_causal",
    },
    call="{K}({q}, {k}, {v}, attn_mask, is_causal, dropout_p, scale, window_size, softcap, alibi_slopes){post}",
    transposed=("q", "k", "v"),
    contiguous=("q", "k", "v"),
    square=("seq_q", "seq_k"),
)


ATTENTION = register_family(
    OpFamily(
        "attention",
        _key,
        _context,
        _bind,
        _transforms,
        function=attention,
        library=True,
        real=_real,
        fake=_fake,
        workloads=WORKLOADS,
        solve=SOLVE,
    )
)


# ----------------------------------------------------------------------------- varlen (packed)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention over a batch of packed sequences of different lengths (flash-attn varlen / FlashInfer ragged).

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k: (B + 1,) int32 prefix sums of the
    lengths. max_seqlen_q/k: the longest sequence (a hint for kernels). Returns (total_q, Hq, D).
    """
    if window_size is not None:  # lists are not hashable and (-1, -1) is no window: normalize before the key
        window_size = _check_options(window_size, softcap, scale)
    try:
        key = _varlen_key(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window_size, softcap
        )
    except AttributeError:
        _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window_size, softcap)
        plan = runtime.plan(ATTENTION_VARLEN, key, args, {})
    try:
        return plan.run(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window_size, softcap
        )
    except Exception as error:
        return plan.recover(
            error,
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            is_causal,
            scale,
            window_size,
            softcap,
        )


def _varlen_key(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: Any = None,
    softcap: float = 0.0,
) -> tuple[Any, ...]:
    return (
        "attention.varlen",
        q.shape[1:],
        k.shape[1:],
        v.shape[1:],
        q.dtype,
        k.dtype,
        v.dtype,
        q.device,
        k.device,
        v.device,
        cu_seqlens_q.shape,
        cu_seqlens_q.dtype,
        cu_seqlens_k.shape,
        cu_seqlens_k.dtype,
        is_causal,
        _hashable(window_size),
        softcap > 0.0,
        _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        q.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _varlen_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
) -> SelectionContext:
    _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise InvalidInputError(
                name, "a 3-D packed tensor (total_tokens, H, D)", f"{t.dim()}-D shape {tuple(t.shape)}"
            )
    _same_dtype_device(q, k=k, v=v)
    if k.shape[0] != v.shape[0]:
        raise InvalidInputError("v", f"{k.shape[0]} tokens (as k)", v.shape[0])
    if k.shape[2] != q.shape[2]:
        raise InvalidInputError("k", f"head_dim {q.shape[2]} (as q)", k.shape[2])
    problem = _heads_problem(q.shape[1], k.shape[1], v.shape[1])
    if problem is not None:
        raise problem
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            raise InvalidInputError(
                name, "a 1-D int32 tensor of B + 1 prefix sums", f"{cu.dtype} shape {tuple(cu.shape)}"
            )
        if cu.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (as q)", cu.device)
        first, last = int(cu[0]), int(cu[-1])
        if first != 0 or last != total or bool((cu[1:] < cu[:-1]).any()):
            raise InvalidInputError(name, f"non-decreasing prefix sums from 0 to {total}", cu.tolist())
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise InvalidInputError(
            "cu_seqlens_k", f"{cu_seqlens_q.numel()} entries (as cu_seqlens_q)", cu_seqlens_k.numel()
        )
    lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    longest_q, longest_k = int(lens_q.max()), int(lens_k.max())
    if max_seqlen_q < longest_q or max_seqlen_k < longest_k:
        raise InvalidInputError(
            "max_seqlen_q/max_seqlen_k",
            f">= the longest sequences ({longest_q}, {longest_k})",
            (max_seqlen_q, max_seqlen_k),
        )
    window = _check_options(window_size, softcap, scale)
    return SelectionContext(
        op="attention.varlen",
        **SelectionContext.device_fields(q.device),  # type: ignore[arg-type]
        dtype=q.dtype,
        batch=cu_seqlens_q.numel() - 1,
        seq_len_q=max_seqlen_q,
        seq_len_k=max_seqlen_k,
        num_heads=q.shape[1],
        num_kv_heads=k.shape[1],
        head_dim=q.shape[2],
        head_dim_v=v.shape[2],
        layout="THD",
        is_causal=bool(is_causal),
        window=window,
        softcap=float(softcap),
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )


ATTENTION_VARLEN = register_family(
    OpFamily("attention_varlen", _varlen_key, _varlen_context, function=attention_varlen)
)


# ----------------------------------------------------------------------------- paged KV cache


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    kv_layout: str = "NHD",
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of new query tokens over a paged KV cache (decode when Sq == 1, else chunked prefill).

    q: (B, Sq, Hq, D); k_cache, v_cache: (num_pages, page_size, Hkv, D) for kv_layout="NHD" or
    (num_pages, Hkv, page_size, D) for "HND"; page_table: (B, max_pages) int32 page ids (vLLM block
    table); seq_lens: (B,) int32 cached tokens per sequence, the Sq new ones included (they are
    already written to the cache). Returns (B, Sq, Hq, D).
    """
    if window_size is not None:  # lists are not hashable and (-1, -1) is no window: normalize before the key
        window_size = _check_options(window_size, softcap, scale)
    try:
        key = _paged_key(q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, kv_layout, window_size, softcap)
    except AttributeError:
        _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        args = (q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, kv_layout, window_size, softcap)
        plan = runtime.plan(PAGED_ATTENTION, key, args, {})
    try:
        return plan.run(q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window_size, softcap, kv_layout)
    except Exception as error:
        return plan.recover(
            error, q, k_cache, v_cache, page_table, seq_lens, is_causal, scale, window_size, softcap, kv_layout
        )


def _paged_key(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    page_table: Any,
    seq_lens: Any,
    is_causal: bool = True,
    scale: float | None = None,
    kv_layout: str = "NHD",
    window_size: Any = None,
    softcap: float = 0.0,
) -> tuple[Any, ...]:
    return (
        "attention.paged",
        kv_layout,
        q.shape,
        k_cache.shape,
        v_cache.shape,
        q.dtype,
        k_cache.dtype,
        v_cache.dtype,
        q.device,
        k_cache.device,
        page_table.shape,
        page_table.dtype,
        seq_lens.shape,
        seq_lens.dtype,
        is_causal,
        _hashable(window_size),
        softcap > 0.0,
        q.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _paged_context(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    kv_layout: str = "NHD",
    window_size: tuple[int, int] | None = None,
    softcap: float = 0.0,
) -> SelectionContext:
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
    if kv_layout not in KV_LAYOUTS:
        raise UnknownNameError("kv_layout", str(kv_layout), KV_LAYOUTS)
    if q.dim() != 4:
        raise InvalidInputError("q", "a 4-D tensor (B, Sq, Hq, D)", f"{q.dim()}-D shape {tuple(q.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            dims = "(num_pages, page_size, Hkv, D)" if kv_layout == "NHD" else "(num_pages, Hkv, page_size, D)"
            raise InvalidInputError(name, f"a 4-D tensor {dims}", f"{t.dim()}-D shape {tuple(t.shape)}")
    _same_dtype_device(q, k_cache=k_cache, v_cache=v_cache)
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise InvalidInputError(
            "v_cache", f"leading shape {tuple(k_cache.shape[:3])} (as k_cache)", tuple(v_cache.shape)
        )
    B, Sq, Hq, D = q.shape
    num_pages, a, b, Dk = k_cache.shape
    page_size, Hk = (a, b) if kv_layout == "NHD" else (b, a)
    if Dk != D:
        raise InvalidInputError("k_cache", f"head_dim {D} (as q)", Dk)
    problem = _heads_problem(Hq, Hk, Hk, f" (kv_layout {kv_layout})")
    if problem is not None:
        other = "HND" if kv_layout == "NHD" else "NHD"
        raise InvalidInputError(
            "k_cache",
            problem.expected,
            problem.got,
            f"check kv_layout (given {kv_layout!r}; {other!r} would read the heads from the other axis)",
        )
    for name, t, shape in (("page_table", page_table, f"({B}, max_pages)"), ("seq_lens", seq_lens, f"({B},)")):
        if t.dtype != torch.int32:
            raise InvalidInputError(name, "dtype torch.int32", t.dtype)
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (as q)", t.device)
        if t.shape[0] != B or t.dim() != (2 if name == "page_table" else 1):
            raise InvalidInputError(name, f"shape {shape}", tuple(t.shape))
    if not q.is_cuda or not torch.cuda.is_current_stream_capturing():  # no value reads while a stream captures
        lens = seq_lens.tolist()
        capacity = page_table.shape[1] * page_size
        if min(lens) < Sq or max(lens) > capacity:
            raise InvalidInputError("seq_lens", f"values in [{Sq}, {capacity}] (Sq .. max_pages * page_size)", lens)
    window = _check_options(window_size, softcap, scale)
    return SelectionContext(
        op="attention.decode" if Sq == 1 else "attention.paged",
        **SelectionContext.device_fields(q.device),  # type: ignore[arg-type]
        dtype=q.dtype,
        batch=B,
        seq_len_q=Sq,
        seq_len_k=page_table.shape[1] * page_size,
        num_heads=Hq,
        num_kv_heads=Hk,
        head_dim=D,
        head_dim_v=v_cache.shape[-1],
        layout="BSHD",
        is_causal=bool(is_causal),
        window=window,
        softcap=float(softcap),
        kv_layout=kv_layout,
        page_size=page_size,
    )


def _paged_workload(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    """(batch, seq_q, seq_k, heads, kv_heads, head_dim, page_size): an NHD cache whose pages are shuffled
    (as a serving allocator leaves them), every sequence seq_k tokens long (make seq_k a multiple of
    page_size: the context's seq_len_k is the page table's capacity)."""
    b, sq, sk, hq, hkv, d, page = shape
    sk = max(sk, sq, 1)
    per_seq = -(-sk // page)
    q = randn((b, sq, hq, d), dtype, device, gen)
    k_cache = randn((b * per_seq, page, hkv, d), dtype, device, gen)
    v_cache = randn((b * per_seq, page, hkv, d), dtype, device, gen)
    order = torch.randperm(b * per_seq, generator=gen, device=device)
    page_table = order.view(b, per_seq).to(torch.int32)
    seq_lens = torch.full((b,), sk, dtype=torch.int32, device=device)
    return (q, k_cache, v_cache, page_table, seq_lens)


def _paged_view(args: Args) -> tuple[Args, Callable[[Any], Any]]:
    """Sequence 0 only (its pages stay where they are in the shared cache)."""
    q, k_cache, v_cache, page_table, seq_lens, *rest = args
    return (q[:1], k_cache, v_cache, page_table[:1], seq_lens[:1], *rest), lambda out: out[:1]


PAGED_WORKLOAD = Workload(
    "paged_attention",
    ("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "page_size"),
    ("batch", "seq_k"),
    _paged_workload,
    _paged_view,
    op_ids={"attention.paged": {}},
)
PAGED_ATTENTION = register_family(
    OpFamily("paged_attention", _paged_key, _paged_context, function=paged_attention, workloads=(PAGED_WORKLOAD,))
)
