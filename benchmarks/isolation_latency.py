"""IPC round-trip latency of an isolated backend (isolation.py) vs the same kernel in-process.

Measures `IsolatedBackend.call` of torch.rms_norm (one request and one reply on the pipe, inputs
and output through the shared-memory arena) for a few tensor sizes, and writes
benchmarks/results/isolation-latency-<device>.md. Run: python benchmarks/isolation_latency.py [cuda]

On CUDA the tensors are not copied: they travel as CUDA IPC handles (torch.multiprocessing), the
worker runs the kernel on the same GPU, and the caller copies the result out of the worker's memory.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from layerzero.backends.torch_native import rms_norm
from layerzero.isolation import IsolatedBackend


def _median_us(fn, reps: int, sync=lambda: None) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main() -> None:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.set_num_threads(1)
    iso = IsolatedBackend("torch", timeout_s=30, num_threads=1)
    t0 = time.perf_counter()
    iso.start()
    start_s = time.perf_counter() - t0
    rows = []
    try:
        for shape in ((1, 64), (16, 4096), (256, 4096), (2048, 4096)):
            x = torch.randn(*shape, device=dev)
            w = torch.randn(shape[-1], device=dev)
            reps = 2000 if x.numel() < 1 << 16 else 300
            local = _median_us(lambda: rms_norm(x, w, 1e-6), reps, sync)  # noqa: B023
            remote = _median_us(lambda: iso.call("torch.rms_norm", x, w, 1e-6), reps, sync)  # noqa: B023
            assert torch.allclose(iso.call("torch.rms_norm", x, w, 1e-6), rms_norm(x, w, 1e-6))
            rows.append((shape, x.numel() * 4, local, remote))
    finally:
        iso.shutdown()
    today = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    how = ("inputs passed as CUDA IPC handles, kernel in the worker on the same GPU, output copied out of the "
           "worker's memory" if dev.type == "cuda" else
           "inputs copied into the shared-memory arena, kernel in the worker, output copied back out")
    lines = [
        f"# Isolated backend IPC round trip ({where}), {today}",
        "",
        f"Machine: {platform.machine()}, 1 torch thread in each process, torch {torch.__version__}, "
        f"python {platform.python_version()}. Worker start (spawn, import torch + layerzero): {start_s:.2f} s.",
        f"Kernel: torch.rms_norm(x, w). `isolated` = IsolatedBackend.call: request on the pipe, {how}, reply.",
        "Median of repeated calls (each synchronised on CUDA).",
        "",
        "| x shape | bytes in | in-process us | isolated us | IPC overhead us |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape, nbytes, local, remote in rows:
        lines.append(f"| {'x'.join(map(str, shape))} | {nbytes} | {local:.1f} | {remote:.1f} | {remote - local:.1f} |")
    out = Path(__file__).parent / "results" / f"isolation-latency-{'h100' if dev.type == 'cuda' else 'cpu'}.md"
    if dev.type == "cuda" and "H100" not in where:
        out = out.with_name("isolation-latency-gpu.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
