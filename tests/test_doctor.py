"""lz.doctor() and lz.readiness_check()."""

from __future__ import annotations

import json

import torch

import layerzero as lz
from layerzero.kernel import ALL_FLOAT_DTYPES


def test_doctor_reports_device_torch_backends_caches_and_is_ready_on_a_healthy_process():
    report = lz.doctor()
    assert report.ready and report.issues == ()
    assert report.torch == torch.__version__
    assert report.devices[0].type == "cpu" and report.devices[0].total_bytes > 0
    names = {b.name: b for b in report.backends}
    assert names["reference"].available and names["torch"].available
    missing = [b for b in report.backends if not b.available]
    assert all(b.reason for b in missing)  # every unavailable backend says why
    assert report.plan_cache["size"] >= 2  # the smoke test ran attention and rms_norm
    text = str(report)
    assert text.startswith("LayerZero doctor: READY") and "backends:" in text and "torch" in text
    json.dumps(report.to_dict(), default=str)  # serializable for --json


def test_readiness_fails_with_an_open_breaker_and_a_missing_required_backend():
    def fails(x, w, eps):
        raise RuntimeError("dead kernel")

    lz.register_kernel(id="flaky.rms", ops=("norm.rms",), impl=fails, platforms=frozenset({"cpu"}), priority=90,
                       dtypes=ALL_FLOAT_DTYPES)
    lz.configure_health(failure_threshold=1)
    lz.rms_norm(torch.randn(2, 8))
    ready, issues = lz.readiness_check(smoke=False, required_backends=("reference", "definitely_not_installed"))
    assert not ready
    assert any("kernel flaky.rms circuit breaker is open (last error: RuntimeError: dead kernel)" in i for i in issues)
    assert any("required backend 'definitely_not_installed'" in i for i in issues)
    report = lz.doctor(smoke=False)
    assert not report.ready
    assert report.health["breakers"][0]["name"] == "flaky.rms"
    assert "NOT READY" in str(report) and "flaky.rms" in str(report)


def test_smoke_test_catches_a_wrong_kernel():
    def wrong(x, w, eps):
        return x * 2.0  # a silently wrong kernel

    lz.register_kernel(id="wrong.rms", ops=("norm.rms",), impl=wrong, platforms=frozenset({"cpu"}), priority=90,
                       dtypes=ALL_FLOAT_DTYPES)
    ready, issues = lz.readiness_check()
    assert not ready and any(i.startswith("rms_norm smoke test on cpu differs from the reference") for i in issues)
