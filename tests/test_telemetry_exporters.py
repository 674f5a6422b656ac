"""layerzero.telemetry: the spec's exporters by name, read back through real parts: the Prometheus text
parser and an OTLP gRPC collector (opentelemetry-proto's services on a local grpc server)."""

from __future__ import annotations

import sys
from concurrent import futures

import pytest
import torch

import layerzero as lz
from layerzero.telemetry import OTelExporter, PrometheusExporter, TelemetryExportError, get_metrics_exporter

grpc = pytest.importorskip("grpc")
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC receiver keeping what it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.metrics: list = []

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics += [m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def collector():
    received = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    received.endpoint = f"http://127.0.0.1:{port}"
    yield received
    server.stop(0)


def test_prometheus_exporter_export_is_the_text_exposition():
    exporter = get_metrics_exporter("prometheus")
    assert isinstance(exporter, PrometheusExporter)
    x = torch.randn(4, 8)
    for _ in range(3):
        lz.rms_norm(x)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(exporter.export()) for s in family.samples}
    assert samples[("layerzero_kernel_calls_total", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))] == 3
    assert samples[("layerzero_selections_total", (("kernel", "torch.rms_norm"), ("op", "norm.rms")))] == 1
    assert samples[("layerzero_plan_cache_hits_total", ())] == 2


def test_unknown_exporter_name():
    with pytest.raises(lz.UnknownNameError, match="unknown metrics exporter 'statsd'.*prometheus"):
        get_metrics_exporter("statsd")


def test_otel_exporter_pushes_spans_and_metrics_to_an_otlp_collector(collector):
    otel = OTelExporter(endpoint=collector.endpoint)
    try:
        lz.layer_norm(torch.randn(2, 8))
        otel.export_traces()
        assert [s.name for s in collector.spans] == ["layerzero.select"]
        attributes = {a.key: a.value.string_value for a in collector.spans[0].attributes}
        assert attributes["layerzero.op"] == "norm.layer" and attributes["layerzero.kernel"] == "torch.layer_norm"
        otel.export_metrics()
        names = {m.name for m in collector.metrics}
        assert {"layerzero.selections", "layerzero.kernel.calls", "layerzero.selection.duration"} <= names
    finally:
        otel.shutdown()


def test_otel_exporter_by_name_and_a_collector_that_is_not_there_is_an_error():
    otel = get_metrics_exporter("opentelemetry", endpoint="http://127.0.0.1:9", timeout_s=0.5)
    try:
        lz.group_norm(torch.randn(2, 4, 8), 2)
        with pytest.raises(TelemetryExportError, match="traces not delivered to http://127.0.0.1:9"):
            otel.export_traces()
    finally:
        otel.shutdown()


def test_otel_exporter_needs_an_endpoint_or_exporters():
    with pytest.raises(lz.InvalidInputError, match="endpoint: expected an OTLP collector URL"):
        OTelExporter()
    with pytest.raises(lz.UnknownNameError, match="unknown OTLP protocol 'udp'"):
        OTelExporter(endpoint="http://x:4317", protocol="udp")


def test_lz_telemetry_stays_callable_once_the_module_is_imported():
    import layerzero.telemetry as module

    assert lz.telemetry is module or lz.telemetry is sys.modules["layerzero.telemetry"]
    lz.rms_norm(torch.randn(2, 8))
    assert lz.telemetry().selections[("norm.rms", "torch.rms_norm")] == 1
