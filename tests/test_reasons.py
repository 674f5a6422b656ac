"""Every Reason code is triggered by a test, through `check_constraints` or the engine.

`TRIGGERED` collects the codes each test saw; `test_every_reason_is_triggered` (run last in this
module) compares it with the enum, minus `NO_MECHANISM`: codes that nothing in LayerZero emits yet.
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.kernel import Backend, KernelSpec, check_constraints
from layerzero.reasons import Reason, Rejection
from layerzero.state import runtime

TRIGGERED: set[Reason] = set()

# Codes with no producer in src/layerzero: none. (Input mismatches are InvalidInputError before
# selection; layouts and contiguity are transforms, not rejections; paged KV is its own op: codes
# for those were removed rather than kept without a mechanism.)
NO_MECHANISM: set[Reason] = set()


def _impl(*args):
    raise AssertionError("never run")


def spec(**kw) -> KernelSpec:
    base = {"id": "test.kernel", "ops": ("attention.full", "attention.causal", "norm.rms"), "impl": _impl,
            "platforms": frozenset({"cpu", "cuda"})}
    return KernelSpec(**{**base, **kw})


def ctx(**kw) -> SelectionContext:
    base = {"op": "attention.full", "device_type": "cpu", "dtype": torch.float16, "batch": 2, "seq_len_q": 16,
            "seq_len_k": 16, "num_heads": 8, "num_kv_heads": 8, "head_dim": 64, "head_dim_v": 64, "layout": "BHSD"}
    return SelectionContext(**{**base, **kw})


def cuda(**kw) -> SelectionContext:
    return ctx(device_type="cuda", sm=kw.pop("sm", 90), generation=kw.pop("generation", "hopper"), **kw)


# (reason, KernelSpec fields, SelectionContext) for every code the generic check emits.
CONSTRAINT_CASES = [
    (Reason.OP_UNSUPPORTED, {"ops": ("norm.rms",)}, ctx()),
    (Reason.PLATFORM_MISMATCH, {"platforms": frozenset({"cuda"})}, ctx()),
    (Reason.SM_TOO_OLD, {"min_sm": 100}, cuda(sm=90)),
    (Reason.SM_TOO_NEW, {"max_sm": 89}, cuda(sm=90)),
    (Reason.GPU_GENERATION_UNSUPPORTED, {"generations": frozenset({"blackwell"})}, cuda()),
    (Reason.CPU_ISA_UNSUPPORTED, {"cpu_isa": frozenset({"amx_tile", "no_such_isa"})}, ctx(isa=frozenset({"avx2"}))),
    (Reason.DTYPE_UNSUPPORTED, {"dtypes": frozenset({torch.bfloat16})}, ctx(dtype=torch.float16)),
    (Reason.HEAD_DIM_TOO_LARGE, {"max_head_dim": 128}, ctx(head_dim=256, head_dim_v=256)),
    (Reason.HEAD_DIM_TOO_SMALL, {"min_head_dim": 32}, ctx(head_dim=16, head_dim_v=16)),
    (Reason.HEAD_DIM_ALIGNMENT, {"head_dim_multiple": 8}, ctx(head_dim=81, head_dim_v=81)),
    (Reason.HEAD_DIM_UNSUPPORTED, {"head_dims": frozenset({64, 128, 256})}, ctx(head_dim=80, head_dim_v=80)),
    (Reason.HEAD_DIM_V_MISMATCH, {}, ctx(head_dim_v=128)),
    (Reason.GQA_UNSUPPORTED, {"supports_gqa": False}, ctx(num_kv_heads=2)),
    (Reason.CAUSAL_UNSUPPORTED, {"supports_causal": False}, ctx(op="attention.causal", is_causal=True)),
    (Reason.NON_CAUSAL_UNSUPPORTED, {"supports_non_causal": False}, ctx()),
    (Reason.CAUSAL_NON_SQUARE, {"causal_non_square": False}, ctx(op="attention.causal", is_causal=True, seq_len_q=3)),
    (Reason.BOOL_MASK_UNSUPPORTED, {}, ctx(mask_kind="bool")),
    (Reason.FLOAT_MASK_UNSUPPORTED, {"mask_kinds": frozenset({"none", "bool"})}, ctx(mask_kind="float")),
    (Reason.MASK_UNSUPPORTED, {}, ctx(mask_kind="block_sparse")),
    (Reason.DROPOUT_UNSUPPORTED, {}, ctx(dropout=True)),
    (Reason.WINDOW_UNSUPPORTED, {}, ctx(window=(4, 0))),
    (Reason.SOFTCAP_UNSUPPORTED, {}, ctx(softcap=30.0)),
    (Reason.ALIBI_UNSUPPORTED, {}, ctx(alibi=True)),
    (Reason.KV_LAYOUT_UNSUPPORTED, {"kv_layouts": frozenset({"NHD"})}, ctx(kv_layout="HND", page_size=16)),
    (Reason.PAGE_SIZE_UNSUPPORTED, {"page_sizes": frozenset({16, 32})}, ctx(kv_layout="NHD", page_size=8)),
    (Reason.PAGE_SIZE_UNSUPPORTED, {"min_page_size": 16}, ctx(kv_layout="NHD", page_size=1)),
    (Reason.BACKWARD_UNSUPPORTED, {}, ctx(requires_grad=True)),
    (Reason.NOT_GRAPH_SAFE, {"graph_safe": False}, cuda(graph_capture=True)),
    (Reason.NOT_DETERMINISTIC, {"deterministic": False}, ctx(deterministic=True)),
    (Reason.HIDDEN_SIZE_TOO_LARGE, {"max_hidden_size": 8192},
     SelectionContext(op="norm.rms", dtype=torch.float16, hidden_size=16384, num_rows=4)),
    (Reason.SEQ_LEN_TOO_LONG, {"max_seq_len": 8}, ctx(seq_len_k=9)),
    (Reason.SEQ_LEN_TOO_SHORT, {"min_seq_len": 32}, ctx()),
    (Reason.BATCH_TOO_LARGE, {"max_batch": 1}, ctx()),
    (Reason.TP_UNSUPPORTED, {"tp_sizes": frozenset({1, 2})}, ctx(tp_size=8)),
    (Reason.CUSTOM_CHECK_FAILED, {"check": lambda c: [Rejection(Reason.CUSTOM_CHECK_FAILED, "odd batch")]}, ctx()),
]


@pytest.mark.parametrize(("reason", "fields", "context"), CONSTRAINT_CASES, ids=lambda x: getattr(x, "name", ""))
def test_constraint_emits_exactly_its_reason(reason, fields, context):
    """The violated constraint, and only it, is reported; the same kernel accepts a fitting context."""
    kernel = spec(**fields)
    rejections = check_constraints(kernel, context)
    assert [r.reason for r in rejections] == [reason], rejections
    assert rejections[0].detail, "a rejection carries the concrete values"
    assert reason.value in str(rejections[0])
    TRIGGERED.add(reason)


def test_constraints_accept_a_fitting_context():
    assert check_constraints(spec(), ctx()) == []
    assert check_constraints(spec(min_sm=80, max_sm=90, generations=frozenset({"hopper"})), cuda()) == []
    assert check_constraints(spec(head_dims=frozenset({64}), head_dim_multiple=8, max_seq_len=16, max_batch=2,
                                  tp_sizes=frozenset({1})), ctx()) == []


def test_backend_check_runs_only_when_the_declared_constraints_pass():
    calls = []
    kernel = spec(dtypes=frozenset({torch.float32}), check=lambda c: calls.append(c) or [])
    assert [r.reason for r in check_constraints(kernel, ctx())] == [Reason.DTYPE_UNSUPPORTED]
    assert calls == []


def test_every_violation_is_listed():
    kernel = spec(platforms=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16}), max_head_dim=32)
    reasons = [r.reason for r in check_constraints(kernel, ctx())]
    assert reasons == [Reason.PLATFORM_MISMATCH, Reason.DTYPE_UNSUPPORTED, Reason.HEAD_DIM_TOO_LARGE]


# ----------------------------------------------------------------------------- through the engine


def _q(dtype=torch.float32):
    return torch.randn(1, 4, 2, 16, dtype=dtype)


def _rejections_of(kernel_id, op="attention", *args, **kwargs):
    args = args or (_q(), _q(), _q())
    return lz.explain(op, *args, **kwargs).rejection_reasons.get(kernel_id, [])


def test_backend_not_installed():
    lz.register_backend(Backend("ghostlib", (spec(id="ghostlib.attn", platforms=frozenset({"cpu"})),),
                                module="layerzero_no_such_module_xyz"))
    reasons = _rejections_of("ghostlib.attn")
    assert reasons == [Reason.BACKEND_NOT_INSTALLED]
    ok, why = lz.validate("ghostlib.attn", "attention", _q(), _q(), _q())
    assert not ok and [r.reason for r in why] == [Reason.BACKEND_NOT_INSTALLED]
    assert "layerzero_no_such_module_xyz" in why[0].detail
    TRIGGERED.add(Reason.BACKEND_NOT_INSTALLED)


def test_backend_version_unsupported():
    lz.register_backend(Backend("oldyaml", (spec(id="oldyaml.attn", platforms=frozenset({"cpu"})),),
                                module="yaml", distribution="PyYAML", min_version="999.0"))
    assert _rejections_of("oldyaml.attn") == [Reason.BACKEND_VERSION_UNSUPPORTED]
    TRIGGERED.add(Reason.BACKEND_VERSION_UNSUPPORTED)


def test_policy_locked_other():
    lz.lock("attention.full", "torch.sdpa_math")
    q = _q()
    report = lz.explain("attention", q, q, q)
    assert report.selected_kernel == "torch.sdpa_math"
    assert Reason.POLICY_LOCKED_OTHER in report.rejection_reasons["torch.sdpa_flash_cpu"]
    TRIGGERED.add(Reason.POLICY_LOCKED_OTHER)


def test_policy_denied_and_not_allowed():
    q = _q()
    lz.configure(deny=["torch.sdpa_flash_cpu"])
    assert Reason.POLICY_DENIED in _rejections_of("torch.sdpa_flash_cpu", "attention", q, q, q)
    TRIGGERED.add(Reason.POLICY_DENIED)
    lz.reset()
    lz.configure(allow=["torch.sdpa_math"])
    report = lz.explain("attention", q, q, q)
    assert Reason.POLICY_NOT_ALLOWED in report.rejection_reasons["torch.sdpa_flash_cpu"]
    assert report.selected_kernel == "torch.sdpa_math"
    TRIGGERED.add(Reason.POLICY_NOT_ALLOWED)


def test_backend_disabled():
    x = torch.randn(2, 8)
    with lz.disabled("torch"):
        report = lz.explain("rms_norm", x)
        assert report.rejection_reasons["torch.rms_norm"] == [Reason.BACKEND_DISABLED]
        assert report.selected_kernel == "reference.rms_norm" and report.fallback
    assert lz.which("rms_norm", x) == "torch.rms_norm"
    TRIGGERED.add(Reason.BACKEND_DISABLED)


def test_kernel_and_backend_unhealthy():
    runtime.ensure_loaded()
    kernel = runtime.registry.kernel("torch.rms_norm")
    lz.configure_health(failure_threshold=2, backend_failure_threshold=3)
    for _ in range(3):
        runtime.health.record_failure(kernel, RuntimeError("boom"))
    runtime.bump()
    reasons = _rejections_of("torch.rms_norm", "rms_norm", torch.randn(2, 8))
    assert Reason.KERNEL_UNHEALTHY in reasons and Reason.BACKEND_UNHEALTHY in reasons
    TRIGGERED.update({Reason.KERNEL_UNHEALTHY, Reason.BACKEND_UNHEALTHY})


def test_workspace_too_large():
    from layerzero.monitor.memory import MemoryConfig

    lz.register_kernel(spec(id="greedy.rms", ops=("norm.rms",), platforms=frozenset({"cpu"}), priority=99,
                            workspace_bytes=lambda c: 1 << 40))
    runtime.memory.configure(MemoryConfig(free_memory=lambda device, index: (1 << 30, 1 << 31)))
    x = torch.randn(2, 8)
    report = lz.explain("rms_norm", x)
    assert report.rejection_reasons["greedy.rms"] == [Reason.WORKSPACE_TOO_LARGE]
    assert report.selected_kernel == "torch.rms_norm"
    TRIGGERED.add(Reason.WORKSPACE_TOO_LARGE)


def test_perf_incorrect(monkeypatch):
    """A kernel that tuning measured wrong for this bucket is rejected."""

    class Record:
        correct, error, max_error, shape, median_us = False, "", 0.5, "(2, 8)", 1.0

    class Measurements:
        def has_rows(self, op):
            return True

        def lookup(self, kernel_id, ctx):
            return Record() if kernel_id == "torch.rms_norm" else None

        def score(self, kernel_id, ctx, regime="eager"):
            return None

    runtime.ensure_loaded()
    monkeypatch.setattr(runtime, "measurements", Measurements())
    report = lz.explain("rms_norm", torch.randn(2, 8))
    assert report.rejection_reasons["torch.rms_norm"] == [Reason.PERF_INCORRECT]
    TRIGGERED.add(Reason.PERF_INCORRECT)


def test_quant_reasons_from_backend_checks():
    """QUANT_FORMAT_UNSUPPORTED and FP8_NEEDS_SM89 come from the quant kernels' own checks."""
    runtime.ensure_loaded()
    seen = set()
    for kernel in runtime.registry.kernels.values():
        if kernel.check is None or not any(op.startswith("quant.") for op in kernel.ops):
            continue
        for fmt in ("no_such_format", "fp8_e4m3:per_tensor", "fp8_e4m3:per_channel"):
            for dtype in kernel.dtypes:
                c = SelectionContext(op=kernel.ops[0], device_type="cuda", sm=80, generation="ampere", dtype=dtype,
                                     quant_format=fmt)
                seen.update(r.reason for r in check_constraints(kernel, c))
    if not seen:
        pytest.skip("no quantization kernels registered")
    assert {Reason.QUANT_FORMAT_UNSUPPORTED, Reason.FP8_NEEDS_SM89} <= seen, seen
    TRIGGERED.update({Reason.QUANT_FORMAT_UNSUPPORTED, Reason.FP8_NEEDS_SM89})


