"""Quantization: `lz.quantize`, `lz.dequantize`, `lz.quant_linear`, GPTQ/AWQ packed weights.

Formats: int8 (symmetric [-127, 127] or asymmetric [-128, 127] with an int32 zero point),
fp8_e4m3 (max 448) and fp8_e5m2 (max 57344), symmetric. Scale granularity: per_tensor (scale
shape ()), per_channel (dim 0: (C, 1, ...)), per_token (last dim reduced: (..., 1)) and block
(2-D tensors, (ceil(M/bm), ceil(N/bn)) scales). Values beyond the format's range saturate at its
max (a plain fp8 cast would give NaN or inf). GPTQ and AWQ checkpoints are described by
`PackedFormat`, validated by `QuantizedTensor.from_packed`, and run through the reference
(dequantize, then matmul) where no backend has a kernel for them.

The context's `quant_format` is the scheme string kernels filter on:
"<format>:<granularity>[:asym]", e.g. "fp8_e4m3:per_tensor", "int8:per_token:asym",
"fp8_e4m3:block128x128", "gptq_int4:group128".

Kernel calling conventions: quantize `impl(x, fmt, granularity, block, scale, zero_point) ->
(data, scale, zero_point)`; dequantize `impl(qt, out_dtype)`; quant_linear `impl(x (M, K), qt,
act, bias, out_dtype) -> (M, N)` where act = (QuantFormat, granularity, block) says how x is
quantized first (None: weight-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..state import runtime
from .family import OpFamily, register_family

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "block")


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """A storage format: its dtype and the range of stored values."""

    name: str
    dtype: torch.dtype
    qmin: float
    qmax: float
    is_float: bool
    symmetric: bool = True


FORMATS = {
    ("int8", True): QuantFormat("int8", torch.int8, -127, 127, False),
    ("int8", False): QuantFormat("int8", torch.int8, -128, 127, False, symmetric=False),
    ("fp8_e4m3", True): QuantFormat("fp8_e4m3", torch.float8_e4m3fn, -448.0, 448.0, True),
    ("fp8_e5m2", True): QuantFormat("fp8_e5m2", torch.float8_e5m2, -57344.0, 57344.0, True),
}
FORMAT_NAMES = ("int8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True, slots=True)
class PackedFormat:
    """A GPTQ or AWQ checkpoint layout of `bits`-bit weights packed into int32 words.

    gptq: qweight (K*bits/32, N) packed along K, qzeros (G, N*bits/32) packed along N, scales
    (G, N), optional g_idx (K,) (act-order). zero_offset 1 for the original GPTQ format, which
    stores zeros minus one; 0 for "gptq_v2". awq: qweight (K, N*bits/32) and qzeros (G, N*bits/32)
    packed along N in the order 0,2,4,6,1,3,5,7; scales (G, N). group_size -1 = one group over K.
    """

    kind: str  # "gptq" | "awq"
    bits: int = 4
    group: int = 128
    zero_offset: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}_int{self.bits}"

    def group_size(self, in_features: int) -> int:
        return in_features if self.group == -1 else self.group


def gptq_format(bits: int = 4, group_size: int = 128, checkpoint_format: str = "gptq") -> PackedFormat:
    """GPTQ layout (AutoGPTQ/exllama); checkpoint_format "gptq" (zeros - 1 stored) or "gptq_v2"."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise InvalidInputError("checkpoint_format", "'gptq' or 'gptq_v2'", checkpoint_format)
    return PackedFormat("gptq", bits, group_size, 1 if checkpoint_format == "gptq" else 0)


