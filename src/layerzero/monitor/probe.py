"""Availability by proof: a backend's kernels compete on a device only after one tiny call of each
of its kernel families (`Backend.probes`) ran there and matched the torch reference at the dtype's
tolerance. A library that imports but cannot run (xformers 0.0.35 under torch 2.11: "No operator
found") or computes wrong numbers is then unavailable for the process with Reason.BACKEND_BROKEN and
the library's own error text, before any user call reaches it.

When. On the selection miss path only: the first time a backend has a kernel for a call's op that
fits the call's device (engine.viable, explain, validate), and in list_backends / doctor. Never at
`import layerzero`, never on the plan-cache hit path. Once per (backend, device) per runtime; the
verdict of each case is kept on disk (`probes.json` beside the PerfDB: $XDG_CACHE_HOME/layerzero/,
or $LAYERZERO_PROBE_CACHE = a file path, or "off"), keyed by backend and its version, device name,
driver, CUDA and torch versions, LayerZero's version and the probe list, so a warm process reads a
verdict instead of running (well under 50 ms). A backend without a version (no package metadata,
e.g. a stand-in) is never cached on disk. A cache that cannot be written costs nothing but the
re-probe next time.

What runs. Each case builds its inputs (batch 1-2, 8-32 tokens, 2-4 heads), calls the kernel's
`impl` on the call's device (under torch.cuda.device(index), synchronized inside the guard so
asynchronous CUDA errors surface there), and compares every output with the reference in float64.
A case whose probe context the kernel's own constraints reject on this device is skipped and tried
again later, and so is one whose JIT module is not built yet (KernelSpec.needs_jit with a
jit_variant: a probe never starts a FlashInfer build, 13-110 s of nvcc, even with LAYERZERO_ALLOW_JIT=1;
it runs once the variant is built, e.g. by lz.warmup). When no case could run, importing the library
is the probe. Everything a library can raise is caught
(SystemExit included; KeyboardInterrupt is not). Out of memory is inconclusive: no verdict, the
next miss tries again. A probe that leaves a sticky CUDA error (illegal address) poisons the CUDA
context for the whole process: that cannot be contained in-process (lz.isolate runs a backend in a
worker process).

Not probed: contexts of a device this process does not have (made-up contexts for explain, tests):
the backend stays as installed. While the current stream captures a CUDA graph, or torch.compile
traces, a probe cannot run (its synchronization and allocations would break the capture): a backend
already verified on the device is used, one not yet verified is skipped for that selection
(Reason.BACKEND_UNPROBED), and cached plans are dropped once it has been probed so that later
selections consider it. Warm up before capturing (graphs.warmup_for_capture, lz.warmup) and
nothing is skipped. Inside LayerZero's ops in a compiled graph (capture.graph_mode) the stream is not
capturing and probes run: their tensors are temporaries freed before the op returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ..context import SelectionContext
from ..kernel import Backend, KernelSpec, check_constraints, fits_device
from ..perf.perfdb import current_signature
from ..reasons import Reason, Rejection
from ..version import __version__

if TYPE_CHECKING:
    from ..backends import Registry
    from ..state import Runtime

log = logging.getLogger("layerzero")

CACHE_ENV = "LAYERZERO_PROBE_CACHE"
OK = "ok"
# Largest error allowed, relative to 1 + max |reference| (as the canary: capabilities.canary).
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-8}
_DETAIL_CHARS = 600


def _reference() -> ModuleType:
    """backends/reference.py, imported when a probe runs: `import layerzero` stays light."""
    from ..backends import reference

    return reference


def default_cache_path() -> Path | None:
    """$LAYERZERO_PROBE_CACHE, else $XDG_CACHE_HOME/layerzero/probes.json (beside the PerfDB); None when 'off'."""
    env = os.environ.get(CACHE_ENV, "")
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "layerzero" / "probes.json"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The verdict on one backend on one device, and what it rests on."""

    backend: str
    device: str
    ok: bool
    detail: str  # the failing case and the library's own error text, or what was verified
    verified: tuple[str, ...] = ()  # cases known good: kernel ids (or "import <module>")
    skipped: tuple[str, ...] = ()  # "kernel id: why" for cases that could not run here yet
    ms: float = 0.0
    cached: bool = False  # every verdict came from the disk cache
    inconclusive: bool = False  # out of memory: no verdict

    @property
    def rejection(self) -> Rejection | None:
        return None if self.ok else Rejection(Reason.BACKEND_BROKEN, self.detail)

    def describe(self) -> str:
        if not self.ok:
            return f"broken on {self.device}: {self.detail}"
        where = "from the probe cache" if self.cached else f"in {self.ms:.1f} ms"
        text = f"verified on {self.device} ({', '.join(self.verified) or 'nothing to run'}; {where})"
        return text + (f"; not yet: {'; '.join(self.skipped)}" if self.skipped else "")


