"""Norms: every CPU kernel (torch.* and reference.*) against an independent float64 reference.

The reference normalizes the same (possibly low-precision) inputs in float64; the kernel output
must match within conftest's `tolerance(dtype)` after its own rounding to the input dtype.
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.errors import InvalidInputError
from layerzero.ops.norm import GROUP_NORM, LAYER_NORM, RMS_NORM
from layerzero.state import runtime
from tests.conftest import tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_SHAPES = [(7,), (3, 64), (2, 5, 80), (1, 3, 4, 257), (4, 4096)]


def ref_rms(x, w, eps):
    x = x.double()
    out = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return out if w is None else out * w.double()


def ref_layer(x, w, b, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    out = out if w is None else out * w.double()
    return out if b is None else out + b.double()


def ref_group(x, groups, w, b, eps):
    xd = x.double()
    n, c = x.shape[:2]
    g = xd.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    out = ((g - mean) / torch.sqrt(((g - mean) ** 2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    out = out if w is None else out * w.double().reshape(shape)
    return out if b is None else out + b.double().reshape(shape)


def run_kernel(family, kernel_id, *args):
    """Run one kernel bound as a plan would bind it, after checking that it validates."""
    ok, reasons = lz.validate(kernel_id, family.name, *args)
    assert ok, f"{kernel_id} rejected these inputs: {reasons}"
    run, _ = family.bind(runtime.registry.kernel(kernel_id), family.context(*args))
    return run(*args)


def check(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype), msg=lambda m: f"{what}: {m}")


def rand(shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


@pytest.mark.parametrize("kernel_id", ["torch.rms_norm", "reference.rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
def test_rms_norm_kernels(kernel_id, dtype, shape, weight):
    x = rand(shape, dtype, seed=1, scale=3.0)
    w = rand(shape[-1:], dtype, seed=2) if weight else None
    out = run_kernel(RMS_NORM, kernel_id, x, w, 1e-6)
    check(out, ref_rms(x, w, 1e-6), dtype, kernel_id)


@pytest.mark.parametrize("kernel_id", ["torch.layer_norm", "reference.layer_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("params", ["weight_bias", "weight", "none"])
def test_layer_norm_kernels(kernel_id, dtype, shape, params):
    x = rand(shape, dtype, seed=3, scale=2.0, offset=5.0)  # a large mean: a one-pass variance would fail
    w = rand(shape[-1:], dtype, seed=4) if params != "none" else None
    b = rand(shape[-1:], dtype, seed=5) if params == "weight_bias" else None
    out = run_kernel(LAYER_NORM, kernel_id, x, w, b, 1e-5)
    check(out, ref_layer(x, w, b, 1e-5), dtype, kernel_id)


@pytest.mark.parametrize("kernel_id", ["torch.group_norm", "reference.group_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "groups"), [((2, 6), 3), ((3, 8, 5), 4), ((2, 12, 3, 5), 1), ((1, 32, 7, 7), 32)],
                         ids=str)
@pytest.mark.parametrize("params", [True, False], ids=["affine", "plain"])
def test_group_norm_kernels(kernel_id, dtype, shape, groups, params):
    x = rand(shape, dtype, seed=6, scale=2.0, offset=-1.0)
    w = rand(shape[1:2], dtype, seed=7) if params else None
    b = rand(shape[1:2], dtype, seed=8) if params else None
    out = run_kernel(GROUP_NORM, kernel_id, x, groups, w, b, 1e-5)
    check(out, ref_group(x, groups, w, b, 1e-5), dtype, kernel_id)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_norms_match_reference(dtype):
    x = rand((3, 5, 96), dtype, seed=9)
    w, b = rand((96,), dtype, seed=10), rand((96,), dtype, seed=11)
    check(lz.rms_norm(x, w, 1e-5), ref_rms(x, w, 1e-5), dtype, f"lz.rms_norm via {lz.which('rms_norm', x, w, 1e-5)}")
    check(lz.layer_norm(x, w, b), ref_layer(x, w, b, 1e-5), dtype, "lz.layer_norm")
    check(lz.group_norm(x, 5), ref_group(x, 5, None, None, 1e-5), dtype, "lz.group_norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_weight_with_half_input_keeps_input_dtype(dtype):
    """A float32 weight (common for norms kept in fp32) with half x returns x's dtype."""
    x = rand((4, 64), dtype, seed=12)
    w = rand((64,), torch.float32, seed=13)
    check(lz.rms_norm(x, w), ref_rms(x, w, 1e-6), dtype, "rms_norm fp32 weight")
    check(lz.layer_norm(x, w, w), ref_layer(x, w, w, 1e-5), dtype, "layer_norm fp32 weight")


