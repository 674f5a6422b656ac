"""torch kernels for sampling, quantization and embedding (backend "torch_ops").

Sampling runs in float32 and draws with the exponential race (argmax of p / E, E ~ Exp(1), which
picks token i with probability p_i) instead of torch.multinomial: no host sync, and the generator
is the only source of randomness on every device. Quantization is the reference math in float32;
fp8 linear layers run `torch._scaled_mm` (per-tensor or row-wise scales) on the CPU and on CUDA
SM >= 89.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..context import SelectionContext
from ..kernel import ALL_FLOAT_DTYPES, FLOAT_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection
from . import reference as ref

_CPU_CUDA = frozenset({"cpu", "cuda"})
SAMPLING_OPS = (
    "sampling.plain",
    "sampling.topk",
    "sampling.topp",
    "sampling.minp",
    "sampling.topk_topp",
    "sampling.combined",
)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return ref.greedy(logits)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (unnormalized) probs (B, V) -> int64 (B,)."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    return (probs / race).argmax(-1)


def sample(
    logits: torch.Tensor,
    top_k: torch.Tensor | int | None,
    top_p: torch.Tensor | float | None,
    min_p: torch.Tensor | float | None,
    temperature: torch.Tensor | float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    x, best, valid = ref.tempered(logits, temperature, torch.float32)
    probs = torch.softmax(x, -1)
    if isinstance(top_k, int) and top_p is None:  # a scalar top-k needs no full sort
        tau = probs.topk(top_k, -1, sorted=False).values.amin(-1, keepdim=True)
        probs = torch.where(probs >= tau, probs, 0.0)
        if min_p is not None:
            probs = ref.filter_probs(probs, None, None, min_p)
    elif top_k is not None or top_p is not None or min_p is not None:
        probs = ref.filter_probs(probs, top_k, top_p, min_p)
    return ref.finish_draws(exponential_race(probs, generator), best, valid, temperature)


def quantize(
    x: torch.Tensor,
    fmt: object,
    granularity: str,
    block: tuple[int, int] | None,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return ref.quantize(x, fmt, granularity, block, scale, zero_point, compute=torch.float32)


def dequantize(w: object, out_dtype: torch.dtype) -> torch.Tensor:
    return ref.dequantize(w, out_dtype, compute=torch.float32)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(t.dtype)


def scaled_mm(
    x: torch.Tensor,
    w: object,
    act: tuple[object, str, tuple[int, int] | None] | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """fp8 x (M, K) quantized per tensor or per token, times fp8 w (N, K), with torch._scaled_mm.

    K and N are zero-padded to multiples of 16 when needed (cuBLASLt's alignment). Row-wise
    scaling produces bfloat16 (what every torch version supports), then casts to out_dtype.
    """
    assert act is not None
    fmt, granularity, _ = act
    xq, sx, _ = ref.quantize(x, fmt, granularity, None, None, None, compute=torch.float32)
    wq: torch.Tensor = w.data  # type: ignore[attr-defined]
    m, k = xq.shape
    n = wq.shape[0]
    kp, np_ = -(-k // 16) * 16, -(-n // 16) * 16
    xq, wq = _pad_to(xq, m, kp), _pad_to(wq.contiguous(), np_, kp)
    sw: torch.Tensor = w.scale  # type: ignore[attr-defined]
    if granularity == "per_tensor":
        out = torch._scaled_mm(xq, wq.t(), scale_a=sx.reshape(()), scale_b=sw.reshape(()), out_dtype=torch.float32)
    else:
        sw = sw.reshape(1, n)
        if np_ != n:
            sw = F.pad(sw, (0, np_ - n), value=1.0)
        out = torch._scaled_mm(xq, wq.t(), scale_a=sx.reshape(m, 1), scale_b=sw, out_dtype=torch.bfloat16)
    out = out[:, :n]
    if bias is not None:
        out = out.float() + bias.float()
    return out.to(out_dtype)


def _scheme_check(
    patterns: tuple[str, ...], fp8_compute: bool = False
) -> Callable[[SelectionContext], list[Rejection]]:
    """A KernelSpec.check accepting the quant_format schemes matching `patterns` (fnmatch)."""

    def check(ctx: SelectionContext) -> list[Rejection]:
        scheme = ctx.quant_format or ""
        if not any(fnmatch.fnmatchcase(scheme, p) for p in patterns):
            return [Rejection(Reason.QUANT_FORMAT_UNSUPPORTED, f"{scheme} not in {', '.join(patterns)}")]
        if fp8_compute and ctx.device_type == "cuda" and ctx.sm < 89:
            return [Rejection(Reason.FP8_NEEDS_SM89, f"sm {ctx.sm} < 89")]
        return []

    return check


def embedding(ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    out = F.embedding(ids, table)
    if padding_idx is not None:
        out = out.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    return out


BACKEND = Backend(
    name="torch_ops",
    description="torch kernels for sampling, quantization (torch._scaled_mm) and embedding",
    kernels=(
        KernelSpec(
            id="torch_ops.greedy",
            ops=("sampling.greedy",),
            impl=greedy,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            description="max over the vocabulary",
        ),
        KernelSpec(
            id="torch_ops.sample",
            ops=SAMPLING_OPS,
            impl=sample,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            description="float32 filters + exponential race, no host sync",
        ),
        KernelSpec(
            id="torch_ops.quantize",
            ops=("quant.quantize",),
            impl=quantize,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            check=_scheme_check(("int8:*", "fp8_*")),
            description="float32 scale, round, saturate, cast",
        ),
        KernelSpec(
            id="torch_ops.dequantize",
            ops=("quant.dequantize",),
            impl=dequantize,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            check=_scheme_check(("int8:*", "fp8_*")),
            description="float32 (q - zero_point) * scale",
        ),
        KernelSpec(
            id="torch_ops.scaled_mm",
            ops=("quant.linear",),
            impl=scaled_mm,
            priority=70,
            platforms=_CPU_CUDA,
            dtypes=FLOAT_DTYPES,
            check=_scheme_check(("fp8_*:per_tensor", "fp8_*:per_channel", "fp8_*:per_token"), fp8_compute=True),
            description="torch._scaled_mm, fp8 per-tensor or row-wise scales",
        ),
        KernelSpec(
            id="torch_ops.embedding",
            ops=("embedding.lookup",),
            impl=embedding,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="torch.nn.functional.embedding",
        ),
    ),
)
