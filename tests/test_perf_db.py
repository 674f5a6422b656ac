"""PerfDB: storage, migrations, versions, processes, kill -9, and how scoring uses it."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import sqlite3
import time

import pytest
import torch

import layerzero as lz
from layerzero.perf.perfdb import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Bucket,
    Figure,
    PerfDB,
    PerfRecord,
    current_signature,
    pow2_bucket,
)
from layerzero.state import runtime

SIG = current_signature("cpu", 0)


def rec(kernel: str, ctx: lz.SelectionContext, median: float, samples: int = 10, variance: float | None = None,
        correct: bool = True, signature=SIG, version: str | None = None) -> PerfRecord:
    var = (0.05 * median) ** 2 if variance is None else variance
    if version is None:
        runtime.ensure_loaded()
        version = runtime._backend_version(kernel) or ""
    return PerfRecord(kernel, ctx.op, ctx.dtype_name, Bucket.of(ctx), signature, version, median, median * 1.1,
                      samples, var, correct, 0.0 if correct else 3.5, shape="test")


def attn_ctx(q, k) -> lz.SelectionContext:
    from layerzero.ops.attention import ATTENTION

    return ATTENTION.context(q, k, k, None, True)


@pytest.fixture
def db(tmp_path):
    lz.perfdb(tmp_path / "perf.sqlite")
    return runtime.measurements.db


def test_pow2_buckets():
    assert [pow2_bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_bucket_exact_dims_and_variant():
    q = torch.randn(3, 100, 8, 64)
    k = torch.randn(3, 100, 2, 64)
    b = Bucket.of(attn_ctx(q, k))
    assert (b.batch, b.seq_q, b.seq_k, b.heads, b.kv_heads, b.head_dim) == (4, 128, 128, 8, 2, 64)
    assert "layout=BSHD" in b.variant and "is_causal=True" in b.variant


def test_record_roundtrip_and_upsert(db):
    ctx = attn_ctx(torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8))
    db.record([rec("torch.sdpa_math", ctx, 10.0)])
    db.record([rec("torch.sdpa_math", ctx, 7.0)])  # same key: replaces
    rows = db.records()
    assert len(rows) == 1 and rows[0].median_us == 7.0 and rows[0].bucket == Bucket.of(ctx)
    assert rows[0].signature == SIG and db.schema_version == SCHEMA_VERSION


def test_wal_mode(db):
    db.record([])
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_from_v1_keeps_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO timings VALUES ('a.k', 'norm.rms', 'float32', 0, 0, 0, 0, 0, 0, 64, 128, '', 'dev', 0,"
                 " '', '', 't', 'v', 5.0, 6.0, 10, 0.1, 1, 0.0, '', 0.0)")
    conn.commit()
    conn.close()
    db = PerfDB(path)
    assert db.schema_version == SCHEMA_VERSION == 3
    (row,) = db.records()
    assert row.kernel == "a.k" and row.median_us == 5.0 and row.shape == "" and row.graph_us is None


# The schema of version 2 as LayerZero 2026-12 wrote it (kept literally: MIGRATIONS may be refactored).
V2_DDL = (
    "CREATE TABLE timings (kernel TEXT NOT NULL, op TEXT NOT NULL, dtype TEXT NOT NULL,"
    " batch INTEGER NOT NULL, seq_q INTEGER NOT NULL, seq_k INTEGER NOT NULL, heads INTEGER NOT NULL,"
    " kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL, rows INTEGER NOT NULL, hidden INTEGER NOT NULL,"
    " variant TEXT NOT NULL, device TEXT NOT NULL, sm INTEGER NOT NULL, driver TEXT NOT NULL,"
    " cuda TEXT NOT NULL, torch TEXT NOT NULL, backend_version TEXT NOT NULL,"
    " median_us REAL NOT NULL, p95_us REAL NOT NULL, samples INTEGER NOT NULL, variance REAL NOT NULL,"
    " correct INTEGER NOT NULL, max_error REAL NOT NULL, error TEXT NOT NULL, created REAL NOT NULL,"
    " PRIMARY KEY (kernel, op, dtype, batch, seq_q, seq_k, heads, kv_heads, head_dim, rows, hidden, variant,"
    " device, sm, driver, cuda, torch, backend_version))",
    "ALTER TABLE timings ADD COLUMN shape TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX timings_by_signature ON timings (device, sm, driver, cuda, torch)",
)


def test_migration_from_v2_keeps_rows_as_eager_figures_and_selection_uses_them(tmp_path):
    """A database written by the v2 schema (one time per row) opens as v3: each old time is the eager
    figure, there is no graph figure, and scoring in either regime falls back to the eager one."""
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    b = Bucket.of(ctx)
    path = tmp_path / "v2.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (2)")
    for statement in V2_DDL:
        conn.execute(statement)
    for kernel, median in ((base, 50.0), ("torch.sdpa_math", 20.0)):
        conn.execute("INSERT INTO timings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                     " ?, ?, ?, ?)",
                     (kernel, ctx.op, ctx.dtype_name, b.batch, b.seq_q, b.seq_k, b.heads, b.kv_heads, b.head_dim,
                      b.rows, b.hidden, b.variant, SIG.device, SIG.sm, SIG.driver, SIG.cuda, SIG.torch,
                      runtime._backend_version(kernel) or "", median, median * 1.1, 10, (0.05 * median) ** 2, 1, 0.0,
                      "", 1.0, "1x32x32x2x2x16x1"))
    conn.commit()
    conn.close()
    db = PerfDB(path)
    assert db.schema_version == SCHEMA_VERSION == 3
    rows = {r.kernel: r for r in db.records()}
    math_row = rows["torch.sdpa_math"]
    assert (math_row.median_us, math_row.samples, math_row.shape) == (20.0, 10, "1x32x32x2x2x16x1")
    assert math_row.graph_us is None and math_row.graph_samples == 0 and math_row.calls == 0
    assert math_row.figure("graph") is None and math_row.figure_for("graph").regime == "eager"
    columns = [c[1] for c in sqlite3.connect(path).execute("PRAGMA table_info(timings)")]
    assert columns[-6:] == ["graph_us", "graph_p95_us", "graph_samples", "graph_variance", "graph_note", "calls"]
    db.close()
    lz.perfdb(path)
    report = lz.explain("attention", q, q, q, is_causal=True)
    assert report.selected_kernel == "torch.sdpa_math" and report.decided_by == "eager 20 us"
    # a v3 row written after the migration round-trips its graph figure
    db = lz.perfdb()
    db.record([dataclasses.replace(math_row, graph_us=7.5, graph_p95_us=8.0, graph_samples=12, graph_variance=0.01,
                                   calls=64)])
    again = {r.kernel: r for r in db.records()}["torch.sdpa_math"]
    assert again.figure("graph") == Figure("graph", 7.5, 8.0, 12, 0.01) and again.calls == 64


def test_newer_schema_is_refused_and_selection_survives(tmp_path):
    path = tmp_path / "future.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    with pytest.raises(lz.CacheCorruptionError, match="schema version 99"):
        PerfDB(path).records()
    lz.perfdb(path)
    q = torch.randn(1, 8, 2, 8)
    assert lz.which("attention", q, q, q) == lz.explain("attention", q, q, q).selected_kernel  # DB ignored
    assert "schema version 99" in runtime.measurements.error


def test_corrupt_file_raises_cache_corruption(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(lz.CacheCorruptionError, match="unreadable"):
        PerfDB(path).records()


def test_confident_measurements_change_the_choice_and_explain_shows_them(db):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)  # by priority
    assert base != "torch.sdpa_math"  # priority 20: never the priority choice
    generation = runtime.generation
    db.record([rec(base, ctx, 50.0), rec("torch.sdpa_math", ctx, 20.0)])
    lz.perfdb(db.path)
    assert runtime.generation > generation
    assert lz.which("attention", q, q, q, is_causal=True) == "torch.sdpa_math"
    report = lz.explain("attention", q, q, q, is_causal=True)
    assert report.scores["torch.sdpa_math"] > report.scores[base]
    assert "measured 20 us" in str(report) and "measured 50 us" in str(report)
    # another bucket (seq 64 -> bucket 64, not 32) keeps priorities
    q2 = torch.randn(1, 64, 2, 16)
    assert lz.which("attention", q2, q2, q2, is_causal=True) == base


def test_noisy_or_few_samples_fall_back_to_priorities(db):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    db.record([rec(base, ctx, 50.0, variance=40.0 ** 2), rec("torch.sdpa_math", ctx, 20.0)])
    lz.perfdb(db.path)
    assert lz.which("attention", q, q, q, is_causal=True) == base
    db.record([rec(base, ctx, 50.0, samples=2), rec("torch.sdpa_math", ctx, 20.0)])
    lz.perfdb(db.path)
    assert lz.which("attention", q, q, q, is_causal=True) == base


def test_kernel_measured_wrong_is_rejected(db):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    db.record([rec(base, ctx, 1.0, correct=False)])
    lz.perfdb(db.path)
    report = lz.explain("attention", q, q, q, is_causal=True)
    assert report.selected_kernel != base
    assert report.rejection_reasons[base] == [lz.Reason.PERF_INCORRECT]
    assert "max error 3.5" in str(report)


def test_other_versions_are_ignored_but_kept(db):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    other_torch = dataclasses.replace(SIG, torch="1.0.0")
    other_device = dataclasses.replace(SIG, device="Some Other CPU")
    base = lz.which("attention", q, q, q, is_causal=True)
    db.record([rec(base, ctx, 50.0, signature=other_torch),
               rec("torch.sdpa_math", ctx, 20.0, signature=other_torch),
               rec(base, ctx, 50.0, signature=other_device),
               rec("torch.sdpa_math", ctx, 20.0, signature=other_device),
               rec(base, ctx, 50.0, version="0.0.1"),  # another backend version
               rec("torch.sdpa_math", ctx, 20.0, version="0.0.1")])
    lz.perfdb(db.path)
    report = lz.explain("attention", q, q, q, is_causal=True)
    assert report.selected_kernel == base
    assert all(c.measured_us is None for c in report.candidates)
    assert len(db.records()) == 6 and db.records(signature=SIG) == db.records(signature=SIG)
    assert len(db.records(signature=other_torch)) == 2


def test_perfdb_off_by_env(monkeypatch):
    monkeypatch.setenv("LAYERZERO_PERFDB", "off")
    lz.reset()
    assert lz.perfdb() is None
    with pytest.raises(lz.ConfigurationError, match="PerfDB is off"):
        lz.tune("rms_norm", shapes=[(4, 8)])


# --- processes --------------------------------------------------------------------------------------

def _writer(path: str, worker: int, count: int) -> None:
    db = PerfDB(path)
    ctx = lz.SelectionContext(op="norm.rms", hidden_size=64, num_rows=8)
    for i in range(count):
        db.record([rec(f"w{worker}.k{i}", ctx, 1.0 + i)])
    os._exit(0)


def test_concurrent_writers_from_several_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    PerfDB(path).records()  # create it first
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    reader = PerfDB(path)
    while any(p.is_alive() for p in procs):
        reader.records()  # readers never block writers in WAL mode
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(reader.records()) == 160
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _batch_writer(path: str) -> None:
    db = PerfDB(path)
    ctx = lz.SelectionContext(op="norm.rms", hidden_size=64, num_rows=8)
    for i in range(10**6):
        db.record([rec(f"b{i}.k{j}", ctx, 1.0 + j) for j in range(25)])


def test_kill_9_mid_write_leaves_the_database_intact(tmp_path):
    path = str(tmp_path / "killed.sqlite")
    PerfDB(path).records()
    proc = multiprocessing.get_context("fork").Process(target=_batch_writer, args=(path,))
    proc.start()
    probe = PerfDB(path)
    deadline = time.time() + 20
    while len(probe.records()) < 100 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    probe.close()
    after = PerfDB(path)
    count = len(after.records())
    assert count >= 100 and count % 25 == 0  # whole transactions only
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ctx = lz.SelectionContext(op="norm.rms", hidden_size=64, num_rows=8)
    after.record([rec("after.kill", ctx, 1.0)])
    assert len(after.records()) == count + 1


def test_a_noisy_timing_far_behind_the_fastest_does_not_block_the_bucket(db):
    """A slow, noisy fallback (median - 2 sd still slower than the best) cannot win: scores stay measured."""
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    others = [s.id for s in runtime.registry.candidates(ctx.op) if s.id not in (base, "torch.sdpa_math")
              and not lz.validate(s.id, lz.attention, q, q, q, is_causal=True)[1]]
    db.record([rec(base, ctx, 50.0), rec("torch.sdpa_math", ctx, 20.0),
               *(rec(k, ctx, 900.0, variance=300.0 ** 2) for k in others[:1])])
    lz.perfdb(db.path)
    assert lz.which("attention", q, q, q, is_causal=True) == "torch.sdpa_math"
    # the same noise on a timing that could be the fastest keeps priorities
    db.record([rec(base, ctx, 50.0), rec("torch.sdpa_math", ctx, 20.0, variance=15.0 ** 2)])
    lz.perfdb(db.path)
    assert lz.which("attention", q, q, q, is_causal=True) == base


# --- regimes: eager streaming vs CUDA-graph replay ------------------------------------------------

def _explain_in(ctx: lz.SelectionContext):
    """What selection decides for ctx (e.g. with graph_capture=True, as during stream capture)."""
    from layerzero.ops.attention import ATTENTION

    return runtime.engine.evaluate(ctx, ATTENTION.transforms)


def _two_regime_rows(db, ctx, base):
    """base: slow eagerly (host-bound), fastest on the device; sdpa_math the other way round."""
    db.record([dataclasses.replace(rec(base, ctx, 50.0), graph_us=10.0, graph_p95_us=10.5, graph_samples=20,
                                   graph_variance=0.1),
               dataclasses.replace(rec("torch.sdpa_math", ctx, 20.0), graph_us=30.0, graph_p95_us=31.0,
                                   graph_samples=20, graph_variance=0.1)])
    lz.perfdb(db.path)


def test_graph_and_eager_regimes_pick_different_kernels_when_their_figures_disagree(db):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    assert base != "torch.sdpa_math"
    _two_regime_rows(db, ctx, base)
    eager = lz.explain("attention", q, q, q, is_causal=True)  # an eager call: eager figures
    assert (eager.regime, eager.selected_kernel, eager.decided_by) == ("eager", "torch.sdpa_math", "eager 20 us")
    assert lz.which("attention", q, q, q, is_causal=True) == "torch.sdpa_math"
    graph = _explain_in(ctx.replace(graph_capture=True))  # the context of a call under capture / compile
    assert (graph.regime, graph.selected_kernel, graph.decided_by) == ("graph", base, "graph 10 us")
    chosen = {c.kernel_id: c for c in graph.candidates}
    assert chosen[base].measured_us == 10.0 and chosen[base].measured_regime == "graph"
    assert chosen["torch.sdpa_math"].measured_us == 30.0 and chosen[base].score > chosen["torch.sdpa_math"].score


def test_regime_env_override_wins_over_the_calls_own_regime(db, monkeypatch):
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    _two_regime_rows(db, ctx, base)
    monkeypatch.setenv("LAYERZERO_REGIME", "graph")
    generation = runtime.generation
    assert lz.load_config()["regime"] == "graph"
    assert runtime.generation > generation  # plans chosen under the old regime are dropped
    assert lz.which("attention", q, q, q, is_causal=True) == base
    assert lz.explain("attention", q, q, q, is_causal=True).regime == "graph"
    monkeypatch.setenv("LAYERZERO_REGIME", "Eager")
    lz.load_config()
    assert _explain_in(ctx.replace(graph_capture=True)).selected_kernel == "torch.sdpa_math"  # forced eager
    monkeypatch.delenv("LAYERZERO_REGIME")
    assert lz.load_config()["regime"] is None
    assert _explain_in(ctx.replace(graph_capture=True)).selected_kernel == base


@pytest.mark.parametrize("value", ["fast", "graphs", "1"])
def test_regime_env_rejects_unknown_values(monkeypatch, value):
    monkeypatch.setenv("LAYERZERO_REGIME", value)
    with pytest.raises(lz.LayerZeroError) as exc:
        lz.load_config()
    assert isinstance(exc.value, lz.PolicyValidationError)
    assert str(exc.value) == f"LAYERZERO_REGIME: expected one of eager, graph, got {value!r}"
    lz.reset()  # the runtime reads it when it loads, too
    with pytest.raises(lz.PolicyValidationError, match="LAYERZERO_REGIME"):
        lz.which("rms_norm", torch.randn(2, 8))


def test_a_kernel_with_one_figure_is_ranked_by_it_in_either_regime(db):
    """No graph figure (not graph-safe, or capture failed): its eager time stands in under graphs,
    rather than dropping the bucket to priorities; explain says which figure it was."""
    q = torch.randn(1, 32, 2, 16)
    ctx = attn_ctx(q, q)
    base = lz.which("attention", q, q, q, is_causal=True)
    db.record([dataclasses.replace(rec(base, ctx, 50.0), graph_note="capture failed: RuntimeError"),
               dataclasses.replace(rec("torch.sdpa_math", ctx, 80.0), graph_us=60.0, graph_samples=20,
                                   graph_variance=0.1)])
    lz.perfdb(db.path)
    graph = _explain_in(ctx.replace(graph_capture=True))
    assert graph.selected_kernel == base and graph.decided_by == "eager 50 us"
    text = str(graph)
    assert "regime: graph; decided by eager 50 us" in text
    assert "measured 50 us (eager; no graph figure)" in text and "measured 60 us (graph)" in text
    assert {c.kernel_id: c.decided_by for c in graph.candidates if c.score is not None}["torch.sdpa_math"] == "graph"
    eager = lz.explain("attention", q, q, q, is_causal=True)
    assert eager.selected_kernel == base and "measured 80 us (eager)" in str(eager)
    # a record with only a graph figure (eager not measured) is ranked by it eagerly too
    only_graph = dataclasses.replace(rec(base, ctx, 50.0), median_us=math.inf, samples=0, graph_us=5.0,
                                     graph_samples=20, graph_variance=0.01)
    assert only_graph.figure("eager") is None and only_graph.figure_for("eager").median_us == 5.0
    assert not only_graph.confident  # the eager figure's confidence: there is none


def test_explain_without_measurements_says_priority_decided():
    q = torch.randn(1, 32, 2, 16)
    report = lz.explain("attention", q, q, q, is_causal=True)
    assert report.regime == "eager" and report.decided_by == "priority"
    assert "regime: eager; decided by priority" in str(report)
