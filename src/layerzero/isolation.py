"""Process isolation: run a backend's kernels in a worker subprocess.

For backends whose native libraries cannot share a process (two builds of the same CUDA
library, conflicting OpenMP runtimes, a library that aborts on some inputs):

    iso = lz.isolate("xformers", timeout_s=10)   # its kernels now run in a worker process
    ...
    iso.shutdown()

The kernels keep their ids and constraints; only `impl` becomes a proxy. One call is one
request on a duplex pipe and one reply, under a per-worker lock (no interleaving on the pipe).
CPU tensors travel through a shared-memory arena mapped by both processes (a copy in, a copy
out, no pickling of data); CUDA tensors go through torch's CUDA IPC handles (the caller blocks
until the reply, so they stay alive). Other arguments are pickled.

A worker that dies, or does not answer within `timeout_s`, is killed and reaped, and the call
raises KernelExecutionError: the runtime's health guard turns that into the next kernel's
result (the reference last) and counts a failure. The next call starts a fresh worker. Nothing
here waits without a timeout, and every process started is joined.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing as mp
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from .errors import ConfigurationError, KernelExecutionError
from .state import runtime

_ALIGN = 64


@dataclasses.dataclass(frozen=True, slots=True)
class _Ref:
    """A tensor stored in the arena: where, shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class WorkerCrashed(RuntimeError):
    """The worker process exited or timed out during a call (wrapped in KernelExecutionError)."""


# ---- the worker side ----------------------------------------------------------------------------


def _worker_main(conn: Connection, module: str | None, num_threads: int | None = None) -> None:
    """Entry point of the worker process: load the kernels, then serve requests until None."""
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions: CUDA IPC)

    if num_threads is not None:
        torch.set_num_threads(num_threads)

    runtime.ensure_loaded()
    if module is not None:
        mod = importlib.import_module(module)
        for backend in getattr(mod, "BACKENDS", None) or (getattr(mod, "BACKEND", None),):
            if backend is not None:
                runtime.registry.add_backend(backend)
    arena = torch.empty(0, dtype=torch.uint8)
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, payload = msg
        if kind == "arena":
            arena = payload
            conn.send(("ok", None))
            continue
        kernel_id, args, kwargs, used = payload
        try:
            impl = runtime.registry.kernel(kernel_id).impl
            args = tuple(_load(arena, a) for a in args)
            kwargs = {k: _load(arena, v) for k, v in kwargs.items()}
            result = impl(*args, **kwargs)
            if isinstance(result, torch.Tensor) and result.device.type == "cpu":
                ref = _store(arena, result, used)
                conn.send(("ok", ref if ref is not None else result))
            else:
                conn.send(("ok", result))
        except Exception as e:  # the kernel's error goes back to the caller; the worker lives on
            conn.send(("err", f"{type(e).__name__}: {e}"))


def _view(arena: torch.Tensor, ref: _Ref) -> torch.Tensor:
    numel = 1
    for s in ref.shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=ref.dtype).element_size()
    return arena[ref.offset : ref.offset + nbytes].view(ref.dtype).view(ref.shape)


def _load(arena: torch.Tensor, value: Any) -> Any:
    return _view(arena, value) if isinstance(value, _Ref) else value


