"""The runtime's monitors as calls: `lz.doctor()`, what this process has (device, driver, torch,
backends, breakers, caches, PerfDB, telemetry); `lz.readiness_check()`, whether it can serve, with
the reasons if not; the health (breakers), memory headroom and telemetry settings and readings."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .device import device_info
from .monitor.health import HealthConfig, HealthReport
from .monitor.memory import MemoryConfig, free_memory
from .monitor.telemetry import TelemetrySnapshot
from .ops.attention import attention
from .ops.norm import rms_norm
from .perf.perfdb import _nvidia_driver
from .selection.inspect import list_backends
from .state import runtime


@dataclass(frozen=True, slots=True)
class DeviceRow:
    type: str
    index: int
    name: str
    sm: int
    generation: str
    total_bytes: int
    free_bytes: int | None


@dataclass(frozen=True, slots=True)
class BackendRow:
    name: str
    available: bool
    version: str | None
    reason: str | None
    kernels: int
    probe: str | None = None  # what the backend's probe verified on the default device


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Everything `layerzero doctor` prints; `to_dict()` is its --json form."""

    python: str
    platform: str
    torch: str
    cuda: str | None
    cudnn: int | None
    driver: str
    devices: tuple[DeviceRow, ...]
    backends: tuple[BackendRow, ...]
    health: dict[str, Any]
    plan_cache: dict[str, int]
    perfdb: dict[str, Any]
    telemetry: dict[str, Any]
    memory: dict[str, Any]
    ready: bool
    issues: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"LayerZero doctor: {'READY' if self.ready else 'NOT READY'}",
            f"  python {self.python} on {self.platform}; torch {self.torch}; CUDA {self.cuda or '-'}; "
            f"cuDNN {self.cudnn or '-'}; driver {self.driver or '-'}",
            "devices:",
        ]
        lines += table(
            ["device", "name", "sm", "generation", "total", "free"],
            [
                [f"{d.type}:{d.index}", d.name, d.sm or "-", d.generation, gib(d.total_bytes), gib(d.free_bytes)]
                for d in self.devices
            ],
        )
        lines.append("backends:")
        lines += table(
            ["backend", "available", "version", "kernels", "reason / probe"],
            [
                [b.name, "yes" if b.available else "no", b.version or "-", b.kernels, b.reason or b.probe or ""]
                for b in self.backends
            ],
        )
        h = self.health
        lines.append(
            f"health: {'ok' if h['healthy'] else 'degraded'}, {h['failures']} failures, {h['fallbacks']} fallbacks"
        )
        if h["breakers"]:
            lines += table(
                ["breaker", "kind", "state", "failures", "opened", "last error"],
                [
                    [b["name"], b["kind"], b["state"], b["total_failures"], b["times_opened"], b["last_error"][:60]]
                    for b in h["breakers"]
                ],
            )
        pc = self.plan_cache
        lines.append(f"plan cache: {pc['size']} plans, generation {pc['generation']}, {pc['selections']} selections")
        db = self.perfdb
        rows = f", {db['rows']} rows" if db.get("rows") is not None else ""
        lines.append(
            f"perfdb: {db.get('path') or 'off'}{rows}" + (f", error: {db['error']}" if db.get("error") else "")
        )
        lines.append(
            f"telemetry: {'on' if self.telemetry['enabled'] else 'off'}"
            f" (prometheus_client {self.telemetry['prometheus_client'] or 'not installed'}, "
            f"opentelemetry-sdk {self.telemetry['opentelemetry_sdk'] or 'not installed'})"
        )
        lines.append(f"memory headroom: {self.memory['headroom_fraction']:.0%} or {self.memory['headroom_bytes']} B")
        lines += [f"issue: {i}" for i in self.issues]
        return "\n".join(lines)


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.1f} GiB"


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[DeviceRow]:

    rows = []
    cpu = device_info(torch.device("cpu"))
    mem = free_memory("cpu")
    rows.append(DeviceRow("cpu", 0, cpu.name, 0, "cpu", mem[1] if mem else 0, mem[0] if mem else None))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            info = device_info(torch.device("cuda", i))
            mem = free_memory("cuda", i)
            rows.append(
                DeviceRow("cuda", i, info.name, info.sm, info.generation, info.total_memory, mem[0] if mem else None)
            )
    return rows


def _driver() -> str:
    if not torch.cuda.is_available():
        return ""

    return _nvidia_driver()


def _perfdb(runtime: Any) -> dict[str, Any]:
    m = getattr(runtime, "measurements", None)
    path = getattr(m, "path", None)
    out: dict[str, Any] = {
        "path": None if path is None else str(path),
        "rows": None,
        "error": getattr(m, "error", None),
    }
    if m is not None and path is not None and path.exists():
        try:
            out["rows"] = len(m.db.records())
        except Exception as e:  # doctor reports; it never fails
            out["error"] = f"{type(e).__name__}: {e}"
    return out


