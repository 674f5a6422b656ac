"""Our own Triton kernel: fused gate * act (SwiGLU, exact GELU and tanh GELU GeGLU) in one pass.

It reads gate and up once and writes the product once, computing in float32 and rounding once
(torch's eager form is two kernels and two roundings). It covers what no installed library does
(Liger's GeGLU is the tanh form only) and stands in where Liger is absent. The kernel treats
gate/up as flat contiguous arrays, so any shape works; it is compiled on first use per dtype
(Triton caches it on disk). Triton is imported only when the kernel first runs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..context import SelectionContext
from ..kernel import FLOAT_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection

BLOCK = 1024
_ACT = {"swiglu": 0, "geglu": 1, "geglu_tanh": 2}


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def gated_act_kernel(g_ptr, u_ptr, o_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            a = g * tl.sigmoid(g)
        elif ACT == 1:
            a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g * tl.sigmoid(2.0 * inner)  # 0.5 * g * (1 + tanh(inner)) = g * sigmoid(2 * inner)
        tl.store(o_ptr + offs, (a * u).to(o_ptr.dtype.element_ty), mask=mask)

    return gated_act_kernel


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for contiguous gate/up of one shape and dtype (the bind makes them contiguous)."""
    out = torch.empty_like(gate)
    n = gate.numel()
    _kernel()[((n + BLOCK - 1) // BLOCK,)](gate, up, out, n, ACT=_ACT[activation], BLOCK=BLOCK, num_warps=4)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated_act(gate, up, "swiglu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return gated_act(gate, up, "geglu_tanh" if approximate == "tanh" else "geglu")


def fused_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str
) -> torch.Tensor:
    """cuBLAS gate/up GEMMs, the fused gate*act kernel, cuBLAS down GEMM."""
    return F.linear(gated_act(F.linear(x, w_gate), F.linear(x, w_up), activation), w_down)


def _non_empty(ctx: SelectionContext) -> list[Rejection]:
    if ctx.num_rows == 0:
        return [Rejection(Reason.CUSTOM_CHECK_FAILED, "empty input")]
    return []


# Priority 72, above Liger's 70: on the H100 (bf16, 2026-11-25, benchmarks/results/norms_rope-h100.md)
# this kernel took 4.0 us at 4 rows where Liger took 49 us, and tied with Liger at 4096 and 65536 rows.
def _spec(name: str, ops: tuple[str, ...], impl: object, description: str, contiguous: bool = True) -> KernelSpec:
    return KernelSpec(
        id=f"triton_act.{name}",
        ops=ops,
        impl=impl,
        priority=72,
        platforms=frozenset({"cuda"}),
        min_sm=80,  # type: ignore[arg-type]
        dtypes=FLOAT_DTYPES,
        requires_contiguous=contiguous,
        needs_jit=True,
        check=_non_empty,
        description=description,
    )


BACKEND = Backend(
    name="triton_act",
    module="triton",
    distribution="triton",
    description="LayerZero's Triton gate*act kernel (SwiGLU / GeGLU, erf and tanh)",
    probes=(("triton_act.swiglu", "swiglu"),),
    kernels=(
        _spec("swiglu", ("activation.swiglu",), swiglu, "one-pass silu(gate) * up in float32"),
        _spec("geglu", ("activation.geglu", "activation.geglu_tanh"), geglu, "one-pass gelu(gate) * up in float32"),
        _spec(
            "fused_mlp",
            ("mlp.swiglu", "mlp.geglu", "mlp.geglu_tanh"),
            fused_mlp,
            "torch GEMMs around the one-pass gate*act",
            contiguous=False,
        ),
    ),
)
