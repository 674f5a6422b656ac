"""Exporters by name, as the spec writes them, over monitor/telemetry.py's prometheus_client collector
and OpenTelemetry instruments:

    from layerzero.telemetry import get_metrics_exporter, OTelExporter
    text = get_metrics_exporter("prometheus").export()         # Prometheus text exposition
    otel = OTelExporter(endpoint="http://collector:4317")       # OTLP over gRPC (4318 + protocol="http")
    otel.export_traces(); otel.export_metrics()                 # push now; both also run in the background

Creating an exporter turns call counting on (`lz.enable_telemetry`), which drops cached plans once.
Importing this module makes `layerzero.telemetry` this module; calling it (`lz.telemetry()`) still
returns the counters' snapshot. Imported on first use: `import layerzero` does not load it.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Mapping, Sequence
from typing import Any

from .doctor import telemetry as snapshot
from .errors import InvalidInputError, LayerZeroError, UnknownNameError
from .monitor.telemetry import TelemetrySnapshot, _require
from .state import runtime

__all__ = ["OTelExporter", "PrometheusExporter", "TelemetryExportError", "get_metrics_exporter", "snapshot"]

EXPORTERS = ("prometheus", "opentelemetry")


class TelemetryExportError(LayerZeroError):
    """An exporter could not deliver: the collector refused or could not be reached."""


class PrometheusExporter:
    """LayerZero's counters in a prometheus_client registry (its own unless given): `export()` is the
    text a scrape returns; `serve(port)` serves /metrics on localhost."""

    def __init__(self, registry: Any = None) -> None:
        prometheus_client = _require("prometheus_client", "prometheus-client")
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        runtime.telemetry.enable(prometheus=self.registry, opentelemetry=False)

    def export(self) -> str:
        """The Prometheus text exposition of every LayerZero metric now."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int = 9464, addr: str = "127.0.0.1") -> int:
        """Serve /metrics from this registry on a loopback address; returns the port (0: a free one)."""
        return runtime.telemetry.start_http_server(port, addr, self.registry)


def get_metrics_exporter(kind: str = "prometheus", **options: Any) -> PrometheusExporter | OTelExporter:
    """An exporter by name: "prometheus" (options: registry=) or "opentelemetry" (OTelExporter's)."""
    if kind == "prometheus":
        return PrometheusExporter(**options)
    if kind in ("opentelemetry", "otel", "otlp"):
        return OTelExporter(**options)
    raise UnknownNameError("metrics exporter", str(kind), EXPORTERS)


