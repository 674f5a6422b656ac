"""lz.silu / gelu / swiglu / geglu / fused_mlp against float64 formulas, selection, and errors."""

from __future__ import annotations

import math

import pytest
import torch

import layerzero as lz
from layerzero import InvalidInputError, Reason

from .conftest import tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(7,), (3, 129), (2, 5, 96)]


def gelu64(x: torch.Tensor, approximate: str) -> torch.Tensor:
    x = x.double()
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu64(x: torch.Tensor) -> torch.Tensor:
    return x.double() / (1 + torch.exp(-x.double()))


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_gelu(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 3
    close(lz.silu(x), silu64(x), dtype)
    for approximate in ("none", "tanh"):
        close(lz.gelu(x, approximate=approximate), gelu64(x, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_and_geglu(dtype, shape):
    gate, up = torch.randn(shape, dtype=dtype) * 2, torch.randn(shape, dtype=dtype)
    # torch's eager form rounds silu(gate) before the product: allow that one extra rounding
    tol = {k: 2 * v for k, v in tolerance(dtype).items()}
    torch.testing.assert_close(lz.swiglu(gate, up).double(), silu64(gate) * up.double(), **tol)
    for approximate in ("none", "tanh"):
        out = lz.geglu(gate, up, approximate=approximate)
        torch.testing.assert_close(out.double(), gelu64(gate, approximate) * up.double(), **tol)


def test_activation_non_contiguous_inputs():
    gate = torch.randn(6, 10).t()
    up = torch.randn(10, 6)
    torch.testing.assert_close(lz.swiglu(gate, up).double(), silu64(gate) * up.double(), **tolerance(torch.float32))


@pytest.mark.parametrize("activation, approximate", [("swiglu", "none"), ("geglu", "none"), ("geglu", "tanh")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_matches_linear_layers(activation, approximate, dtype):
    d_model, d_ff = 48, 80
    x = torch.randn(2, 3, d_model, dtype=dtype)
    gate = torch.nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
    up = torch.nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
    down = torch.nn.Linear(d_ff, d_model, bias=False, dtype=dtype)
    out = lz.fused_mlp(x, gate.weight, up.weight, down.weight, activation=activation, approximate=approximate)
    xd = x.double()
    g, u = xd @ gate.weight.double().T, xd @ up.weight.double().T
    act = silu64(g) if activation == "swiglu" else gelu64(g, approximate)
    ref = (act * u) @ down.weight.double().T
    assert out.shape == x.shape and out.dtype == dtype
    # bf16 GEMMs round their outputs (the hidden activations) once more than the float64 reference
    tol = tolerance(dtype) if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.double(), ref, **tol)


def test_op_ids_carry_the_approximation():
    x = torch.randn(4, 8)
    assert lz.explain("gelu", x, approximate="tanh").context.op == "activation.gelu_tanh"
    assert lz.explain("geglu", x, x).context.op == "activation.geglu"
    report = lz.explain("geglu", x, x, approximate="tanh")
    assert report.context.op == "activation.geglu_tanh" and report.selected_kernel == "torch.geglu"
    w = torch.randn(16, 8)
    assert lz.explain("fused_mlp", x, w, w, w.T, activation="geglu", approximate="tanh").context.op == "mlp.geglu_tanh"
    assert lz.which("fused_mlp", x, w, w, w.T) == "torch.fused_mlp"


def test_cpu_rejects_cuda_kernels_with_reasons():
    x = torch.randn(4, 8)
    reasons = lz.explain("swiglu", x, x).rejection_reasons
    assert reasons["triton_act.swiglu"] in ([Reason.PLATFORM_MISMATCH], [Reason.BACKEND_NOT_INSTALLED])
    assert reasons["torch.swiglu_compiled"] == [Reason.PLATFORM_MISMATCH]


def test_backward_goes_through_torch():
    gate = torch.randn(3, 8, requires_grad=True)
    up = torch.randn(3, 8, requires_grad=True)
    lz.swiglu(gate, up).sum().backward()
    g = gate.detach()
    expected = torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g))) * up.detach()
    torch.testing.assert_close(gate.grad, expected)
    torch.testing.assert_close(up.grad, torch.nn.functional.silu(g))


def test_plans_are_cached_per_approximation():
    x = torch.randn(5, 7)
    exact, tanh = lz.gelu(x), lz.gelu(x, approximate="tanh")
    assert not torch.equal(exact, tanh)
    assert lz.explain("gelu", x).cached and lz.explain("gelu", x, approximate="tanh").cached


@pytest.mark.parametrize("call, argument, fragment", [
    (lambda x, w: lz.swiglu(x, x[:, :4]), "up", "shape"),
    (lambda x, w: lz.swiglu(x, x.double()), "up", "dtype"),
    (lambda x, w: lz.swiglu(x.int(), x.int()), "gate", "floating-point"),
    (lambda x, w: lz.geglu(x, x, approximate="fast"), "approximate", "('none', 'tanh')"),
    (lambda x, w: lz.gelu(x, approximate=None), "approximate", "'none'"),
    (lambda x, w: lz.silu([1.0]), "x", "torch.Tensor"),
    (lambda x, w: lz.fused_mlp(x, w, w, w, activation="relu"), "activation", "swiglu"),
    (lambda x, w: lz.fused_mlp(x, w, w, w), "w_down", "(d_model, d_ff)"),
    (lambda x, w: lz.fused_mlp(x, w.T, w, w.T), "w_gate", "nn.Linear"),
    (lambda x, w: lz.fused_mlp(x, w, w[:5], w.T), "w_up", "shape"),
    (lambda x, w: lz.fused_mlp(x, w, w, w.T.double()), "w_down", "dtype"),
])
def test_errors_name_the_argument(call, argument, fragment):
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    with pytest.raises(InvalidInputError) as info:
        call(x, w)
    assert info.value.argument == argument and fragment in str(info.value)
