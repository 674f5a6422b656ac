"""lz.tune on CPU kernels (check before timing, store, select from measurements), traces, warmup."""

from __future__ import annotations

import json
import time

import pytest
import torch

import layerzero as lz
from layerzero.backends.reference import rms_norm as reference_rms_norm
from layerzero.perf.bench import compare, rotation_count, time_calls
from layerzero.state import runtime


def slow_rms(x, weight, eps):
    time.sleep(0.004)
    return reference_rms_norm(x, weight, eps)


def fast_rms(x, weight, eps):
    time.sleep(0.001)
    return reference_rms_norm(x, weight, eps)


def wrong_rms(x, weight, eps):
    return torch.zeros_like(x)


def raising_rms(x, weight, eps):
    raise RuntimeError("no kernel image for this shape")


def _register(**kernels) -> None:
    for name, (impl, priority) in kernels.items():
        lz.register_kernel(id=f"mine.{name}", ops=("norm.rms",), impl=impl, platforms=frozenset({"cpu"}),
                           priority=priority, dtypes=frozenset({torch.float32}))


@pytest.fixture
def perf_path(tmp_path):
    path = tmp_path / "perf.sqlite"
    lz.perfdb(path)
    return path


def test_time_calls_reports_sane_statistics():
    t = time_calls(lambda: time.sleep(0.002), [()], torch.device("cpu"), warmup=1, repeats=5, min_sample_s=0.001)
    assert 5 <= t.samples <= 25 and t.iters == 1  # more samples only while p95/median > 1.1 (at most 5x)
    assert 1900 < t.median_us < 20_000 and t.p95_us >= t.median_us
    short = time_calls(lambda: None, [()], torch.device("cpu"), warmup=1, repeats=3, min_sample_s=0.002)
    assert short.iters > 100  # N back-to-back calls fill a sample of at least min_sample_s


def test_sampling_takes_more_repeats_while_p95_is_far_from_the_median():
    from layerzero.perf.bench import _sampled

    values = iter([1.0] * 9 + [2.0] + [1.0] * 100)  # one outlier in the first 10: p95 = 2 x the median
    t = _sampled(lambda: next(values), 7, repeats=10, max_repeats=None, spread=1.1)
    assert (t.samples, t.p95_us, t.median_us, t.iters) == (20, 1.0, 1.0, 7)  # 20 samples: p95 is the 19th
    noisy = iter([1.0, 3.0] * 100)
    t = _sampled(lambda: next(noisy), 1, repeats=10, max_repeats=30, spread=1.1)
    assert t.samples == 30 and t.p95_us == 3.0  # never settles: stops at the cap, p95 recorded as measured
    steady = iter([1.0] * 100)
    assert _sampled(lambda: next(steady), 1, repeats=10, max_repeats=None, spread=1.1).samples == 10


def test_rotation_exceeds_l2():
    n = rotation_count(64 << 10, torch.device("cpu"))
    from layerzero.perf.bench import l2_bytes

    assert n * (64 << 10) > 2 * l2_bytes(torch.device("cpu")) or n == 64


def test_compare_tolerances():
    ref = torch.randn(8, 8, dtype=torch.float64)
    assert compare(ref.to(torch.bfloat16), ref, torch.bfloat16)[0]
    ok, err = compare(ref.to(torch.float32) + 0.1, ref, torch.float32)
    assert not ok and err == pytest.approx(0.1, rel=1e-3)
    assert not compare(torch.full((8, 8), float("nan")), ref, torch.float32)[0]


