"""What a serving process needs around selection: health (circuit breakers and the runtime
fallback), telemetry, CUDA graph safety, memory headroom, and the doctor.

Nothing here imports an optional library at import time; prometheus_client and the
OpenTelemetry SDK are imported when telemetry is enabled.
"""