def test_non_contiguous_input():
    base = rand((6, 2, 128), torch.float32, seed=14)
    x = base[:, 0, ::2]  # strided rows and columns
    assert not x.is_contiguous()
    w = rand((64,), torch.float32, seed=15)
    check(lz.rms_norm(x, w), ref_rms(x, w, 1e-6), torch.float32, "rms_norm strided")
    check(lz.layer_norm(x, w, w), ref_layer(x, w, w, 1e-5), torch.float32, "layer_norm strided")
    xt = rand((5, 8, 3), torch.float32, seed=16).transpose(0, 2)  # (3, 8, 5), permuted strides
    check(lz.group_norm(xt, 4), ref_group(xt, 4, None, None, 1e-5), torch.float32, "group_norm strided")


def test_eps_is_used_per_call_not_cached():
    """eps is not part of the plan key; a second call with another eps must still use its own eps."""
    x = rand((2, 16), torch.float32, seed=17, scale=1e-2)
    small, large = lz.rms_norm(x, None, 1e-6), lz.rms_norm(x, None, 1.0)
    check(small, ref_rms(x, None, 1e-6), torch.float32, "eps 1e-6")
    check(large, ref_rms(x, None, 1.0), torch.float32, "eps 1.0 (cache hit)")


def test_gradients_flow_through_the_selected_kernel():
    x = rand((3, 32), torch.float64, seed=18).requires_grad_()
    w = rand((32,), torch.float64, seed=19).requires_grad_()
    lz.rms_norm(x, w).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref_rms(x, w, 1e-6).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize(
    ("call", "argument", "fragment"),
    [
        (lambda: lz.rms_norm(torch.randn(3, 8), torch.randn(7)), "weight", "shape (8,)"),
        (lambda: lz.rms_norm(torch.randn(3, 8), [1.0] * 8), "weight", "a torch.Tensor"),
        (lambda: lz.rms_norm(torch.arange(8), None), "x", "a floating-point dtype"),
        (lambda: lz.rms_norm(torch.randn(3, 0), None), "x", "a non-empty normalized dimension"),
        (lambda: lz.rms_norm(torch.randn(3, 8), torch.ones(8, dtype=torch.int32)), "weight", "a floating-point dtype"),
        (lambda: lz.layer_norm(torch.randn(3, 8), None, torch.randn(8, 1)), "bias", "shape (8,)"),
        (lambda: lz.group_norm(torch.randn(8), 2), "x", "at least 2 dimension(s)"),
        (lambda: lz.group_norm(torch.randn(2, 6, 4), 4), "num_groups", "a positive divisor of the channel count 6"),
        (lambda: lz.group_norm(torch.randn(2, 6, 4), 3, torch.randn(4)), "weight", "shape (6,)"),
    ],
    ids=["weight_shape", "weight_type", "int_x", "empty", "int_weight", "bias_shape", "group_rank", "groups",
         "group_weight"],
)
def test_bad_input_errors(call, argument, fragment):
    with pytest.raises(InvalidInputError) as info:
        call()
    assert info.value.argument == argument
    assert fragment in str(info.value), str(info.value)


def test_torch_rms_norm_is_refused_on_a_torch_without_it(monkeypatch):
    """pyproject allows torch 2.3, which has no torch.rms_norm: the kernel is refused, not tried and failed."""
    from layerzero.context import SelectionContext
    from layerzero.kernel import check_constraints

    runtime.ensure_loaded()
    spec = runtime.registry.kernel("torch.rms_norm")
    ctx = SelectionContext(op="norm.rms", device_type="cpu", dtype=torch.float32, num_rows=4, hidden_size=32)
    assert check_constraints(spec, ctx) == []
    monkeypatch.delattr(torch, "rms_norm")
    assert [r.reason for r in check_constraints(spec, ctx)] == [lz.Reason.BACKEND_VERSION_UNSUPPORTED]