def awq_format(bits: int = 4, group_size: int = 128) -> PackedFormat:
    """AWQ GEMM layout."""
    return PackedFormat("awq", bits, group_size, 0)


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """Quantized values with their scales. For packed formats `data` holds the int32 words and
    the logical tensor is the (out_features, in_features) linear weight."""

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    format: str
    granularity: str
    block: tuple[int, int] | None
    dtype: torch.dtype  # the dtype it was quantized from; dequantize's default
    packing: PackedFormat | None = None
    g_idx: torch.Tensor | None = None

    @property
    def scheme(self) -> str:
        """The `quant_format` string kernels filter on (module docstring)."""
        if self.packing is not None:
            return f"{self.format}:group{self.packing.group}"
        gran = f"block{self.block[0]}x{self.block[1]}" if self.block else self.granularity
        return f"{self.format}:{gran}" + ("" if self.zero_point is None else ":asym")

    @property
    def shape(self) -> tuple[int, ...]:
        if self.packing is None:
            return tuple(self.data.shape)
        return (self.scale.shape[1], self.g_idx.shape[0] if self.g_idx is not None else _packed_k(self))

    @staticmethod
    def from_packed(
        fmt: PackedFormat,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor,
        g_idx: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Validate a GPTQ/AWQ checkpoint's tensors against `fmt` and wrap them."""
        _validate_packed(fmt, qweight, scales, qzeros, g_idx)
        return QuantizedTensor(qweight, scales, qzeros, fmt.name, "group", None, scales.dtype, fmt, g_idx)


def _packed_k(q: QuantizedTensor) -> int:
    assert q.packing is not None
    per = 32 // q.packing.bits
    return q.data.shape[0] * (per if q.packing.kind == "gptq" else 1)


def _validate_packed(fmt: PackedFormat, qweight: Any, scales: Any, qzeros: Any, g_idx: Any) -> None:
    if fmt.kind not in ("gptq", "awq"):
        raise InvalidInputError("fmt.kind", "'gptq' or 'awq'", fmt.kind)
    if fmt.bits not in (2, 4, 8):
        raise InvalidInputError("fmt.bits", "2, 4 or 8", fmt.bits)
    if fmt.kind == "awq" and fmt.bits != 4:
        raise InvalidInputError("fmt.bits", "4 for AWQ (its packing order is defined for 4 bits)", fmt.bits)
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InvalidInputError(name, "a 2-D torch.Tensor", getattr(t, "shape", type(t).__name__))
        if t.device != qweight.device:
            raise InvalidInputError(name, f"device {qweight.device} (as qweight)", t.device)
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise InvalidInputError(name, "dtype torch.int32 (packed words)", t.dtype)
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidInputError("scales", "dtype float16, bfloat16 or float32", scales.dtype)
    per = 32 // fmt.bits
    if fmt.kind == "gptq":
        k, n = qweight.shape[0] * per, qweight.shape[1]
    else:
        k, n = qweight.shape[0], qweight.shape[1] * per
    gs = fmt.group_size(k)
    if gs <= 0 or k % gs:
        raise InvalidInputError("fmt.group_size", f"a divisor of in_features {k} (or -1)", fmt.group)
    groups = k // gs
    if tuple(scales.shape) != (groups, n):
        raise InvalidInputError("scales", f"shape (groups, out_features) = ({groups}, {n})", tuple(scales.shape))
    if tuple(qzeros.shape) != (groups, n // per) or n % per:
        raise InvalidInputError("qzeros", f"shape ({groups}, {n} / {per}) int32 words", tuple(qzeros.shape))
    if g_idx is not None:
        if fmt.kind != "gptq":
            raise InvalidInputError("g_idx", "None for AWQ (act-order is a GPTQ feature)", "a tensor")
        if (
            not isinstance(g_idx, torch.Tensor)
            or tuple(g_idx.shape) != (k,)
            or g_idx.dtype not in (torch.int32, torch.int64)
        ):
            raise InvalidInputError("g_idx", f"an int32 tensor of shape ({k},)", getattr(g_idx, "shape", g_idx))
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise InvalidInputError(
                "g_idx", f"group indices in [0, {groups})", f"range [{int(g_idx.min())}, {int(g_idx.max())}]"
            )


def resolve_format(format: str, symmetric: bool = True) -> QuantFormat:
    """The QuantFormat for a name; fp8 formats are symmetric only."""
    if format not in FORMAT_NAMES:
        raise UnknownNameError("quantization format", str(format), FORMAT_NAMES)
    fmt = FORMATS.get((format, bool(symmetric)))
    if fmt is None:
        raise InvalidInputError("symmetric", f"True for {format} (fp8 scales are symmetric)", symmetric)
    return fmt


def _scheme(format: str, granularity: str, block: tuple[int, int] | None, symmetric: bool) -> str:
    gran = f"block{block[0]}x{block[1]}" if granularity == "block" and block else granularity
    return f"{format}:{gran}" + ("" if symmetric else ":asym")


def scale_shape(shape: tuple[int, ...], granularity: str, block: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of the scale (and zero point) of a tensor of `shape`."""
    if granularity == "per_tensor":
        return ()
    if granularity == "per_channel":
        return (shape[0],) + (1,) * (len(shape) - 1)
    if granularity == "per_token":
        return tuple(shape[:-1]) + (1,)
    assert block is not None
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def quantize(
    x: torch.Tensor,
    format: str = "int8",
    granularity: str = "per_tensor",
    *,
    block_size: tuple[int, int] = (128, 128),
    symmetric: bool = True,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize x (any shape; 2-D for block) to `format` with scales per `granularity`.

    Scales are computed from the data (dynamic) unless `scale` (and for asymmetric int8
    `zero_point`) is given (static); values the scale cannot represent saturate.
    """
    block = tuple(block_size) if granularity == "block" else None
    try:
        key = _quantize_key(
            x, format, granularity, block_size=block_size, symmetric=symmetric, scale=scale, zero_point=zero_point
        )
    except AttributeError:
        _check(x=x)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(
            QUANTIZE,
            key,
            (x, format, granularity),
            {"block_size": block_size, "symmetric": symmetric, "scale": scale, "zero_point": zero_point},
        )
    fmt = FORMATS[(format, bool(symmetric))]
    data, s, zp = plan(x, fmt, granularity, block, scale, zero_point)
    return QuantizedTensor(data, s, zp, format, granularity, block, x.dtype)  # type: ignore[arg-type]


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float tensor q stands for, in `dtype` (default: the dtype it was quantized from).
    Packed GPTQ/AWQ weights come back as the (out_features, in_features) linear weight."""
    try:
        key = _dequantize_key(q, dtype)
    except AttributeError:
        raise InvalidInputError(
            "q", "a QuantizedTensor (from lz.quantize or QuantizedTensor.from_packed)", type(q).__name__
        ) from None
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(DEQUANTIZE, key, (q, dtype), {})
    return plan(q, key[-1])


def activation_scheme(w: QuantizedTensor) -> tuple[QuantFormat, str, tuple[int, int] | None] | None:
    """How quant_linear quantizes its input for weights `w` (None: weight-only).

    fp8 weights take fp8_e4m3 activations, int8 weights symmetric int8: per-tensor with a
    per-tensor weight, per-token with per-channel weights, (1, bk) blocks with (bn, bk) blocks.
    """
    if w.packing is not None:
        return None
    fmt = FORMATS[("fp8_e4m3", True)] if w.format.startswith("fp8") else FORMATS[("int8", True)]
    if w.granularity == "per_tensor":
        return fmt, "per_tensor", None
    if w.granularity == "block":
        assert w.block is not None
        return fmt, "block", (1, w.block[1])
    return fmt, "per_token", None


def quant_linear(
    x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y = x @ dequant(weight)^T + bias with quantized weights (N, K); x (..., K) -> (..., N).

    The input is quantized on the fly as `activation_scheme` says; fp8 runs torch._scaled_mm where
    the device supports it (SM >= 89, or the CPU), the reference elsewhere.
    """
    try:
        key = _linear_key(x, weight, bias, out_dtype)
    except AttributeError:
        _check(x=x, bias=bias)
        raise InvalidInputError("weight", "a QuantizedTensor", type(weight).__name__) from None
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(QUANT_LINEAR, key, (x, weight, bias, out_dtype), {})
    out = plan(x.reshape(-1, x.shape[-1]), weight, activation_scheme(weight), bias, out_dtype or x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _check(**tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _quantize_context(
    x: torch.Tensor,
    format: str = "int8",
    granularity: str = "per_tensor",
    *,
    block_size: tuple[int, int] = (128, 128),
    symmetric: bool = True,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> SelectionContext:
    _check(x=x, scale=scale, zero_point=zero_point)
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise InvalidInputError("x", "a float16/bfloat16/float32/float64 tensor", x.dtype)
    fmt = resolve_format(format, symmetric)
    if granularity not in GRANULARITIES:
        raise UnknownNameError("granularity", str(granularity), GRANULARITIES)
    block = None
    if granularity == "block":
        if (
            not isinstance(block_size, (tuple, list))
            or len(block_size) != 2
            or not all(isinstance(b, int) and b > 0 for b in block_size)
        ):
            raise InvalidInputError("block_size", "two positive ints (rows, cols)", block_size)
        if x.dim() != 2:
            raise InvalidInputError("x", "a 2-D tensor for block scales", f"{x.dim()}-D")
        block = (block_size[0], block_size[1])
    if x.dim() == 0 and granularity != "per_tensor":
        raise InvalidInputError("x", f"a tensor with dimensions for {granularity} scales", "a 0-D tensor")
    want = scale_shape(tuple(x.shape), granularity, block)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if tuple(t.shape) != want and t.numel() != max(1, _prod(want)):
            raise InvalidInputError(name, f"shape {want} for {granularity} scales of {tuple(x.shape)}", tuple(t.shape))
        if t.device != x.device:
            raise InvalidInputError(name, f"device {x.device} (as x)", t.device)
    if zero_point is not None and fmt.symmetric:
        raise InvalidInputError("zero_point", "None for symmetric quantization (pass symmetric=False)", "a tensor")
    if scale is not None and not fmt.symmetric and zero_point is None:
        raise InvalidInputError("zero_point", "an int tensor with the scale for asymmetric int8", None)
    return SelectionContext(
        op="quant.quantize",
        **SelectionContext.device_fields(x.device),  # type: ignore[arg-type]
        dtype=x.dtype,
        quant_format=_scheme(format, granularity, block, fmt.symmetric),
        hidden_size=x.shape[-1] if x.dim() else 1,
        num_rows=x.numel() // max(1, x.shape[-1] if x.dim() else 1),
    )


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _dequantize_context(q: QuantizedTensor, dtype: torch.dtype | None = None) -> SelectionContext:
    if not isinstance(q, QuantizedTensor):
        raise InvalidInputError("q", "a QuantizedTensor", type(q).__name__)
    out = dtype or q.dtype
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise InvalidInputError("dtype", "a floating-point torch.dtype", out)
    return SelectionContext(
        op="quant.dequantize",
        **SelectionContext.device_fields(q.data.device),  # type: ignore[arg-type]
        dtype=out,
        quant_format=q.scheme,
    )


def _linear_context(
    x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> SelectionContext:
    _check(x=x, bias=bias)
    if not isinstance(weight, QuantizedTensor):
        raise InvalidInputError("weight", "a QuantizedTensor", type(weight).__name__)
    if not x.is_floating_point() or x.dim() < 1:
        raise InvalidInputError("x", "a floating-point tensor (..., in_features)", f"{x.dtype} {tuple(x.shape)}")
    n, k = weight.shape[0], weight.shape[-1]
    if len(weight.shape) != 2:
        raise InvalidInputError("weight", "a 2-D (out_features, in_features) quantized weight", weight.shape)
    if x.shape[-1] != k:
        raise InvalidInputError("x", f"last dimension {k} (weight's in_features)", x.shape[-1])
    if weight.data.device != x.device:
        raise InvalidInputError("weight", f"device {x.device} (as x)", weight.data.device)
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != x.device):
        raise InvalidInputError("bias", f"shape ({n},) on {x.device}", f"{tuple(bias.shape)} on {bias.device}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise InvalidInputError("out_dtype", "None or a floating-point torch.dtype", out_dtype)
    return SelectionContext(
        op="quant.linear",
        **SelectionContext.device_fields(x.device),  # type: ignore[arg-type]
        dtype=x.dtype,
        quant_format=weight.scheme,
        hidden_size=k,
        num_rows=x.numel() // max(1, k),
    )


def _quantize_key(
    x: Any,
    format: str = "int8",
    granularity: str = "per_tensor",
    *,
    block_size: Any = (128, 128),
    symmetric: bool = True,
    scale: Any = None,
    zero_point: Any = None,
) -> Any:
    block = tuple(block_size) if granularity == "block" else None
    return (
        "quant.quantize",
        format,
        granularity,
        block,
        bool(symmetric),
        x.shape,
        x.dtype,
        x.device,
        scale is None,
        zero_point is None,
    )


def _dequantize_key(q: Any, dtype: Any = None) -> Any:
    return ("quant.dequantize", q.scheme, q.data.shape, q.data.device, dtype or q.dtype)


def _linear_key(x: Any, weight: Any, bias: Any = None, out_dtype: Any = None) -> Any:
    return (
        "quant.linear",
        weight.scheme,
        x.shape,
        x.dtype,
        x.device,
        weight.data.shape,
        weight.data.device,
        None if bias is None else (bias.shape, bias.dtype, bias.device),
        out_dtype,
    )


QUANTIZE = register_family(OpFamily("quantize", _quantize_key, _quantize_context, function=quantize))
DEQUANTIZE = register_family(OpFamily("dequantize", _dequantize_key, _dequantize_context, function=dequantize))
QUANT_LINEAR = register_family(OpFamily("quant_linear", _linear_key, _linear_context, function=quant_linear))