def test_needs_jit_compile_from_the_flashinfer_gate(monkeypatch):
    """FlashInfer kernels whose variant is not compiled are rejected unless JIT is allowed."""
    runtime.ensure_loaded()
    if "flashinfer.prefill" not in runtime.registry.kernels:
        pytest.skip("no FlashInfer backend module")
    import layerzero.backends.flashinfer as flashinfer_backend

    monkeypatch.delenv("LAYERZERO_ALLOW_JIT", raising=False)
    monkeypatch.setattr(flashinfer_backend, "is_compiled", lambda *args: False)  # also where it is AOT-built
    kernel = runtime.registry.kernel("flashinfer.prefill")
    c = cuda(op="attention.causal", is_causal=True, head_dim=128, head_dim_v=128)
    assert [r.reason for r in check_constraints(kernel, c)] == [Reason.NEEDS_JIT_COMPILE]
    TRIGGERED.add(Reason.NEEDS_JIT_COMPILE)


# ----------------------------------------------------------------------------- the codes themselves


def test_codes_are_stable_strings_with_messages():
    for reason in Reason:
        assert reason.value == reason.name, "the code is the member name, for logs and policy reports"
        assert str(reason) == reason.value and reason == reason.value
        assert isinstance(reason.message, str) and len(reason.message) > 10
        assert Reason(reason.value) is reason
    assert len({r.message for r in Reason}) == len(Reason), "two codes share a message"
    assert str(Rejection(Reason.GQA_UNSUPPORTED)) == f"GQA_UNSUPPORTED: {Reason.GQA_UNSUPPORTED.message}"