def readiness_check(smoke: bool = True, required_backends: tuple[str, ...] = ()) -> tuple[bool, list[str]]:
    """(ready, issues): can this process serve? Checks that backends load, that every backend in
    `required_backends` is available, that no breaker is open, and (smoke) that attention and
    rms_norm on the default device agree with the float64 reference."""
    issues: list[str] = []
    try:
        runtime.ensure_loaded()
    except Exception as e:
        return False, [f"loading backends failed: {type(e).__name__}: {e}"]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for name in required_backends:
        try:
            backend = runtime.registry.backend(name)
            if backend.availability[0]:
                runtime.probes.probe(backend, device)  # a library that imports but cannot run is not ready
            ok, _, why = backend.availability
        except Exception as e:
            issues.append(f"required backend {name!r}: {e}")
            continue
        if not ok:
            issues.append(f"required backend {name!r} is not available: {why}")
    for b in runtime.health.report().breakers:
        if b.state.value != "closed":
            issues.append(f"{b.kind} {b.name} circuit breaker is {b.state.value} (last error: {b.last_error})")
    perf_error = getattr(getattr(runtime, "measurements", None), "error", None)
    if perf_error:
        issues.append(f"PerfDB ignored: {perf_error}")
    if smoke:
        issues.extend(_smoke())
    return not issues, issues


def _smoke() -> list[str]:
    """Run attention and rms_norm once on the default device against the float64 reference."""
    from .backends import reference  # only when the smoke test runs: `import layerzero` stays light

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    gen = torch.Generator(device="cpu").manual_seed(0)
    issues = []
    try:
        q, k, v = (torch.randn(1, 16, 4, 64, generator=gen).to(device, dtype) for _ in range(3))
        out = attention(q, k, v, is_causal=True)
        qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
        ref = reference.attention(qd, kd, vd, None, True, 0.0, None).transpose(1, 2)
        err = float((out.double() - ref).abs().max())
        if not err <= tol:
            issues.append(f"attention smoke test on {device} differs from the reference by {err:.3g}")
        x = torch.randn(8, 256, generator=gen).to(device, dtype)
        w = torch.randn(256, generator=gen).to(device, dtype)
        err = float((rms_norm(x, w).double() - reference.rms_norm(x.double(), w.double(), 1e-6)).abs().max())
        if not err <= tol * 10:
            issues.append(f"rms_norm smoke test on {device} differs from the reference by {err:.3g}")
    except Exception as e:
        issues.append(f"smoke test on {device} raised {type(e).__name__}: {e}")
    return issues


def doctor(smoke: bool = True) -> DoctorReport:
    """Device, driver, torch, every backend with version / availability / reason, breakers,
    plan cache, PerfDB, telemetry and memory settings, and the readiness verdict."""
    ready, issues = readiness_check(smoke=smoke)
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    backends = tuple(
        BackendRow(b.name, b.available, b.version, b.reason, len(b.kernels), b.probe) for b in list_backends()
    )
    mem = runtime.memory.config
    return DoctorReport(
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=cudnn,
        driver=_driver(),
        devices=tuple(_devices()),
        backends=backends,
        health=runtime.health.report().to_dict(),
        plan_cache={"size": len(runtime.plans), "generation": runtime.generation, "selections": runtime.plans.computes},
        perfdb=_perfdb(runtime),
        telemetry={
            "enabled": runtime.telemetry.enabled,
            "prometheus_client": _version("prometheus-client"),
            "opentelemetry_sdk": _version("opentelemetry-sdk"),
        },
        memory={"headroom_fraction": mem.headroom_fraction, "headroom_bytes": mem.headroom_bytes},
        ready=ready,
        issues=tuple(issues),
    )


# ---- health, memory headroom, telemetry


def health() -> HealthReport:
    """Circuit-breaker states and failure/fallback counts of this process (`lz.health()`)."""
    return runtime.health.report()


def configure_health(**changes: Any) -> HealthConfig:
    """Change breaker thresholds or turn the runtime fallback off, e.g.
    `lz.configure_health(failure_threshold=3, window_s=10, cooldown_s=5)`. See HealthConfig."""
    return runtime.health.configure(**changes)


def configure_memory(
    headroom_fraction: float = 0.05,
    headroom_bytes: int = 0,
    free_memory: Callable[[str, int], tuple[int, int] | None] | None = None,
) -> MemoryConfig:
    """Keep max(headroom_bytes, headroom_fraction * device total) free: kernels whose declared
    workspace would not fit are rejected with WORKSPACE_TOO_LARGE. Drops cached plans."""
    config = MemoryConfig(headroom_fraction, headroom_bytes, free_memory)
    runtime.memory.configure(config)
    runtime.bump()
    return config


def telemetry() -> TelemetrySnapshot:
    """A snapshot of LayerZero's counters (no exporter needed)."""
    return runtime.telemetry.snapshot()


def enable_telemetry(
    prometheus: bool | Any = True,
    opentelemetry: bool = True,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    spans: bool = True,
) -> None:
    """Count kernel calls and export all counters (see Telemetry.enable). Drops cached plans."""
    runtime.telemetry.enable(prometheus, opentelemetry, meter_provider, tracer_provider, spans)


def disable_telemetry() -> None:
    """Stop counting calls and detach exporters; counters keep their values."""
    runtime.telemetry.disable()


def start_metrics_server(port: int = 9464, addr: str = "127.0.0.1", registry: Any = None) -> int:
    """Serve Prometheus /metrics on localhost; returns the port (0 picks a free one)."""
    return runtime.telemetry.start_http_server(port, addr, registry)
