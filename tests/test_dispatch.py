"""layerzero.dispatch: the spec's static, dynamic and hot-reload dispatchers over solve, the plan cache
and the policy watcher (issue 20)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import (
    StaticDispatcherBuilder,
    create_dynamic_dispatcher,
    create_hot_reload_dispatcher,
    kernel_registry,
    load_dispatch_config,
)
from layerzero.state import runtime


def qkv(batch: int = 2, seq: int = 32, heads: int = 2, dim: int = 16):
    q = torch.randn(batch, seq, heads, dim)
    return q, torch.randn_like(q), torch.randn_like(q)


def test_import_layerzero_loads_neither_dispatch_nor_telemetry_exporters():
    import subprocess

    code = ("import layerzero, sys; assert 'layerzero.dispatch' not in sys.modules; "
            "assert 'layerzero.telemetry' not in sys.modules and 'opentelemetry' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- dynamic


def test_dynamic_dispatch_is_the_lz_call():
    dispatcher = create_dynamic_dispatcher(kernel_registry=kernel_registry(), backend_registry=kernel_registry())
    q, k, v = qkv()
    out = dispatcher.dispatch("attention.causal", (q, k, v))
    torch.testing.assert_close(out, lz.attention(q, k, v, is_causal=True), rtol=0, atol=0)
    assert dispatcher.which("attention.causal", (q, k, v)) == lz.which("attention.causal", q, k, v)
    x, w = torch.randn(4, 8), torch.ones(8)
    torch.testing.assert_close(dispatcher.dispatch("norm.rms", {"x": x, "weight": w}), lz.rms_norm(x, w))
    torch.testing.assert_close(dispatcher.dispatch("rms_norm", (x, w)), lz.rms_norm(x, w))  # a family name too


def test_dynamic_dispatch_follows_policy():
    dispatcher = create_dynamic_dispatcher()
    q, k, v = qkv()
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return torch.zeros_like(args[0])

    lz.register_kernel(id="spy.attn", ops=("attention.causal",), impl=spy, platforms=frozenset({"cpu"}),
                       priority=1, dtypes=frozenset({torch.float32}), layout="BSHD")
    lz.lock("attention.causal", "spy.attn")
    assert dispatcher.dispatch("attention.causal", (q, k, v)).abs().sum() == 0 and calls


def test_dynamic_dispatch_checks_the_context_and_the_op():
    dispatcher = create_dynamic_dispatcher()
    q, k, v = qkv(batch=2)
    ctx = lz.SelectionContext(op="attention.causal", batch=2, seq_len_q=32, seq_len_k=32, num_heads=2)
    assert dispatcher.dispatch("attention.causal", (q, k, v), context=ctx).shape == q.shape
    with pytest.raises(lz.InvalidInputError, match="context: expected batch=2 \\(as the inputs have\\), got batch=3"):
        dispatcher.dispatch("attention.causal", (q, k, v), context=ctx.replace(batch=3))
    with pytest.raises(lz.InvalidInputError, match="expected inputs of attention.decode"):
        dispatcher.dispatch("attention.decode", (q, k, v))


def test_dynamic_dispatcher_registers_given_kernels():
    spec = lz.KernelSpec(id="given.rms", ops=("norm.rms",), impl=lambda x, w, eps: x * 0 + 7,
                         platforms=frozenset({"cpu"}), priority=99, dtypes=frozenset({torch.float32}))
    dispatcher = create_dynamic_dispatcher(kernel_registry=[spec])
    assert "given.rms" in runtime.registry.kernels
    assert dispatcher.dispatch("norm.rms", torch.randn(2, 4)).eq(7).all()
    with pytest.raises(lz.InvalidInputError, match="kernel_registry: expected KernelSpec objects"):
        create_dynamic_dispatcher(kernel_registry=["given.rms"])


# ---- static


def test_static_dispatcher_solves_its_kernels_and_drops_the_uninstalled_one(caplog):
    runtime.ensure_loaded()
    flash_attn_spec = runtime.registry.kernel("flash_attn.v2")
    dispatcher = (StaticDispatcherBuilder()
                  .with_kernel(flash_attn_spec, operation="attention.causal", default=True)
                  .with_kernel("torch.sdpa_math", operation="attention.causal")
                  .build())
    assert dispatcher.kernels("attention.causal") == ["torch.sdpa_math"]  # no flash-attn on this CPU
    assert "flash_attn.v2 dropped" in dispatcher.notes[0] and "BACKEND_NOT_INSTALLED" in dispatcher.notes[0]
    q, k, v = qkv()
    out = dispatcher.dispatch("attention.causal", (q, k, v))
    torch.testing.assert_close(out, lz.attention(q, k, v, is_causal=True))
    (compiled,) = dispatcher.compiled["attention.causal"]
    assert set(compiled.kernels.values()) == {"torch.sdpa_math"}  # never the engine's own pick (flash_cpu)
    assert lz.which("attention.causal", q, k, v) != "torch.sdpa_math"
    dispatcher.dispatch("attention.causal", (q, k, v))
    assert len(dispatcher.compiled["attention.causal"]) == 1  # solved once per call signature


DOUBLED: list[bool] = []


def doubling_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, window, softcap, alibi):
    """A kernel at module level: a solved module imports kernels by module and name."""
    DOUBLED.append(is_causal)
    return q * 2


def test_static_dispatcher_calls_the_kernel_directly_with_no_selection():
    DOUBLED.clear()
    lz.register_kernel(id="mine.attn", ops=("attention.causal",), impl=doubling_attention,
                       platforms=frozenset({"cpu"}), priority=1, dtypes=frozenset({torch.float32}), layout="BSHD")
    dispatcher = (StaticDispatcherBuilder().with_kernel("mine.attn", operation="attention.causal", default=True)
                  .with_shapes("attention.causal", [(1, 16, 2, 16), (4, 64, 2, 16)], dtypes=[torch.float32],
                               device="cpu")
                  .build())
    q, k, v = qkv(batch=3, seq=40)
    misses = runtime.telemetry.counted().misses.copy()
    torch.testing.assert_close(dispatcher.dispatch("attention.causal", (q, k, v)), q * 2)
    assert DOUBLED == [True]
    assert runtime.telemetry.counted().misses == misses  # no selection ran for the call
    with pytest.raises(lz.NoKernelFoundError, match="none of mine.attn was solved for this attention.causal call"):
        dispatcher.dispatch("attention.causal", qkv(batch=8, seq=40))  # outside the shapes it was built for


def test_static_builder_errors():
    with pytest.raises(lz.UnknownNameError, match="unknown kernel 'nope.attn'"):
        StaticDispatcherBuilder().with_kernel("nope.attn", operation="attention.causal")
    with pytest.raises(lz.InvalidInputError, match="kernel: expected a kernel implementing attention.causal"):
        StaticDispatcherBuilder().with_kernel("torch.rms_norm", operation="attention.causal")
    with pytest.raises(lz.InvalidInputError, match="operation: expected an op static dispatch can solve"):
        StaticDispatcherBuilder().with_kernel("torch.sdpa_math", operation="paged_attention")
    with pytest.raises(lz.BackendNotAvailableError, match="no kernel given for attention.causal can run here"):
        StaticDispatcherBuilder().with_kernel("flash_attn.v2", operation="attention.causal").build()
    builder = StaticDispatcherBuilder().with_kernel("torch.sdpa_math", operation="attention.causal", default=True)
    with pytest.raises(lz.ConfigurationError, match="a default kernel is already set"):
        builder.with_kernel("torch.sdpa_flash_cpu", operation="attention.causal", default=True)
    with pytest.raises(lz.UnknownNameError, match="operation of this static dispatcher 'norm.rms'"):
        builder.build().dispatch("norm.rms", torch.randn(2, 4))


# ---- hot reload / config-driven

SEED_CONFIG = """\
version: "1.0"
rules:
  - operation: "attention.*"
    conditions:
      - field: "batch_size"
        operator: ">"
        value: 32
    kernel: "flashinfer.prefill"

  - operation: "attention.*"
    kernel: "flash_attn"  # Default for smaller batches
