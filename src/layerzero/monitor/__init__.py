"""What the Runtime watches while kernels run: circuit breakers and the runtime fallback (health),
availability proven by probes (probe), memory headroom (memory) and metrics (telemetry).

Nothing here imports an optional library at import time; prometheus_client and the
OpenTelemetry SDK are imported when telemetry is enabled.
"""
