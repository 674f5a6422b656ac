"""IPC round-trip latency of an isolated backend (runtime/isolation.py) vs the same kernel in-process.

Measures `IsolatedBackend.call` of torch.rms_norm (one request and one reply on the pipe, inputs
and output through the shared-memory arena) for a few tensor sizes, and writes
benchmarks/results/isolation-latency-<device>.md. Run: python benchmarks/isolation_latency.py
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from layerzero.backends.torch_native import rms_norm
from layerzero.runtime.isolation import IsolatedBackend


def _median_us(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(1)
    iso = IsolatedBackend("torch", timeout_s=30, num_threads=1)
    t0 = time.perf_counter()
    iso.start()
    start_s = time.perf_counter() - t0
    rows = []
    try:
        for shape in ((1, 64), (16, 4096), (256, 4096), (2048, 4096)):
            x = torch.randn(*shape)
            w = torch.randn(shape[-1])
            reps = 2000 if x.numel() < 1 << 16 else 300
            local = _median_us(lambda: rms_norm(x, w, 1e-6), reps)  # noqa: B023
            remote = _median_us(lambda: iso.call("torch.rms_norm", x, w, 1e-6), reps)  # noqa: B023
            assert torch.allclose(iso.call("torch.rms_norm", x, w, 1e-6), rms_norm(x, w, 1e-6))
            rows.append((shape, x.numel() * 4, local, remote))
    finally:
        iso.shutdown()
    today = datetime.date.today().isoformat()
    lines = [
        f"# Isolated backend IPC round trip (CPU), {today}",
        "",
        f"Machine: {platform.machine()}, 1 torch thread in each process, torch {torch.__version__}, "
        f"python {platform.python_version()}. Worker start (spawn, import torch + layerzero): {start_s:.2f} s.",
        "Kernel: torch.rms_norm(x, w). `isolated` = IsolatedBackend.call: request on the pipe, inputs copied into",
        "the shared-memory arena, kernel in the worker, output copied back out, reply. Median of repeated calls.",
        "",
        "| x shape | bytes in | in-process us | isolated us | IPC overhead us |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape, nbytes, local, remote in rows:
        lines.append(f"| {'x'.join(map(str, shape))} | {nbytes} | {local:.1f} | {remote:.1f} | {remote - local:.1f} |")
    out = Path(__file__).parent / "results" / "isolation-latency-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