"""


def test_dispatch_config_rules_become_ordered_locks(tmp_path):
    path = tmp_path / "dispatch_config.yaml"
    path.write_text(SEED_CONFIG)
    policy = load_dispatch_config(path)
    assert [r.kind for r in policy.locks] == ["lock", "lock"]
    assert policy.locks[0].kernels == ("flashinfer.prefill",) and policy.locks[0].condition_text == "batch_size > 32"
    assert policy.locks[1].backends == ("flash_attn",) and policy.locks[1].condition is None
    assert policy.locks[0].source.endswith("dispatch_config.yaml:3")


def test_dispatch_config_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        rules:
          - operation: "attention.*"
            conditions:
              - {field: batch_size, operator: "=>", value: 3}
            kernel: torch.sdpa_math
        """))
    with pytest.raises(lz.PolicyValidationError, match=r"bad.yaml:4: rules\[0\].conditions\[0\]: operator: expected "
                                                        r"one of =="):
        load_dispatch_config(path)
    path.write_text("rules:\n  - {operation: 'attention.*', kernel: torch.sdpa_math, priority: 3}\n")
    with pytest.raises(lz.PolicyValidationError, match="bad.yaml:2: rules\\[0\\]: unknown key 'priority'"):
        load_dispatch_config(path)


def test_hot_reload_dispatcher_follows_the_file(tmp_path):
    path = tmp_path / "dispatch_config.yaml"
    path.write_text(textwrap.dedent("""\
        version: "1.0"
        rules:
          - operation: "attention.*"
            conditions: [{field: batch_size, operator: ">", value: 2}]
            kernel: torch.sdpa_math
        """))
    small, large = qkv(batch=1), qkv(batch=4)
    free = lz.which("attention.causal", *large)
    assert free != "torch.sdpa_math"
    with create_hot_reload_dispatcher(config_path=str(path), watch_interval_seconds=60) as dispatcher:
        assert lz.which("attention.causal", *large) == "torch.sdpa_math"
        assert lz.which("attention.causal", *small) == free  # its condition does not hold
        assert dispatcher.dispatch("attention.causal", large).shape == large[0].shape
        path.write_text("rules:\n  - {operation: 'attention.*', kernel: torch.sdpa_math}\n")
        assert dispatcher.reload() is True  # what the watcher thread does every interval
        assert lz.which("attention.causal", *small) == "torch.sdpa_math"
        path.write_text("rules:\n  - {operation: 'attention.*', kernel: no_such}\n")
        assert dispatcher.reload() is False and "no_such" in dispatcher.watcher.last_error
        assert lz.which("attention.causal", *small) == "torch.sdpa_math"  # the previous rules stay
    assert runtime.policy_watcher is None


