"""Telemetry: what runs and how fast, exported with prometheus_client and the OpenTelemetry SDK.

Counts live in plain Python containers of the runtime; the exporters read them when scraped
(a Prometheus collector, OpenTelemetry observable counters), so the hot path never calls an
exporter. Counted always (all on the miss path or on rare events): selections, cache misses,
fallbacks, failures, breaker transitions, the selection-latency histogram (fixed buckets,
bounded memory). Counted only while enabled (the hot path): calls per kernel, through a
counting wrapper the plan gets when it is built. Cache hits are derived: calls minus misses.
The miss path takes no lock: it appends its selection (and, while enabled, its miss) to a
queue that readers fold into the counters; threads missing at once would queue on a lock.

    lz.enable_telemetry()                 # prometheus_client default registry + OTel global providers
    lz.start_metrics_server(9464)         # http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BackendNotAvailableError, ConfigurationError
from ..version import __version__

if TYPE_CHECKING:
    from ..context import SelectionContext
    from ..selection.engine import ExecutionPlan
    from ..state import Runtime

# Records the miss path may queue before it folds them into the counters itself (bounds memory
# between reads; a fold takes the lock once per this many misses).
FOLD_EVERY = 1024
# Selection latency bucket bounds in seconds: a selection is tens of microseconds to milliseconds.
LATENCY_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class LatencyHistogram:
    """Counts per fixed bucket, a sum and a count: memory does not grow with observations."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= bound) pairs ending with +Inf, as Prometheus wants them."""
        out, total = [], 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def _count_value(counter: itertools.count) -> int:
    # itertools.count: next() is one atomic C call under the GIL (a += on a Python int is not),
    # the cheapest thread-safe counter CPython has; its repr is the only public way to read it.
    return int(repr(counter)[6:-1])