def _store(arena: torch.Tensor, t: torch.Tensor, offset: int) -> _Ref | None:
    """Copy `t` into the arena at `offset` (aligned); None if it does not fit."""
    offset = -(-offset // _ALIGN) * _ALIGN
    nbytes = t.numel() * t.element_size()
    if offset + nbytes > arena.numel():
        return None
    ref = _Ref(offset, tuple(t.shape), t.dtype)
    _view(arena, ref).copy_(t)
    return ref


# ---- the caller side ----------------------------------------------------------------------------


class _Process:
    """The live worker: process, pipe end and arena. Separate from IsolatedBackend so that a
    weakref finalizer can stop it without keeping the backend alive."""

    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.arena = torch.empty(0, dtype=torch.uint8)

    def stop(self, grace_s: float = 2.0) -> None:
        """Ask the worker to exit, then terminate and kill if needed; always reaps it."""
        try:
            if self.proc.is_alive():
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(grace_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(grace_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class IsolatedBackend:
    """A backend whose kernels run in one worker subprocess (see the module docstring)."""

    def __init__(
        self,
        backend: str,
        module: str | None = None,
        timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
        arena_bytes: int = 1 << 20,
        num_threads: int | None = None,
    ) -> None:
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name}: expected seconds > 0, got {value!r}")
        self.backend = backend
        self.module = module
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.arena_bytes = arena_bytes
        self.num_threads = num_threads  # torch intra-op threads of the worker (None: torch's default)
        self.restarts = 0  # workers started after the first
        self.crashes = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._worker: _Process | None = None
        self._started = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        w = self._worker
        return None if w is None else w.proc.pid

    def start(self) -> None:
        """Start the worker now (otherwise the first call does)."""
        with self._lock:
            self._ensure_worker()

    def _ensure_worker(self) -> _Process:
        if self._worker is not None and self._worker.proc.is_alive():
            return self._worker
        if self._worker is not None:
            self._discard()
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(theirs, self.module, self.num_threads),
            daemon=True,
            name=f"layerzero-isolated-{self.backend}",
        )
        proc.start()
        theirs.close()
        worker = _Process(proc, ours)
        self._worker = worker
        self._finalizer = weakref.finalize(self, worker.stop)
        if self._started:
            self.restarts += 1
        self._started += 1
        try:
            self._receive(worker, self.start_timeout_s, "starting")
            self._set_arena(worker, self.arena_bytes)
        except BaseException:
            self._discard()
            raise
        return worker

    def _set_arena(self, worker: _Process, nbytes: int) -> None:
        import torch.multiprocessing  # noqa: F401  (the reduction that shares the storage's memory)

        arena = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        worker.conn.send(("arena", arena))
        self._receive(worker, self.start_timeout_s, "mapping the arena")
        worker.arena = arena

    def _receive(self, worker: _Process, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                if worker.conn.poll(min(max(remaining, 0.0), 0.5)):
                    status, value = worker.conn.recv()
                    if status == "err":
                        raise _KernelRaised(value)
                    return value
            except (EOFError, OSError) as e:
                raise WorkerCrashed(
                    f"worker of {self.backend} died while {what} (exit code {worker.proc.exitcode})"
                ) from e
            if not worker.proc.is_alive() and not worker.conn.poll(0):
                worker.proc.join(1.0)
                raise WorkerCrashed(f"worker of {self.backend} died while {what} (exit code {worker.proc.exitcode})")
            if remaining <= 0:
                raise WorkerCrashed(f"worker of {self.backend} did not answer within {timeout_s:g}s while {what}")

    def _discard(self) -> None:
        worker, self._worker = self._worker, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if worker is not None:
            worker.stop(grace_s=0.5)

    def call(self, kernel_id: str, *args: Any, **kwargs: Any) -> Any:
        """Run `kernel_id` in the worker; KernelExecutionError if it raises, crashes or times out."""
        with self._lock:
            self.calls += 1
            try:
                worker = self._ensure_worker()
                packed, kw, used = self._pack(worker, args, kwargs)
                worker.conn.send(("call", (kernel_id, packed, kw, used)))
                result = self._receive(worker, self.timeout_s, f"running {kernel_id}")
            except _KernelRaised as e:
                raise KernelExecutionError(kernel_id, RuntimeError(str(e))) from None
            except (WorkerCrashed, OSError, EOFError) as e:
                self.crashes += 1
                self._discard()  # killed and reaped; the next call starts a fresh worker
                raise KernelExecutionError(kernel_id, e) from None
            if isinstance(result, _Ref):
                return _view(worker.arena, result).clone()  # the arena is reused by the next call
            if isinstance(result, torch.Tensor) and result.is_cuda:
                # a CUDA IPC view of the worker's memory: copy it into ours, so that the result
                # outlives the worker (a later crash or restart frees that memory)
                return result.clone()
            return result

    def _pack(
        self, worker: _Process, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], int]:
        cpu = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.device.type == "cpu"]
        need = sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in cpu)
        if need * 2 > worker.arena.numel():  # room for the inputs and an output of their size
            self._set_arena(worker, max(2 * need * 2, self.arena_bytes))
        offset = 0

        def pack(v: Any) -> Any:
            nonlocal offset
            if not (isinstance(v, torch.Tensor) and v.device.type == "cpu"):
                return v
            ref = _store(worker.arena, v.detach(), offset)
            assert ref is not None  # the arena was sized above
            offset = ref.offset + v.numel() * v.element_size()
            return ref

        packed = tuple(pack(a) for a in args)
        kw = {k: pack(v) for k, v in kwargs.items()}
        return packed, kw, offset

    def shutdown(self) -> None:
        """Stop the worker (reaped); a later call would start a new one."""
        with self._lock:
            self._discard()

    def proxy(self, kernel_id: str) -> Callable[..., Any]:
        """A kernel impl that runs `kernel_id` in this worker."""

        def run(*args: Any, **kwargs: Any) -> Any:
            return self.call(kernel_id, *args, **kwargs)

        run.__qualname__ = f"isolated_{kernel_id}"
        return run


class _KernelRaised(Exception):
    """The kernel raised inside a healthy worker."""


def isolate(
    backend: str, module: str | None = None, timeout_s: float = 30.0, start_timeout_s: float = 120.0
) -> IsolatedBackend:
    """Run `backend`'s kernels in a worker subprocess from now on; returns its handle.

    module: the module that defines the backend (BACKEND/BACKENDS), when it is not a built-in
    one; the worker imports it. Cached plans are dropped. Call `.shutdown()` when done (also done
    when the handle is garbage-collected or the interpreter exits).
    """

    runtime.ensure_loaded()
    name = runtime.registry.backend_name(backend)
    iso = IsolatedBackend(name, module, timeout_s, start_timeout_s)
    specs = [s for s in runtime.registry.kernels.values() if s.backend == name]
    with runtime._lock:
        for spec in specs:
            runtime.registry.add_kernel(dataclasses.replace(spec, impl=iso.proxy(spec.id)))
        runtime.bump()
    return iso
