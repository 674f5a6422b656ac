"""Memory-aware selection: declared workspaces against the free-memory headroom."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.kernel import ALL_FLOAT_DTYPES
from layerzero.monitor.memory import free_memory

MiB = 2**20


def _rms(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def register_big(workspace) -> None:
    lz.register_kernel(id="big.rms", ops=("norm.rms",), impl=_rms, platforms=frozenset({"cpu"}), priority=90,
                       dtypes=ALL_FLOAT_DTYPES, workspace_bytes=workspace)


def test_workspace_beyond_headroom_is_rejected_and_a_smaller_kernel_runs():
    register_big(lambda ctx: ctx.num_rows * MiB)  # 1 MiB per row
    lz.configure_memory(headroom_fraction=0.25, free_memory=lambda device, index: (64 * MiB, 100 * MiB))
    small, large = torch.randn(8, 32), torch.randn(64, 32)
    assert lz.which("rms_norm", small) == "big.rms"  # 8 MiB <= 64 - 25
    report = lz.explain("rms_norm", large)  # 64 MiB > 64 - 25
    assert report.selected_kernel == "torch.rms_norm"
    assert report.rejection_reasons["big.rms"] == [lz.Reason.WORKSPACE_TOO_LARGE]
    assert "workspace 64.0 MiB > free 64.0 MiB minus headroom 25.0 MiB on cpu:0" in str(report)
    torch.testing.assert_close(lz.rms_norm(large), _rms(large, None, 1e-6))


def test_headroom_bytes_wins_when_larger_than_fraction():
    register_big(lambda ctx: 10 * MiB)
    lz.configure_memory(headroom_fraction=0.0, headroom_bytes=60 * MiB,
                        free_memory=lambda device, index: (64 * MiB, 100 * MiB))
    assert lz.which("rms_norm", torch.randn(2, 8)) == "torch.rms_norm"
    lz.configure_memory(headroom_fraction=0.0, headroom_bytes=50 * MiB,
                        free_memory=lambda device, index: (64 * MiB, 100 * MiB))
    assert lz.which("rms_norm", torch.randn(2, 8)) == "big.rms"  # configure_memory dropped the cached plan


def test_unknown_free_memory_and_zero_workspace_never_reject():
    register_big(lambda ctx: 10**18)
    lz.configure_memory(free_memory=lambda device, index: None)
    assert lz.which("rms_norm", torch.randn(2, 8)) == "big.rms"


def test_broken_workspace_estimate_rejects_the_kernel_not_the_call():
    register_big(lambda ctx: 1 // 0)
    x = torch.randn(2, 8)
    report = lz.explain("rms_norm", x)
    assert report.rejection_reasons["big.rms"] == [lz.Reason.CUSTOM_CHECK_FAILED]
    assert "workspace estimate raised ZeroDivisionError" in str(report)
    torch.testing.assert_close(lz.rms_norm(x), _rms(x, None, 1e-6))


def test_real_cpu_memory_is_measured_and_huge_workspace_rejected():
    free, total = free_memory("cpu")
    assert 0 < free <= total
    register_big(lambda ctx: 2 * total)
    assert lz.explain("rms_norm", torch.randn(2, 8)).rejection_reasons["big.rms"] == [lz.Reason.WORKSPACE_TOO_LARGE]


@pytest.mark.parametrize("kwargs", [dict(headroom_fraction=1.5), dict(headroom_fraction=-0.1),
                                    dict(headroom_bytes=-1), dict(headroom_bytes=1.5)])
def test_bad_memory_settings_raise_configuration_error(kwargs):
    with pytest.raises(lz.ConfigurationError, match=next(iter(kwargs))):
        lz.configure_memory(**kwargs)