def test_seed_dispatch_config_on_cpu_warns_and_selects_among_the_rest(tmp_path, caplog):
    path = tmp_path / "dispatch_config.yaml"
    path.write_text(SEED_CONFIG)
    with create_hot_reload_dispatcher(config_path=str(path), watch_interval_seconds=60):
        q, k, v = qkv()
        report = lz.explain("attention.causal", q, k, v)
        assert report.selected_kernel  # flash_attn cannot run on CPU: the lock says so and others run
        assert any("lock attention.* -> flash_attn" in n and "cannot run this call" in n for n in report.notes)


@pytest.mark.parametrize("text, message", [
    (b"rules: \xff\xfe", "expected UTF-8 text"),
    ("rules: [" * 5000, "not valid YAML"),
    ("# " + "x" * (1 << 20) + "\nrules: []\n", "bytes, got"),
])
def test_dispatch_config_is_read_as_guardedly_as_a_policy(text, message):
    """Both formats share one YAML reader: undecodable bytes, a parser-exhausting document and an
    oversized one are a PolicyValidationError naming the source, never a crash or a silent replace."""
    from layerzero.policy.loader import parse_dispatch_text

    runtime.ensure_loaded()
    with pytest.raises(lz.PolicyValidationError, match=message):
        parse_dispatch_text(text, runtime.registry, source="dispatch.yaml")
