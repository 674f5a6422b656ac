"""Position encodings: `lz.rope`, `lz.rope_qk`, the cos/sin builder `lz.rope_cache`, and
`lz.alibi_slopes` (ALiBi itself runs inside `lz.attention(alibi_slopes=...)`).

RoPE conventions (those of Hugging Face transformers, which Liger follows too):
- x: (B, S, H, D) in BSHD (default) or (B, H, S, D) in BHSD.
- cos, sin: (S, R) or (B, S, R) / (1, S, R), as HF's rotary embeddings return them, where R (the
  rotary dim, even, <= D) is `cat(freqs, freqs)`: its two halves are equal. Only the first R/2
  entries (the angle of each rotated pair) are read. With `position_ids` ((S,) or (B, S) ints),
  cos/sin are a cache (max_positions, R) indexed by position instead. Position values are checked
  when a plan is built (first call per shape) and on CPU on every call; on CUDA a later
  out-of-range position is a device-side error, to keep the hot path free of host syncs.
- interleaved=False (NeoX/Llama): pair i is (x[i], x[i + R/2]).
  interleaved=True (GPT-J): pair i is (x[2i], x[2i + 1]).
  Both rotate pair i by the angle of cos[..., i]; dims R..D pass through unchanged (partial rotary).
- Outputs are new tensors in x's layout and dtype; inputs are never modified.

Kernel calling convention (op ids `posenc.rope` and `posenc.rope_interleaved`):
    impl(q, k, cos, sin) -> (q_out, k_out)
q: (B, S, Hq, D), k: (B, S, Hk, D) or None (then k_out is None), both in BSHD;
cos, sin: (1 or B, S, R) in any float dtype (kernels compute in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..capture import GRAPH_CALL, stream_capturing
from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import LAYOUTS, KernelSpec
from ..state import runtime
from .family import Args, OpFamily, Shape, Workload, compile_flags, dynamo_compiling, randn, register_family

_grad_enabled = torch.is_grad_enabled


def _tkey(t: Any) -> Any:
    return None if t is None else (t.shape, t.dtype, t.device)


def _key(
    q: Any, k: Any, cos: Any, sin: Any, interleaved: bool = False, position_ids: Any = None, layout: str = "BSHD"
) -> tuple[Any, ...]:
    grad = _grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
    return (
        "posenc.rope",
        bool(interleaved),
        layout,
        _tkey(q),
        _tkey(k),
        _tkey(cos),
        _tkey(sin),
        _tkey(position_ids),
        grad,
        q.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> torch.Tensor:
    """Rotary position embedding of one tensor. x: (B, S, H, D) (or BHSD with layout="BHSD").

    cos/sin: (S, R), (B, S, R), or a (max_positions, R) cache with position_ids; see the module doc.
    """
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(ROPE, x, cos, sin, interleaved, position_ids, layout)
    try:
        key = _rope_key(x, cos, sin, interleaved, position_ids, layout)
    except AttributeError:
        _check_tensors(x=x, cos=cos, sin=sin, position_ids=position_ids)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(ROPE, key, (x, cos, sin, interleaved, position_ids, layout), {})
    cos, sin = _angles(cos, sin, position_ids, x.device)
    try:
        return plan.run(x, None, cos, sin)[0]
    except Exception as error:
        return plan.recover(error, x, None, cos, sin)[0]


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of queries and keys in one call (one kernel launch where the backend fuses them).

    q: (B, S, Hq, D), k: (B, S, Hk, D) (GQA: Hk may differ), same layout; returns (q_out, k_out).
    """
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(ROPE_QK, q, k, cos, sin, interleaved, position_ids, layout)
    try:
        key = _key(q, k, cos, sin, interleaved, position_ids, layout)
    except AttributeError:
        _check_tensors(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(ROPE_QK, key, (q, k, cos, sin, interleaved, position_ids, layout), {})
    cos, sin = _angles(cos, sin, position_ids, q.device)
    try:
        return plan.run(q, k, cos, sin)
    except Exception as error:
        return plan.recover(error, q, k, cos, sin)


def _angles(
    cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as (1 or B, S, R): gathered by position_ids, or with a batch dim added."""
    if position_ids is None:
        return (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
    if device.type == "cpu":
        _check_positions(position_ids, cos.shape[0])
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    return cos[pos], sin[pos]


def _check_positions(position_ids: torch.Tensor, max_positions: int) -> None:
    if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= max_positions):
        raise InvalidInputError(
            "position_ids",
            f"values in [0, {max_positions}) (rows of the cos/sin cache)",
            f"range [{int(position_ids.min())}, {int(position_ids.max())}]",
        )


def _check_tensors(**tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _context(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> SelectionContext:
    """Validate the inputs and describe the call (miss path only)."""
    qname = "x" if k is None else "q"
    _check_tensors(**{qname: q}, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if layout not in LAYOUTS:
        raise UnknownNameError("layout", str(layout), LAYOUTS)
    if not isinstance(interleaved, bool):
        raise InvalidInputError("interleaved", "a bool", interleaved)
    dims = "B, S, H, D" if layout == "BSHD" else "B, H, S, D"
    if q.dim() != 4:
        raise InvalidInputError(qname, f"a 4-D tensor ({dims})", f"{q.dim()}-D shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise InvalidInputError(qname, "a floating-point dtype", q.dtype)
    B, S, H, D = q.shape if layout == "BSHD" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    Hk = 0
    if k is not None:
        if k.dim() != 4:
            raise InvalidInputError("k", f"a 4-D tensor ({dims})", f"{k.dim()}-D shape {tuple(k.shape)}")
        Bk, Sk, Hk, Dk = k.shape if layout == "BSHD" else (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
        if (Bk, Sk, Dk) != (B, S, D):
            raise InvalidInputError("k", f"batch, seq_len, head_dim = {(B, S, D)} (as q) in {layout}", (Bk, Sk, Dk))
        if k.dtype != q.dtype:
            raise InvalidInputError("k", f"dtype {q.dtype} (as q)", k.dtype)
        if k.device != q.device:
            raise InvalidInputError("k", f"device {q.device} (as q)", k.device)
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise InvalidInputError(name, "a floating-point dtype", t.dtype)
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (as {qname})", t.device)
    if sin.shape != cos.shape:
        raise InvalidInputError("sin", f"shape {tuple(cos.shape)} (as cos)", tuple(sin.shape))
    R = cos.shape[-1] if cos.dim() else 0
    if position_ids is None:
        ok = cos.dim() == 2 and cos.shape[0] == S or cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == S
        if not ok:
            raise InvalidInputError(
                "cos",
                f"shape (S, R) or (1 or B, S, R) with S = {S}, B = {B}",
                tuple(cos.shape),
                "or pass position_ids to index a (max_positions, R) cache",
            )
    else:
        if position_ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError("position_ids", "dtype torch.int64 or torch.int32", position_ids.dtype)
        if tuple(position_ids.shape) not in ((S,), (B, S)):
            raise InvalidInputError("position_ids", f"shape ({S},) or ({B}, {S})", tuple(position_ids.shape))
        if position_ids.device != q.device:
            raise InvalidInputError("position_ids", f"device {q.device}", position_ids.device)
        if cos.dim() != 2:
            raise InvalidInputError(
                "cos", "a 2-D (max_positions, R) cache when position_ids is given", tuple(cos.shape)
            )
        _check_positions(position_ids, cos.shape[0])
    if R % 2 or not 2 <= R <= D:
        raise InvalidInputError("cos", f"an even rotary dim R (last dimension) in [2, head_dim {D}]", R)
    return SelectionContext(
        op="posenc.rope_interleaved" if interleaved else "posenc.rope",
        **SelectionContext.device_fields(q.device),  # type: ignore[arg-type]
        dtype=q.dtype,
        batch=B,
        seq_len_q=S,
        seq_len_k=S,
        num_heads=H,
        num_kv_heads=Hk or H,
        head_dim=D,
        head_dim_v=D,
        layout=layout,
        num_rows=B * S,
        hidden_size=R,
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)),
    )


def _transforms(spec: KernelSpec, ctx: SelectionContext) -> tuple[str, ...]:
    out = []
    if spec.layout != ctx.layout:
        out.append(f"{ctx.layout}->{spec.layout}")
    if spec.requires_contiguous:
        out.append("contiguous")
    return tuple(out)


def _bind(spec: KernelSpec, ctx: SelectionContext) -> tuple[Callable[..., Any], tuple[str, ...]]:
    impl, transforms = spec.impl, _transforms(spec, ctx)
    if not transforms:
        return impl, ()
    transpose, contiguous = spec.layout != ctx.layout, spec.requires_contiguous

    def run(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        if transpose:
            q, k = q.transpose(1, 2), (None if k is None else k.transpose(1, 2))
        if contiguous:
            q, k = q.contiguous(), (None if k is None else k.contiguous())
        qo, ko = impl(q, k, cos, sin)
        if transpose:
            qo, ko = qo.transpose(1, 2), (None if ko is None else ko.transpose(1, 2))
        return qo, ko

    return run, transforms


def _rope_key(
    x: Any, cos: Any, sin: Any, interleaved: bool = False, position_ids: Any = None, layout: str = "BSHD"
) -> tuple[Any, ...]:
    """rope's key: rope_qk's (_key) with k None, computed in one frame."""
    return (
        "posenc.rope",
        bool(interleaved),
        layout,
        _tkey(x),
        None,
        _tkey(cos),
        _tkey(sin),
        _tkey(position_ids),
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _rope_context(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> SelectionContext:
    return _context(x, None, cos, sin, interleaved, position_ids, layout)


def _rope_fake(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> torch.Tensor:
    """The fake kernel of torch.ops.layerzero.rope (ops/library.py)."""
    if position_ids is None:  # with position_ids the checks read the positions: the real kernel does them
        _context(x, None, cos, sin, interleaved, None, layout)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_qk_real(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real kernel of torch.ops.layerzero.rope_qk: rope_qk with contiguous outputs."""
    qo, ko = rope_qk(q, k, cos, sin, interleaved, position_ids, layout)
    return qo.contiguous(), ko.contiguous()


def _rope_qk_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    layout: str = "BSHD",
) -> tuple[torch.Tensor, torch.Tensor]:
    if position_ids is None:
        _context(q, k, cos, sin, interleaved, None, layout)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )


