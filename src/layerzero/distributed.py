"""Consistent kernel selection across the ranks of a `torch.distributed` group (any backend).

With tensor parallelism every rank must run the same kernels: different kernels give different
numerics and can deadlock collectives. Three tools, from light to strict:

- `tp_invariant(tp_size, tp_rank)`: selection stops reading rank-local state (its own PerfDB,
  circuit breakers, free memory); choices then follow only from priorities, policy and the
  call's shapes, which are alike on every rank. No communication.
- `check_versions(group, mode)`: gathers torch / CUDA / driver / backend versions of every rank.
  `mode="training"` raises VersionMismatchError on any difference; `mode="inference"` returns the
  report, whose `excluded` backends (missing or of another version on some rank) sync_selection
  rules out everywhere.
- `sync_selection(group, timeout)`: the version check, then rank 0's PerfDB measurements are
  broadcast and every rank selects with them in TP-invariant mode, then a hash of every rank's
  selection inputs is compared. Afterwards `verify_selection(calls)` checks by hash that the
  ranks really pick the same kernels for given calls.

Every exchange is an async collective waited on with a timeout: a dead or stuck rank gives a
DistributedTimeoutError naming the step, never a hang. After such an error the process group is
in an unknown state; destroy it (or the job) rather than reuse it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .context import SelectionContext
from .errors import ConfigurationError, LayerZeroError
from .kernel import KernelSpec
from .perf.perfdb import Bucket, Measurements, PerfRecord, current_signature
from .reasons import Reason, Rejection
from .selection.inspect import which
from .state import Runtime, runtime

MODES = ("inference", "training")


class DistributedError(LayerZeroError):
    """Ranks of a process group disagree in a way LayerZero cannot reconcile."""


class DistributedTimeoutError(DistributedError, TimeoutError):
    """A rank did not take part in an exchange in time (dead, stuck, or not calling it)."""


class VersionMismatchError(DistributedError):
    """Ranks run different torch / CUDA / driver / backend versions (training mode)."""


class SelectionMismatchError(DistributedError):
    """Ranks would select different kernels (or from different inputs)."""


# ---------------------------------------------------------------------------------------- exchange


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigurationError(
            "layerzero.distributed: torch.distributed is not initialized; "
            "call torch.distributed.init_process_group first"
        )
    return dist


def _device(dist: Any, group: Any) -> torch.device:
    """Where the exchange tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(start: Any, device: torch.device, timeout: float, step: str, rank: int) -> None:
    """Issue a collective (`start()` returns its async work) and wait for it, at most `timeout` s.

    Both happen in a daemon thread that the caller waits for with the deadline, because NCCL can
    block the host in two places a timeout argument does not reach: inside the call itself (while
    its communicator waits for the other ranks) and after it (work.wait(timeout) only makes the
    stream wait and returns at once; the next read of the result then blocks on a dead peer; seen
    on two H200s, torch 2.11). The thread polls is_completed(), so a finished collective is seen
    on the host before anyone reads its output. On timeout the thread is abandoned (the process
    group is unusable from then on, as the error says).
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            work = start()
            give_up = time.monotonic() + timeout + 1.0
            while not work.is_completed():
                if time.monotonic() > give_up:
                    return
                time.sleep(0.0005)
            work.wait()  # raises the collective's own error, if any
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True, name=f"layerzero-{step}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or failure:
        e = failure[0] if failure else TimeoutError(f"not completed after {timeout:g} s")
        raise DistributedTimeoutError(
            f"layerzero.distributed: {step} on rank {rank} did not complete within {timeout:g} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); a rank is dead, stuck or not "
            "calling it. The process group may be unusable now: destroy it instead of retrying"
        ) from e


def all_gather_objects(obj: Any, group: Any = None, timeout: float = 30.0, step: str = "exchange") -> list[Any]:
    """Every rank's `obj` (picklable), in group-rank order, or DistributedTimeoutError after `timeout` s."""
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigurationError(f"timeout: expected seconds > 0, got {timeout!r}")
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = _device(dist, group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    count = torch.tensor([payload.numel()], device=device)
    _collective(
        lambda: dist.all_gather(sizes, count, group=group, async_op=True), device, timeout, f"{step} (sizes)", rank
    )
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    _collective(
        lambda: dist.all_gather(buffers, padded, group=group, async_op=True), device, timeout, f"{step} (data)", rank
    )
    return [pickle.loads(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(buffers, sizes, strict=True)]


def broadcast_object(obj: Any, group: Any = None, timeout: float = 30.0, step: str = "broadcast") -> Any:
    """Group rank 0's `obj` on every rank (others pass anything, e.g. None)."""
    dist = _dist()
    rank = dist.get_rank(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    device = _device(dist, group)
    data = pickle.dumps(obj) if rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    _collective(
        lambda: dist.broadcast(size, src=src, group=group, async_op=True), device, timeout, f"{step} (size)", rank
    )
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if rank == 0
        else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    )
    _collective(
        lambda: dist.broadcast(buffer, src=src, group=group, async_op=True), device, timeout, f"{step} (data)", rank
    )
    return obj if rank == 0 else pickle.loads(buffer.cpu().numpy().tobytes())


# ---------------------------------------------------------------------------------------- versions


@dataclass(frozen=True, slots=True)
class Environment:
    """What one rank runs: versions that change numerics or which kernels exist."""

    rank: int
    torch: str
    cuda: str
    driver: str
    device: str
    backends: tuple[tuple[str, str | None], ...]  # (backend, version or None when unavailable)

    def facts(self) -> dict[str, str]:
        out = {"torch": self.torch, "cuda": self.cuda, "driver": self.driver, "device": self.device}
        out.update({f"backend {name}": version or "unavailable" for name, version in self.backends})
        return out


def local_environment(rt: Runtime | None = None, rank: int = 0) -> Environment:
    """This process's Environment (the current CUDA device when there is one)."""
    rt = rt or runtime
    rt.ensure_loaded()
    cuda = torch.cuda.is_available()
    sig = current_signature("cuda", torch.cuda.current_device()) if cuda else current_signature("cpu")
    backends = tuple(
        sorted((name, b.availability[1] if b.availability[0] else None) for name, b in rt.registry.backends.items())
    )
    return Environment(rank, torch.__version__, torch.version.cuda or "", sig.driver, sig.device, backends)


@dataclass(frozen=True, slots=True)
class VersionReport:
    """Versions of every rank; `mismatches` {fact: {rank: value}} lists only facts that differ."""

    environments: tuple[Environment, ...]
    mismatches: dict[str, dict[int, str]]
    excluded: frozenset[str]  # backends missing or of another version on some rank

    @property
    def consistent(self) -> bool:
        return not self.mismatches

    def __str__(self) -> str:
        if not self.mismatches:
            return f"versions agree on {len(self.environments)} ranks"
        lines = [f"versions differ across {len(self.environments)} ranks:"]
        for fact, values in sorted(self.mismatches.items()):
            lines.append(f"  {fact}: " + ", ".join(f"rank {r}={v}" for r, v in sorted(values.items())))
        if self.excluded:
            lines.append(f"  backends ruled out on every rank: {', '.join(sorted(self.excluded))}")
        return "\n".join(lines)


def compare_environments(environments: Sequence[Environment]) -> VersionReport:
    """The VersionReport of some ranks' environments (pure; check_versions gathers them)."""
    facts = [e.facts() for e in environments]
    mismatches: dict[str, dict[int, str]] = {}
    for name in sorted(set().union(*facts)):
        values = {e.rank: f.get(name, "unavailable") for e, f in zip(environments, facts, strict=True)}
        if len(set(values.values())) > 1:
            mismatches[name] = values
    excluded = frozenset(name.removeprefix("backend ") for name in mismatches if name.startswith("backend "))
    # torch's own kernels and the reference cannot be swapped out; a torch mismatch is reported instead
    excluded -= {"reference", "torch"}
    return VersionReport(tuple(environments), mismatches, excluded)


def check_versions(group: Any = None, mode: str = "inference", timeout: float = 30.0) -> VersionReport:
    """Gather every rank's versions. training: raise VersionMismatchError on any difference;
    inference: return the report (sync_selection then rules out the backends not shared)."""
    if mode not in MODES:
        raise ConfigurationError(f"mode: expected one of {MODES}, got {mode!r}")
    rank = _dist().get_rank(group)
    report = compare_environments(all_gather_objects(local_environment(rank=rank), group, timeout, "version check"))
    if mode == "training" and not report.consistent:
        raise VersionMismatchError(
            f"{report}\ntraining needs identical versions on every rank; install the same "
            "versions, or use mode='inference' to fall back to the common subset"
        )
    if not report.consistent:
        runtime.warn_once(("versions", str(report)), str(report))
    return report


# ---------------------------------------------------------------------------------------- invariant mode


class SharedMeasurements(Measurements):
    """A fixed set of PerfRecords (rank 0's), read the same way on every rank.

    Indexed without the hardware signature and without local backend versions: those were
    checked once on rank 0 when the snapshot was taken, and a rank-local check here would let
    ranks disagree.
    """

    def __init__(self, records: Iterable[PerfRecord] = ()) -> None:
        super().__init__(None, lambda kernel_id: None)
        self.records = tuple(records)
        self._shared: dict[tuple[str, str, Bucket], dict[str, PerfRecord]] = {}
        for r in self.records:
            self._shared.setdefault((r.op, r.dtype, r.bucket), {})[r.kernel] = r
        self._ops = frozenset(r.op for r in self.records)

    def bucket_records(self, ctx: SelectionContext) -> dict[str, PerfRecord]:
        return self._shared.get((ctx.op, ctx.dtype_name, Bucket.of(ctx)), {})

    def has_rows(self, op: str) -> bool:
        return op in self._ops

    def digest(self) -> str:
        rows = sorted(
            (
                r.kernel,
                r.op,
                r.dtype,
                repr(r.bucket),
                r.median_us,
                r.samples,
                r.correct,
                -1.0 if r.graph_us is None else r.graph_us,
                r.graph_samples,
            )
            for r in self.records
        )
        return hashlib.sha256(repr(rows).encode()).hexdigest()


def local_snapshot(rt: Runtime | None = None, device: torch.device | None = None) -> SharedMeasurements:
    """This rank's PerfDB rows valid here (installed backend versions, and the signature of `device`;
    by default of the CPU and of the current CUDA device, since a rank selects kernels for both)."""
    rt = rt or runtime
    if device is not None:
        devices = [device]
    else:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda", torch.cuda.current_device()))
    db = rt.measurements.db
    if db is None or rt.measurements.path is None or not rt.measurements.path.exists():
        return SharedMeasurements()
    return SharedMeasurements(
        r
        for d in devices
        for r in db.records(current_signature(d.type, d.index or 0))
        if r.backend_version == (rt._backend_version(r.kernel) or "")
    )


@dataclass(slots=True)
class InvariantMode:
    """The Runtime hook (`runtime.invariant`): what selection reads instead of rank-local state."""

    measurements: Measurements = field(default_factory=SharedMeasurements)
    excluded: frozenset[str] = frozenset()  # backends ruled out on every rank
    tp_size: int = 1
    tp_rank: int = 0

    def rejections(self, spec: KernelSpec) -> list[Rejection]:
        if spec.backend in self.excluded:
            return [Rejection(Reason.BACKEND_DISABLED, f"backend {spec.backend} is not the same version on every rank")]
        return []

    def context(self, ctx: SelectionContext) -> SelectionContext:
        if ctx.tp_size == self.tp_size and ctx.tp_rank == self.tp_rank:
            return ctx
        return ctx.replace(tp_size=self.tp_size, tp_rank=self.tp_rank)


def _install(mode: InvariantMode | None) -> None:
    with runtime._lock:
        runtime.invariant = mode
        runtime.bump()


class tp_invariant:  # noqa: N801 - used like a function: lz.distributed.tp_invariant(4, rank) or as a `with`
    """Turn TP-invariant selection on (process-wide, until `disable_invariant()` or the `with` exits).

    Selection then ignores this rank's PerfDB, circuit breakers and free memory; contexts carry
    tp_size and tp_rank (kernels' tp_sizes constraints apply; tp_rank never changes a choice).
    """

    def __init__(
        self, tp_size: int = 1, tp_rank: int = 0, measurements: Measurements | None = None, excluded: Iterable[str] = ()
    ) -> None:
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ConfigurationError(f"tp_size: expected an int >= 1, got {tp_size!r}")
        if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise ConfigurationError(f"tp_rank: expected an int in [0, {tp_size}), got {tp_rank!r}")
        self.previous = runtime.invariant
        self.mode = InvariantMode(
            measurements if measurements is not None else SharedMeasurements(), frozenset(excluded), tp_size, tp_rank
        )
        _install(self.mode)

    def __enter__(self) -> InvariantMode:
        return self.mode

    def __exit__(self, *exc: object) -> None:
        _install(self.previous)


def disable_invariant() -> None:
    """Back to rank-local selection (own PerfDB, health, memory)."""
    _install(None)


# ---------------------------------------------------------------------------------------- sync and verify


def _inputs_digest(mode: InvariantMode) -> str:
    """Hash of everything a TP-invariant selection reads besides the call itself."""
    runtime.ensure_loaded()
    policy = runtime.policy
    kernels = sorted(
        (s.id, s.priority, s.ops, runtime.registry.backend(s.backend).availability[0])
        for s in runtime.registry.kernels.values()
    )
    measured = mode.measurements.digest() if isinstance(mode.measurements, SharedMeasurements) else "local"
    parts = [
        json.dumps([r.to_dict() for r in policy.rules()], sort_keys=True, default=str),
        str(policy.strict),
        repr(kernels),
        measured,
        repr(sorted(mode.excluded)),
        str(mode.tp_size),
        repr(sorted(runtime.disabled_backends)),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What sync_selection did on this rank."""

    rank: int
    world_size: int
    versions: VersionReport
    measurements: int  # rank 0's PerfDB rows now used by every rank
    digest: str


def sync_selection(
    group: Any = None, timeout: float = 30.0, mode: str = "inference", device: torch.device | None = None
) -> SyncReport:
    """Make every rank of `group` select the same kernels (a collective: call it on every rank).

    1. version check (training: any mismatch raises; inference: backends not shared are ruled out),
    2. rank 0's valid PerfDB rows are broadcast and every rank enters TP-invariant mode with them
       (tp_size = group size, tp_rank = group rank),
    3. the hash of each rank's selection inputs (policy, kernels, measurements) is compared:
       SelectionMismatchError names the ranks that differ.
    A rank that does not answer within `timeout` seconds gives DistributedTimeoutError.
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    versions = check_versions(group, mode, timeout)
    snapshot = broadcast_object(
        local_snapshot(device=device).records if rank == 0 else None, group, timeout, "PerfDB broadcast"
    )
    invariant = InvariantMode(SharedMeasurements(snapshot), versions.excluded, world, rank)
    _install(invariant)
    digest = _inputs_digest(invariant)
    digests = all_gather_objects(digest, group, timeout, "selection-input hash")
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise SelectionMismatchError(
            f"ranks {differing} select from other inputs than rank 0 (policy, registered kernels or disabled "
            "backends differ): load the same policy and register the same kernels on every rank"
        )
    return SyncReport(rank, world, versions, len(snapshot), digest)


Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # (op name or function, args, kwargs)


def verify_selection(calls: Sequence[Call], group: Any = None, timeout: float = 30.0) -> list[str]:
    """The kernel ids this rank selects for `calls`, checked by hash against every rank.

    Raises SelectionMismatchError listing, for the first differing call, every rank's kernel.
    """

    picks = [which(op, *args, **kwargs) for op, args, kwargs in calls]
    digest = hashlib.sha256(repr(picks).encode()).hexdigest()
    gathered = all_gather_objects((digest, picks), group, timeout, "selection hash")
    if any(d != gathered[0][0] for d, _ in gathered):
        for i in range(len(picks)):
            column = {r: p[i] for r, (_, p) in enumerate(gathered)}
            if len(set(column.values())) > 1:
                raise SelectionMismatchError(
                    f"ranks select different kernels for call {i} ({calls[i][0]}): "
                    + ", ".join(f"rank {r}: {k}" for r, k in column.items())
                    + "; use sync_selection (or tp_invariant) before running the model"
                )
        raise SelectionMismatchError("ranks checked a different number of calls")
    return picks
