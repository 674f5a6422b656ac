"""Telemetry read back through the real exporters: a Prometheus scrape and OpenTelemetry readers.

The exporter libraries are optional (the GPU machine has prometheus-client but no opentelemetry):
each test that reads through one imports it with pytest.importorskip, so the rest still run.
"""

from __future__ import annotations

import sys
import urllib.request

import pytest
import torch

import layerzero as lz
from layerzero.kernel import ALL_FLOAT_DTYPES
from layerzero.monitor.telemetry import LATENCY_BUCKETS_S, LatencyHistogram


def prometheus():
    """prometheus_client, or the test is skipped."""
    return pytest.importorskip("prometheus_client", reason="prometheus-client is not installed")


def scrape(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the registry's text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    text = prometheus().generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_some_ops(n_norm: int = 7, n_attn: int = 3) -> None:
    x = torch.randn(4, 32)
    for _ in range(n_norm):
        lz.rms_norm(x)
    q = torch.randn(1, 8, 2, 16)
    for _ in range(n_attn):
        lz.attention(q, q, q, is_causal=True)


def test_prometheus_scrape_counts_calls_selections_misses_hits_and_latency():
    registry = prometheus().CollectorRegistry()
    lz.enable_telemetry(prometheus=registry, opentelemetry=False)
    run_some_ops()
    attn = lz.which("attention", *(torch.randn(1, 8, 2, 16),) * 3, is_causal=True)
    m = scrape(registry)
    assert m[("layerzero_kernel_calls_total", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))] == 7
    assert m[("layerzero_kernel_calls_total", (("kernel", attn), ("op", "attention.causal")))] == 3
    assert m[("layerzero_selections_total", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))] == 1
    assert m[("layerzero_plan_cache_misses_total", (("family", "rms_norm"),))] == 1
    assert m[("layerzero_plan_cache_misses_total", (("family", "attention"),))] == 1  # lz.which hit the cache
    assert m[("layerzero_plan_cache_hits_total", ())] == 10 - 2
    assert m[("layerzero_selection_duration_seconds_count", ())] == 2
    assert m[("layerzero_selection_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert m[("layerzero_selection_duration_seconds_sum", ())] > 0
    assert m[("layerzero_plan_cache_size", ())] == 2


def test_prometheus_reports_failures_fallbacks_and_breaker_state():
    registry = prometheus().CollectorRegistry()
    lz.enable_telemetry(prometheus=registry, opentelemetry=False)
    lz.configure_health(failure_threshold=2)

    def fails(x, w, eps):
        raise ValueError("nope")

    lz.register_kernel(id="flaky.rms", ops=("norm.rms",), impl=fails, platforms=frozenset({"cpu"}), priority=90,
                       dtypes=ALL_FLOAT_DTYPES)
    x = torch.randn(2, 8)
    for _ in range(3):
        lz.rms_norm(x)
    m = scrape(registry)
    assert m[("layerzero_kernel_failures_total", (("error", "ValueError"), ("kernel", "flaky.rms")))] == 2
    assert m[("layerzero_fallbacks_total", (("from_kernel", "flaky.rms"), ("to_kernel", "torch.rms_norm")))] == 2
    opened = (("kind", "kernel"), ("name", "flaky.rms"), ("state", "open"))
    assert m[("layerzero_breaker_transitions_total", opened)] == 1
    assert m[("layerzero_breaker_state", (("kind", "kernel"), ("name", "flaky.rms")))] == 2  # open
    assert m[("layerzero_kernel_calls_total", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))] == 1


def test_default_registry_and_localhost_http_endpoint():
    prom = prometheus()
    REGISTRY, generate_latest = prom.REGISTRY, prom.generate_latest  # noqa: N806 - prometheus_client's names
    lz.enable_telemetry(opentelemetry=False)  # prometheus_client's global REGISTRY
    port = lz.start_metrics_server(0)
    run_some_ops(n_norm=2, n_attn=0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'layerzero_kernel_calls_total{kernel="torch.rms_norm",op="norm.rms"} 2.0' in body
    lz.disable_telemetry()
    assert "layerzero_kernel_calls_total" not in generate_latest(REGISTRY).decode()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    lz.enable_telemetry(opentelemetry=False)  # registering again after disable works
    assert "layerzero_plan_cache_size" in generate_latest(REGISTRY).decode()


def test_metrics_server_refuses_non_loopback_address():
    with pytest.raises(lz.ConfigurationError, match="addr: expected a loopback address"):
        lz.start_metrics_server(0, addr="0.0.0.0")


def test_opentelemetry_metrics_and_selection_spans_through_in_memory_readers():
    pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    spans = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    lz.enable_telemetry(prometheus=False, meter_provider=meters, tracer_provider=tracers)
    run_some_ops(n_norm=5, n_attn=2)
    points = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points[(metric.name, tuple(sorted(p.attributes.items())))] = p
    assert points[("layerzero.kernel.calls", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))].value == 5
    assert points[("layerzero.plan_cache.misses", (("family", "rms_norm"),))].value == 1
    assert points[("layerzero.plan_cache.hits", ())].value == 5
    latency = points[("layerzero.selection.duration", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))]
    assert latency.count == 1 and latency.sum > 0
    assert list(latency.explicit_bounds) == list(LATENCY_BUCKETS_S)
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["layerzero.select", "layerzero.select"]
    assert finished[0].attributes["layerzero.op"] == "norm.rms"
    assert finished[0].attributes["layerzero.kernel"] == "torch.rms_norm"
    assert finished[0].end_time > finished[0].start_time
    lz.disable_telemetry()
    run_some_ops(n_norm=1, n_attn=0)
    assert len(spans.get_finished_spans()) == 2  # no spans once disabled


