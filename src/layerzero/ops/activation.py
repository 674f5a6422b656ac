"""Activations and the gated MLP: `lz.silu`, `lz.gelu`, `lz.swiglu`, `lz.geglu`, `lz.fused_mlp`.

Semantics (every kernel is tested against backends/reference.py, which computes in float32):
- swiglu(gate, up) = silu(gate) * up;  geglu(gate, up) = gelu(gate) * up. gate and up have the
  same shape, dtype and device; the result has that shape and dtype.
- approximate: "none" (erf GELU, torch's default) or "tanh" (Gemma's gelu_pytorch_tanh).
- fused_mlp(x, w_gate, w_up, w_down) = act(x @ w_gate.T, x @ w_up.T) @ w_down.T, weights in
  nn.Linear's (out_features, in_features) layout: w_gate, w_up (d_ff, d_model), w_down (d_model, d_ff).

The approximation is part of the op id, so kernels declare what they implement as data:
`activation.silu`, `activation.gelu`, `activation.gelu_tanh`, `activation.swiglu`,
`activation.geglu`, `activation.geglu_tanh`, `mlp.swiglu`, `mlp.geglu`, `mlp.geglu_tanh`.

Kernel calling conventions: silu `impl(x)`; gelu `impl(x, approximate)`; swiglu `impl(gate, up)`;
geglu `impl(gate, up, approximate)`; mlp `impl(x, w_gate, w_up, w_down, activation)` with
activation the op suffix ("swiglu", "geglu" or "geglu_tanh").
"""

from __future__ import annotations

from typing import Any

import torch

from ..capture import GRAPH_CALL, stream_capturing
from ..context import SelectionContext
from ..errors import InvalidInputError
from ..state import runtime
from .family import Args, OpFamily, Shape, Workload, compile_flags, dynamo_compiling, randn, register_family

