"""Runtime fallback and circuit breakers: failures cost a fallback, never a wrong result."""

from __future__ import annotations

import logging
import random
import threading

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.backends import reference
from layerzero.kernel import ALL_FLOAT_DTYPES
from layerzero.monitor.health import BreakerState, CircuitBreaker, HealthConfig

CPU = frozenset({"cpu"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rms_ref(x: torch.Tensor, w: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    return reference.rms_norm(x.double(), None if w is None else w.double(), eps)


def register_rms(kernel_id: str, impl, priority: int = 90) -> None:
    lz.register_kernel(id=kernel_id, ops=("norm.rms",), impl=impl, platforms=CPU, priority=priority,
                       dtypes=ALL_FLOAT_DTYPES)


def always_fails(x, w, eps):
    raise RuntimeError("kernel exploded")


# -- the breaker state machine -------------------------------------------------------------------

def test_breaker_opens_after_threshold_within_window_then_half_opens_and_closes():
    cfg = HealthConfig(failure_threshold=3, window_s=10.0, cooldown_s=5.0)
    b = CircuitBreaker("k.x", "kernel", cfg.failure_threshold)
    assert b.failure(0.0, cfg, "e") is None
    assert b.failure(1.0, cfg, "e") is None
    assert b.failure(11.5, cfg, "e") is None  # the first two fell out of the 10 s window
    assert b.state is BreakerState.CLOSED
    assert b.failure(12.0, cfg, "e") is None
    assert b.failure(12.5, cfg, "e") is BreakerState.OPEN
    assert b.tick(17.0) is None  # cooldown not over
    assert b.tick(17.5) is BreakerState.HALF_OPEN
    assert b.failure(18.0, cfg, "e") is BreakerState.OPEN  # a failed probe reopens at once
    assert b.retry_at == 23.0
    assert b.tick(23.0) is BreakerState.HALF_OPEN
    assert b.success() is BreakerState.CLOSED
    assert b.times_opened == 2 and b.total_failures == 6 and not b.recent


@pytest.mark.parametrize("bad", [dict(failure_threshold=0), dict(window_s=0), dict(cooldown_s=-1),
                                 dict(backend_failure_threshold=1.5), dict(window_s=float("inf"))])
def test_health_config_rejects_bad_values(bad):
    with pytest.raises(lz.ConfigurationError) as e:
        lz.configure_health(**bad)
    assert next(iter(bad)) in str(e.value)


def test_configure_health_rejects_unknown_setting():
    with pytest.raises(lz.ConfigurationError, match="threshhold"):
        lz.configure_health(threshhold=3)


# -- the runtime fallback ------------------------------------------------------------------------

def test_failing_kernel_falls_back_to_next_with_correct_output_and_untouched_inputs(caplog):
    seen = []

    def scribbles_then_fails(x, w, eps):
        seen.append(x)
        out = torch.empty_like(x).fill_(123.0)  # a partial output that must never escape
        if out.sum() > 0:
            raise RuntimeError("half-way failure")
        return out

    register_rms("flaky.rms", scribbles_then_fails)
    x, w = torch.randn(6, 48), torch.randn(48)
    x0, w0 = x.clone(), w.clone()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        out = lz.rms_norm(x, w)
        lz.rms_norm(x, w)
    torch.testing.assert_close(out.double(), rms_ref(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(w, w0)
    assert seen[0] is x  # the failed kernel got the caller's tensors, and so did the fallback
    h = lz.health()
    assert h.failures == 2 and h.fallbacks == 2
    assert h.breaker("flaky.rms").total_failures == 2
    assert "RuntimeError: half-way failure" in h.breaker("flaky.rms").last_error
    fallback_logs = [r for r in caplog.records if "this call ran torch.rms_norm" in r.getMessage()]
    assert len(fallback_logs) == 1  # warned once, not per call


def test_fallback_walks_the_chain_down_to_the_reference():
    register_rms("bad.one", always_fails, priority=95)
    register_rms("worse.two", always_fails, priority=92)
    lz.configure(deny=["torch"])
    x = torch.randn(3, 40, dtype=torch.float64)
    out = lz.rms_norm(x)
    torch.testing.assert_close(out, rms_ref(x, None))
    snap = lz.telemetry()
    assert snap.failures == {("bad.one", "RuntimeError"): 1, ("worse.two", "RuntimeError"): 1}
    assert snap.fallbacks == {("bad.one", "reference.rms_norm"): 1}


def test_fallback_of_attention_in_another_layout_matches_reference():
    shapes = []

    def bhsd_fails(q, k, v, attn_mask, is_causal, dropout_p, scale, *rest):
        shapes.append(tuple(q.shape))
        raise RuntimeError("attention kernel failed")

    lz.register_kernel(id="flaky.attn", ops=("attention.causal",), impl=bhsd_fails, platforms=CPU, priority=99,
                       dtypes=ALL_FLOAT_DTYPES, layout="BHSD")
    q, k, v = (torch.randn(2, 9, 4, 16) for _ in range(3))
    copies = [t.clone() for t in (q, k, v)]
    assert lz.which("attention", q, k, v, is_causal=True) == "flaky.attn"
    out = lz.attention(q, k, v, is_causal=True)
    ref = reference.attention(*(t.double().transpose(1, 2) for t in (q, k, v)), None, True, 0.0, None).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies, strict=True))
    assert shapes == [(2, 4, 9, 16)]  # the kernel got BHSD views; the fallback got the BSHD originals
    assert lz.health().fallbacks == 1


def test_reference_failure_raises_kernel_execution_error_naming_it():
    lz.configure(deny=["torch"])
    register_rms("bad.one", always_fails)

    def broken_reference(x, w, eps):
        raise ValueError("reference broke")

    lz.register_kernel(id="reference.rms_norm", ops=("norm.rms",), impl=broken_reference,
                       platforms=frozenset({"cpu", "cuda"}), priority=0, dtypes=ALL_FLOAT_DTYPES)
    with pytest.raises(lz.KernelExecutionError) as e:
        lz.rms_norm(torch.randn(2, 8))
    assert e.value.kernel_id == "reference.rms_norm"
    assert isinstance(e.value.error, ValueError)
    assert str(e.value) == "kernel reference.rms_norm failed: ValueError: reference broke"


def test_strict_mode_never_falls_back_to_the_reference():
    lz.configure(deny=["torch"])
    register_rms("bad.one", always_fails)
    lz.configure(strict_mode=True)
    with pytest.raises(lz.KernelExecutionError, match="kernel bad.one failed: RuntimeError: kernel exploded"):
        lz.rms_norm(torch.randn(2, 8))


def test_strict_mode_still_falls_back_to_another_accelerated_kernel():
    register_rms("bad.one", always_fails)
    lz.configure(strict_mode=True)
    x = torch.randn(2, 8)
    torch.testing.assert_close(lz.rms_norm(x).double(), rms_ref(x, None), rtol=1e-5, atol=1e-6)


def test_fallback_off_raises_the_failure():
    register_rms("bad.one", always_fails)
    lz.configure_health(fallback=False)
    with pytest.raises(lz.KernelExecutionError) as e:
        lz.rms_norm(torch.randn(2, 8))
    assert e.value.kernel_id == "bad.one" and isinstance(e.value.__cause__, RuntimeError)
    assert lz.health().failures == 1


# -- breakers through selection ------------------------------------------------------------------

def test_open_breaker_rejects_kernel_with_reason_bumps_generation_and_recovers(caplog):
    clock = FakeClock()
    lz.configure_health(failure_threshold=2, window_s=60, cooldown_s=30, clock=clock)
    fail = [True]

    def sometimes(x, w, eps):
        if fail[0]:
            raise RuntimeError("transient")
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    register_rms("flaky.rms", sometimes)
    x = torch.randn(4, 16)
    with caplog.at_level(logging.INFO, logger="layerzero"):
        lz.rms_norm(x)
        generation = lz.select("rms_norm", x).generation
        lz.rms_norm(x)  # second failure: the breaker opens
        assert lz.health().state("flaky.rms") is BreakerState.OPEN
        report = lz.explain("rms_norm", x)
        assert report.selected_kernel == "torch.rms_norm"
        assert lz.Reason.KERNEL_UNHEALTHY in report.rejection_reasons["flaky.rms"]
        assert lz.select("rms_norm", x).generation > generation
        clock.advance(29.0)
        assert lz.which("rms_norm", x) == "torch.rms_norm"
        fail[0] = False
        clock.advance(1.0)
        lz.rms_norm(x)  # the cached plan notices the cooldown is over: half-open, generation bump
        assert lz.health().state("flaky.rms") is BreakerState.HALF_OPEN
        assert lz.which("rms_norm", x) == "flaky.rms"  # the probe plan
        lz.rms_norm(x)  # the probe succeeds
    assert lz.health().state("flaky.rms") is BreakerState.CLOSED
    assert lz.health().healthy
    messages = [r.getMessage() for r in caplog.records]
    assert sum("flaky.rms circuit breaker open" in m for m in messages) == 1
    assert sum("flaky.rms circuit breaker half-open" in m for m in messages) == 1
    assert sum("flaky.rms circuit breaker closed" in m for m in messages) == 1


def test_backend_breaker_rejects_all_its_kernels():
    lz.configure_health(failure_threshold=10, backend_failure_threshold=2)
    register_rms("flaky.a", always_fails, priority=95)
    lz.register_kernel(id="flaky.b", ops=("norm.layer",), impl=always_fails, platforms=CPU, priority=95,
                       dtypes=ALL_FLOAT_DTYPES)
    x = torch.randn(2, 8)
    lz.rms_norm(x)
    lz.layer_norm(x)
    assert lz.health().state("flaky") is BreakerState.OPEN
    assert lz.health().state("flaky.a") is BreakerState.CLOSED
    assert lz.Reason.BACKEND_UNHEALTHY in lz.explain("rms_norm", x).rejection_reasons["flaky.a"]
    assert lz.Reason.BACKEND_UNHEALTHY in lz.explain("layer_norm", x).rejection_reasons["flaky.b"]
    assert "backend flaky" in str(lz.health())


def test_fault_injection_10k_calls(caplog):
    """5% of calls raise: every output equals the reference, the breaker opens and recovers,
    and the counters add up."""
    clock = FakeClock()
    lz.configure_health(failure_threshold=3, backend_failure_threshold=10_000, window_s=1.0, cooldown_s=0.2,
                        clock=clock)
    from prometheus_client import CollectorRegistry

    lz.enable_telemetry(prometheus=CollectorRegistry(), opentelemetry=False)
    rng = random.Random(7)
    invoked = raised = 0

    def flaky(x, w, eps):
        nonlocal invoked, raised
        invoked += 1
        if rng.random() < 0.05:
            raised += 1
            raise RuntimeError("injected fault")
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    register_rms("flaky.rms", flaky)
    n = 10_000
    gen = torch.Generator().manual_seed(0)
    X, W = torch.randn(n, 4, 16, generator=gen), torch.randn(n, 16, generator=gen)
    X0, W0 = X.clone(), W.clone()
    outs = []
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        for i in range(n):
            clock.advance(0.001)
            outs.append(lz.rms_norm(X[i], W[i]))
    out = torch.stack(outs).double()
    ref = X.double() * torch.rsqrt(X.double().pow(2).mean(-1, keepdim=True) + 1e-6) * W.double()[:, None, :]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(X, X0) and torch.equal(W, W0)

    h, t = lz.health(), lz.telemetry()
    kernel = h.breaker("flaky.rms")
    opened = t.breaker_transitions[("flaky.rms", "kernel", "open")]
    closed = t.breaker_transitions[("flaky.rms", "kernel", "closed")]
    assert raised > 50 and 0.03 * invoked < raised < 0.08 * invoked  # ~5% of the calls that reached it
    assert kernel.times_opened == opened >= 5 and closed >= 5
    assert t.breaker_transitions[("flaky.rms", "kernel", "half_open")] >= closed
    calls = t.kernel_calls
    assert calls[("flaky.rms", "norm.rms")] + calls[("torch.rms_norm", "norm.rms")] == n
    assert calls[("flaky.rms", "norm.rms")] == invoked
    assert h.failures == raised == t.failures[("flaky.rms", "RuntimeError")]
    assert h.fallbacks == raised == t.fallbacks[("flaky.rms", "torch.rms_norm")]
    assert t.cache_hits + sum(t.cache_misses.values()) == n
    print(f"fault injection: {n} calls, kernel invoked {invoked}x, raised {raised}, fallbacks {h.fallbacks}, "
          f"breaker opened {opened}x / closed {closed}x, cache misses {sum(t.cache_misses.values())}")
    opens_logged = sum("flaky.rms circuit breaker open" in r.getMessage() for r in caplog.records)
    assert opens_logged == opened


def test_fallback_is_thread_safe():
    rng = random.Random(1)
    lock = threading.Lock()

    def flaky(x, w, eps):
        with lock:
            fail = rng.random() < 0.2
        if fail:
            raise RuntimeError("injected")
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    register_rms("flaky.rms", flaky)
    lz.configure_health(failure_threshold=10_000)
    errors = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):
            x = torch.randn(3, 24, generator=g)
            if not torch.allclose(lz.rms_norm(x).double(), rms_ref(x, None), rtol=1e-5, atol=1e-6):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert lz.health().failures == lz.health().fallbacks > 0


def test_half_open_seen_by_any_reader_reselects_every_cached_plan():
    clock = FakeClock()
    lz.configure_health(failure_threshold=1, cooldown_s=5, clock=clock)
    fail = [True]

    def sometimes(x, w, eps):
        if fail[0]:
            raise RuntimeError("transient")
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    register_rms("flaky.rms", sometimes)
    x1, x2 = torch.randn(2, 8), torch.randn(3, 8)
    lz.rms_norm(x1)  # opens the breaker
    assert lz.which("rms_norm", x1) == "torch.rms_norm"
    fail[0] = False
    clock.advance(5)
    lz.explain("rms_norm", x2)  # another reader sees the cooldown over first (and probes nothing)
    assert lz.health().state("flaky.rms") is BreakerState.HALF_OPEN
    lz.rms_norm(x1)
    assert lz.which("rms_norm", x1) == "flaky.rms"  # x1's plan was dropped too, not stuck on torch
    lz.rms_norm(x1)
    assert lz.health().state("flaky.rms") is BreakerState.CLOSED


# -- every public op's call site hands a kernel failure to the plan's recover ---------------------

def _op_calls():
    """(op id, call) for every public op on small CPU float32 inputs (a call returns a tensor or tuple)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = r(2, 5, 4, 16), r(2, 5, 2, 16), r(2, 5, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    kc, vc = r(6, 4, 2, 16), r(6, 4, 2, 16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([9, 12], dtype=torch.int32)
    x, w, b = r(3, 32), r(32), r(32)
    cos, sin = lz.rope_cache(5, 16)
    gate, up = r(3, 24), r(3, 24)
    return {
        "attention.causal": lambda: lz.attention(q, k, v, is_causal=True),
        "attention.varlen": lambda: lz.attention_varlen(r(7, 4, 16), r(7, 2, 16), r(7, 2, 16), cu, cu, 4, 4),
        "attention.decode": lambda: lz.paged_attention(q[:, :1], kc, vc, table, lens),
        "norm.rms": lambda: lz.rms_norm(x, w),
        "norm.layer": lambda: lz.layer_norm(x, w, b),
        "norm.group": lambda: lz.group_norm(r(2, 32, 3), 4, w, b),
        "posenc.rope": lambda: lz.rope_qk(q, k, cos, sin),
        "activation.silu": lambda: lz.silu(x),
        "activation.gelu": lambda: lz.gelu(x),
        "activation.swiglu": lambda: lz.swiglu(gate, up),
        "activation.geglu": lambda: lz.geglu(gate, up),
        "mlp.swiglu": lambda: lz.fused_mlp(x, r(24, 32), r(24, 32), r(32, 24)),
        "embedding.lookup": lambda: lz.embedding(torch.tensor([[1, 4], [0, 2]]), r(8, 16)),
        "sampling.greedy": lambda: lz.sample_greedy(r(2, 11)),
    }


@pytest.mark.parametrize("op", list(_op_calls()))
def test_every_op_falls_back_when_its_kernel_raises(op):
    """The hot path runs a plan's bare kernel and catches its failure at the call site: a raising
    kernel of any op must still give the next kernel's result and count one failure."""
    expected = _op_calls()[op]()  # no failing kernel yet: the normal choice
    lz.reset()

    def explodes(*args, **kwargs):
        raise RuntimeError(f"{op} kernel exploded")

    lz.register_kernel(id="boom.kernel", ops=(op,), impl=explodes, platforms=CPU, priority=10_000,
                       dtypes=ALL_FLOAT_DTYPES | {torch.int64})
    call = _op_calls()[op]
    got = call()
    assert lz.health().breaker("boom.kernel").total_failures == 1
    for e, o in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)
    call()  # the cached plan still recovers
    assert lz.health().breaker("boom.kernel").total_failures == 2
