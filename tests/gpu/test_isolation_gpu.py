"""Process isolation on the GPU: CUDA tensors reach the worker as CUDA IPC handles (no host copy),
the result comes back correct and outlives the worker, and a worker killed mid-call gives the
fallback result and a restarted worker. Not run on the CPU machine."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.isolation import isolate

pytestmark = pytest.mark.gpu

_BACKEND_SRC = textwrap.dedent('''
    """A GPU test backend: rms_norm in fp32 that can be told to sleep (to be killed mid-call)."""
    import os, time
    import torch
    from layerzero.kernel import ALL_FLOAT_DTYPES, Backend, KernelSpec

    def rms(x, weight, eps):
        assert x.is_cuda, "the worker must receive the CUDA tensor itself"
        if float(x.reshape(-1)[0]) == 1234.0:
            time.sleep(60)
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = out * weight.float() if weight is not None else out
        return out.to(x.dtype)

    def pid(x):
        return torch.full((1,), float(os.getpid()), device=x.device)

    BACKEND = Backend("isogpu", kernels=(
        KernelSpec(id="isogpu.rms", ops=("norm.rms",), impl=rms, priority=99,
                   platforms=frozenset({"cuda"}), dtypes=ALL_FLOAT_DTYPES),
    ))
''')


@pytest.fixture
def iso_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (tmp_path / "lz_isogpu_backend.py").write_text(_BACKEND_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lz_isogpu_backend

    lz.register_backend(lz_isogpu_backend.BACKEND)
    iso = isolate("isogpu", module="lz_isogpu_backend", timeout_s=20)
    yield iso
    iso.shutdown()
    sys.modules.pop("lz_isogpu_backend", None)


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())


def test_cuda_tensors_cross_by_ipc_and_results_outlive_the_worker(iso_gpu) -> None:
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = 1.0 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    out = lz.rms_norm(x, w)
    assert lz.which("rms_norm", x, w) == "isogpu.rms"
    assert out.is_cuda and out.dtype == torch.bfloat16
    pid = iso_gpu.pid
    assert pid is not None and pid != os.getpid()
    torch.testing.assert_close(out.double(), _reference(x, w), atol=1e-2, rtol=1e-2)
    iso_gpu.shutdown()  # the worker's memory is gone; our result was copied out of it
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), _reference(x, w), atol=1e-2, rtol=1e-2)


def test_killed_gpu_worker_gives_fallback_then_restarts(iso_gpu) -> None:
    w = 1.0 + 0.1 * torch.randn(1024, device="cuda")
    x = torch.randn(8, 1024, device="cuda")
    lz.rms_norm(x, w)  # starts the worker
    first = iso_gpu.pid
    hang = x.clone()
    hang[0, 0] = 1234.0
    killer = threading.Timer(3.0, lambda: os.kill(first, 9))
    killer.start()
    t0 = time.monotonic()
    out = lz.rms_norm(hang, w)  # the worker dies mid-call: the next kernel (torch) answers
    killer.join()
    assert time.monotonic() - t0 < 15
    torch.testing.assert_close(out.double(), _reference(hang, w), atol=1e-4, rtol=1e-4)
    assert iso_gpu.crashes == 1
    again = lz.rms_norm(x, w)  # a fresh worker
    assert iso_gpu.pid not in (None, first) and iso_gpu.restarts == 1
    torch.testing.assert_close(again.double(), _reference(x, w), atol=1e-4, rtol=1e-4)
