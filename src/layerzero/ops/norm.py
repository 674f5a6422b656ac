"""Normalization: `lz.rms_norm`, `lz.layer_norm`, `lz.group_norm`.

Kernel calling conventions: rms_norm `impl(x, weight, eps)`, layer_norm `impl(x, weight, bias,
eps)`, group_norm `impl(x, num_groups, weight, bias, eps)`; weight and bias may be None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..capture import GRAPH_CALL, stream_capturing
from ..context import SelectionContext
from ..errors import InvalidInputError
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


def _param_key(t: torch.Tensor | None) -> Any:
    return None if t is None else (t.shape, t.dtype, t.device, t.requires_grad)


def _rms_key(x: Any, weight: Any = None, eps: float = 1e-6) -> tuple[Any, ...]:
    """The plan-cache key of rms_norm (the call, select, explain and solve all use this one)."""
    return (
        "norm.rms",
        x.shape,
        x.dtype,
        x.device,
        None if weight is None else (weight.shape, weight.dtype, weight.device, weight.requires_grad),
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight.

    x: (..., hidden); weight: (hidden,) or None. Returns x's shape and dtype.
    """
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(RMS_NORM, x, weight, eps)
    try:
        key = _rms_key(x, weight)
    except AttributeError:
        _check(x=x, weight=weight)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(RMS_NORM, key, (x, weight, eps), {})
    try:
        return plan.run(x, weight, eps)
    except Exception as error:
        return plan.recover(error, x, weight, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension. x: (..., hidden); weight, bias: (hidden,) or None."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(LAYER_NORM, x, weight, bias, eps)
    try:
        key = _layer_key(x, weight, bias)
    except AttributeError:
        _check(x=x, weight=weight, bias=bias)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(LAYER_NORM, key, (x, weight, bias, eps), {})
    try:
        return plan.run(x, weight, bias, eps)
    except Exception as error:
        return plan.recover(error, x, weight, bias, eps)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm. x: (N, C, *); C divisible by num_groups; weight, bias: (C,) or None."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(GROUP_NORM, x, num_groups, weight, bias, eps)
    try:
        key = _group_key(x, num_groups, weight, bias)
    except AttributeError:
        _check(x=x, weight=weight, bias=bias)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(GROUP_NORM, key, (x, num_groups, weight, bias, eps), {})
    try:
        return plan.run(x, num_groups, weight, bias, eps)
    except Exception as error:
        return plan.recover(error, x, num_groups, weight, bias, eps)


def _layer_key(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> tuple[Any, ...]:
    return (
        "norm.layer",
        x.shape,
        x.dtype,
        x.device,
        _param_key(weight),
        _param_key(bias),
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _group_key(x: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> tuple[Any, ...]:
    return (
        "norm.group",
        x.shape,
        x.dtype,
        x.device,
        num_groups,
        _param_key(weight),
        _param_key(bias),
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _check(**tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _check_param(name: str, t: torch.Tensor | None, x: torch.Tensor, size: int) -> None:
    if t is None:
        return
    if tuple(t.shape) != (size,):
        raise InvalidInputError(name, f"shape ({size},)", tuple(t.shape))
    if t.device != x.device:
        raise InvalidInputError(name, f"device {x.device} (as x)", t.device)
    if t.dtype != x.dtype and not (t.is_floating_point() and x.is_floating_point()):
        raise InvalidInputError(name, f"a floating-point dtype (x is {x.dtype})", t.dtype)


def _row_context(
    op: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, min_dim: int = 1
) -> SelectionContext:
    _check(x=x, weight=weight, bias=bias)
    if x.dim() < min_dim:
        raise InvalidInputError("x", f"a tensor with at least {min_dim} dimension(s)", f"{x.dim()}-D")
    if not x.is_floating_point():
        raise InvalidInputError("x", "a floating-point dtype", x.dtype)
    hidden = x.shape[-1] if op != "norm.group" else x.shape[1]
    if hidden == 0:
        raise InvalidInputError("x", "a non-empty normalized dimension", tuple(x.shape))
    _check_param("weight", weight, x, hidden)
    _check_param("bias", bias, x, hidden)
    # Kernels that take the weight in x's dtype get it cast by the reference only; record mixing.
    return SelectionContext(
        op=op,
        **SelectionContext.device_fields(x.device),  # type: ignore[arg-type]
        dtype=x.dtype,
        hidden_size=hidden,
        num_rows=x.numel() // max(hidden, 1),
        has_weight=weight is not None,
        has_bias=bias is not None,
        requires_grad=torch.is_grad_enabled() and x.requires_grad,
    )


def _rms_context(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> SelectionContext:
    return _row_context("norm.rms", x, weight, None)


def _layer_context(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> SelectionContext:
    return _row_context("norm.layer", x, weight, bias)


def _group_context(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> SelectionContext:
    ctx = _row_context("norm.group", x, weight, bias, min_dim=2)
    if not isinstance(num_groups, int) or num_groups <= 0 or x.shape[1] % num_groups:
        raise InvalidInputError("num_groups", f"a positive divisor of the channel count {x.shape[1]}", num_groups)
    return ctx.replace(num_groups=num_groups, num_rows=x.shape[0])


# How lz.tune / lz.warmup / benchmarks build norm calls (perf/workloads.py), and how lz.solve calls the
# kernels without the engine (perf/solve.py).


def _rows_workload(bias: bool) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Args]:
    """(rows, hidden): x of that shape, a weight (and bias) of size hidden."""

    def make(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
        rows, hidden = shape
        x = randn((rows, hidden), dtype, device, gen)
        weight = (1.0 + 0.1 * randn((hidden,), torch.float32, device, gen)).to(dtype)
        if not bias:
            return (x, weight)
        return (x, weight, (0.1 * randn((hidden,), torch.float32, device, gen)).to(dtype))

    return make


# rows: the product of all but the last dim; a 0-d x or an empty last dim goes to dynamic selection
_ROWS = ("s = x.shape", "if s and (H := s[-1]):", "    R = s.numel() // H", "    dt = x.dtype")


RMS_NORM = register_family(
    OpFamily(
        "rms_norm",
        _rms_key,
        _rms_context,
        function=rms_norm,
        library=True,
        workloads=(
            Workload("rms_norm", ("rows", "hidden"), ("rows",), _rows_workload(bias=False), op_ids={"norm.rms": {}}),
        ),
        solve=SolveCode(
            ("x", "weight", "eps"),
            ("weight",),
            "x",
            ("x", "weight"),
            _ROWS,
            {"rows": "R", "hidden": "H"},
            "{K}({x}, weight, eps)",
            contiguous=("x",),
        ),
    )
)
LAYER_NORM = register_family(
    OpFamily(
        "layer_norm",
        _layer_key,
        _layer_context,
        function=layer_norm,
        library=True,
        workloads=(
            Workload("layer_norm", ("rows", "hidden"), ("rows",), _rows_workload(bias=True), op_ids={"norm.layer": {}}),
        ),
        solve=SolveCode(
            ("x", "weight", "bias", "eps"),
            ("weight", "bias"),
            "x",
            ("x", "weight", "bias"),
            _ROWS,
            {"rows": "R", "hidden": "H"},
            "{K}({x}, weight, bias, eps)",
            contiguous=("x",),
        ),
    )
)
GROUP_NORM = register_family(OpFamily("group_norm", _group_key, _group_context, function=group_norm, library=True))
