"""Every exception class of LayerZero, raised where it belongs, with a message that says what
was wrong (the ones raised by this runtime are also tested next to their feature)."""

from __future__ import annotations

import threading

import pytest
import torch

import layerzero as lz
from layerzero.kernel import ALL_FLOAT_DTYPES
from layerzero.selection.cache import PlanCache

ALL = [lz.NoKernelFoundError, lz.CudaGraphUnsafeError, lz.KernelExecutionError, lz.PolicyValidationError,
       lz.BackendNotAvailableError, lz.ConfigurationError, lz.SelectionTimeoutError, lz.CacheCorruptionError,
       lz.InvalidInputError, lz.UnknownNameError]


@pytest.mark.parametrize("cls", ALL)
def test_every_error_is_a_layerzero_error(cls):
    assert issubclass(cls, lz.LayerZeroError)


def test_no_kernel_found_in_strict_mode_lists_the_candidates():
    lz.configure(deny=["torch"], strict_mode=True)
    with pytest.raises(lz.NoKernelFoundError) as e:
        lz.rms_norm(torch.randn(2, 8))
    assert "strict mode: only the reference can run norm.rms" in str(e.value)
    assert "torch.rms_norm" in str(e.value) and "POLICY_DENIED" in str(e.value)


def test_kernel_execution_error_carries_kernel_and_cause():
    def fails(x, w, eps):
        raise RuntimeError("bad launch")

    lz.register_kernel(id="bad.rms", ops=("norm.rms",), impl=fails, platforms=frozenset({"cpu"}), priority=90,
                       dtypes=ALL_FLOAT_DTYPES)
    lz.configure_health(fallback=False)
    with pytest.raises(lz.KernelExecutionError, match="kernel bad.rms failed: RuntimeError: bad launch") as e:
        lz.rms_norm(torch.randn(2, 8))
    assert e.value.kernel_id == "bad.rms"


def test_policy_validation_error_names_the_bad_target():
    with pytest.raises(lz.PolicyValidationError, match="lock target: expected a backend name or kernel id, got 42"):
        lz.lock("attention.causal", 42)


def test_configuration_error_names_the_setting():
    with pytest.raises(lz.ConfigurationError, match="cooldown_s: expected a finite number of seconds > 0, got 0"):
        lz.configure_health(cooldown_s=0)


def test_selection_timeout_when_another_thread_holds_the_selection():
    cache = PlanCache(wait_timeout_s=0.05)
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return "plan"

    owner = threading.Thread(target=cache.get_or_compute, args=("k", slow))
    owner.start()
    started.wait(5)
    try:
        with pytest.raises(lz.SelectionTimeoutError, match="waited 0.05s"):
            cache.get_or_compute("k", lambda: "other")
    finally:
        release.set()
        owner.join()


def test_cache_corruption_error_for_an_unreadable_perfdb(tmp_path):
    from layerzero.perf.perfdb import PerfDB

    path = tmp_path / "perfdb.sqlite"
    path.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(lz.CacheCorruptionError, match="is unreadable"):
        _ = PerfDB(path).schema_version


def test_backend_not_available_for_a_missing_exporter(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(lz.BackendNotAvailableError, match="opentelemetry-sdk"):
        lz.enable_telemetry(prometheus=False)


def test_cuda_graph_unsafe_error_for_a_graph_that_disagrees_with_eager():
    from layerzero.graphs import compare_outputs

    with pytest.raises(lz.CudaGraphUnsafeError, match="differs from eager"):
        compare_outputs(torch.zeros(3), torch.ones(3))
