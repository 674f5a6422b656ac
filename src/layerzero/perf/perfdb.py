"""PerfDB: measured kernel timings in SQLite, and the in-memory view that scoring reads.

Rows are keyed by kernel, op, dtype, shape bucket and the hardware/software signature (device
name, SM, driver, CUDA, torch, backend version). A row measured under other versions is kept for
history but never used. The file is in WAL mode and every write is one transaction, so several
processes may tune at once and a process killed mid-write leaves the database intact.

Shape buckets: batch, seq_q, seq_k and rows round up to a power of two; heads, head_dim and hidden
stay exact; the remaining non-default context fields (layout, mask kind, window, ...) form
`variant`.

Each row holds two figures, one per timing regime (see `REGIMES`): the eager one (N back-to-back
calls, about max(host time, device time) per call: what a model's forward sees) and, for kernels
that could be captured, the graph one (the same calls replayed from a CUDA graph: device time).
Scoring reads the figure of the regime the call runs in, and a kernel's other figure when it has
only one (`PerfRecord.figure_for`).
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..context import SelectionContext
from ..device import device_info
from ..errors import CacheCorruptionError

if TYPE_CHECKING:
    import sqlite3

ENV_PATH = "LAYERZERO_PERFDB"  # a path, or "off" to ignore measurements
MIN_SAMPLES = 5  # a timing needs this many samples to be trusted by scoring ...
MAX_CV = 0.25  # ... and a standard deviation at most this fraction of its median
PERF_SCALE = 1000.0  # score of the fastest measured kernel; slower ones get PERF_SCALE * best / time
# Timing regimes: "eager" = N back-to-back calls between two events (host and device overlap, so about
# max(host, device) per call); "graph" = the same N calls captured in a CUDA graph and replayed (device time).
REGIMES = ("eager", "graph")


def default_path() -> Path | None:
    """$LAYERZERO_PERFDB, else $XDG_CACHE_HOME/layerzero/perfdb.sqlite; None when set to 'off'."""
    env = os.environ.get(ENV_PATH, "")
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "layerzero" / "perfdb.sqlite"


def pow2_bucket(n: int) -> int:
    """The smallest power of two >= n (0 and 1 map to themselves): the upper bound of n's bucket."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def bucket_low(upper: int) -> int:
    """The smallest value in the bucket whose upper bound is `upper`."""
    return upper if upper <= 1 else upper // 2 + 1


# Context fields that are bucketed explicitly or describe the environment rather than the problem.
_NOT_VARIANT = frozenset(
    {
        "op",
        "device_type",
        "device_index",
        "sm",
        "generation",
        "dtype",
        "batch",
        "seq_len_q",
        "seq_len_k",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "num_rows",
        "hidden_size",
        "isa",
        "requires_grad",
        "graph_capture",
        "deterministic",
        "tp_size",
        "tp_rank",
    }
)


@dataclass(frozen=True, slots=True)
class Bucket:
    """The shape bucket of a call; fields that do not apply to the op are 0."""

    batch: int = 0
    seq_q: int = 0
    seq_k: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    rows: int = 0
    hidden: int = 0
    variant: str = ""

    @staticmethod
    def of(ctx: SelectionContext) -> Bucket:
        parts = []
        for f in fields(ctx):
            if f.name in _NOT_VARIANT:
                continue
            value = getattr(ctx, f.name)
            if f.name == "head_dim_v" and value == ctx.head_dim:
                continue
            if value != f.default:
                parts.append(f"{f.name}={value}")
        return Bucket(
            pow2_bucket(ctx.batch),
            pow2_bucket(ctx.seq_len_q),
            pow2_bucket(ctx.seq_len_k),
            ctx.num_heads,
            ctx.num_kv_heads,
            ctx.head_dim,
            pow2_bucket(ctx.num_rows),
            ctx.hidden_size,
            ",".join(parts),
        )

    def label(self) -> str:
        named = [
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "variant" and getattr(self, f.name)
        ]
        return " ".join(named + ([self.variant] if self.variant else []))


@dataclass(frozen=True, slots=True)
class Signature:
    """The hardware and software a timing is valid for (backend versions are per row)."""

    device: str
    sm: int
    driver: str
    cuda: str
    torch: str

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _nvidia_driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(\S+)", f.read())
            if found:
                return found.group(1)
    except OSError:
        pass
    import torch

    try:
        v = int(torch._C._cuda_getDriverVersion())  # type: ignore[attr-defined]  # the CUDA driver API version, when NVML text is missing
        return f"cuda-driver-{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return ""