def _rope_workload(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    """rope_qk's workload (batch, seq, heads, kv_heads, head_dim): q and k in BSHD, a full-width
    (seq, head_dim) cos/sin."""
    b, s, hq, hkv, d = shape
    q = randn((b, s, hq, d), dtype, device, gen)
    k = randn((b, s, hkv, d), dtype, device, gen)
    angles = torch.rand((s, d // 2), generator=gen, device=device, dtype=torch.float32) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    return (q, k, angles.cos().to(dtype), angles.sin().to(dtype))


ROPE = register_family(
    OpFamily("rope", _rope_key, _rope_context, _bind, _transforms, function=rope, library=True, fake=_rope_fake)
)
ROPE_QK = register_family(
    OpFamily(
        "rope_qk",
        _key,
        _context,
        _bind,
        _transforms,
        function=rope_qk,
        library=True,
        real=_rope_qk_real,
        fake=_rope_qk_fake,
        workloads=(
            Workload(
                "rope_qk",
                ("batch", "seq", "heads", "kv_heads", "head_dim"),
                (),
                _rope_workload,
                op_ids={"posenc.rope": {}},
            ),
        ),
    )
)


# ----------------------------------------------------------------------------- cos/sin cache


def rope_inv_freq(
    dim: int, base: float = 10000.0, scaling: Mapping[str, Any] | None = None, seq_len: int | None = None
) -> torch.Tensor:
    """Float64 (dim/2,) inverse frequencies with HF transformers' `rope_scaling` semantics.

    scaling: None (default), {"type": "linear", "factor": f}, {"type": "dynamic", "factor": f,
    "original_max_position_embeddings": m} (NTK-aware, grows the base once seq_len > m), or
    {"type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
    "original_max_position_embeddings": m}. "rope_type" is accepted for "type" as in HF.
    """
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise InvalidInputError("dim", "an even int >= 2 (the rotary dim)", dim)
    if not isinstance(base, int | float) or base <= 1:
        raise InvalidInputError("base", "a number > 1", base)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return 1.0 / base**exponents
    if not isinstance(scaling, Mapping):
        raise InvalidInputError("scaling", "None or a dict", type(scaling).__name__)
    factor = _scaling_value(scaling, "factor", kind)
    if kind == "linear":
        return 1.0 / base**exponents / factor
    if kind == "dynamic":
        original = _scaling_value(scaling, "original_max_position_embeddings", kind)
        length = max(seq_len or 0, original)
        base = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2)) if dim > 2 else base
        return 1.0 / base**exponents
    if kind == "llama3":
        original = _scaling_value(scaling, "original_max_position_embeddings", kind)
        low = _scaling_value(scaling, "low_freq_factor", kind)
        high = _scaling_value(scaling, "high_freq_factor", kind)
        if high <= low:
            raise InvalidInputError("scaling['high_freq_factor']", f"> low_freq_factor {low}", high)
        inv_freq = 1.0 / base**exponents
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = original / low, original / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnknownNameError("rope scaling type", str(kind), ("default", "linear", "dynamic", "llama3"))


def _scaling_value(scaling: Mapping[str, Any], name: str, kind: str) -> float:
    value = scaling.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"scaling[{name!r}]", f"a positive number (required by {kind!r} scaling)", value)
    return float(value)


def rope_cache(
    seq_len: int,
    dim: int,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, dim) = cat(freqs, freqs) for positions 0..seq_len-1, as HF builds them.

    Computed in float64, returned in `dtype`. Feed them to `lz.rope` directly (S = seq_len) or as a
    cache with position_ids. For dynamic scaling, seq_len is the length the base is grown for.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise InvalidInputError("seq_len", "an int >= 1", seq_len)
    inv_freq = rope_inv_freq(dim, base, scaling, seq_len)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- ALiBi


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 (num_heads,) ALiBi slopes (Press et al.; HF BLOOM's rule for non-power-of-two heads).

    For n a power of two: 2^(-8 i / n), i = 1..n. Otherwise the n' = 2^floor(log2 n) slopes of n'
    heads, then every other slope of 2n' heads (odd i) for the remaining n - n' heads.
    Pass the result to `lz.attention(..., alibi_slopes=...)`.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise InvalidInputError("num_heads", "an int >= 1", num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float32, device=device)