_grad_enabled = torch.is_grad_enabled
APPROXIMATIONS = ("none", "tanh")
MLP_ACTIVATIONS = ("swiglu", "geglu")


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), elementwise. x: any shape, floating point."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(SILU, x)
    try:
        key = _silu_key(x)
    except AttributeError:
        _check_tensors(x=x)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(SILU, key, (x,), {})
    try:
        return plan.run(x)
    except Exception as error:
        return plan.recover(error, x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, elementwise: exact (erf) with approximate="none", the tanh form with "tanh"."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(GELU, x, approximate)
    try:
        key = _gelu_key(x, approximate)
    except AttributeError:
        _check_tensors(x=x)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(GELU, key, (x, approximate), {})
    try:
        return plan.run(x, approximate)
    except Exception as error:
        return plan.recover(error, x, approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: (..., d_ff), same shape/dtype/device."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(SWIGLU, gate, up)
    try:
        key = _swiglu_key(gate, up)
    except AttributeError:
        _check_tensors(gate=gate, up=up)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(SWIGLU, key, (gate, up), {})
    try:
        return plan.run(gate, up)
    except Exception as error:
        return plan.recover(error, gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate, approximate) * up. gate, up: (..., d_ff), same shape/dtype/device."""
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(GEGLU, gate, up, approximate)
    try:
        key = _geglu_key(gate, up, approximate)
    except AttributeError:
        _check_tensors(gate=gate, up=up)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(GEGLU, key, (gate, up, approximate), {})
    try:
        return plan.run(gate, up, approximate)
    except Exception as error:
        return plan.recover(error, gate, up, approximate)


def fused_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    approximate: str = "none",
) -> torch.Tensor:
    """Gated MLP act(x @ w_gate.T, x @ w_up.T) @ w_down.T (Llama's SwiGLU MLP, Gemma's GeGLU MLP).

    x: (..., d_model); w_gate, w_up: (d_ff, d_model); w_down: (d_model, d_ff), nn.Linear layout.
    activation: "swiglu" or "geglu" (approximate applies to geglu). Returns (..., d_model).
    """
    # torch.compile / torch.export: one custom op node (ops/library.py)
    if dynamo_compiling() or compile_flags._is_compiling_flag:
        from .library import trace  # an import dynamo runs for real: registers the ops

        return trace(FUSED_MLP, x, w_gate, w_up, w_down, activation, approximate)
    try:
        key = _mlp_key(x, w_gate, w_up, w_down, activation, approximate)
    except AttributeError:
        _check_tensors(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(FUSED_MLP, key, (x, w_gate, w_up, w_down, activation, approximate), {})
    act = _MLP_OP_SUFFIX[activation, approximate]
    try:
        return plan.run(x, w_gate, w_up, w_down, act)
    except Exception as error:
        return plan.recover(error, x, w_gate, w_up, w_down, act)


_MLP_OP_SUFFIX = {
    ("swiglu", "none"): "swiglu",
    ("swiglu", "tanh"): "swiglu",
    ("geglu", "none"): "geglu",
    ("geglu", "tanh"): "geglu_tanh",
}


def _silu_key(x: Any) -> tuple[Any, ...]:
    return (
        "activation.silu",
        x.shape,
        x.dtype,
        x.device,
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _gelu_key(x: Any, approximate: str = "none") -> tuple[Any, ...]:
    return (
        "activation.gelu",
        approximate,
        x.shape,
        x.dtype,
        x.device,
        _grad_enabled() and x.requires_grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _mlp_key(
    x: Any, w_gate: Any, w_up: Any, w_down: Any, activation: str = "swiglu", approximate: str = "none"
) -> tuple[Any, ...]:
    grad = _grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad or w_down.requires_grad)
    return (
        "mlp",
        activation,
        approximate,
        x.shape,
        x.dtype,
        x.device,
        w_gate.shape,
        w_gate.dtype,
        w_gate.device,
        w_up.shape,
        w_up.dtype,
        w_up.device,
        w_down.shape,
        w_down.dtype,
        w_down.device,
        grad,
        x.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _gated_key(op: str, gate: Any, up: Any, approximate: str = "none") -> tuple[Any, ...]:
    return (
        op,
        approximate,
        gate.shape,
        gate.dtype,
        gate.device,
        up.shape,
        up.dtype,
        up.device,
        _grad_enabled() and (gate.requires_grad or up.requires_grad),
        gate.is_cuda and (GRAPH_CALL.depth > 0 or stream_capturing()),
    )


def _swiglu_key(gate: Any, up: Any) -> tuple[Any, ...]:
    return _gated_key("activation.swiglu", gate, up)


def _geglu_key(gate: Any, up: Any, approximate: str = "none") -> tuple[Any, ...]:
    return _gated_key("activation.geglu", gate, up, approximate)


def _check_tensors(**tensors: Any) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _check_approximate(approximate: Any) -> str:
    if approximate not in APPROXIMATIONS:
        raise InvalidInputError("approximate", f"one of {APPROXIMATIONS}", repr(approximate))
    return "" if approximate == "none" else "_tanh"


def _row_context(op: str, x: torch.Tensor, name: str, requires_grad: bool) -> SelectionContext:
    if not x.is_floating_point():
        raise InvalidInputError(name, "a floating-point dtype", x.dtype)
    hidden = x.shape[-1] if x.dim() else 1
    return SelectionContext(
        op=op,
        **SelectionContext.device_fields(x.device),  # type: ignore[arg-type]
        dtype=x.dtype,
        hidden_size=hidden,
        num_rows=x.numel() // max(hidden, 1),
        requires_grad=torch.is_grad_enabled() and requires_grad,
    )


def _silu_context(x: torch.Tensor) -> SelectionContext:
    _check_tensors(x=x)
    return _row_context("activation.silu", x, "x", x.requires_grad)


def _gelu_context(x: torch.Tensor, approximate: str = "none") -> SelectionContext:
    _check_tensors(x=x)
    return _row_context("activation.gelu" + _check_approximate(approximate), x, "x", x.requires_grad)


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    _check_tensors(gate=gate, up=up)
    if up.shape != gate.shape:
        raise InvalidInputError("up", f"shape {tuple(gate.shape)} (as gate)", tuple(up.shape))
    if up.dtype != gate.dtype:
        raise InvalidInputError("up", f"dtype {gate.dtype} (as gate)", up.dtype)
    if up.device != gate.device:
        raise InvalidInputError("up", f"device {gate.device} (as gate)", up.device)


def _swiglu_context(gate: torch.Tensor, up: torch.Tensor) -> SelectionContext:
    _check_pair(gate, up)
    return _row_context("activation.swiglu", gate, "gate", gate.requires_grad or up.requires_grad)


def _geglu_context(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> SelectionContext:
    _check_pair(gate, up)
    op = "activation.geglu" + _check_approximate(approximate)
    return _row_context(op, gate, "gate", gate.requires_grad or up.requires_grad)


def _mlp_context(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    approximate: str = "none",
) -> SelectionContext:
    _check_tensors(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    if activation not in MLP_ACTIVATIONS:
        raise InvalidInputError("activation", f"one of {MLP_ACTIVATIONS}", repr(activation))
    suffix = _check_approximate(approximate)
    if x.dim() < 1:
        raise InvalidInputError("x", "a tensor (..., d_model)", "a 0-D tensor")
    d_model = x.shape[-1]
    if w_gate.dim() != 2 or w_gate.shape[1] != d_model:
        raise InvalidInputError("w_gate", f"shape (d_ff, d_model={d_model}) (nn.Linear layout)", tuple(w_gate.shape))
    d_ff = w_gate.shape[0]
    if tuple(w_up.shape) != (d_ff, d_model):
        raise InvalidInputError("w_up", f"shape ({d_ff}, {d_model}) (as w_gate)", tuple(w_up.shape))
    if tuple(w_down.shape) != (d_model, d_ff):
        raise InvalidInputError(
            "w_down", f"shape ({d_model}, {d_ff}) = (d_model, d_ff) (nn.Linear layout)", tuple(w_down.shape)
        )
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise InvalidInputError(name, f"dtype {x.dtype} (as x)", w.dtype)
        if w.device != x.device:
            raise InvalidInputError(name, f"device {x.device} (as x)", w.device)
    grad = any(t.requires_grad for t in (x, w_gate, w_up, w_down))
    op = "mlp.swiglu" if activation == "swiglu" else "mlp.geglu" + suffix
    ctx = _row_context(op, x, "x", grad)
    return ctx.replace(hidden_size=d_ff, num_rows=x.numel() // max(d_model, 1))


def _mlp_fake(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    approximate: str = "none",
) -> torch.Tensor:
    """The fake kernel of torch.ops.layerzero.fused_mlp (ops/library.py): (..., d_model) like x's rows."""
    _mlp_context(x, w_gate, w_up, w_down, activation, approximate)
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


def _pair_workload(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    """swiglu's workload (rows, hidden): gate and up of that shape."""
    return (randn(shape, dtype, device, gen), randn(shape, dtype, device, gen))


SILU = register_family(OpFamily("silu", _silu_key, _silu_context, function=silu, library=True))
GELU = register_family(OpFamily("gelu", _gelu_key, _gelu_context, function=gelu, library=True))
SWIGLU = register_family(
    OpFamily(
        "swiglu",
        _swiglu_key,
        _swiglu_context,
        function=swiglu,
        library=True,
        workloads=(Workload("swiglu", ("rows", "hidden"), ("rows",), _pair_workload),),
    )
)
GEGLU = register_family(OpFamily("geglu", _geglu_key, _geglu_context, function=geglu, library=True))
FUSED_MLP = register_family(
    OpFamily("fused_mlp", _mlp_key, _mlp_context, function=fused_mlp, library=True, fake=_mlp_fake)
)