@functools.lru_cache(maxsize=16)
def current_signature(device_type: str = "cpu", index: int = 0) -> Signature:
    """The Signature of this process on a device (queried once per device)."""
    import torch

    info = device_info(torch.device(device_type, index) if device_type == "cuda" else torch.device(device_type))
    cuda = device_type == "cuda"
    return Signature(
        info.name,
        info.sm,
        _nvidia_driver() if cuda else "",
        (torch.version.cuda or "") if cuda else "",
        torch.__version__,
    )


@dataclass(frozen=True, slots=True)
class Figure:
    """One regime's timing of a kernel: microseconds per call over `samples` samples."""

    regime: str
    median_us: float
    p95_us: float
    samples: int
    variance: float

    @property
    def confident(self) -> bool:
        """Enough samples with a small enough spread to rank kernels by."""
        return (
            self.samples >= MIN_SAMPLES
            and 0 < self.median_us < math.inf
            and math.sqrt(max(self.variance, 0.0)) <= MAX_CV * self.median_us
        )


@dataclass(frozen=True, slots=True)
class PerfRecord:
    """One kernel measured on one shape bucket under one signature.

    `correct` False means the kernel's output differed from the reference (or it raised: see
    `error`); such a kernel is never selected for the bucket. Times are microseconds per call:
    `median_us`, `p95_us`, `samples` and `variance` are the eager figure, `graph_*` the graph
    figure (`graph_us` None: not measured, `graph_note` says why: not graph-safe, capture failed,
    no CUDA). `calls` is N, the back-to-back calls per sample of the eager figure (0: unknown).
    """

    kernel: str
    op: str
    dtype: str
    bucket: Bucket
    signature: Signature
    backend_version: str
    median_us: float
    p95_us: float
    samples: int
    variance: float
    correct: bool = True
    max_error: float = 0.0
    error: str = ""
    shape: str = ""
    created: float = 0.0
    graph_us: float | None = None
    graph_p95_us: float | None = None
    graph_samples: int = 0
    graph_variance: float = 0.0
    graph_note: str = ""
    calls: int = 0

    @property
    def confident(self) -> bool:
        """The eager figure has enough samples with a small enough spread to rank kernels by."""
        eager = self.figure("eager")
        return self.correct and eager is not None and eager.confident

    def figure(self, regime: str) -> Figure | None:
        """The figure measured in `regime` ("eager" or "graph"), None when there is none."""
        if regime == "graph":
            if self.graph_us is None or self.graph_samples <= 0:
                return None
            p95 = self.graph_p95_us if self.graph_p95_us is not None else self.graph_us
            return Figure("graph", self.graph_us, p95, self.graph_samples, self.graph_variance)
        if self.samples <= 0 or not math.isfinite(self.median_us):
            return None
        return Figure("eager", self.median_us, self.p95_us, self.samples, self.variance)

    def figure_for(self, regime: str) -> Figure | None:
        """The figure scoring uses in `regime`: that regime's, else the other one, else None.

        A kernel with one figure is ranked by it rather than dropped to priorities: tune records the
        eager figure of every correct kernel and the graph figure only where capture worked, so in
        the graph regime the fallback is an eager time, an upper bound of the device time (it can
        under-rank that kernel, never over-rank it); a kernel that could not be captured is rarely
        a good pick under capture anyway.
        """
        return self.figure(regime) or self.figure("graph" if regime == "eager" else "eager")


# --- schema -------------------------------------------------------------------------------------

_KEY = (
    "kernel",
    "op",
    "dtype",
    "batch",
    "seq_q",
    "seq_k",
    "heads",
    "kv_heads",
    "head_dim",
    "rows",
    "hidden",
    "variant",
    "device",
    "sm",
    "driver",
    "cuda",
    "torch",
    "backend_version",
)
_VALUES = (
    "median_us",
    "p95_us",
    "samples",
    "variance",
    "correct",
    "max_error",
    "error",
    "created",
    "shape",
    "graph_us",
    "graph_p95_us",
    "graph_samples",
    "graph_variance",
    "graph_note",
    "calls",
)