class Telemetry:
    """The runtime's counters and the exporters attached to them."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.enabled = False
        self.calls: dict[tuple[str, str], itertools.count] = {}
        self.selections: dict[tuple[str, str], int] = {}
        self.misses: dict[str, int] = {}
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.selection_latency = LatencyHistogram()
        self._lock = threading.Lock()
        # Recorded on the miss path without the lock (deque.append is atomic), folded into
        # selections / selection_latency / misses by readers (fold) or every FOLD_EVERY records.
        self._new_selections: deque[tuple[str, str, float]] = deque()
        self._new_misses: deque[str] = deque()
        self._registries: list[tuple[Any, PrometheusCollector]] = []
        self._servers: list[tuple[Any, threading.Thread]] = []
        self._otel_latency: Any = None
        self._tracer: Any = None

    # -- counting ------------------------------------------------------------------------------

    def call_counter(self, kernel_id: str, op: str) -> itertools.count:
        counter = self.calls.get((kernel_id, op))  # the lock only to add one
        if counter is not None:
            return counter
        with self._lock:
            counter = self.calls.get((kernel_id, op))
            if counter is None:
                counter = self.calls[(kernel_id, op)] = itertools.count()
            return counter

    def kernel_calls(self) -> dict[tuple[str, str], int]:
        """(kernel id, op) -> calls counted while enabled."""
        with self._lock:
            return {key: _count_value(c) for key, c in self.calls.items()}

    def cache_hits(self) -> int:
        """Plan-cache hits: counted calls minus misses (both counted only while enabled)."""
        calls = sum(self.kernel_calls().values())
        return max(0, calls - sum(self.counted().misses.values()))

    def miss(self, family: str) -> None:
        if self.enabled:
            self._new_misses.append(family)
            if len(self._new_misses) >= FOLD_EVERY:
                self.counted()

    def selected(self, ctx: SelectionContext, plan: ExecutionPlan, seconds: float) -> None:
        """One selection on the miss path: counter, latency histogram, OpenTelemetry span."""
        self._new_selections.append((ctx.op, plan.kernel_id, seconds))
        if len(self._new_selections) >= FOLD_EVERY:
            self.counted()
        if self._otel_latency is not None:
            self._otel_latency.record(seconds, {"op": ctx.op, "kernel": plan.kernel_id})
        if self._tracer is not None:
            end = time.time_ns()
            span = self._tracer.start_span(
                "layerzero.select",
                start_time=end - int(seconds * 1e9),
                attributes={
                    "layerzero.op": ctx.op,
                    "layerzero.kernel": plan.kernel_id,
                    "layerzero.fallback": plan.fallback,
                    "layerzero.transforms": ",".join(plan.transforms),
                    "layerzero.context": ctx.summary(),
                },
            )
            span.end(end_time=end)

    def counted(self) -> Telemetry:
        """Self, with the selections and misses recorded since the last read folded into
        `selections`, `selection_latency` and `misses` (read those through this)."""
        with self._lock:
            self._fold()
        return self

    def _fold(self) -> None:
        """Under the lock. popleft is atomic: a record appended meanwhile is folded now or next time."""
        selections, misses = self._new_selections, self._new_misses
        while selections:
            op, kernel_id, seconds = selections.popleft()
            self.selections[(op, kernel_id)] = self.selections.get((op, kernel_id), 0) + 1
            self.selection_latency.observe(seconds)
        while misses:
            family = misses.popleft()
            self.misses[family] = self.misses.get(family, 0) + 1

    def fallback(self, from_kernel: str, to_kernel: str) -> None:
        with self._lock:
            key = (from_kernel, to_kernel)
            self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def failure(self, kernel_id: str, error_type: str) -> None:
        with self._lock:
            key = (kernel_id, error_type)
            self.failures[key] = self.failures.get(key, 0) + 1

    def transition(self, name: str, kind: str, state: str) -> None:
        with self._lock:
            key = (name, kind, state)
            self.transitions[key] = self.transitions.get(key, 0) + 1

    # -- enabling and exporters ----------------------------------------------------------------

    def enable(
        self,
        prometheus: bool | Any = True,
        opentelemetry: bool = True,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        spans: bool = True,
    ) -> None:
        """Start counting calls and attach exporters.

        prometheus: True (the default registry), a CollectorRegistry, or False. opentelemetry:
        attach observable counters and a latency histogram to `meter_provider` (default: the
        global one) and selection spans to `tracer_provider` (default: the global one).
        """
        if prometheus is not False:
            prometheus_client = _require("prometheus_client", "prometheus-client")
            registry = prometheus_client.REGISTRY if prometheus is True else prometheus
            if all(r is not registry for r, _ in self._registries):
                collector = PrometheusCollector(self.runtime)
                registry.register(collector)
                self._registries.append((registry, collector))
        if opentelemetry:
            _require("opentelemetry.sdk", "opentelemetry-sdk")
            self._attach_otel(meter_provider, tracer_provider if spans else None, spans)
        self.enabled = True
        self.runtime.bump()  # rebind plans with counting wrappers

    def disable(self) -> None:
        """Stop counting calls, detach the Prometheus collector, stop metrics servers."""
        self.close()
        self.runtime.bump()

    def snapshot(self) -> TelemetrySnapshot:
        """The counters now (lz.telemetry())."""
        with self._lock:
            self._fold()
            calls = {key: _count_value(c) for key, c in self.calls.items()}
            return TelemetrySnapshot(
                self.enabled,
                calls,
                dict(self.selections),
                dict(self.misses),
                max(0, sum(calls.values()) - sum(self.misses.values())),
                dict(self.fallbacks),
                dict(self.failures),
                dict(self.transitions),
                self.selection_latency.count,
                self.selection_latency.sum,
            )

    def close(self) -> None:
        """Disable without dropping plans (lz.reset replaces them anyway)."""
        self.enabled = False
        for registry, collector in self._registries:
            registry.unregister(collector)
        self._registries.clear()
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self._servers.clear()
        self._otel_latency = None
        self._tracer = None

    def start_http_server(self, port: int = 9464, addr: str = "127.0.0.1", registry: Any = None) -> int:
        """Serve /metrics from `registry` (default: the one telemetry exports to) on localhost.

        Returns the port (pass 0 for a free one). Only loopback addresses are accepted: expose
        metrics further through your own proxy.
        """
        if addr not in _LOOPBACK:
            raise ConfigurationError(f"addr: expected a loopback address {sorted(_LOOPBACK)}, got {addr!r}")
        prometheus_client = _require("prometheus_client", "prometheus-client")
        if registry is None:
            registry = self._registries[0][0] if self._registries else prometheus_client.REGISTRY
        server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
        self._servers.append((server, thread))
        return int(server.server_port)

    def _attach_otel(self, meter_provider: Any, tracer_provider: Any, spans: bool) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.metrics import Observation

        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("layerzero", __version__)
        me = self

        def observe(read: Any, labels: tuple[str, ...]) -> Any:
            def callback(options: Any) -> Iterator[Observation]:
                if not me.enabled:
                    return
                for key, value in read().items():
                    yield Observation(value, dict(zip(labels, key if isinstance(key, tuple) else (key,), strict=True)))

            return callback

        counters = [
            (
                "layerzero.kernel.calls",
                "{call}",
                "kernel calls (plans built while telemetry is on)",
                self.kernel_calls,
                ("kernel", "op"),
            ),
            (
                "layerzero.selections",
                "{selection}",
                "kernel selections",
                lambda: dict(self.counted().selections),
                ("op", "kernel"),
            ),
            (
                "layerzero.plan_cache.misses",
                "{miss}",
                "plan-cache misses",
                lambda: dict(self.counted().misses),
                ("family",),
            ),
            (
                "layerzero.plan_cache.hits",
                "{hit}",
                "plan-cache hits (calls minus misses)",
                lambda: {(): self.cache_hits()},
                (),
            ),
            (
                "layerzero.fallbacks",
                "{fallback}",
                "calls re-run on another kernel after a failure",
                lambda: dict(self.fallbacks),
                ("from_kernel", "to_kernel"),
            ),
            (
                "layerzero.kernel.failures",
                "{failure}",
                "kernel failures",
                lambda: dict(self.failures),
                ("kernel", "error"),
            ),
        ]
        for name, unit, description, read, labels in counters:
            meter.create_observable_counter(name, callbacks=[observe(read, labels)], unit=unit, description=description)
        self._otel_latency = meter.create_histogram(
            "layerzero.selection.duration",
            unit="s",
            description="time to select and bind a kernel on a miss",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        if spans:
            tracers = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
            self._tracer = tracers.get_tracer("layerzero", __version__)


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """The counters at one moment (`lz.telemetry()`); keys as in the exported labels."""

    enabled: bool
    kernel_calls: dict[tuple[str, str], int]
    selections: dict[tuple[str, str], int]
    cache_misses: dict[str, int]
    cache_hits: int
    fallbacks: dict[tuple[str, str], int]
    failures: dict[tuple[str, str], int]
    breaker_transitions: dict[tuple[str, str, str], int]
    selection_latency_count: int
    selection_latency_sum_s: float


class PrometheusCollector:
    """A prometheus_client collector reading a runtime's telemetry, health and plan cache."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return []  # names are known only at scrape time; describing them would run collect()

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        rt = self.runtime
        t = rt.telemetry.counted()

        def counter(name: str, doc: str, labels: tuple[str, ...], values: dict[Any, int]) -> Any:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(list(key if isinstance(key, tuple) else (key,)), value)
            return family

        yield counter(
            "layerzero_kernel_calls",
            "Kernel calls through plans built while telemetry is on.",
            ("kernel", "op"),
            t.kernel_calls(),
        )
        yield counter(
            "layerzero_selections",
            "Kernel selections (plan-cache misses that selected).",
            ("op", "kernel"),
            dict(t.selections),
        )
        yield counter("layerzero_plan_cache_misses", "Plan-cache misses.", ("family",), dict(t.misses))
        yield CounterMetricFamily(
            "layerzero_plan_cache_hits", "Plan-cache hits (calls minus misses).", value=t.cache_hits()
        )
        yield counter(
            "layerzero_fallbacks",
            "Calls re-run on another kernel after a failure.",
            ("from_kernel", "to_kernel"),
            dict(t.fallbacks),
        )
        yield counter(
            "layerzero_kernel_failures", "Exceptions raised by kernels.", ("kernel", "error"), dict(t.failures)
        )
        yield counter(
            "layerzero_breaker_transitions",
            "Circuit-breaker state changes.",
            ("name", "kind", "state"),
            dict(t.transitions),
        )
        states = GaugeMetricFamily(
            "layerzero_breaker_state", "Breaker state: 0 closed, 1 half-open, 2 open.", labels=("name", "kind")
        )
        for b in rt.health.report().breakers:
            states.add_metric([b.name, b.kind], _STATE_VALUE[b.state.value])
        yield states
        hist = t.selection_latency
        yield HistogramMetricFamily(
            "layerzero_selection_duration_seconds",
            "Time to select and bind a kernel.",
            buckets=hist.cumulative(),
            sum_value=hist.sum,
        )
        yield GaugeMetricFamily("layerzero_plan_cache_size", "Plans in the cache.", value=len(rt.plans))
        yield GaugeMetricFamily("layerzero_plan_cache_generation", "Plan-cache generation.", value=rt.generation)


def _require(module: str, distribution: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendNotAvailableError(
            f"telemetry exporter needs {distribution} ({module} failed to import: {e}); "
            f"pip install 'layerzero[telemetry]' or pass {module.split('.')[0]}=False"
        ) from e
