"""torch kernels for RoPE, activations and the gated MLP (part of the `torch` backend; the
registry merges them with backends/torch_native.py's kernels).

Eager kernels compute RoPE in float32 (half-precision products and differences would cancel
badly) and use torch's own activation kernels. The `*_compiled` activation variants fuse the same
math with `torch.compile(dynamic=True)`: one compilation serves every shape; they are CUDA-only
and get a low priority until measurements say otherwise. A compiled RoPE was removed: on the H100
(2026-11-25) one compiled function serving both RoPE forms and three dtypes hit dynamo's recompile
limit of 8.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernel import ALL_FLOAT_DTYPES, FLOAT_DTYPES, Backend, KernelSpec
from .reference import gated_act

_CPU_CUDA = frozenset({"cpu", "cuda"})


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(B, S, H, D) x; cos/sin (1 or B, S, R): rotate the first R dims, computing in float32 (or 64)."""
    half = cos.shape[-1] // 2
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos[..., :half].to(ct)[:, :, None, :]
    s = sin[..., :half].to(ct)[:, :, None, :]
    first, second = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (
        slice(0, half), slice(half, 2 * half))
    x1, x2 = x[..., first].to(ct), x[..., second].to(ct)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x2 * c + x1 * s
    if 2 * half < x.shape[-1]:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate(q, cos, sin, False), None if k is None else rotate(k, cos, sin, False)


def rope_interleaved(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate(q, cos, sin, True), None if k is None else rotate(k, cos, sin, True)


def _rotate_cat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The same math as `rotate`, written as one expression for the compiler to fuse."""
    half = cos.shape[-1] // 2
    c = cos[..., :half].float()[:, :, None, :]
    s = sin[..., :half].float()[:, :, None, :]
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


@functools.cache
def _compiled(name: str) -> Callable[..., torch.Tensor]:
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "swiglu": lambda g, u: (F.silu(g.float()) * u.float()).to(g.dtype),
        "geglu": lambda g, u, approximate: (F.gelu(g.float(), approximate=approximate) * u.float()).to(g.dtype),
    }
    return torch.compile(fns[name], dynamic=True, fullgraph=True)


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def swiglu_compiled(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _compiled("swiglu")(gate, up)


def geglu_compiled(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _compiled("geglu")(gate, up, approximate)


def fused_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              activation: str) -> torch.Tensor:
    """Two cuBLAS/oneDNN GEMMs, torch's activation, the down GEMM."""
    return F.linear(gated_act(activation)(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


_MLP_OPS = ("mlp.swiglu", "mlp.geglu", "mlp.geglu_tanh")
_CUDA_ONLY = {"platforms": frozenset({"cuda"}), "dtypes": FLOAT_DTYPES, "needs_jit": True}

BACKEND = Backend(
    name="torch",
    description="torch: RoPE in plain ops, F.silu/F.gelu activations, torch.compile'd fused variants",
    kernels=(
        KernelSpec(id="torch.rope", ops=("posenc.rope",), impl=rope, priority=50, platforms=_CPU_CUDA,
                   dtypes=ALL_FLOAT_DTYPES, layout="BSHD", supports_backward=True,
                   description="RoPE (half rotation) in float32 torch ops"),
        KernelSpec(id="torch.rope_interleaved", ops=("posenc.rope_interleaved",), impl=rope_interleaved,
                   priority=50, platforms=_CPU_CUDA, dtypes=ALL_FLOAT_DTYPES, layout="BSHD", supports_backward=True,
                   description="RoPE (GPT-J interleaved pairs) in float32 torch ops"),
        KernelSpec(id="torch.silu", ops=("activation.silu",), impl=silu, priority=50, platforms=_CPU_CUDA,
                   dtypes=ALL_FLOAT_DTYPES, supports_backward=True, description="torch.nn.functional.silu"),
        KernelSpec(id="torch.gelu", ops=("activation.gelu", "activation.gelu_tanh"), impl=gelu, priority=50,
                   platforms=_CPU_CUDA, dtypes=ALL_FLOAT_DTYPES, supports_backward=True,
                   description="torch.nn.functional.gelu"),
        KernelSpec(id="torch.swiglu", ops=("activation.swiglu",), impl=swiglu, priority=50, platforms=_CPU_CUDA,
                   dtypes=ALL_FLOAT_DTYPES, supports_backward=True, description="F.silu(gate) * up (two kernels)"),
        KernelSpec(id="torch.geglu", ops=("activation.geglu", "activation.geglu_tanh"), impl=geglu, priority=50,
                   platforms=_CPU_CUDA, dtypes=ALL_FLOAT_DTYPES, supports_backward=True,
                   description="F.gelu(gate) * up (two kernels)"),
        KernelSpec(id="torch.swiglu_compiled", ops=("activation.swiglu",), impl=swiglu_compiled, priority=30,
                   supports_backward=True, description="silu(gate) * up, torch.compile(dynamic=True)",
                   **_CUDA_ONLY),  # type: ignore[arg-type]
        KernelSpec(id="torch.geglu_compiled", ops=("activation.geglu", "activation.geglu_tanh"), impl=geglu_compiled,
                   priority=30, supports_backward=True, description="gelu(gate) * up, torch.compile(dynamic=True)",
                   **_CUDA_ONLY),  # type: ignore[arg-type]
        KernelSpec(id="torch.fused_mlp", ops=_MLP_OPS, impl=fused_mlp, priority=50, platforms=_CPU_CUDA,
                   dtypes=ALL_FLOAT_DTYPES, supports_backward=True,
                   description="F.linear x2, torch gate*act, F.linear"),
    ),
)