def test_backend_that_fails_to_import_becomes_unavailable(monkeypatch):
    """A kernel whose library is present but raises ImportError: its backend is marked
    BACKEND_IMPORT_FAILED for the process (no breaker cycling), and the call still returns."""

    def broken(x, weight, eps):
        raise ImportError("libbroken.so: cannot open shared object file")

    lz.register_kernel(id="brokenlib.rms", ops=("norm.rms",), impl=broken, priority=99,
                       platforms=frozenset({"cpu"}))
    backend = runtime.registry.backend("brokenlib")
    x, w = torch.randn(3, 8), torch.randn(8)
    out = lz.rms_norm(x, w)  # the runtime fallback answers this call
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (8,), w, 1e-6))
    report = lz.explain("rms_norm", x, w)
    assert report.rejection_reasons["brokenlib.rms"] == [Reason.BACKEND_IMPORT_FAILED]
    assert "libbroken.so" in str(report)
    monkeypatch.delitem(backend.__dict__, "availability")  # undo the process-wide verdict
    TRIGGERED.add(Reason.BACKEND_IMPORT_FAILED)


def _probed_backend(impl) -> Backend:
    """A user backend whose rms_norm kernel is proven on the CPU before it competes (Backend.probes)."""
    kernel = KernelSpec(id="probed.rms", ops=("norm.rms",), impl=impl, priority=99, platforms=frozenset({"cpu"}))
    return lz.register_backend(Backend("probed", (kernel,), probes=(("probed.rms", "rms_norm"),)))