def test_tune_switches_selection_to_the_measured_fastest(perf_path, tmp_path, monkeypatch):
    # sleep() jitters on a loaded machine; the confidence gate has its own tests (test_perf_db)
    monkeypatch.setattr("layerzero.perf.perfdb.MAX_CV", 1.0)
    _register(slow=(slow_rms, 99), fast=(fast_rms, 98), wrong=(wrong_rms, 100), broken=(raising_rms, 97))
    x, w = torch.randn(16, 64), torch.randn(64)
    assert lz.which("rms_norm", x, w) == "mine.wrong"  # by priority
    report = lz.tune("rms_norm", shapes=[(16, 64)], dtypes=[torch.float32], kernels="mine.*", repeats=5,
                     warmup=1, min_sample_s=0.0, report=tmp_path / "report", progress=False, device="cpu")
    (res,) = report.results
    by_kernel = {r.kernel: r for r in res.records}
    assert set(by_kernel) == {"mine.slow", "mine.fast", "mine.wrong", "mine.broken"}
    assert not by_kernel["mine.wrong"].correct and by_kernel["mine.wrong"].max_error > 0.1
    assert not by_kernel["mine.broken"].correct and "no kernel image" in by_kernel["mine.broken"].error
    assert by_kernel["mine.fast"].median_us < by_kernel["mine.slow"].median_us
    assert res.best.kernel == "mine.fast"
    # stored, and selection now follows the measurements (the wrong kernel is never selected)
    assert {r.kernel for r in lz.perfdb().records()} == set(by_kernel)
    explained = lz.explain("rms_norm", x, w)
    assert explained.selected_kernel == "mine.fast", str(explained)
    assert explained.rejection_reasons["mine.wrong"] == [lz.Reason.PERF_INCORRECT]
    assert explained.rejection_reasons["mine.broken"] == [lz.Reason.PERF_INCORRECT]
    assert "no kernel image" in str(explained)
    # the report: table and heatmap
    table = report.table()
    assert "mine.fast" in table and "wrong" in table and "error" in table and "*" in table
    assert (tmp_path / "report" / "tune_report.md").read_text().startswith("tuned 1 shape")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report" / "tune_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_tune_on_cpu_records_eager_figures_and_no_graph_figure(perf_path):
    report = lz.tune("rms_norm", shapes=[(8, 32)], dtypes=[torch.float32], kernels="torch.*", repeats=4, warmup=1,
                     min_sample_s=0.001, progress=False, device="cpu")
    (res,) = report.results
    (row,) = [r for r in lz.perfdb().records() if r.kernel == "torch.rms_norm"]
    assert row.correct and row.samples >= 4 and row.calls >= 1 and row.p95_us >= row.median_us > 0
    assert row.figure("eager").median_us == row.median_us
    assert row.graph_us is None and row.figure("graph") is None and row.graph_note == "no CUDA graphs on cpu"
    assert res.best_in("graph") is None and report.regimes == ["eager"]
    line = report.table().splitlines()[2]
    assert line.endswith("| torch.rms_norm | - |") and "* / -" in line  # eager figure, no graph one
    assert "eager (N back-to-back calls) / graph" in str(report)