class Probes:
    """The probe verdicts of one runtime: per (backend, device), run at most once (under a lock)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.results: dict[tuple[str, str], ProbeResult] = {}
        self._lock = threading.RLock()
        self._deferred: set[tuple[str, str]] = set()  # skipped during capture: re-select once probed

    def rejection(self, backend: Backend, ctx: SelectionContext) -> Rejection | None:
        """Why `backend` may not run on ctx's device now (BACKEND_BROKEN, BACKEND_UNPROBED), or None:
        verified, nothing to verify, or not a device of this process. Probes on first use."""
        if not backend.probes:
            return None
        device = reachable_device(ctx.device_type, ctx.device_index)
        if device is None:
            return None
        key = (backend.name, str(device))
        done = self.results.get(key)
        if done is None:
            if capturing_or_tracing(device):
                self._deferred.add(key)
                return Rejection(
                    Reason.BACKEND_UNPROBED,
                    f"{backend.name} is not verified on {device} yet and probes do not run during "
                    "CUDA graph capture or torch.compile: call the op once before capturing "
                    "(lz.warmup_for_capture / lz.warmup)",
                )
            done = self.probe(backend, device)
        return done.rejection

    def probe(self, backend: Backend, device: torch.device) -> ProbeResult:
        """The verdict for `backend` on `device`, running the probe if this runtime has none yet."""
        key = (backend.name, str(device))
        if reachable_device(device.type, device.index or 0) is None:
            return ProbeResult(backend.name, str(device), True, f"{device} is not a device of this process")
        with self._lock:
            done = self.results.get(key)
            if done is not None:
                return done
            result = run_probe(self.runtime.registry, backend, device)
            if result.inconclusive:
                log.warning("layerzero: probe of %s on %s inconclusive: %s", backend.name, device, result.detail)
                return result
            self.results[key] = result
            deferred = key in self._deferred
            self._deferred.discard(key)
        if not result.ok:
            self.mark_broken(backend, result.detail)
        elif deferred:
            self.runtime.bump()  # plans chosen during capture skipped it
        return result

    def mark_broken(self, backend: Backend, detail: str) -> None:
        """Make `backend` unavailable for the process (BACKEND_BROKEN) and drop cached plans."""
        ok, version, _ = backend.availability
        if not ok:
            return
        # availability is a cached_property of the Backend: overriding it is the process-wide verdict
        backend.__dict__["availability"] = (False, version, Rejection(Reason.BACKEND_BROKEN, detail))
        self.runtime.warn_once(
            ("broken", backend.name), f"layerzero: backend {backend.name} is unavailable: its probe failed: {detail}"
        )
        self.runtime.bump()


def reachable_device(device_type: str, index: int) -> torch.device | None:
    """The device of a context if this process has it (CPU always; CUDA when present), else None."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "cuda" and torch.cuda.is_available() and 0 <= index < torch.cuda.device_count():
        return torch.device("cuda", index)
    return None