# MIGRATIONS[i] brings a database from schema version i to i + 1; each runs in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE timings (kernel TEXT NOT NULL, op TEXT NOT NULL, dtype TEXT NOT NULL,"
        " batch INTEGER NOT NULL, seq_q INTEGER NOT NULL, seq_k INTEGER NOT NULL, heads INTEGER NOT NULL,"
        " kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL, rows INTEGER NOT NULL, hidden INTEGER NOT NULL,"
        " variant TEXT NOT NULL, device TEXT NOT NULL, sm INTEGER NOT NULL, driver TEXT NOT NULL,"
        " cuda TEXT NOT NULL, torch TEXT NOT NULL, backend_version TEXT NOT NULL,"
        " median_us REAL NOT NULL, p95_us REAL NOT NULL, samples INTEGER NOT NULL, variance REAL NOT NULL,"
        " correct INTEGER NOT NULL, max_error REAL NOT NULL, error TEXT NOT NULL, created REAL NOT NULL,"
        f" PRIMARY KEY ({', '.join(_KEY)}))",
    ),
    (
        # v2: the exact measured shape (reports), and an index for loading one signature's rows.
        "ALTER TABLE timings ADD COLUMN shape TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX timings_by_signature ON timings (device, sm, driver, cuda, torch)",
    ),
    (
        # v3: the graph figure (device time under CUDA-graph replay; NULL: none, graph_note says why) and
        # N, the calls per sample. Rows of v2 keep their time as the eager figure (the v2 harness also
        # timed back-to-back calls between two events, with fewer calls per sample) and have no graph figure.
        "ALTER TABLE timings ADD COLUMN graph_us REAL",
        "ALTER TABLE timings ADD COLUMN graph_p95_us REAL",
        "ALTER TABLE timings ADD COLUMN graph_samples INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE timings ADD COLUMN graph_variance REAL NOT NULL DEFAULT 0",
        "ALTER TABLE timings ADD COLUMN graph_note TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE timings ADD COLUMN calls INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class PerfDB:
    """A PerfDB file. Safe to share between threads (one connection, locked) and processes (WAL)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PerfDB({str(self.path)!r})"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        import sqlite3

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode
            self._migrate(conn)
        except sqlite3.DatabaseError as e:
            raise CacheCorruptionError(f"PerfDB {self.path} is unreadable: {e}; delete it or set {ENV_PATH}") from e
        self._conn, self._pid = conn, os.getpid()  # a forked child opens its own connection
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise CacheCorruptionError(
                    f"PerfDB {self.path}: schema version {version}, this LayerZero reads up to {SCHEMA_VERSION}; "
                    f"upgrade layerzero or point {ENV_PATH} at another file"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT version FROM schema_version").fetchone()[0])

    def record(self, records: Iterable[PerfRecord]) -> int:
        """Store records in one transaction (a newer measurement replaces the same key). Returns the count."""
        rows = [_row(r) for r in records]
        columns = _KEY + _VALUES
        sql = (
            f"INSERT INTO timings ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _VALUES)
        )
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return len(rows)

    def records(self, signature: Signature | None = None, op: str | None = None) -> list[PerfRecord]:
        """Stored records, all versions, or only those of `signature` / `op`."""
        where, params = [], []
        if signature is not None:
            where.append("device = ? AND sm = ? AND driver = ? AND cuda = ? AND torch = ?")
            params += [signature.device, signature.sm, signature.driver, signature.cuda, signature.torch]
        if op is not None:
            where.append("op = ?")
            params.append(op)
        sql = f"SELECT {', '.join(_KEY + _VALUES)} FROM timings"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._connection().execute(sql, params).fetchall()
        return [_record(r) for r in rows]

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap; for noticing other processes' tuning)."""
        with self._lock:
            return int(self._connection().execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _row(r: PerfRecord) -> tuple[Any, ...]:
    b, s = r.bucket, r.signature
    return (
        r.kernel,
        r.op,
        r.dtype,
        b.batch,
        b.seq_q,
        b.seq_k,
        b.heads,
        b.kv_heads,
        b.head_dim,
        b.rows,
        b.hidden,
        b.variant,
        s.device,
        s.sm,
        s.driver,
        s.cuda,
        s.torch,
        r.backend_version or "",
        float(r.median_us),
        float(r.p95_us),
        int(r.samples),
        float(r.variance),
        int(bool(r.correct)),
        float(r.max_error),
        r.error,
        r.created or time.time(),
        r.shape,
        None if r.graph_us is None else float(r.graph_us),
        None if r.graph_p95_us is None else float(r.graph_p95_us),
        int(r.graph_samples),
        float(r.graph_variance),
        r.graph_note,
        int(r.calls),
    )


def _record(row: tuple[Any, ...]) -> PerfRecord:
    (
        kernel,
        op,
        dtype,
        batch,
        seq_q,
        seq_k,
        heads,
        kv_heads,
        head_dim,
        rows,
        hidden,
        variant,
        device,
        sm,
        driver,
        cuda,
        torch_v,
        backend_version,
        median,
        p95,
        samples,
        variance,
        correct,
        max_error,
        error,
        created,
        shape,
        graph_us,
        graph_p95,
        graph_samples,
        graph_variance,
        graph_note,
        calls,
    ) = row
    return PerfRecord(
        kernel,
        op,
        dtype,
        Bucket(batch, seq_q, seq_k, heads, kv_heads, head_dim, rows, hidden, variant),
        Signature(device, sm, driver, cuda, torch_v),
        backend_version,
        median,
        p95,
        samples,
        variance,
        bool(correct),
        max_error,
        error,
        shape,
        created,
        graph_us,
        graph_p95,
        graph_samples,
        graph_variance,
        graph_note,
        calls,
    )


# --- the runtime's view ---------------------------------------------------------------------------

_Index = dict[tuple[str, str, Bucket, Signature], dict[str, PerfRecord]]


class Measurements:
    """What the PerfDB says for this process, indexed by (op, dtype, bucket, signature) for scoring.

    Loaded lazily on the first lookup, and only if the file exists (no sqlite3 import otherwise).
    `version_of(kernel_id)` gives the installed version of the kernel's backend; rows measured with
    another version are ignored. An unreadable database logs one warning and scores fall back to
    priorities.
    """

    def __init__(self, path: str | os.PathLike[str] | None, version_of: Callable[[str], str | None]) -> None:
        self.path = None if path is None else Path(path).expanduser()
        self.version_of = version_of
        self.error: str | None = None
        self._index: _Index | None = None
        self._ops: frozenset[str] = frozenset()  # ops with at least one row in _index
        self._db: PerfDB | None = None

    @property
    def db(self) -> PerfDB | None:
        if self._db is None and self.path is not None:
            self._db = PerfDB(self.path)
        return self._db

    def _load(self) -> _Index:
        index: _Index = {}
        if self.path is not None and self.path.exists() and self.db is not None:
            try:
                for r in self.db.records():
                    index.setdefault((r.op, r.dtype, r.bucket, r.signature), {})[r.kernel] = r
            except Exception as e:  # noqa: BLE001 - measurements are advisory: never fail a call
                self.error = str(e)
                import logging

                logging.getLogger("layerzero").warning("PerfDB ignored: %s", e)
                index = {}
        self._ops = frozenset(op for op, _, _, _ in index)
        self._index = index
        return index

    def reload(self) -> None:
        self._index = None

    def bucket_records(self, ctx: SelectionContext) -> dict[str, PerfRecord]:
        """Records for ctx's bucket under the current signature and backend versions."""
        index = self._index if self._index is not None else self._load()
        if not index:
            return {}
        sig = current_signature(ctx.device_type, ctx.device_index)
        found = index.get((ctx.op, ctx.dtype_name, Bucket.of(ctx), sig))
        if not found:
            return {}
        return {k: r for k, r in found.items() if r.backend_version == (self.version_of(k) or "")}

    def has_rows(self, op: str) -> bool:
        """False when no lookup for `op` can find a record: selection then skips its PerfDB lookups.
        A subclass that keeps its own records overrides this with its own answer."""
        if self._index is None:
            self._load()
        return op in self._ops

    def lookup(self, kernel_id: str, ctx: SelectionContext) -> PerfRecord | None:
        return self.bucket_records(ctx).get(kernel_id)

    def score(self, kernel_id: str, ctx: SelectionContext, regime: str = "eager") -> tuple[float, Figure] | None:
        """(PERF_SCALE * fastest time in the bucket / this kernel's time, the figure used) in `regime`;
        None when the kernel is unmeasured or the bucket's data is not confident.

        Each kernel is timed by `PerfRecord.figure_for(regime)`. One noisy timing could skew the
        ranking, so a bucket is used only when each of its correct timings is confident or clearly
        out of the race: its median minus two standard deviations is still slower than the fastest
        confident median (a slow fallback such as unfused math attention is often noisy; on the H100
        that alone kept 5 of 22 tuned shapes on priorities).
        """
        records = self.bucket_records(ctx)
        mine = records.get(kernel_id)
        if mine is None or not mine.correct:
            return None
        own = mine.figure_for(regime)
        if own is None:
            return None
        timed = [f for f in (r.figure_for(regime) for r in records.values() if r.correct) if f is not None]
        confident = [f.median_us for f in timed if f.confident]
        if not confident:
            return None
        best = min(confident)
        for f in timed:
            if not f.confident and (
                f.samples < MIN_SAMPLES or f.median_us - 2.0 * math.sqrt(max(f.variance, 0.0)) <= best
            ):
                return None
        return PERF_SCALE * min(f.median_us for f in timed) / own.median_us, own