def test_tune_report_shows_both_figures(tmp_path):
    from layerzero.perf.perfdb import Bucket, PerfRecord, current_signature
    from layerzero.perf.tune import ShapeResult, TuneReport

    sig = current_signature("cpu", 0)

    def row(kernel, eager, graph=None):
        return PerfRecord(kernel, "norm.rms", "float32", Bucket(rows=8, hidden=32), sig, "", eager, eager, 20, 0.0,
                          graph_us=graph, graph_p95_us=graph, graph_samples=0 if graph is None else 20)

    res = ShapeResult("rms_norm", (8, 32), "float32", "norm.rms",
                      (row("a.k", 10.0, 4.0), row("b.k", 8.0, 6.0), row("c.k", 9.0)))
    report = TuneReport([res], None)
    assert res.best.kernel == "b.k" and res.best_in("graph").kernel == "a.k" and report.regimes == ["eager", "graph"]
    assert report.table().splitlines()[2] == "| norm.rms float32 8x32 | 10 / 4* | 8* / 6 | 9 / - | b.k | a.k |"
    pytest.importorskip("matplotlib")
    assert report.heatmap(tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_tune_builtin_cpu_kernels_attention_and_norms(perf_path):
    # torch.* only: FlexAttention on CPU compiles for tens of seconds (a warmup matter, not a tune test)
    report = lz.tune("attention", shapes=[(1, 16, 16, 2, 1, 16, 1), "1x1x16x2x2x16x0"], dtypes=[torch.float32],
                     kernels="torch.*", repeats=3, warmup=1, min_sample_s=0.0, progress=False, device="cpu")
    assert len(report.results) == 2
    for res in report.results:
        assert res.records and all(r.correct for r in res.records), [r.error for r in res.records]
        assert {r.kernel for r in res.records} >= {"torch.sdpa_math"}
        assert all(r.shape == "x".join(map(str, res.shape)) for r in res.records)
    assert report.results[1].op == "attention.full"
    norms = lz.tune("layer_norm", shapes=[(8, 32)], dtypes=[torch.float32, torch.bfloat16], kernels="torch.*",
                    repeats=3, warmup=1, min_sample_s=0.0, progress=False, device="cpu")
    assert [r.dtype for r in norms.results] == ["float32", "bfloat16"]
    assert all(r.correct for res in norms.results for r in res.records)


def test_tune_rejects_bad_shapes(perf_path):
    with pytest.raises(lz.InvalidInputError, match="7 non-negative ints"):
        lz.tune("attention", shapes=[(1, 2, 3)])
    with pytest.raises(lz.UnknownNameError, match="rms_norm"):
        lz.tune("rms_norn", shapes=[(1, 2)])


def test_tune_from_a_recorded_trace(perf_path, tmp_path):
    x1, x2, w = torch.randn(4, 32), torch.randn(3, 5, 32), torch.randn(32)
    with lz.record_trace() as trace:
        for _ in range(3):
            lz.rms_norm(x1, w)
            lz.rms_norm(x2, w)
        lz.rms_norm(x1)  # no weight: no workload reproduces this variant
    assert [name for name, _ in trace] == ["rms_norm"] * 3
    path = lz.save_trace(trace, tmp_path / "trace.json")
    rows = json.loads(path.read_text())
    assert [r["shape"] for r in rows] == [[4, 32], [15, 32], None]
    report = lz.tune(trace=path, repeats=3, warmup=1, min_sample_s=0.0, progress=False, device="cpu")
    assert [res.shape for res in report.results] == [(4, 32), (15, 32)]
    assert any("skipped" in n for n in report.notes)
    assert lz.tune(trace=trace, repeats=3, warmup=1, min_sample_s=0.0, progress=False, device="cpu").results


def jit_rms(x, weight, eps):
    if not getattr(jit_rms, "compiled", False):
        time.sleep(0.05)  # stands in for a JIT compile on the first call
        jit_rms.compiled = True
    return reference_rms_norm(x, weight, eps)


def test_warmup_preselects_and_reports_compilation():
    lz.register_kernel(id="mine.jit", ops=("norm.rms",), impl=jit_rms, platforms=frozenset({"cpu"}), priority=99,
                       needs_jit=True)
    jit_rms.compiled = False
    report = lz.warmup("rms_norm", shapes=[(4, 32), (64, 32)], dtypes=[torch.float32], device="cpu")
    assert [e.kernel for e in report.entries] == ["mine.jit", "mine.jit"]
    first = report.entries[0]
    assert first.compiled and first.first_ms >= 50 and first.compile_ms > 40
    assert "mine.jit" in str(report) and "compiled" in str(report)
    x = torch.randn(64, 32)
    w = (1.0 + 0.1 * torch.randn(32)).to(torch.float32)
    assert lz.explain("rms_norm", x, w).cached  # the plan for this shape was pre-selected
    assert runtime.plans.computes == 2


def test_cli_tune_and_solve(tmp_path, capsys):
    from layerzero.cli import main

    db = tmp_path / "cli.sqlite"
    assert main(["tune", "rms_norm", "--shape", "8x32", "--dtype", "float32", "--repeats", "3", "--kernels", "torch.*",
                 "--perfdb", str(db), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["best"] == "torch.rms_norm" and out[0]["shape"] == [8, 32]
    assert main(["solve", "rms_norm", "--dim", "rows=1:64", "--dim", "hidden=32", "--out", str(tmp_path / "s.py"),
                 "--dtype", "float32", "--device", "cpu"]) == 0
    assert "torch.rms_norm" in capsys.readouterr().out and (tmp_path / "s.py").exists()
    assert main(["solve", "rms_norm", "--dim", "rows", "--out", str(tmp_path / "t.py")]) == 2


def test_compare_tuples_element_by_element():
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert compare((a, b), (a.clone(), b.clone()), torch.float32)[0]
    ok, err = compare((a, b), (a.clone(), b + 1.0), torch.float32)
    assert not ok and err == pytest.approx(1.0)
    assert not compare((a,), (a, b), torch.float32)[0]  # a missing output is wrong, not ignored


def test_rope_and_paged_workloads_build_checkable_inputs():
    from layerzero.perf import workloads
    from layerzero.perf.bench import measure

    runtime.ensure_loaded()
    cpu = torch.device("cpu")
    ctx, records = measure("rope_qk", (2, 16, 4, 2, 32), torch.float32, cpu,
                           [runtime.registry.kernel("torch.rope")], repeats=2, min_sample_s=1e-4)
    assert ctx.op == "posenc.rope" and records[0].correct  # (q, k) both checked against the reference
    assert workloads.shape_of("rope_qk", ctx) == (2, 16, 4, 2, 32)
    for shape, op in (((3, 1, 64, 4, 2, 16, 16), "attention.decode"), ((2, 5, 48, 4, 2, 16, 16), "attention.paged")):
        ctx = workloads.context_for("paged_attention", shape, torch.float32, cpu)
        assert (ctx.op, ctx.batch, ctx.seq_len_k, ctx.page_size) == (op, shape[0], shape[2], 16)
        args = workloads.workload("paged_attention").make(shape, torch.float32, cpu, torch.Generator().manual_seed(0))
        q, k_cache, v_cache, table, lens = args
        assert sorted(table.flatten().tolist()) == list(range(k_cache.shape[0]))  # every page used once
        ref, cut = workloads.reference_output("paged_attention", args)
        out = lz.paged_attention(*args)  # the op on the whole batch, cut to the reference's sequence 0
        torch.testing.assert_close(cut(out).double(), ref, rtol=1e-4, atol=1e-5)


def test_window_softcap_and_swiglu_workloads(perf_path):
    from layerzero.perf import workloads

    cpu = torch.device("cpu")
    ctx = workloads.context_for("attention_ext", (2, 1000, 1000, 8, 2, 64, 1, 256, 30), torch.float32, cpu)
    assert (ctx.op, ctx.batch, ctx.seq_len_q, ctx.window, ctx.softcap) == ("attention.sliding_window", 2, 1000,
                                                                            (256, 0), 30.0)
    assert workloads.context_for("attention_ext", (1, 64, 64, 4, 4, 16, 0, 8, 0), torch.float32, cpu).window == (8, 8)
    report = lz.tune("attention_ext", shapes=["1x32x32x4x2x16x1x8x0"], dtypes=[torch.float32], kernels="torch.*",
                     repeats=3, warmup=1, min_sample_s=0.0, progress=False, device="cpu")
    (res,) = report.results
    assert res.family == "attention_ext" and res.op == "attention.sliding_window"
    assert res.records and all(r.correct for r in res.records), [r.error for r in res.records]
    swiglu = lz.tune("swiglu", shapes=[(5, 48)], dtypes=[torch.float32], kernels="torch.*", repeats=3, warmup=1,
                     min_sample_s=0.0, progress=False, device="cpu")
    assert swiglu.results[0].op == "activation.swiglu" and swiglu.results[0].best.kernel == "torch.swiglu"