def capturing_or_tracing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream, or torch.compile is tracing."""
    if torch.compiler.is_compiling():
        return True
    if device.type != "cuda":
        return False
    try:
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- running a probe


def run_probe(registry: Registry, backend: Backend, device: torch.device) -> ProbeResult:
    """Verify `backend` on `device`: verdicts cached on disk first, then each case not verified yet."""
    start = time.perf_counter()
    device_ctx = SelectionContext(
        op="", **{**SelectionContext.device_fields(device), "graph_capture": False, "deterministic": False}
    )  # type: ignore[arg-type]
    if not runs_on(backend, device_ctx):
        return ProbeResult(
            backend.name, str(device), True, "no kernel of the backend runs on this device", ms=_ms(start)
        )
    key = cache_key(backend, device)
    path = default_cache_path() if key is not None else None
    stored = _read(path).get(key, {}) if path is not None and key is not None else {}
    stored = stored if isinstance(stored, dict) else {}
    cases = dict(stored)
    skipped: list[str] = []
    failure = next(((k, v) for k, v in cases.items() if v != OK), None)
    if failure is None:
        for kernel_id, case in backend.probes:
            if kernel_id in cases:
                continue
            spec = registry.kernels.get(kernel_id)
            if spec is None:
                skipped.append(f"{kernel_id}: not registered")
                continue
            built = _CASES[case](spec, device_ctx)
            if isinstance(built, str):
                skipped.append(f"{kernel_id}: {built}")
                continue
            rejections = check_constraints(spec, built.ctx)
            if rejections:
                skipped.append(f"{kernel_id}: {rejections[0]}")
                continue
            unbuilt = spec.jit_variant(built.ctx) if spec.needs_jit and spec.jit_variant is not None else None
            if unbuilt is not None:  # a probe never builds a JIT module (FlashInfer: 13-110 s of nvcc)
                skipped.append(f"{kernel_id}: {unbuilt.label} is not built yet")
                continue
            outcome = _run_case(built, device)
            if outcome is None:
                return ProbeResult(
                    backend.name,
                    str(device),
                    True,
                    f"{kernel_id}: out of memory during the probe",
                    ms=_ms(start),
                    inconclusive=True,
                )
            cases[kernel_id] = outcome
            if outcome != OK:
                failure = (kernel_id, outcome)
                break
        if not cases and backend.module is not None:
            name = f"import {backend.module}"
            cases[name] = _import(backend.module)
            if cases[name] != OK:
                failure = (name, cases[name])
    if path is not None and key is not None and cases != stored:
        _write(path, key, cases)
    verified = tuple(k for k, v in cases.items() if v == OK)
    cached = bool(stored) and cases == stored
    if failure is not None:
        return ProbeResult(
            backend.name,
            str(device),
            False,
            f"{failure[0]}: {failure[1]}",
            verified,
            tuple(skipped),
            _ms(start),
            cached,
        )
    return ProbeResult(
        backend.name,
        str(device),
        True,
        f"verified: {', '.join(verified) or 'nothing'}",
        verified,
        tuple(skipped),
        _ms(start),
        cached,
    )


def runs_on(backend: Backend, device_ctx: SelectionContext) -> bool:
    """Some kernel of `backend` fits the device of `device_ctx` (platform, SM, ISA) in one of its dtypes."""
    return any(fits_device(s, device_ctx.replace(dtype=d)) for s in backend.kernels for d in s.dtypes)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _import(module: str) -> str:
    import importlib

    try:
        importlib.import_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure to import is the verdict
        return _error_text(e)
    return OK


def _error_text(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _run_case(case: _Case, device: torch.device) -> str | None:
    """OK, the library's error text or the mismatch, or None when the device ran out of memory."""
    try:
        # no autocast: the reference must compute in float64 whatever region the call came from
        with (
            torch.no_grad(),
            torch.autocast(device.type, enabled=False),
            torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(),
        ):
            outputs, references = case.run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # asynchronous errors surface here, inside the guard
    except torch.cuda.OutOfMemoryError:
        return None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever the library raises is the verdict
        return _error_text(e)
    for out, ref in zip(outputs, references, strict=True):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"output shape {got}, expected {tuple(ref.shape)} ({case.label})"
        err = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
        tol = TOLERANCE[out.dtype] * (1.0 + float(ref.double().abs().max()))
        if not err <= tol:  # NaN compares False: a NaN output is a mismatch
            return f"output differs from the reference: max error {err:.3g} > {tol:.3g} ({case.label})"
    return OK


# ----------------------------------------------------------------------------- the disk cache


def cache_key(backend: Backend, device: torch.device) -> str | None:
    """The verdict's validity: backend + version, device, driver, CUDA, torch, LayerZero, probe list.
    None when the backend has no version (nothing tells a changed library from the one probed)."""
    version = backend.availability[1]
    if not version:
        return None

    sig = current_signature(device.type, device.index or 0)
    probes = ",".join(f"{k}:{c}" for k, c in backend.probes)
    return (
        f"{backend.name}={version}|{sig.device}|sm{sig.sm}|driver {sig.driver}|cuda {sig.cuda}|"
        f"torch {sig.torch}|layerzero {__version__}|{probes}"
    )


def _read(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        verdicts = data.get("verdicts", {})
        return verdicts if isinstance(verdicts, dict) else {}
    except (OSError, ValueError, AttributeError):  # missing or unreadable: nothing cached
        return {}


def _write(path: Path, key: str, cases: dict[str, str]) -> None:
    """Merge one verdict into the file (atomic replace); failures are logged, never raised."""
    try:
        verdicts = _read(path)
        verdicts[key] = cases
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "verdicts": verdicts}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("layerzero: probe cache %s not written: %s", path, e)


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True, slots=True)
class _Case:
    """A probe call: the context it is (checked against the kernel's constraints) and a function that
    makes the inputs and returns (kernel outputs, float64 references)."""

    label: str
    ctx: SelectionContext
    run: Callable[[], tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]]


