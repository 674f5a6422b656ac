"""CUDA graph safety on CPU: the capture rule in selection, is_graph_safe, output comparison.
The capture itself is exercised on the GPU (tests/gpu/test_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.graphs import compare_outputs
from layerzero.kernel import ALL_FLOAT_DTYPES, HALF_DTYPES
from layerzero.ops import FAMILIES
from layerzero.state import runtime


def _unsafe(x, w, eps):
    return x


def test_capture_rejects_unsafe_kernels_with_reason(monkeypatch):
    monkeypatch.setenv("LAYERZERO_PERFDB", "off")
    lz.reset()
    lz.register_kernel(id="unsafe.rms", ops=("norm.rms",), impl=_unsafe, platforms=frozenset({"cuda"}), priority=99,
                       dtypes=HALF_DTYPES, graph_safe=False)
    runtime.ensure_loaded()
    ctx = lz.SelectionContext(op="norm.rms", device_type="cuda", sm=90, generation="hopper", dtype=torch.float16,
                              hidden_size=64, num_rows=8)
    transforms = FAMILIES["rms_norm"].transforms
    assert runtime.engine.evaluate(ctx, transforms).selected_kernel == "unsafe.rms"
    report = runtime.engine.evaluate(ctx.replace(graph_capture=True), transforms)
    assert report.selected_kernel != "unsafe.rms"
    assert report.rejection_reasons["unsafe.rms"] == [lz.Reason.NOT_GRAPH_SAFE]
    assert "NOT_GRAPH_SAFE: the current CUDA stream is capturing" in str(report)


def test_is_graph_safe_by_kernel_id_and_by_call():
    assert lz.is_graph_safe("torch.rms_norm") is True
    lz.register_kernel(id="unsafe.rms", ops=("norm.rms",), impl=lambda x, w, eps: x * 1.0,
                       platforms=frozenset({"cpu"}), priority=99, dtypes=ALL_FLOAT_DTYPES, graph_safe=False)
    assert lz.is_graph_safe("unsafe.rms") is False
    x = torch.randn(2, 16)
    assert lz.is_graph_safe("rms_norm", x) is False  # unsafe.rms is what this call selects
    assert lz.is_graph_safe(lz.layer_norm, x) is True
    with pytest.raises(lz.UnknownNameError, match="did you mean 'unsafe.rms'"):
        lz.is_graph_safe("unsafe.rsm")


def test_validate_graph_capture_needs_cuda_tensors():
    with pytest.raises(lz.InvalidInputError) as e:
        lz.validate_graph_capture(lz.rms_norm, torch.randn(2, 8))
    assert e.value.argument == "args" and "CUDA tensors" in str(e.value) and "cpu" in str(e.value)


def test_compare_outputs_accepts_rounding_and_rejects_real_differences():
    a = torch.randn(4, 8, dtype=torch.float16)
    assert compare_outputs(a, a.clone()) == 0.0
    assert compare_outputs((a, {"n": 3}), (a + 1e-4, {"n": 3})) <= 2e-4
    with pytest.raises(lz.CudaGraphUnsafeError, match=r"replay 3: out\[1\] differs from eager by up to 1"):
        compare_outputs((a, a), (a, a + 1), "replay 3")
    with pytest.raises(lz.CudaGraphUnsafeError, match="2 items from the graph, 1 eagerly"):
        compare_outputs((a, a), (a,))
    with pytest.raises(lz.CudaGraphUnsafeError, match="shape/dtype"):
        compare_outputs(a, a.float())
    nan = a.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(lz.CudaGraphUnsafeError, match="NaN/Inf"):
        compare_outputs(nan, a)
