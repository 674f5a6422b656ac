"""`lz.warmup` / `layerzero warmup`: compile and select, before serving, what the given calls will run,
so that the first real call pays neither JIT compilation nor selection.

1. JIT variants, in parallel worker processes. For each (shape, dtype) the kernel selection will run
   once everything is compiled is found: the current choice, or a kernel rejected only because its
   variant is not built yet (NEEDS_JIT_COMPILE) that would outscore it. The modules those need
   (KernelSpec.jit_variant: FlashInfer's prefill and decode modules, 13-110 s of nvcc each;
   FlashAttention-4's when its disk cache is on) are built in worker processes, one per variant,
   each calling the kernel once with the shape, so the library's on-disk cache is filled, and
   checking the output against the reference. Workers at once: min(variants, slots) with slots =
   min(cores, free RAM / NVCC_BYTES); each worker's ninja gets MAX_JOBS = slots / workers (FlashInfer
   builds a module with ninja, by default one nvcc per core: five modules at once on the 16-core
   H200 host ran ~80 nvcc and one was killed). A progress bar and each variant's time go to stderr.
2. In this process each shape is selected (the plan stays cached) and called twice; the first call
   loads what phase 1 built. Kernels without a jit_variant (Triton, FlexAttention) compile here.

Modules of FlashInfer's ahead-of-time package flashinfer-jit-cache count as compiled
(backends/flashinfer.py: compiled_on_disk), so their variants skip phase 1.

    print(lz.warmup("attention", shapes=[(8, 1, 4096, 32, 8, 128, 1)], dtypes=[torch.bfloat16]))
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from ..errors import InvalidInputError
from ..kernel import KernelSpec
from ..monitor.probe import TOLERANCE
from ..reasons import Reason
from ..selection.engine import REFERENCE_BACKEND, TRANSFORM_PENALTY
from ..state import runtime
from . import workloads

# A first call this much slower than the second (and by at least 1 ms) counts as compilation.
COMPILE_RATIO = 5.0
# Memory one nvcc of a FlashInfer attention module may take (an estimate, on the high side: template-
# heavy CUDA). It bounds how many compilers run at once with the free RAM.
NVCC_BYTES = 4 << 30
RESULT_TAG = "LAYERZERO_WARMUP_RESULT "
Problem = tuple[tuple[int, ...], torch.dtype, dict[str, Any]]  # shape, dtype, keyword arguments of the op
LOCKED = 1e9


@dataclass(frozen=True, slots=True)
class WarmupEntry:
    """One warmed shape: the kernel selected and how long its first and second calls took."""

    family: str
    shape: tuple[int, ...]
    dtype: str
    kernel: str
    needs_jit: bool
    select_ms: float
    first_ms: float
    second_ms: float

    @property
    def compiled(self) -> bool:
        slow_first = self.first_ms > COMPILE_RATIO * self.second_ms and self.first_ms - self.second_ms > 1.0
        return self.needs_jit or slow_first

    @property
    def compile_ms(self) -> float:
        return max(0.0, self.first_ms - self.second_ms)


@dataclass(frozen=True, slots=True)
class VariantResult:
    """One JIT variant built in a worker process: the worker's first call of the kernel (compile + run),
    which began and ended at `started` and `finished` (seconds since the epoch)."""

    label: str
    kernel: str
    seconds: float
    ok: bool
    error: str = ""
    pid: int = 0
    started: float = 0.0
    finished: float = 0.0


@dataclass(frozen=True, slots=True)
class WarmupReport:
    entries: tuple[WarmupEntry, ...]
    seconds: float
    variants: tuple[VariantResult, ...] = ()
    processes: int = 0  # worker processes run at once in phase 1
    compile_seconds: float = 0.0  # wall time of phase 1

    @property
    def compiled(self) -> list[WarmupEntry]:
        return [e for e in self.entries if e.compiled]

    def __str__(self) -> str:
        lines = [
            f"warmed {len(self.entries)} shape(s) in {self.seconds:.2f} s; compiled: "
            f"{', '.join(sorted({e.kernel for e in self.compiled})) or 'nothing'}"
        ]
        if self.variants:
            lines.append(
                f"JIT variants built in parallel: {len(self.variants)} in {self.compile_seconds:.1f} s "
                f"({self.processes} process(es) at once)"
            )
            lines += [
                f"  {v.label:<44} {v.seconds:>8.1f} s  {'ok' if v.ok else 'FAILED: ' + v.error}" for v in self.variants
            ]
        lines.append(
            f"{'op':<16} {'shape':<26} {'dtype':<9} {'kernel':<28} {'select ms':>9} {'1st ms':>9} {'2nd ms':>9}  jit"
        )
        for e in self.entries:
            lines.append(
                f"{e.family:<16} {'x'.join(map(str, e.shape)):<26} {e.dtype:<9} {e.kernel:<28} "
                f"{e.select_ms:>9.3f} {e.first_ms:>9.3f} {e.second_ms:>9.3f}  "
                f"{'compiled' if e.compiled else '-'}"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class JitTask:
    """One variant to build: which kernel to call with which inputs (what a worker receives)."""

    key: Hashable
    label: str
    kernel: str
    module: str  # the kernel's impl module: a worker imports it if the kernel is not built in (a plugin)
    operation: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    options: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> str:
        return json.dumps(
            {
                "label": self.label,
                "kernel": self.kernel,
                "module": self.module,
                "operation": self.operation,
                "shape": list(self.shape),
                "dtype": self.dtype,
                "device": self.device,
                "options": self.options,
            }
        )


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def warmup(
    operation: str,
    shapes: Sequence[Any] = (),
    dtypes: Sequence[torch.dtype] = (),
    device: str | torch.device | None = None,
    *,
    options: dict[str, Any] | None = None,
    parallel: bool = True,
    jobs: int | None = None,
    progress: bool = True,
    timeout_s: float = 3600.0,
) -> WarmupReport:
    """Build the JIT variants these calls need in parallel worker processes, then pre-select (the plans
    stay cached for these exact shapes) and call each kernel once here.

    operation: an op id (`"attention.causal"`, `"norm.rms"`) or a family name (`"attention"`).
    shapes: as for lz.tune (attention: batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, or for an
    attention op id also (batch, seq, heads, head_dim); norms: rows, hidden); an entry may be a pair
    (shape, {keyword arguments of this call}).
    options: the op's keyword arguments for every shape (attention: window_size, softcap).
    parallel=False: no worker processes (the first call here compiles).
    jobs: worker processes at once (default: sized to the cores and free memory). progress: the
    progress bar on stderr. timeout_s: a worker still running after this is killed.
    """
    started = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    resolved = []  # (family, shape, this call's own keyword arguments); every shape checked before any runs
    for raw in shapes:
        own = raw[1] if isinstance(raw, tuple | list) and len(raw) == 2 and isinstance(raw[1], dict) else None
        name, shape = workloads.op_shape(operation, raw[0] if own is not None else raw)
        resolved.append((name, shape, own))
    if not resolved:
        raise InvalidInputError("shapes", f"at least one shape for {operation}", shapes)
    name = resolved[0][0]
    wl = workloads.workload(name)
    fam = workloads.family(name)
    op = workloads.public_op(name)
    runtime.ensure_loaded()
    problems: list[Problem] = []
    for dtype in dtypes or [torch.bfloat16 if dev.type == "cuda" else torch.float32]:
        for _, shape, own in resolved:
            problems.append((wl.check_shape(shape), dtype, {**(options or {}), **(own or {})}))
    variants: list[VariantResult] = []
    processes, compile_s = 0, 0.0
    tasks = jit_tasks(name, problems, dev) if parallel else []
    if tasks:
        t0 = time.perf_counter()
        variants, processes = compile_parallel(tasks, jobs=jobs, progress=progress, timeout_s=timeout_s)
        compile_s = time.perf_counter() - t0
        runtime.bump()  # plans chosen while a variant was not built may now pick it
    entries = []
    for shape, dtype, kwargs in problems:
        args = wl.make(shape, dtype, dev, torch.Generator(device=dev).manual_seed(0))
        t0 = time.perf_counter()
        plan = runtime.plan(fam, fam.key(*args, **kwargs), args, kwargs)
        select_ms = (time.perf_counter() - t0) * 1e3
        first = _timed(lambda args=args, kwargs=kwargs: op(*args, **kwargs), dev)
        second = _timed(lambda args=args, kwargs=kwargs: op(*args, **kwargs), dev)
        spec = runtime.registry.kernel(plan.kernel_id)
        entries.append(
            WarmupEntry(
                operation,
                shape,
                str(dtype).removeprefix("torch."),
                plan.kernel_id,
                spec.needs_jit,
                select_ms,
                first,
                second,
            )
        )
    return WarmupReport(tuple(entries), time.perf_counter() - started, tuple(variants), processes, compile_s)


# ----------------------------------------------------------------------------- phase 1: what to build


def jit_tasks(operation: str, problems: Sequence[Problem], device: torch.device) -> list[JitTask]:
    """The variants to build for these (shape, dtype, keyword arguments) calls, one task per variant."""
    tasks: dict[Hashable, JitTask] = {}
    for problem in problems:
        task = jit_task(operation, problem, device)
        if task is not None:
            tasks.setdefault(task.key, task)
    return list(tasks.values())


def jit_task(operation: str, problem: Problem, device: torch.device) -> JitTask | None:
    """The variant one call needs built, or None (nothing to build, or built already).

    The call's kernel is the one selection will run once every variant is built: the current choice,
    unless a kernel rejected only for its unbuilt variant (NEEDS_JIT_COMPILE) would outscore it, by the
    score selection gives (PerfDB or priority, prefer rules, boosts, transform penalties) or by a
    policy lock that names it.
    """

    shape, dtype, options = problem
    fam = workloads.family(operation)
    policy = runtime.policy
    ctx = workloads.context_for(operation, shape, dtype, device, options)
    report = runtime.engine.evaluate(ctx, fam.transforms)
    measured = runtime.perf.has_rows(ctx.op)
    lock = policy.lock_for(ctx) if policy.locks else None
    best: tuple[float, KernelSpec] | None = None
    if report.selected_kernel:
        best = (float("-inf") if report.fallback else report.score, runtime.registry.kernel(report.selected_kernel))
    for cand in report.candidates:  # a kernel held back only by its unbuilt variant, that would win
        if not cand.rejections or any(r.reason is not Reason.NEEDS_JIT_COMPILE for r in cand.rejections):
            continue
        spec = runtime.registry.kernel(cand.kernel_id)
        if spec.backend == REFERENCE_BACKEND or spec.jit_variant is None:
            continue
        score = runtime.score(spec, ctx, measured, runtime.regime(ctx))[0] - TRANSFORM_PENALTY * len(
            fam.transforms(spec, ctx)
        )
        if policy.boosts:
            score *= policy.boost(spec, ctx)[0]
        if lock is not None and lock.targets(spec):
            score += LOCKED  # above every kernel the lock does not name, ranked among those it does
        if best is None or score > best[0]:
            best = (score, spec)
    if best is None or best[1].jit_variant is None:
        return None
    spec = best[1]
    variant = spec.jit_variant(ctx)  # type: ignore[misc]
    if variant is None:
        return None
    return JitTask(
        variant.key,
        variant.label,
        spec.id,
        spec.impl.__module__,
        operation,
        tuple(shape),
        str(dtype).removeprefix("torch."),
        str(device),
        {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    )


def compile_slots() -> tuple[int, int, int]:
    """(compilers that may run at once, cores, free RAM bytes): min(cores, free RAM / NVCC_BYTES), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    free = _free_ram()
    return max(1, min(cores, free // NVCC_BYTES if free else cores)), cores, free


def _free_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


# ----------------------------------------------------------------------------- phase 1: worker processes


@dataclass(eq=False)
class _Running:
    task: JitTask
    process: subprocess.Popen[bytes]
    started: float
    out: IO[bytes]
    err: IO[bytes]


def compile_parallel(
    tasks: Sequence[JitTask], jobs: int | None = None, progress: bool = True, timeout_s: float = 3600.0
) -> tuple[list[VariantResult], int]:
    """Run each task in its own worker process, at most `jobs` at once (default: sized to the machine).
    Returns the results in task order and the number of processes run at once."""
    slots, cores, free = compile_slots()
    processes = max(1, min(len(tasks), jobs if jobs else slots))
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(max(1, slots // processes)))  # ninja -j of each worker's FlashInfer build
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the worker imports what this process can
    bar = _Progress(len(tasks), sys.stderr, progress)
    bar.line(
        f"layerzero warmup: building {len(tasks)} JIT variant(s) in {processes} worker process(es) at once "
        f"(MAX_JOBS={env['MAX_JOBS']} each; {cores} cores, {free / 2**30:.0f} GiB free RAM)"
    )
    pending = list(tasks)
    running: list[_Running] = []
    results: dict[int, VariantResult] = {}
    order = {id(t): i for i, t in enumerate(tasks)}
    try:
        while pending or running:
            while pending and len(running) < processes:
                task = pending.pop(0)
                out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                cmd = [sys.executable, "-m", "layerzero.perf.warmup", "--worker", task.payload()]
                running.append(
                    _Running(task, subprocess.Popen(cmd, stdout=out, stderr=err, env=env), time.time(), out, err)
                )
            for r in list(running):
                code = r.process.poll()
                if code is None and time.time() - r.started > timeout_s:
                    r.process.kill()
                    code = r.process.wait()
                if code is None:
                    continue
                running.remove(r)
                result = _collect(r, code, timeout_s)
                results[order[id(r.task)]] = result
                bar.finished(result, time.time() - r.started)
            bar.tick([r.task.label for r in running])
            if running:
                time.sleep(0.05)
    finally:
        for r in running:  # interrupted: stop the workers this call started
            r.process.kill()
            r.process.wait()
    bar.close()
    return [results[i] for i in sorted(results)], processes


def _collect(r: _Running, code: int, timeout_s: float) -> VariantResult:
    r.out.seek(0)
    r.err.seek(0)
    stdout = r.out.read().decode(errors="replace")
    stderr = r.err.read().decode(errors="replace")
    r.out.close()
    r.err.close()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            data = json.loads(line[len(RESULT_TAG) :])
            return VariantResult(
                r.task.label,
                r.task.kernel,
                data["seconds"],
                data["ok"],
                data.get("error", ""),
                data.get("pid", 0),
                data.get("started", 0.0),
                data.get("finished", 0.0),
            )
    why = (
        f"killed after {timeout_s:.0f} s"
        if code in (-9, 137) and time.time() - r.started > timeout_s
        else f"worker exited with code {code}"
    )
    tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
    return VariantResult(r.task.label, r.task.kernel, time.time() - r.started, False, f"{why}: {tail}".rstrip(": "))


class _Progress:
    """A progress bar on stderr, no dependency: a line per finished variant; on a terminal also a
    status line rewritten at most once a second."""

    def __init__(self, total: int, stream: Any, enabled: bool) -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done = 0
        self.started = time.time()
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last_tick = 0.0
        self._status = False

    def _bar(self) -> str:
        width = 24
        full = width * self.done // max(self.total, 1)
        return f"[{'#' * full}{'-' * (width - full)}] {self.done}/{self.total}"

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finished(self, result: VariantResult, wall_s: float) -> None:
        self.done += 1
        status = "ok" if result.ok else f"FAILED ({result.error})"
        self.line(
            f"{self._bar()} {_clock(time.time() - self.started):>7}  {result.label}: "
            f"{result.seconds:.1f} s compile+run, {wall_s:.1f} s in its worker  {status}"
        )

    def tick(self, running: list[str]) -> None:
        now = time.time()
        if not self.tty or not running or now - self._last_tick < 1.0:
            return
        self._last_tick = now
        self.stream.write(
            f"\r\033[K{self._bar()} {_clock(now - self.started):>7}  building: {', '.join(running)}"[:200]
        )
        self.stream.flush()
        self._status = True

    def close(self) -> None:
        self.line(f"{self._bar()} {_clock(time.time() - self.started):>7}  done")


def _clock(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ----------------------------------------------------------------------------- the worker


def _worker(payload: str) -> dict[str, Any]:
    """In a worker process: call the task's kernel once with its shape (building its variant, which the
    library keeps on disk) and compare the output with the reference. Errors of the kernel itself are
    reported as "kernel: ...", others as "setup: ..."; the report shows them (a variant that fails
    here stays unbuilt: selection keeps to the other kernels, as the JIT gate says)."""

    task = json.loads(payload)
    started = time.perf_counter()
    try:
        runtime.ensure_loaded()
        if task["kernel"] not in runtime.registry.kernels:
            importlib.import_module(task["module"])  # a plugin module registers its kernels on import
        spec = runtime.registry.kernel(task["kernel"])
        dev, dtype = torch.device(task["device"]), getattr(torch, task["dtype"])
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in task["options"].items()}
        op = task["operation"]
        args = workloads.workload(op).make(tuple(task["shape"]), dtype, dev, torch.Generator(device=dev).manual_seed(0))
        fam = workloads.family(op)
        run, _ = fam.bind(spec, fam.context(*args, **options))
        kernel_args = workloads.run_args(op, args, options)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return {
            "ok": False,
            "seconds": time.perf_counter() - started,
            "error": f"setup: {type(e).__name__}: {e}",
            "pid": os.getpid(),
        }
    t0, started = time.perf_counter(), time.time()
    try:
        out = run(*kernel_args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:  # noqa: BLE001 - the library's error is the verdict
        return {
            "ok": False,
            "seconds": time.perf_counter() - t0,
            "error": f"kernel: {type(e).__name__}: {e}",
            "pid": os.getpid(),
        }
    seconds = time.perf_counter() - t0
    when = {"started": started, "finished": time.time()}
    ref, cut = workloads.reference_output(op, args, options)
    got = cut(out)
    for o, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,), strict=True):
        if o is None or r is None:
            continue
        err = float((o.double() - r.double()).abs().max()) if o.numel() else 0.0
        tol = TOLERANCE[o.dtype] * (1.0 + float(r.double().abs().max()))
        if not err <= tol:
            return {
                "ok": False,
                "seconds": seconds,
                "pid": os.getpid(),
                **when,
                "error": f"kernel: output differs from the reference: max error {err:.3g} > {tol:.3g}",
            }
    return {"ok": True, "seconds": seconds, "pid": os.getpid(), **when}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m layerzero.perf.warmup --worker TASK_JSON`: one worker of compile_parallel."""
    parser = argparse.ArgumentParser(prog="python -m layerzero.perf.warmup")
    parser.add_argument("--worker", required=True, help="a JitTask payload (JSON)")
    args = parser.parse_args(argv)
    try:
        result = _worker(args.worker)
    except Exception as e:  # noqa: BLE001 - always answer the parent
        result = {"ok": False, "seconds": 0.0, "error": f"setup: {type(e).__name__}: {e}", "pid": os.getpid()}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------- `layerzero warmup`


if __name__ == "__main__":
    sys.exit(main())