def _dtype(spec: KernelSpec, device_ctx: SelectionContext) -> torch.dtype | None:
    order = (
        (torch.bfloat16, torch.float16, torch.float32)
        if device_ctx.device_type == "cuda"
        else (torch.float32, torch.bfloat16, torch.float16)
    )
    return next((d for d in order if d in spec.dtypes and fits_device(spec, device_ctx.replace(dtype=d))), None)


def _head_dim(spec: KernelSpec) -> int | None:
    for d in (128, 64, 256, 96, 80, 32, 16, 8):
        if (
            spec.min_head_dim <= d <= spec.max_head_dim
            and d % spec.head_dim_multiple == 0
            and (spec.head_dims is None or d in spec.head_dims)
        ):
            return d
    return None


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _device(ctx: SelectionContext) -> torch.device:
    return torch.device("cuda", ctx.device_index) if ctx.device_type == "cuda" else torch.device(ctx.device_type)


def _shape_facts(spec: KernelSpec, device_ctx: SelectionContext) -> tuple[torch.dtype, int, int] | str:
    dtype, d = _dtype(spec, device_ctx), _head_dim(spec)
    if dtype is None:
        return "the kernel does not run on this device"
    if d is None:
        return "no head_dim to probe"
    return dtype, d, 4 if spec.supports_gqa else 2


def _dense(seq_q: int, seq_k: int) -> Callable[[KernelSpec, SelectionContext], _Case | str]:
    """Dense attention, q/k/v (1, S, H, D) in the kernel's layout; causal when the kernel has it."""

    def build(spec: KernelSpec, device_ctx: SelectionContext) -> _Case | str:
        facts = _shape_facts(spec, device_ctx)
        if isinstance(facts, str):
            return facts
        dtype, d, hq = facts
        causal = spec.supports_causal and "attention.causal" in spec.ops
        op = "attention.causal" if causal else "attention.full"
        if op not in spec.ops:
            return "no dense attention op"
        ctx = device_ctx.replace(
            op=op,
            dtype=dtype,
            batch=1,
            seq_len_q=seq_q,
            seq_len_k=seq_k,
            num_heads=hq,
            num_kv_heads=2,
            head_dim=d,
            head_dim_v=d,
            layout=spec.layout,
            is_causal=causal,
        )
        dev = _device(ctx)

        def run() -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:

            q, k, v = (
                _randn((1, s, h, d), dtype, dev, i) for i, (s, h) in enumerate(((seq_q, hq), (seq_k, 2), (seq_k, 2)))
            )
            args = (None, causal, 0.0, None, None, 0.0, None)
            if spec.layout == "BHSD":
                out = spec.impl(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *args)
                out = out.transpose(1, 2) if isinstance(out, torch.Tensor) else out
            else:
                out = spec.impl(q, k, v, *args)
            qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
            ref = _reference().attention(qd, kd, vd, None, causal, 0.0, None)
            return (out,), (ref.transpose(1, 2),)

        return _Case(f"{'causal' if causal else 'full'} {dtype} Sq={seq_q} Sk={seq_k} D={d}", ctx, run)

    return build


def _paged(spec: KernelSpec, device_ctx: SelectionContext) -> _Case | str:
    """Decode (Sq = 1) over a paged cache of two sequences, pages shuffled, the first spanning two pages."""
    facts = _shape_facts(spec, device_ctx)
    if isinstance(facts, str):
        return facts
    dtype, d, hq = facts
    if "attention.decode" not in spec.ops:
        return "no attention.decode op"
    page = min(spec.page_sizes) if spec.page_sizes else max(16, spec.min_page_size)
    layout = "NHD" if "NHD" in spec.kv_layouts else "HND"
    ctx = device_ctx.replace(
        op="attention.decode",
        dtype=dtype,
        batch=2,
        seq_len_q=1,
        seq_len_k=2 * page,
        num_heads=hq,
        num_kv_heads=2,
        head_dim=d,
        head_dim_v=d,
        layout="BSHD",
        is_causal=True,
        kv_layout=layout,
        page_size=page,
    )
    dev = _device(ctx)

    def run() -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:

        shape = (4, page, 2, d) if layout == "NHD" else (4, 2, page, d)
        q, kc, vc = _randn((2, 1, hq, d), dtype, dev, 0), _randn(shape, dtype, dev, 1), _randn(shape, dtype, dev, 2)
        table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32, device=dev)
        lens = torch.tensor([page + 3, 5], dtype=torch.int32, device=dev)
        out = spec.impl(q, kc, vc, table, lens, True, None, None, 0.0, layout)
        ref = _reference().paged_attention(
            q.double(), kc.double(), vc.double(), table, lens, True, None, None, 0.0, layout
        )
        return (out,), (ref,)

    return _Case(f"paged decode {dtype} page {page} {layout} D={d}", ctx, run)


