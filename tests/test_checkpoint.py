"""Gradient checkpointing through lz.* ops: torch's control-flow exceptions are not kernel failures.

Non-reentrant checkpointing stops its recomputation by raising torch.utils.checkpoint's
_StopRecomputationError from the saved-tensor hook of the last tensor it needs, that is from inside
whichever kernel saves it. The runtime fallback must let it through: no second kernel, no breaker.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointError, _StopRecomputationError, checkpoint

import layerzero as lz
from layerzero.kernel import ALL_FLOAT_DTYPES
from layerzero.monitor.health import is_control_flow
from layerzero.state import runtime


def test_issue_repro_rms_norm_under_non_reentrant_checkpoint():
    w = torch.ones(16, requires_grad=True)
    x = torch.randn(2, 16, requires_grad=True)

    def block(x):
        return lz.rms_norm(torch.nn.functional.linear(x, torch.eye(16)) * 2, w, 1e-6)

    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert lz.which("rms_norm", x, w, 1e-6) != "reference.rms_norm"  # a guarded kernel ran
    report = lz.health()
    assert (report.failures, report.fallbacks, report.breakers) == (0, 0, ())
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _lin(x: torch.Tensor, n: int) -> torch.Tensor:
    """A differentiable intermediate in front of the op (its input must be recomputed)."""
    return F.linear(x, torch.eye(n, x.shape[-1], dtype=x.dtype)) * 2


COS, SIN = lz.rope_cache(6, 16)
IDS = torch.tensor([[1, 3, 0], [2, 2, 5]])
CU = torch.tensor([0, 5, 12], dtype=torch.int32)
_G = torch.Generator().manual_seed(3)
WG, WU, WD = (torch.randn(*s, generator=_G) * 0.3 for s in ((24, 16), (24, 16), (16, 24)))

# name -> (input shape, block). Each block ends with the op, as in a model layer.
BLOCKS: dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]] = {
    "attention": ((2, 6, 64), lambda x: lz.attention(_lin(x, 64).view(2, 6, 4, 16), _lin(x, 32).view(2, 6, 2, 16),
                                                     _lin(x, 32).view(2, 6, 2, 16), is_causal=True)),
    "attention_bhsd": ((2, 6, 64), lambda x: lz.attention(_lin(x, 64).view(2, 6, 4, 16).transpose(1, 2),
                                                          _lin(x, 64).view(2, 6, 4, 16).transpose(1, 2),
                                                          _lin(x, 64).view(2, 6, 4, 16).transpose(1, 2),
                                                          layout="BHSD")),
    "attention_varlen": ((12, 16), lambda x: lz.attention_varlen(_lin(x, 16).view(12, 2, 8), _lin(x, 16).view(12, 2, 8),
                                                                 _lin(x, 16).view(12, 2, 8), CU, CU, 7, 7,
                                                                 is_causal=True)),
    "rms_norm": ((3, 16), lambda x: lz.rms_norm(_lin(x, 16), _lin(x, 16)[0], 1e-6)),
    "layer_norm": ((3, 16), lambda x: lz.layer_norm(_lin(x, 16), _lin(x, 16)[0], _lin(x, 16)[1], 1e-5)),
    "group_norm": ((3, 16), lambda x: lz.group_norm(_lin(x, 16).view(3, 4, 4), 2, _lin(x, 4)[0], _lin(x, 4)[1], 1e-5)),
    "rope": ((2, 6, 32), lambda x: lz.rope(_lin(x, 32).view(2, 6, 2, 16), COS, SIN)),
    "rope_qk": ((2, 6, 32), lambda x: torch.cat(lz.rope_qk(_lin(x, 32).view(2, 6, 2, 16),
                                                           _lin(x, 16).view(2, 6, 1, 16), COS, SIN), dim=2)),
    "silu": ((3, 16), lambda x: lz.silu(_lin(x, 16))),
    "gelu": ((3, 16), lambda x: lz.gelu(_lin(x, 16))),
    "gelu_tanh": ((3, 16), lambda x: lz.gelu(_lin(x, 16), "tanh")),
    "swiglu": ((3, 16), lambda x: lz.swiglu(_lin(x, 24), _lin(x, 24))),
    "geglu": ((3, 16), lambda x: lz.geglu(_lin(x, 24), _lin(x, 24))),
    "fused_mlp_swiglu": ((3, 16), lambda x: lz.fused_mlp(_lin(x, 16), WG, WU, WD)),
    "fused_mlp_geglu": ((3, 16), lambda x: lz.fused_mlp(_lin(x, 16), WG, WU, WD, activation="geglu")),
    "embedding": ((6, 4), lambda x: lz.embedding(IDS, _lin(x, 4))),
}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_op_under_checkpoint_gives_the_plain_gradients(name: str, use_reentrant: bool):
    shape, block = BLOCKS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = torch.randn(block(x.detach()).shape, generator=torch.Generator().manual_seed(1))

    (block(x) * weight).sum().backward()
    want = x.grad.clone()
    x.grad = None
    (checkpoint(block, x, use_reentrant=use_reentrant) * weight).sum().backward()

    report = lz.health()
    assert (report.failures, report.fallbacks) == (0, 0), str(report)
    assert x.grad is not None and want.abs().sum() > 0
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-5)  # fp32; the same kernels ran both times


def _register(kernel_id: str, impl: Callable[..., torch.Tensor], priority: int) -> None:
    lz.register_kernel(id=kernel_id, ops=("norm.rms",), impl=impl, priority=priority, dtypes=ALL_FLOAT_DTYPES,
                       platforms=frozenset({"cpu"}), supports_backward=True)


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if w is None else out * w


@pytest.mark.parametrize("error", [_StopRecomputationError(), CheckpointError("recomputed a different graph")],
                         ids=["stop_recomputation", "checkpoint_error"])
def test_control_flow_exceptions_pass_through_untouched_and_count_nowhere(error: Exception):
    ran = []

    def steering(x, w, eps):
        raise error

    def second(x, w, eps):
        ran.append("second")
        return _rms(x, w, eps)

    _register("mine.steering", steering, 900)
    _register("mine.second", second, 800)
    x, w = torch.randn(2, 16), torch.ones(16)
    assert lz.which("rms_norm", x, w, 1e-6) == "mine.steering"
    with pytest.raises(type(error)) as raised:
        lz.rms_norm(x, w, 1e-6)
    assert raised.value is error  # the same object, not wrapped in a KernelExecutionError
    assert ran == []  # no fallback ran
    report = lz.health()
    assert (report.failures, report.fallbacks, report.breakers) == (0, 0, ())


def test_control_flow_from_the_fallback_kernel_passes_through_too():
    def broken(x, w, eps):
        raise RuntimeError("a real failure")

    def steering(x, w, eps):
        raise _StopRecomputationError

    _register("mine.broken", broken, 900)
    _register("mine.steering", steering, 800)
    with pytest.raises(_StopRecomputationError):
        lz.rms_norm(torch.randn(2, 16), torch.ones(16), 1e-6)
    report = lz.health()
    assert report.failures == 1 and report.breaker("mine.broken") is not None  # the real failure counted
    assert report.breaker("mine.steering") is None and report.fallbacks == 0


def test_kernel_failures_still_fall_back_and_base_exceptions_are_never_caught():
    def broken(x, w, eps):
        raise RuntimeError("a real failure")

    _register("mine.broken", broken, 900)
    x, w = torch.randn(2, 16), torch.ones(16)
    torch.testing.assert_close(lz.rms_norm(x, w, 1e-6), _rms(x, w, 1e-6), rtol=1e-4, atol=1e-5)
    assert lz.health().fallbacks == 1

    lz.reset()

    def interrupted(x, w, eps):
        raise KeyboardInterrupt

    _register("mine.interrupted", interrupted, 900)
    with pytest.raises(KeyboardInterrupt):
        lz.rms_norm(x, w, 1e-6)
    assert lz.health().failures == 0


def test_is_control_flow_names_torch_signals_only():
    assert is_control_flow(_StopRecomputationError())
    assert is_control_flow(CheckpointError("x"))
    assert not is_control_flow(RuntimeError("x"))
    assert not is_control_flow(AssertionError("x"))
    assert runtime.health.failures == 0
