"""Every policy call changes what `lz.which` returns, and undoing it changes it back: none is a
silent no-op (issue 20: `lz.disabled("torch_sdpa")` written as a statement used to do nothing)."""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch

import layerzero as lz
from layerzero.state import runtime

SDPA = "torch.sdpa_"


def qkv(batch: int = 1, seq: int = 8):
    q = torch.randn(batch, seq, 2, 16)
    return q, torch.randn_like(q), torch.randn_like(q)


def which(**kwargs: object) -> str:
    return lz.which("attention.causal", *qkv(), **kwargs)


def rms() -> str:
    return lz.which("norm.rms", torch.randn(2, 8), torch.ones(8))


@pytest.fixture
def base() -> str:
    picked = which()
    assert picked != "torch.sdpa_math"  # the tests below move the choice to sdpa_math and back
    return picked


def test_lock_and_unlock(base):
    lz.lock("attention.causal", "torch.sdpa_math")
    assert which() == "torch.sdpa_math"
    assert lz.unlock("attention.causal") is True
    assert which() == base


def test_lock_the_readme_kernel_id_that_cannot_run_here_warns_and_explains(base, caplog):
    lz.lock("attention.causal", "flashinfer.decode")  # the seed README's example; no FlashInfer on CPU
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert which() == base
    assert any("lock attention.causal -> flashinfer.decode" in r.getMessage() and "lock lock" not in r.getMessage()
               for r in caplog.records)
    report = lz.explain("attention.causal", *qkv())
    assert any("cannot run this call" in n for n in report.notes)
    assert lz.get_locks() == {"attention.causal": "flashinfer.decode"}


def test_prefer_statement_and_undo(base):
    preference = lz.prefer("torch.sdpa_math")
    assert which() == "torch.sdpa_math"
    preference.undo()
    assert which() == base


def test_prefer_with_block(base):
    with lz.prefer("torch.sdpa_math", priority=100):
        assert which() == "torch.sdpa_math"
    assert which() == base


def test_disabled_statement_takes_effect_and_stays_until_undo(base):
    norm = rms()
    assert base.startswith(SDPA)
    switch = lz.disabled("torch_sdpa")  # a statement, as the seed README writes it
    assert not which().startswith(SDPA)
    assert not which().startswith(SDPA)  # still in force for later calls
    assert rms() == norm  # torch_sdpa is torch's SDPA kernels, not its norms
    assert lz.Reason.BACKEND_DISABLED in lz.explain("attention.causal", *qkv()).rejection_reasons[base]
    switch.undo()
    assert which() == base


def test_disabled_with_block_restores(base):
    with lz.disabled("torch_sdpa") as switch:
        assert not which().startswith(SDPA)
        assert isinstance(switch, lz.disabled)
    assert which() == base


def test_disabled_one_kernel_by_id(base):
    with lz.disabled(base):
        assert which() != base
        assert lz.explain("attention.causal", *qkv()).rejection_reasons[base] == [lz.Reason.BACKEND_DISABLED]
    assert which() == base


def test_disabled_backend_covers_its_norms_too():
    norm = rms()
    with lz.disabled("torch"):
        assert rms() != norm


def test_enabled_undoes_disabled_and_its_undo_disables_again(base):
    lz.disabled("torch_sdpa")
    assert not which().startswith(SDPA)
    switch = lz.enabled("torch_sdpa")
    assert which() == base
    switch.undo()
    assert not which().startswith(SDPA)
    lz.enabled()  # everything
    assert which() == base and runtime.disabled_backends == frozenset()


def test_enabled_backend_also_enables_its_kernels_disabled_by_id(base):
    lz.disabled(base)
    assert which() != base
    lz.enabled("torch")
    assert which() == base


def test_enabled_cannot_enable_a_kernel_disabled_through_a_wider_entry(base):
    lz.disabled("torch")
    with pytest.raises(lz.ConfigurationError, match="is disabled through lz.disabled\\('torch'\\); "
                                                    "call lz.enabled\\('torch'\\)"):
        lz.enabled("torch_sdpa")
    assert which() != base  # nothing changed
    lz.disabled()
    with pytest.raises(lz.ConfigurationError, match="lz.disabled\\(\\) \\(every backend\\); call lz.enabled\\(\\)"):
        lz.enabled("torch")


def test_configure_file(tmp_path, base):
    path = tmp_path / "policy.yaml"
    path.write_text("locks:\n  - {operation: attention.causal, kernel: torch.sdpa_math}\n")
    lz.configure(str(path))
    assert which() == "torch.sdpa_math"


def test_configure_keywords(base):
    lz.configure(lock={"attention.causal": "torch.sdpa_math"})
    assert which() == "torch.sdpa_math"
    lz.unlock("attention.causal")
    lz.configure(allow={"attention.*": ["torch.sdpa_math"]})
    assert which() == "torch.sdpa_math"


def test_configure_deny_and_prefer(base):
    lz.configure(deny=[base])
    assert which() != base
    lz.reset()
    lz.configure(prefer={"torch.sdpa_math": 500})
    assert which() == "torch.sdpa_math"


def test_configure_mapping_in_the_file_schema(base):
    lz.configure({"boosts": [{"operation": "attention.*", "kernel": "torch.sdpa_math", "boost_factor": 100}]})
    assert which() == "torch.sdpa_math"


def test_configure_strict_mode_refuses_the_reference_fallback():
    lz.disabled()
    assert which() == "reference.attention"
    lz.configure(strict_mode=True)
    with pytest.raises(lz.NoKernelFoundError, match="strict mode"):
        which()


def test_watch_policy_and_reload(tmp_path, base):
    path = tmp_path / "policy.yaml"
    path.write_text("locks:\n  - {operation: attention.causal, kernel: torch.sdpa_math}\n")
    with lz.watch_policy(path, interval_s=60) as watcher:
        assert which() == "torch.sdpa_math"
        path.write_text("denies:\n  - {operation: attention.causal, kernel: torch.sdpa_math}\n")
        assert watcher.check() is True
        assert which() == base


def test_load_config_reads_the_environment(monkeypatch, base):
    monkeypatch.setenv("LAYERZERO_LOCK", "attention.causal=torch.sdpa_math")
    lz.load_config()
    assert which() == "torch.sdpa_math"


def test_policy_yaml_with_torch_sdpa_group(tmp_path, base):
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        denies:
          - operation: "attention.*"
            backends: ["torch_sdpa"]
        """))
    norm = rms()
    lz.configure(str(path))
    assert not which().startswith(SDPA)
    assert rms() == norm


def test_lock_to_a_group_picks_among_its_kernels(base):
    lz.lock("attention.causal", "torch_sdpa")
    report = lz.explain("attention.causal", *qkv())
    assert report.selected_kernel.startswith(SDPA)
    assert all(lz.Reason.POLICY_LOCKED_OTHER in reasons for kid, reasons in report.rejection_reasons.items()
               if not kid.startswith(SDPA))
    with pytest.raises(lz.PolicyValidationError, match="'torch_sdpa' .* does not implement 'norm.rms'"):
        lz.lock("norm.rms", "torch_sdpa")