def _varlen(spec: KernelSpec, device_ctx: SelectionContext) -> _Case | str:
    """Packed causal attention of two sequences (5 and 7 tokens), (total, H, D)."""
    facts = _shape_facts(spec, device_ctx)
    if isinstance(facts, str):
        return facts
    dtype, d, hq = facts
    ctx = device_ctx.replace(
        op="attention.varlen",
        dtype=dtype,
        batch=2,
        seq_len_q=7,
        seq_len_k=7,
        num_heads=hq,
        num_kv_heads=2,
        head_dim=d,
        head_dim_v=d,
        layout="THD",
        is_causal=True,
    )
    dev = _device(ctx)

    def run() -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:

        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
        q, k, v = (
            _randn((12, hq, d), dtype, dev, 0),
            _randn((12, 2, d), dtype, dev, 1),
            _randn((12, 2, d), dtype, dev, 2),
        )
        out = spec.impl(q, k, v, cu, cu, 7, 7, True, None, None, 0.0)
        ref = _reference().attention_varlen(q.double(), k.double(), v.double(), cu, cu, 7, 7, True, None, None, 0.0)
        return (out,), (ref,)

    return _Case(f"varlen causal {dtype} D={d}", ctx, run)


def _rows(op: str) -> Callable[[KernelSpec, SelectionContext], _Case | str]:
    """Norms and gated activations on (4, 256) rows."""

    def build(spec: KernelSpec, device_ctx: SelectionContext) -> _Case | str:
        dtype = _dtype(spec, device_ctx)
        if dtype is None:
            return "the kernel does not run on this device"
        ctx = device_ctx.replace(op=op, dtype=dtype, hidden_size=256, num_rows=4, has_bias=op == "norm.layer")
        dev = _device(ctx)

        def run() -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:

            x, y = _randn((4, 256), dtype, dev, 0), _randn((4, 256), dtype, dev, 1)
            w, b = _randn((256,), dtype, dev, 2), _randn((256,), dtype, dev, 3)
            if op == "norm.rms":
                return (spec.impl(x, w, 1e-6),), (_reference().rms_norm(x.double(), w.double(), 1e-6),)
            if op == "norm.layer":
                return (
                    (spec.impl(x, w, b, 1e-5),),
                    (_reference().layer_norm(x.double(), w.double(), b.double(), 1e-5),),
                )
            return (spec.impl(x, y),), (_reference().swiglu(x.double(), y.double()),)

        return _Case(f"{op} {dtype} 4x256", ctx, run)

    return build


def _rope(spec: KernelSpec, device_ctx: SelectionContext) -> _Case | str:
    """NeoX RoPE of q (1, 8, 4, 64) and k (1, 8, 2, 64) in BSHD, full rotary."""
    dtype = _dtype(spec, device_ctx)
    if dtype is None:
        return "the kernel does not run on this device"
    if spec.layout != "BSHD":
        return f"layout {spec.layout}: the rope probe is BSHD"
    ctx = device_ctx.replace(
        op="posenc.rope",
        dtype=dtype,
        batch=1,
        seq_len_q=8,
        seq_len_k=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        head_dim_v=64,
        layout="BSHD",
        num_rows=8,
        hidden_size=64,
    )
    dev = _device(ctx)

    def run() -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:

        q, k = _randn((1, 8, 4, 64), dtype, dev, 0), _randn((1, 8, 2, 64), dtype, dev, 1)
        angles = torch.arange(8, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(32) / 32))[None, :]
        angles = torch.cat((angles, angles), -1)[None].to(dev)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        qo, ko = spec.impl(q, k, cos, sin)
        qr, kr = _reference().rope(q.double(), k.double(), cos.double(), sin.double())
        assert kr is not None
        return (qo, ko), (qr, kr)

    return _Case(f"rope {dtype} 1x8x4x64", ctx, run)


_CASES: dict[str, Callable[[KernelSpec, SelectionContext], _Case | str]] = {
    "prefill": _dense(16, 16),
    "decode": _dense(1, 32),
    "paged": _paged,
    "varlen": _varlen,
    "rms_norm": _rows("norm.rms"),
    "layer_norm": _rows("norm.layer"),
    "swiglu": _rows("activation.swiglu"),
    "rope": _rope,
}
CASES = frozenset(_CASES)
