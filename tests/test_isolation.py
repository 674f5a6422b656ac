"""Process isolation: results through the shared-memory arena, a worker killed mid-call gives the
fallback result and a restarted worker, a timeout never hangs, and no zombie is left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.errors import KernelExecutionError
from layerzero.isolation import isolate

_BACKEND_SRC = textwrap.dedent('''
    """A test backend: rms_norm that can be told to sleep (to be killed mid-call) or to raise."""
    import os, time
    import torch
    from layerzero.kernel import ALL_FLOAT_DTYPES, Backend, KernelSpec

    def rms(x, weight, eps):
        flag = float(x.reshape(-1)[0])
        if flag == 1234.0:
            time.sleep(60)
        if flag == 4321.0:
            raise ValueError("told to fail")
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return out * weight if weight is not None else out

    def pid(x, weight, eps):
        return torch.full_like(x, float(os.getpid()))

    BACKEND = Backend("isotest", kernels=(
        KernelSpec(id="isotest.rms", ops=("norm.rms",), impl=rms, priority=99,
                   platforms=frozenset({"cpu"}), dtypes=ALL_FLOAT_DTYPES),
    ))
''')


@pytest.fixture
def iso_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "lz_isotest_backend.py").write_text(_BACKEND_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned worker inherits sys.path
    import lz_isotest_backend

    lz.register_backend(lz_isotest_backend.BACKEND)
    iso = isolate("isotest", module="lz_isotest_backend", timeout_s=20)
    yield iso
    iso.shutdown()
    sys.modules.pop("lz_isotest_backend", None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def test_killed_worker_gives_fallback_result_then_restarts(iso_backend) -> None:
    x = torch.randn(4, 64)
    w = torch.randn(64)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    out = lz.rms_norm(x, w)  # first call: starts the worker, runs there, result through the arena
    torch.testing.assert_close(out, want)
    assert lz.which("rms_norm", x, w) == "isotest.rms"
    first_pid = iso_backend.pid
    assert first_pid is not None and first_pid != os.getpid() and iso_backend.calls == 1

    hang = x.clone()
    hang[0, 0] = 1234.0  # the worker sleeps on this input: kill it mid-call
    want_hang = hang * torch.rsqrt(hang.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    killer = threading.Timer(1.0, os.kill, (first_pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    got = lz.rms_norm(hang, w)  # the health guard falls back to the next kernel
    elapsed = time.monotonic() - t0
    killer.join()
    torch.testing.assert_close(got, want_hang, rtol=1e-4, atol=1e-4)
    assert elapsed < 15, elapsed  # noticed the death, did not wait for the 20 s timeout
    assert iso_backend.crashes == 1 and not _alive(first_pid)

    torch.testing.assert_close(lz.rms_norm(x, w), want)  # fresh worker serves the next call
    assert iso_backend.restarts == 1 and iso_backend.pid not in (None, first_pid)


def test_kernel_error_and_timeout_are_kernel_execution_errors(iso_backend) -> None:
    x = torch.randn(2, 8)
    bad = x.clone()
    bad[0, 0] = 4321.0
    with pytest.raises(KernelExecutionError, match="isotest.rms failed.*told to fail"):
        iso_backend.call("isotest.rms", bad, None, 1e-6)
    pid = iso_backend.pid
    assert pid is not None and _alive(pid)  # an exception in the kernel does not cost the worker

    iso_backend.timeout_s = 1.0
    hang = x.clone()
    hang[0, 0] = 1234.0
    t0 = time.monotonic()
    with pytest.raises(KernelExecutionError, match="did not answer within 1s"):
        iso_backend.call("isotest.rms", hang, None, 1e-6)
    assert time.monotonic() - t0 < 6
    assert not _alive(pid) and iso_backend.pid is None  # killed and reaped


def test_shutdown_leaves_no_zombie_and_concurrent_calls_do_not_mix(iso_backend) -> None:
    xs = [torch.randn(3, 16) * (i + 1) for i in range(8)]
    outs: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        outs[i] = iso_backend.call("isotest.rms", xs[i], None, 1e-6)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, x in enumerate(xs):  # each thread got its own answer: no interleaving on the pipe
        torch.testing.assert_close(outs[i], x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    pid = iso_backend.pid
    assert pid is not None
    iso_backend.shutdown()
    assert not _alive(pid) and iso_backend.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped by us
    assert not [p for p in multiprocessing.active_children() if p.pid == pid]