class _Recorded:
    """Wraps an SDK exporter and keeps the result of its last export, so a failed push is reported."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failures: list[str] = []

    def note(self, ok: bool, what: str) -> None:
        if not ok:
            with self.lock:
                self.failures.append(what)

    def take(self) -> list[str]:
        with self.lock:
            out, self.failures = self.failures, []
        return out


class OTelExporter:
    """Selections as spans and every counter as metrics, pushed over OTLP to `endpoint` through the
    OpenTelemetry SDK (batched in the background; `export_traces()` / `export_metrics()` push now and
    raise TelemetryExportError if the collector did not take them).

    protocol: "grpc" (port 4317, opentelemetry-exporter-otlp-proto-grpc) or "http" (4318,
    opentelemetry-exporter-otlp-proto-http). span_exporter / metric_exporter: SDK exporters to use
    instead of OTLP ones (e.g. the SDK's in-memory or console exporters).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        protocol: str = "grpc",
        insecure: bool | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        service_name: str = "layerzero",
        span_exporter: Any = None,
        metric_exporter: Any = None,
        export_interval_s: float = 60.0,
    ) -> None:
        _require("opentelemetry.sdk", "opentelemetry-sdk")
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        if endpoint is None and (span_exporter is None or metric_exporter is None):
            raise InvalidInputError(
                "endpoint",
                "an OTLP collector URL such as 'http://collector:4317' (or both span_exporter= and metric_exporter=)",
                None,
            )
        if protocol not in ("grpc", "http"):
            raise UnknownNameError("OTLP protocol", str(protocol), ("grpc", "http"))
        self.endpoint = endpoint
        self.protocol = protocol
        options = {
            "endpoint": endpoint,
            "timeout": timeout_s,
            "headers": dict(headers) if headers is not None else None,
        }
        if protocol == "grpc":
            options["insecure"] = insecure if insecure is not None else (endpoint or "").startswith("http://")
        elif endpoint is not None:
            options["endpoint"] = endpoint.rstrip("/")
        self._recorded = _Recorded()
        recorded = self._recorded
        spans = span_exporter if span_exporter is not None else _otlp(protocol, "trace", options)
        metrics = metric_exporter if metric_exporter is not None else _otlp(protocol, "metric", options)
        where = endpoint or type(spans).__name__

        class Spans(SpanExporter):  # delegates, remembering failures
            def export(self, batch: Sequence[Any]) -> Any:
                try:
                    result = spans.export(batch)
                except Exception as exc:  # noqa: BLE001 - reported by export_traces
                    recorded.note(False, f"spans to {where}: {type(exc).__name__}: {exc}")
                    return SpanExportResult.FAILURE
                recorded.note(result == SpanExportResult.SUCCESS, f"{len(batch)} span(s) to {where}: {result.name}")
                return result

            def shutdown(self) -> None:
                spans.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return bool(spans.force_flush(timeout_millis))

        inner_export = metrics.export

        def export_metrics(data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
            try:
                result = inner_export(data, timeout_millis=timeout_millis, **kw)
            except Exception as exc:  # noqa: BLE001 - reported by export_metrics
                recorded.note(False, f"metrics to {where}: {type(exc).__name__}: {exc}")
                return MetricExportResult.FAILURE
            recorded.note(result == MetricExportResult.SUCCESS, f"metrics to {where}: {result.name}")
            return result

        metrics.export = export_metrics  # the reader calls export(); the exporter keeps its temporality
        resource = Resource.create({"service.name": service_name})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(Spans()))
        self.metric_reader = PeriodicExportingMetricReader(
            metrics, export_interval_millis=export_interval_s * 1e3, export_timeout_millis=timeout_s * 1e3
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[self.metric_reader])
        self.timeout_s = timeout_s
        runtime.telemetry.enable(
            prometheus=False,
            opentelemetry=True,
            meter_provider=self.meter_provider,
            tracer_provider=self.tracer_provider,
        )

    def export_traces(self) -> None:
        """Push the selection spans recorded so far; TelemetryExportError if the collector did not take them."""
        done = self.tracer_provider.force_flush(int(self.timeout_s * 1e3))
        self._raise("traces", done)

    def export_metrics(self) -> None:
        """Collect and push every counter now; TelemetryExportError if the collector did not take them."""
        done = self.metric_reader.force_flush(int(self.timeout_s * 1e3))
        self._raise("metrics", done)

    def _raise(self, what: str, done: bool) -> None:
        failures = self._recorded.take()
        if failures or not done:
            detail = "; ".join(failures) or f"not flushed within {self.timeout_s:g} s"
            raise TelemetryExportError(
                f"OTelExporter: {what} not delivered to {self.endpoint or 'the exporter'}: {detail}"
            )

    def shutdown(self) -> None:
        """Flush and stop both providers (their background threads end)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _otlp(protocol: str, signal: str, options: dict[str, Any]) -> Any:
    distribution = f"opentelemetry-exporter-otlp-proto-{protocol}"
    module = f"opentelemetry.exporter.otlp.proto.{protocol}.{signal}_exporter"
    exporter = _require(module, distribution)
    cls = exporter.OTLPSpanExporter if signal == "trace" else exporter.OTLPMetricExporter
    if protocol == "http" and options.get("endpoint"):  # the HTTP exporters take the full signal URL
        options = {**options, "endpoint": f"{options['endpoint']}/v1/{'traces' if signal == 'trace' else 'metrics'}"}
    return cls(**{k: v for k, v in options.items() if v is not None})


class _CallableModule(types.ModuleType):
    """`layerzero.telemetry` is this module once imported (the package attribute is replaced by the
    submodule); calling it keeps returning the snapshot that the function of that name returned."""

    def __call__(self) -> TelemetrySnapshot:
        return snapshot()


sys.modules[__name__].__class__ = _CallableModule
