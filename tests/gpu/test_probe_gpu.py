"""Backend probes on the GPU (monitor/probe.py): each installed backend is verified by its tiny calls
on this device or reported BACKEND_BROKEN with the library's own error text; verdicts come back from
the disk cache in under 50 ms; nothing is probed during CUDA graph capture. With xformers 0.0.35
under torch 2.11 (imports, cannot run) xformers must be unavailable and every call still answer;
with flash-attn-4 alone, FlashAttention-2 must not be available.

    PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_probe_gpu.py -q -s
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.monitor.probe import CACHE_ENV
from layerzero.reasons import Reason
from layerzero.state import runtime

pytestmark = pytest.mark.gpu
ROWS: list[tuple[str, str, float, float, str]] = []


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "probes.json"))


def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def installed_probed_backends() -> list[lz.Backend]:
    runtime.ensure_loaded()
    out = []
    for b in runtime.registry.backends.values():
        ok, _, why = b.availability
        if b.probes and (ok or (why is not None and why.reason is not Reason.BACKEND_NOT_INSTALLED)):
            out.append(b)
    return out


def test_each_installed_backend_is_verified_or_broken_and_warm_verdicts_are_fast(probe_cache):
    backends = installed_probed_backends()
    if not backends:
        pytest.skip("no backend with probes is installed here")
    cold = {}
    for b in backends:
        t0 = time.perf_counter()
        result = runtime.probes.probe(b, cuda())
        cold[b.name] = ((time.perf_counter() - t0) * 1e3, result)
        ok, _, why = b.availability
        if result.ok:
            assert ok, why
            assert result.verified, f"{b.name}: nothing verified ({result.skipped})"
        else:
            assert not ok and why.reason is Reason.BACKEND_BROKEN and why.detail == result.detail
    lz.reset()  # a new runtime: every verdict is read back from the probe cache
    for b in backends:
        t0 = time.perf_counter()
        result = runtime.probes.probe(b, cuda())
        warm_ms = (time.perf_counter() - t0) * 1e3
        cold_ms, first = cold[b.name]
        ROWS.append((b.name, b.availability[1] or "-", cold_ms, warm_ms, result.describe()))
        assert result.ok == first.ok and set(result.verified) == set(first.verified)
        if b.availability[1]:  # versioned: cached on disk
            assert result.cached and warm_ms < 50, f"{b.name}: warm probe took {warm_ms:.1f} ms"


def test_xformers_that_cannot_run_is_unavailable_and_every_call_answers():
    pytest.importorskip("xformers", reason="xformers is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = lz.attention(q, k, v, is_causal=True)
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    ref = R.attention(t(q), t(k), t(v), None, True, 0.0, None).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=2e-2)
    xf = runtime.registry.backend("xformers")
    ok, version, why = xf.availability
    print(f"\nxformers {version}: {'verified' if ok else why}")
    if ok:  # an xformers built for this torch: its probe passed and it may be chosen
        assert runtime.probes.results[("xformers", str(cuda()))].verified == ("xformers.memory_efficient",)
    else:
        assert why.reason is Reason.BACKEND_BROKEN and why.detail.startswith("xformers.memory_efficient: ")
        assert lz.which("attention", q, k, v, is_causal=True) != "xformers.memory_efficient"
        report = lz.explain("attention", q, k, v, is_causal=True)
        assert report.rejection_reasons["xformers.memory_efficient"] == [Reason.BACKEND_BROKEN]
    assert lz.health().failures == 0  # no user call failed


def test_flash_attn_4_alone_is_not_flash_attention_2():
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not staged (.fa4a/.fa4b)")
    if importlib.util.find_spec("flash_attn_2_cuda") is not None:
        pytest.skip("FlashAttention-2 is installed too")
    runtime.ensure_loaded()
    ok, _, why = runtime.registry.backend("flash_attn").availability
    assert not ok and why.reason is Reason.BACKEND_NOT_INSTALLED and "flash_attn_2_cuda" in why.detail
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FlashAttention-4 runs on SM 9.0+")
    fa4 = runtime.probes.probe(runtime.registry.backend("flash_attn4"), cuda())
    print(f"\nflash_attn4: {fa4.describe()}")
    assert fa4.ok and "flash_attn4.fwd" in fa4.verified, fa4.detail


def test_nothing_is_probed_during_capture_and_the_graph_replays():
    pytest.importorskip("triton", reason="triton is not installed")
    gate = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    key = ("triton_act", str(cuda()))
    assert key not in runtime.probes.results  # a fresh runtime: not verified yet
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the first lz call of this runtime is captured
        out = lz.swiglu(gate, up)
    assert key not in runtime.probes.results
    graph.replay()
    torch.cuda.synchronize()
    ref = R.swiglu(gate.double(), up.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    lz.swiglu(gate, up)  # outside capture: the Triton backend is probed, then it competes
    assert runtime.probes.results[key].ok
    assert lz.which("swiglu", gate, up) == "triton_act.swiglu"


def test_zz_probe_table():
    print("\n| backend | version | cold probe ms | warm (cached) ms | verdict |\n|---|---|---|---|---|")
    for name, version, cold_ms, warm_ms, verdict in ROWS:
        print(f"| {name} | {version} | {cold_ms:.1f} | {warm_ms:.2f} | {verdict} |")
    assert ROWS or not installed_probed_backends()
