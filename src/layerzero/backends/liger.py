"""Liger-Kernel (linkedin/Liger-Kernel, Triton): rms_norm, layer_norm, rope, swiglu, geglu.

We call its forward functions (`liger_kernel.ops.<op>.<op>_forward`), not the autograd
Functions: LayerZero runs inference, so the Liger kernels declare no backward and inputs that
require grad go to torch. What we rely on, read from Liger 0.8.5's sources:

- rms_norm_forward(X, W, eps, offset, casting_mode, row_mode): X viewed (-1, hidden), so it must
  be contiguous; W (hidden,) read with unit stride, or None. casting_mode "gemma" computes all in
  float32 and rounds once, which is our reference's semantics ("llama" rounds x * rstd to x's
  dtype before the weight multiply: a second rounding we do not want). offset 0.0 (Gemma's
  `1 + w` is the caller's business).
- layer_norm_forward(X, W, B, eps): float32 statistics; W and B are both required.
- Both size one program to next_power_of_2(hidden) <= 65536 columns (`calculate_settings`).
- rope_forward(q, k, cos, sin): q/k given as (B, H, S, D) views of BSHD storage, rotated IN PLACE
  when that storage is contiguous (so we hand it a fresh copy); q and k always together (a
  one-head scratch k stands in for single-tensor rope); cos/sin (1 or B, S, R) of which only the
  first R/2 entries are read; math in cos's dtype (we pass float32). Half rotation only.
- swiglu_forward(a, b) = silu(a in float32) cast to b's dtype, times b; geglu_forward is the tanh
  GELU only (so it implements activation.geglu_tanh, not the erf form).

Triton's bf16 and Liger's CI cover Ampere and newer: min SM 8.0. float64 is not declared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import SelectionContext
from ..kernel import FLOAT_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection

MAX_HIDDEN = 65536  # liger_kernel.ops.utils.calculate_settings: MAX_FUSED_SIZE


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import rms_norm_forward

    w = None if weight is None else weight.contiguous()
    return rms_norm_forward(x, w, eps, 0.0, "gemma", None)[0]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    from liger_kernel.ops.layer_norm import layer_norm_forward

    assert weight is not None and bias is not None  # the spec's check keeps other calls away
    return layer_norm_forward(x, weight.contiguous(), bias.contiguous(), eps)[0]


def rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from liger_kernel.ops.rope import rope_forward

    # Fresh contiguous BSHD buffers: Liger rotates them in place (never the caller's tensors).
    qw = q.clone(memory_format=torch.contiguous_format)
    kw = (
        q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])
        if k is None
        else k.clone(memory_format=torch.contiguous_format)
    )
    rope_forward(qw.transpose(1, 2), kw.transpose(1, 2), cos.float().contiguous(), sin.float().contiguous())
    return qw, None if k is None else kw


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import swiglu_forward

    return swiglu_forward(gate, up)[2]


def geglu_tanh(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    from liger_kernel.ops.geglu import geglu_forward

    return geglu_forward(gate, up)[2]


def fused_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str
) -> torch.Tensor:
    """cuBLAS gate/up GEMMs, Liger's gate*act kernel, cuBLAS down GEMM."""
    act = swiglu if activation == "swiglu" else geglu_tanh
    return F.linear(act(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


def _non_empty(ctx: SelectionContext) -> list[Rejection]:
    if ctx.num_rows == 0:
        return [Rejection(Reason.CUSTOM_CHECK_FAILED, "empty input (Liger launches one program per row)")]
    return []


def _layer_norm_check(ctx: SelectionContext) -> list[Rejection]:
    if not (ctx.has_weight and ctx.has_bias):
        return [Rejection(Reason.CUSTOM_CHECK_FAILED, "liger layer_norm_forward needs both weight and bias")]
    return _non_empty(ctx)


def _spec(name: str, ops: tuple[str, ...], impl: object, priority: int, description: str, **kw: object) -> KernelSpec:
    return KernelSpec(
        id=f"liger.{name}",
        ops=ops,
        impl=impl,
        priority=priority,
        platforms=frozenset({"cuda"}),
        min_sm=80,  # type: ignore[arg-type]
        dtypes=FLOAT_DTYPES,
        max_hidden_size=MAX_HIDDEN,
        requires_contiguous=kw.pop("requires_contiguous", True),  # type: ignore[arg-type]
        check=kw.pop("check", _non_empty),  # type: ignore[arg-type]
        description=description,
        **kw,  # type: ignore[arg-type]
    )


# Priorities before tuning, from benchmarks/results/norms_rope-h100.md (H100, bf16, 2026-11-25):
# Liger's kernels carry ~50 us of launch overhead per call, so torch's fused rms_norm/layer_norm win
# up to at least 4096 rows (2.4x for rms_norm) and Liger wins at 65536 rows (1.46x rms_norm, 1.42x
# layer_norm): Liger gets the lead from 16384 rows on (the crossover lies in 4096..65536; PerfDB
# tuning pins it per shape). Liger's RoPE won at every row count measured (4..65536).
ROWS_LIGER_NORMS_WIN = 16384
BACKEND = Backend(
    name="liger",
    module="liger_kernel",
    distribution="liger-kernel",
    aliases=("liger_kernel",),
    description="Liger-Kernel Triton kernels (rms_norm, layer_norm, rope, swiglu, geglu)",
    probes=(("liger.rms_norm", "rms_norm"), ("liger.rope", "rope")),
    kernels=(
        _spec(
            "rms_norm",
            ("norm.rms",),
            rms_norm,
            45,
            "rms_norm_forward, casting_mode='gemma' (float32 math)",
            row_priorities=((ROWS_LIGER_NORMS_WIN, 55),),
        ),
        _spec(
            "layer_norm",
            ("norm.layer",),
            layer_norm,
            45,
            "layer_norm_forward (weight and bias required)",
            check=_layer_norm_check,
            row_priorities=((ROWS_LIGER_NORMS_WIN, 55),),
        ),
        _spec(
            "rope",
            ("posenc.rope",),
            rope,
            70,
            "rope_forward on a copy, q and k in one launch",
            layout="BSHD",
            requires_contiguous=False,
        ),
        _spec("swiglu", ("activation.swiglu",), swiglu, 70, "swiglu_forward: silu(gate) * up in one pass"),
        _spec("geglu", ("activation.geglu_tanh",), geglu_tanh, 70, "geglu_forward: tanh-GELU(gate) * up"),
        _spec(
            "fused_mlp",
            ("mlp.swiglu", "mlp.geglu_tanh"),
            fused_mlp,
            70,
            "torch GEMMs around Liger's gate*act",
            requires_contiguous=False,
        ),
    ),
)
