"""CUDA graphs on the GPU: attention + rms_norm captured and replayed on new inputs, unsafe
kernels kept out of the capture, and a kernel that fails only under capture falling back.

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_graphs_gpu.py -s -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.backends import reference
from layerzero.graphs import compare_outputs
from layerzero.kernel import HALF_DTYPES

pytestmark = pytest.mark.gpu

B, S, HQ, HKV, D = 2, 128, 8, 2, 64
DTYPE = torch.float16
ATTENTION_OPS = ("attention.causal", "attention.full", "attention.masked")


def inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, HQ, D, device="cuda", dtype=DTYPE, generator=g)
    k = torch.randn(B, S, HKV, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(B, S, HKV, D, device="cuda", dtype=DTYPE, generator=g)
    w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(DTYPE)
    return q, k, v, w


def step(q, k, v, w):
    """One decoder-ish step: causal attention, then RMSNorm of its output."""
    a = lz.attention(q, k, v, is_causal=True)
    return a, lz.rms_norm(a, w)


def reference_step(q, k, v, w):
    a = reference.attention(*(t.double().transpose(1, 2) for t in (q, k, v)), None, True, 0.0, None).transpose(1, 2)
    return a, reference.rms_norm(a, w.double(), 1e-6)


def capture(fn, static):
    lz.warmup_for_capture(fn, *static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def replay_and_check(graph, static_out, static, fn, n: int, seed0: int = 1000) -> float:
    """Copy new inputs into the static buffers, replay, compare with eager and the reference."""
    worst = 0.0
    for i in range(n):
        new = inputs(seed0 + i)
        for buf, value in zip(static, new, strict=True):
            buf.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = fn(*new)
        worst = max(worst, compare_outputs(static_out, eager, f"replay {i}"))
        for got, ref in zip(static_out, reference_step(*new), strict=True):
            torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    return worst


def test_attention_and_rms_norm_graph_replays_100_times_on_new_inputs():
    lz.enable_telemetry(prometheus=False, opentelemetry=False)
    static = inputs(0)
    eager_kernels = (lz.which("attention", *static[:3], is_causal=True), lz.which("rms_norm", static[0], static[3]))
    graph, static_out = capture(step, static)
    worst = replay_and_check(graph, static_out, static, step, 100)
    selections = lz.telemetry().selections
    print(f"\n[graphs] {torch.cuda.get_device_name()}: eager kernels {eager_kernels}; selections {selections}; "
          f"100 replays on new inputs, max |graph - eager| = {worst:.3g}")
    check = lz.validate_graph_capture(step, *inputs(1), replays=10)
    print(f"[graphs] validate_graph_capture: {check}")
    assert check.replays == 10 and check.max_abs_error <= 2e-3


def test_unsafe_kernels_are_kept_out_of_the_capture():
    called_under_capture: list[str] = []

    def unsafe_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, *rest):
        if torch.cuda.is_current_stream_capturing():
            called_under_capture.append("unsafe.attention")
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)

    def unsafe_rms(x, w, eps):
        if torch.cuda.is_current_stream_capturing():
            called_under_capture.append("unsafe.rms")
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    lz.register_kernel(id="unsafe.attention", ops=ATTENTION_OPS, impl=unsafe_attention, priority=999,
                       dtypes=HALF_DTYPES, layout="BHSD", graph_safe=False, causal_non_square=False)
    lz.register_kernel(id="unsafe.rms", ops=("norm.rms",), impl=unsafe_rms, priority=999, dtypes=HALF_DTYPES,
                       graph_safe=False)
    static = inputs(0)
    assert lz.which("attention", *static[:3], is_causal=True) == "unsafe.attention"
    assert lz.which("rms_norm", static[0], static[3]) == "unsafe.rms"
    assert not lz.is_graph_safe("unsafe.attention") and not lz.is_graph_safe("rms_norm", static[0], static[3])
    graph, static_out = capture(step, static)
    assert called_under_capture == []
    worst = replay_and_check(graph, static_out, static, step, 20)
    print(f"\n[graphs] unsafe kernels kept out of capture; eager still runs them "
          f"({lz.which('rms_norm', static[0], static[3])}); capture fallbacks {lz.health().fallbacks}; "
          f"max |graph - eager| = {worst:.3g}")


def test_kernel_failing_only_under_capture_falls_back_and_opens_its_breaker():
    lz.configure_health(failure_threshold=3)
    attempts = {"eager": 0, "capture": 0}

    def fails_under_capture(q, k, v, attn_mask, is_causal, dropout_p, scale, *rest):
        if torch.cuda.is_current_stream_capturing():
            attempts["capture"] += 1
            raise RuntimeError("not capturable after all")
        attempts["eager"] += 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)

    lz.register_kernel(id="capfail.attention", ops=ATTENTION_OPS, impl=fails_under_capture, priority=999,
                       dtypes=HALF_DTYPES, layout="BHSD", causal_non_square=False)
    static = inputs(0)
    assert lz.which("attention", *static[:3], is_causal=True) == "capfail.attention"
    worst = 0.0
    for _ in range(6):
        graph, static_out = capture(step, static)
        worst = max(worst, replay_and_check(graph, static_out, static, step, 5))
    h = lz.health()
    print(f"\n[graphs] capture-only failures: {attempts}; health: failures {h.failures}, fallbacks {h.fallbacks}, "
          f"breaker {h.state('capfail.attention').value}; max |graph - eager| = {worst:.3g}")
    assert attempts["capture"] == h.failures == 3  # after the third, the open breaker keeps it out
    assert h.fallbacks == 3
    assert h.state("capfail.attention") is lz.BreakerState.OPEN
