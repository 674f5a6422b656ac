"""lz.tune on the GPU: both figures per kernel (eager streaming, CUDA-graph replay), kernels that
cannot be captured recorded without a graph figure, and selection reading the regime's figure.

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_perf_regimes_gpu.py -q
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.backends.reference import rms_norm as reference_rms_norm
from layerzero.kernel import HALF_DTYPES
from layerzero.perf import workloads
from layerzero.state import runtime

pytestmark = pytest.mark.gpu

SHAPE = (4, 4096)  # 4 rows: host-bound, so the two regimes differ


def syncs_rms(x, weight, eps):
    """Correct eagerly; a host sync is illegal under capture."""
    if float(x.float().abs().sum().item()) < 0:
        raise AssertionError("unreachable")
    return reference_rms_norm(x, weight, eps).to(x.dtype)


class _Calls:
    n = 0


def host_state_rms(x, weight, eps):
    """Correct on odd calls, 11x on even ones: a host counter baked into the captured graph."""
    _Calls.n += 1
    return (reference_rms_norm(x, weight, eps) * (11.0 if _Calls.n % 2 == 0 else 1.0)).to(x.dtype)


def test_tune_records_both_figures_and_notes_why_a_graph_figure_is_missing(tmp_path):
    lz.register_kernel(id="mine.syncs", ops=("norm.rms",), impl=syncs_rms, platforms=frozenset({"cuda"}),
                       dtypes=HALF_DTYPES, priority=1)
    lz.register_kernel(id="mine.unsafe", ops=("norm.rms",), impl=syncs_rms, platforms=frozenset({"cuda"}),
                       dtypes=HALF_DTYPES, priority=1, graph_safe=False)
    lz.register_kernel(id="mine.stale", ops=("norm.rms",), impl=host_state_rms, platforms=frozenset({"cuda"}),
                       dtypes=HALF_DTYPES, priority=1)
    _Calls.n = 0
    report = lz.tune("rms_norm", shapes=[SHAPE], dtypes=[torch.bfloat16], kernels="torch.rms_norm", repeats=10,
                     perfdb=tmp_path / "perf.sqlite", progress=False)
    mine = lz.tune("rms_norm", shapes=[SHAPE], dtypes=[torch.bfloat16], kernels="mine.*", repeats=5,
                   progress=False)
    print(report, mine, sep="\n")
    rows = {r.kernel: r for r in lz.perfdb().records()}
    torch_row = rows["torch.rms_norm"]
    assert torch_row.correct and torch_row.calls >= 10 and torch_row.graph_samples >= 10
    assert torch_row.graph_us is not None and torch_row.graph_note == ""
    assert torch_row.graph_us < torch_row.median_us  # 4 rows: replay skips the host time eager calls pay
    assert rows["mine.syncs"].correct and rows["mine.syncs"].graph_us is None
    assert rows["mine.syncs"].graph_note.startswith("capture failed:"), rows["mine.syncs"].graph_note
    assert rows["mine.unsafe"].graph_note == "not graph-safe (KernelSpec.graph_safe=False)"
    assert rows["mine.stale"].graph_note.startswith("replay differs from the eager call"), rows["mine.stale"].graph_note
    assert all(rows[k].figure("eager") is not None for k in ("mine.syncs", "mine.unsafe", "mine.stale"))
    assert "/ -" in mine.table()


def test_selection_reads_the_graph_figure_under_capture(tmp_path):
    lz.tune("rms_norm", shapes=[SHAPE], dtypes=[torch.bfloat16], kernels="torch.*", repeats=10,
            perfdb=tmp_path / "perf.sqlite", progress=False)
    ctx = workloads.context_for("rms_norm", SHAPE, torch.bfloat16, torch.device("cuda"))
    transforms = workloads.family("rms_norm").transforms
    eager = runtime.engine.evaluate(ctx, transforms)
    graph = runtime.engine.evaluate(ctx.replace(graph_capture=True), transforms)
    print(eager, graph, sep="\n")
    assert eager.regime == "eager" and graph.regime == "graph"
    rows = {r.kernel: r for r in lz.perfdb().records()}
    assert eager.decided_by.startswith("eager ") and graph.decided_by.startswith("graph "), (eager, graph)
    assert float(graph.decided_by.split()[1]) == pytest.approx(rows[graph.selected_kernel].graph_us, rel=1e-3)
    assert float(eager.decided_by.split()[1]) == pytest.approx(rows[eager.selected_kernel].median_us, rel=1e-3)
    assert f"regime: graph; decided by {graph.decided_by}" in str(graph)