def test_disabled_telemetry_counts_no_calls_and_leaves_plans_uncounted():
    x = torch.randn(4, 32)
    lz.rms_norm(x)
    lz.rms_norm(x)
    snap = lz.telemetry()
    assert not snap.enabled and snap.kernel_calls == {} and snap.cache_misses == {}
    assert snap.selections == {("norm.rms", "torch.rms_norm"): 1}  # the miss path counts always
    lz.enable_telemetry(prometheus=False, opentelemetry=False)
    lz.rms_norm(x)
    assert lz.telemetry().kernel_calls == {("torch.rms_norm", "norm.rms"): 1}


def test_missing_exporter_library_raises_backend_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(lz.BackendNotAvailableError, match="pip install 'layerzero\\[telemetry\\]'"):
        lz.enable_telemetry(opentelemetry=False)
    assert not lz.telemetry().enabled
    lz.enable_telemetry(prometheus=False, opentelemetry=False)  # counting alone needs no library
    assert lz.telemetry().enabled


def test_latency_histogram_memory_is_bounded():
    hist = LatencyHistogram()
    for i in range(50_000):
        hist.observe((i % 1000) * 1e-5)
    assert len(hist.counts) == len(LATENCY_BUCKETS_S) + 1
    cumulative = hist.cumulative()
    assert cumulative[-1] == ("+Inf", 50_000) == ("+Inf", hist.count)
    assert all(a[1] <= b[1] for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert cumulative[0][1] == 100  # the 0.0 and 1e-5 observations (le is inclusive): 2 per 1000, 50 rounds


def test_miss_path_records_without_the_lock_and_loses_nothing_across_threads():
    """selected()/miss() append to queues that readers fold in (FOLD_EVERY bounds them): 8 threads
    recording at once lose no record, and the queues never hold more than FOLD_EVERY."""
    import threading

    from layerzero.monitor.telemetry import FOLD_EVERY
    from layerzero.state import runtime

    t = runtime.telemetry
    t.enabled = True  # miss() counts only while enabled; no exporter needed
    ctx = lz.SelectionContext("norm.rms")
    plan = type("Plan", (), {"kernel_id": "torch.rms_norm"})()
    n, longest = 3 * FOLD_EVERY + 7, [0]

    def record() -> None:
        for _ in range(n):
            t.selected(ctx, plan, 2e-5)  # type: ignore[arg-type]
            t.miss("rms_norm")
            longest[0] = max(longest[0], len(t._new_selections), len(t._new_misses))

    threads = [threading.Thread(target=record) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert longest[0] <= FOLD_EVERY + 8  # each thread appends at most one past the fold threshold
    snap = lz.telemetry()
    assert snap.selections == {("norm.rms", "torch.rms_norm"): 8 * n}
    assert snap.cache_misses == {"rms_norm": 8 * n}
    assert snap.selection_latency_count == 8 * n and snap.selection_latency_sum_s == pytest.approx(8 * n * 2e-5)