def test_backend_whose_probe_raises_is_broken():
    def broken(x, weight, eps):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    _probed_backend(broken)
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(lz.rms_norm(x, w), torch.nn.functional.rms_norm(x, (8,), w, 1e-6))
    report = lz.explain("rms_norm", x, w)
    assert report.rejection_reasons["probed.rms"] == [Reason.BACKEND_BROKEN]
    assert "no kernel image is available" in str(report)
    assert lz.health().failures == 0  # the probe failed, no user call did
    TRIGGERED.add(Reason.BACKEND_BROKEN)


def test_backend_not_probed_yet_is_skipped_while_torch_compile_traces(monkeypatch):
    _probed_backend(lambda x, weight, eps: torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps))
    runtime.ensure_loaded()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what dynamo answers while tracing
    traced = ctx(op="norm.rms", dtype=torch.float32, hidden_size=8, num_rows=3)
    report = runtime.engine.evaluate(traced, lambda spec, c: ())
    assert report.rejection_reasons["probed.rms"] == [Reason.BACKEND_UNPROBED]
    TRIGGERED.add(Reason.BACKEND_UNPROBED)


def test_every_reason_is_triggered():
    """Runs last in this module (pytest keeps file order): every code was seen or is listed as unbuilt."""
    missing = set(Reason) - TRIGGERED - NO_MECHANISM
    if len(TRIGGERED) < 20:
        pytest.skip("run the whole module to check coverage of the reason codes")
    assert not missing, f"reason codes no test triggered: {sorted(r.value for r in missing)}"
    assert not (TRIGGERED & NO_MECHANISM), "a code listed as unbuilt was triggered: update NO_MECHANISM"
