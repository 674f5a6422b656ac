"""The selection engine and its public face: candidates, constraint filter, scores, choice,
explain reports, select/which/list_kernels/validate, user kernels, reference fallback, plan cache."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.kernel import KernelSpec
from layerzero.reasons import Reason
from layerzero.selection.engine import TRANSFORM_PENALTY, ExecutionPlan
from layerzero.state import runtime
from tests.conftest import tolerance

CPU = frozenset({"cpu"})


def counting_rms(calls: list[str], name: str):
    def impl(x, weight, eps):
        calls.append(name)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    return impl


def ref_rms(x, w, eps=1e-6):
    xd = x.double()
    out = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return out if w is None else out * w.double()


# ----------------------------------------------------------------------------- candidates, filter, score, choice


def test_every_registered_kernel_of_the_op_is_a_candidate():
    x = torch.randn(3, 16)
    report = lz.explain("rms_norm", x)
    runtime.ensure_loaded()
    assert {c.kernel_id for c in report.candidates} == {s.id for s in runtime.registry.candidates("norm.rms")}
    assert {"torch.rms_norm", "reference.rms_norm"} <= {c.kernel_id for c in report.candidates}
    for c in report.candidates:  # each one either rejected with reasons or scored, never both
        assert (c.score is None) == bool(c.rejections), c


def test_user_kernel_competes_and_wins_by_priority():
    calls: list[str] = []
    x, w = torch.randn(4, 32), torch.randn(32)
    assert lz.which("rms_norm", x, w) == "torch.rms_norm"
    lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms(calls, "mine"), platforms=CPU, priority=90)
    assert lz.which("rms_norm", x, w) == "mine.rms"
    out = lz.rms_norm(x, w)
    assert calls == ["mine"], "the selected user kernel is the one that runs"
    torch.testing.assert_close(out.double(), ref_rms(x, w), **tolerance(torch.float32))
    report = lz.explain("rms_norm", x, w)
    assert report.selected_kernel == "mine.rms" and report.score == 90.0
    assert report.scores["torch.rms_norm"] == 50.0 and report.scores["mine.rms"] == 90.0


def test_user_kernel_without_platforms_runs_everywhere():
    """The issue's call: no platforms declared, so the kernel runs on this CPU (it used to be CUDA only)."""
    calls: list[str] = []
    spec = lz.register_kernel(id="mine.rms_norm", ops=("norm.rms",), impl=counting_rms(calls, "mine"), priority=500)
    assert spec.platforms == frozenset({"*"})
    x, w = torch.randn(3, 16), torch.randn(16)
    torch.testing.assert_close(lz.rms_norm(x, w, 1e-6).double(), ref_rms(x, w), **tolerance(torch.float32))
    assert calls == ["mine"] and lz.which("rms_norm", x, w, 1e-6) == "mine.rms_norm"
    cuda_only = lz.register_kernel(id="mine.rms_cuda", ops="norm.rms", impl=counting_rms(calls, "c"), platforms="cuda",
                                   priority=900)
    assert cuda_only.platforms == frozenset({"cuda"}) and cuda_only.ops == ("norm.rms",)
    reasons = lz.explain("rms_norm", x, w, 1e-6).rejection_reasons["mine.rms_cuda"]
    assert reasons == [Reason.PLATFORM_MISMATCH]


def test_register_kernel_one_platform_as_a_string_is_that_platform():
    spec = lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms([], "m"), platforms="cpu")
    assert spec.platforms == frozenset({"cpu"})  # not {"c", "p", "u"}
    spec = lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms([], "m"), platforms=["cpu", "cuda"])
    assert spec.platforms == frozenset({"cpu", "cuda"})


@pytest.mark.parametrize("fields, error, message", [
    (dict(ops=("norm.rmss",)), lz.UnknownNameError,
     "register_kernel('mine.k'): ops: unknown operation 'norm.rmss'; did you mean 'norm.rms'"),
    (dict(ops=("attention",)), lz.UnknownNameError, "did you mean 'attention.causal'"),
    (dict(platforms="cdua"), lz.UnknownNameError, "unknown platform 'cdua'; did you mean 'cuda'"),
    (dict(platforms="cuda:0"), lz.UnknownNameError, "unknown platform 'cuda:0'"),
    (dict(platforms=()), lz.InvalidInputError, "platforms: expected a device type"),
    (dict(platforms=[1]), lz.InvalidInputError, "platforms: expected a device type ('cpu', 'cuda', ...) or '*'"),
    (dict(ops=()), lz.InvalidInputError, "ops: expected an op id such as 'norm.rms'"),
    (dict(dtypes="float16"), lz.InvalidInputError, "dtypes: expected a torch.dtype or a non-empty collection"),
    (dict(priority="high"), lz.InvalidInputError, "priority: expected a number"),
    (dict(max_head_dim=128.0), lz.InvalidInputError, "max_head_dim: expected an integer, got 128.0"),
    (dict(supports_gqa="yes"), lz.InvalidInputError, "supports_gqa: expected True or False, got 'yes'"),
    (dict(mask_kinds="boolean"), lz.UnknownNameError, "unknown mask kind 'boolean'; did you mean 'bool'"),
    (dict(layout="BHDS"), lz.UnknownNameError, "unknown layout 'BHDS'"),
    (dict(impl=42), lz.InvalidInputError, "impl: expected a callable"),
    (dict(id="nodot"), lz.InvalidInputError, "id: expected a kernel id of the form 'backend.name'"),
])
def test_register_kernel_checks_ops_and_field_types(fields, error, message):
    runtime.ensure_loaded()
    before = runtime.generation
    base = dict(id="mine.k", ops=("norm.rms",), impl=counting_rms([], "k"))
    with pytest.raises(error) as raised:
        lz.register_kernel(**{**base, **fields})
    assert message in str(raised.value)
    assert "mine.k" not in runtime.registry.kernels and runtime.generation == before  # nothing registered


def test_lower_priority_user_kernel_loses_and_a_higher_one_takes_over():
    calls: list[str] = []
    x = torch.randn(2, 8)
    lz.register_kernel(id="slow.rms", ops=("norm.rms",), impl=counting_rms(calls, "slow"), platforms=CPU, priority=10)
    assert lz.which("rms_norm", x) == "torch.rms_norm"
    lz.rms_norm(x)
    assert calls == []
    lz.register_kernel(KernelSpec(id="fast.rms", ops=("norm.rms",), impl=counting_rms(calls, "fast"), platforms=CPU,
                                  priority=99))
    lz.rms_norm(x)  # registration dropped the cached plan: the new kernel runs at once
    assert calls == ["fast"]


def test_register_kernel_replaces_the_same_id():
    calls: list[str] = []
    x = torch.randn(2, 8)
    lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms(calls, "v1"), platforms=CPU, priority=90)
    lz.rms_norm(x)
    lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms(calls, "v2"), platforms=CPU, priority=90)
    lz.rms_norm(x)
    assert calls == ["v1", "v2"]
    assert [c.kernel_id for c in lz.explain("rms_norm", x).candidates].count("mine.rms") == 1


def test_constraint_filter_rejects_a_user_kernel_with_its_reason():
    calls: list[str] = []
    lz.register_kernel(id="mine.rms64", ops=("norm.rms",), impl=counting_rms(calls, "f64"), platforms=CPU,
                       priority=95, dtypes=frozenset({torch.float64}), max_hidden_size=64)
    x32, x64, wide = torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 128, dtype=torch.float64)
    assert lz.explain("rms_norm", x32).rejection_reasons["mine.rms64"] == [Reason.DTYPE_UNSUPPORTED]
    assert lz.explain("rms_norm", wide).rejection_reasons["mine.rms64"] == [Reason.HIDDEN_SIZE_TOO_LARGE]
    assert lz.which("rms_norm", x32) == lz.which("rms_norm", wide) == "torch.rms_norm"
    assert lz.which("rms_norm", x64) == "mine.rms64"
    lz.rms_norm(x64)
    lz.rms_norm(x32)
    assert calls == ["f64"]


def _attn_impl(calls, name):
    def impl(q, k, v, *rest):
        calls.append((name, q.shape))
        return torch.zeros_like(q)

    return impl


def test_layout_transform_costs_score_and_the_native_layout_wins():
    """Two equal-priority kernels: the one that needs no BSHD<->BHSD transpose wins, per layout."""
    calls: list = []
    for layout in ("BSHD", "BHSD"):
        lz.register_kernel(id=f"mine.{layout.lower()}", ops=("attention.full",), impl=_attn_impl(calls, layout),
                           platforms=CPU, priority=97, layout=layout)
    q = torch.randn(1, 5, 2, 64)  # BSHD: S=5, H=2
    report = lz.explain("attention", q, q, q)
    assert report.selected_kernel == "mine.bshd"
    assert report.scores["mine.bhsd"] == 97 - TRANSFORM_PENALTY
    bhsd_candidate = next(c for c in report.candidates if c.kernel_id == "mine.bhsd")
    assert bhsd_candidate.transforms == ("BSHD->BHSD",)
    lz.attention(q, q, q)
    assert calls == [("BSHD", (1, 5, 2, 64))], "the BSHD kernel gets the tensors untransposed"
    qb = q.transpose(1, 2).contiguous()
    assert lz.which("attention", qb, qb, qb, layout="BHSD") == "mine.bhsd"


def test_transposing_binding_gives_the_kernel_its_layout_and_returns_the_callers():
    calls: list = []
    lz.register_kernel(id="mine.bhsd", ops=("attention.full",), impl=_attn_impl(calls, "bhsd"), platforms=CPU,
                       priority=99, layout="BHSD")
    q = torch.randn(2, 7, 3, 64)
    out = lz.attention(q, q, q)
    assert calls == [("bhsd", (2, 3, 7, 64))] and out.shape == (2, 7, 3, 64)


def test_choice_among_equal_scores_is_deterministic():
    x = torch.randn(2, 8)
    for name in ("tie_b.rms", "tie_a.rms"):
        lz.register_kernel(id=name, ops=("norm.rms",), impl=counting_rms([], name), platforms=CPU, priority=93)
    first = lz.which("rms_norm", x)
    lz.reset()
    for name in ("tie_a.rms", "tie_b.rms"):
        lz.register_kernel(id=name, ops=("norm.rms",), impl=counting_rms([], name), platforms=CPU, priority=93)
    assert lz.which("rms_norm", x) == first


@pytest.mark.parametrize(
    ("kwargs", "op"),
    [({}, "attention.full"), ({"is_causal": True}, "attention.causal"),
     ({"attn_mask": torch.ones(4, 4, dtype=torch.bool)}, "attention.masked"),
     ({"window_size": (2, 0), "is_causal": True}, "attention.sliding_window")],
)
def test_attention_calls_map_to_op_ids(kwargs, op):
    q = torch.randn(1, 4, 2, 16)
    assert lz.explain("attention", q, q, q, **kwargs).context.op == op


# ----------------------------------------------------------------------------- reference fallback


def test_reference_fallback_when_every_candidate_is_rejected(caplog):
    """Every accelerated rms_norm kernel rejected by its constraints: the reference runs, and says so once."""
    runtime.ensure_loaded()
    torch_spec = runtime.registry.kernel("torch.rms_norm")
    lz.register_kernel(KernelSpec(id="torch.rms_norm", ops=("norm.rms",), impl=torch_spec.impl, platforms=CPU,
                                  dtypes=frozenset({torch.float64})))  # no float32 any more
    x, w = torch.randn(3, 40), torch.randn(40)
    report = lz.explain("rms_norm", x, w)
    assert report.fallback and report.selected_kernel == "reference.rms_norm"
    assert all(c.rejections for c in report.candidates if c.backend != "reference")
    assert report.rejection_reasons["torch.rms_norm"] == [Reason.DTYPE_UNSUPPORTED]
    assert "reference fallback" in str(report) and "the torch reference runs" in str(report)
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        out = lz.rms_norm(x, w)
        lz.rms_norm(torch.randn(5, 40), w)  # another shape, same op: no second warning
    torch.testing.assert_close(out.double(), ref_rms(x, w), **tolerance(torch.float32))
    warnings = [r for r in caplog.records if "reference" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert lz.select("rms_norm", x, w).fallback


def test_reference_fallback_for_attention_when_backends_are_disabled():
    q = torch.randn(1, 6, 4, 64)
    k = torch.randn(1, 9, 1, 64)
    with lz.disabled():
        report = lz.explain("attention", q, k, k, is_causal=True)
        assert report.selected_kernel == "reference.attention" and report.fallback
        out = lz.attention(q, k, k, is_causal=True)
    from tests.test_attention import reference_attention

    torch.testing.assert_close(out.double(), reference_attention(q, k, k, is_causal=True), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- explain, select, which


def test_explain_report_fields_and_text():
    q = torch.randn(2, 5, 4, 64)
    k = torch.randn(2, 7, 2, 64)
    report = lz.explain(lz.attention, q, k, k, is_causal=True)  # the function works as well as its name
    assert report.op == "attention.causal" and report.selected_kernel in runtime.registry.kernels
    assert report.score == report.scores[report.selected_kernel] == max(report.scores.values())
    assert report.cached is False
    reasons = report.rejection_reasons
    assert isinstance(reasons, dict) and all(isinstance(r, Reason) for rs in reasons.values() for r in rs)
    assert Reason.PLATFORM_MISMATCH in reasons["torch.sdpa_flash"]
    assert Reason.CAUSAL_NON_SQUARE in reasons["torch.sdpa_flash"]  # 5 queries, 7 keys
    text = str(report)
    first = text.splitlines()[0]
    assert first == f"op attention.causal: selected {report.selected_kernel} (score {report.score:g})"
    assert "context: op=attention.causal" in text and "seq_len_q=5 seq_len_k=7" in text
    assert f" * {report.selected_kernel}" in text, "the choice is marked"
    flash_line = next(line for line in text.splitlines() if "torch.sdpa_flash " in line)
    assert "rejected: PLATFORM_MISMATCH: device cpu, kernel runs on cuda" in flash_line
    math_line = next(line for line in text.splitlines() if "torch.sdpa_math" in line)
    assert "score" in math_line and "(priority 20)" in math_line and "transforms=BSHD->BHSD" in math_line


def test_cache_hit_on_a_repeated_call():
    x, w = torch.randn(4, 64), torch.randn(64)
    assert lz.explain("rms_norm", x, w).cached is False
    computes = runtime.plans.computes
    lz.rms_norm(x, w)
    assert runtime.plans.computes == computes + 1
    plan = lz.select("rms_norm", x, w)
    for _ in range(3):
        lz.rms_norm(torch.randn(4, 64), w, 1e-3)  # new values and eps, same signature
    assert runtime.plans.computes == computes + 1, "a repeated call signature must not select again"
    assert lz.select("rms_norm", x, w) is plan
    assert lz.explain("rms_norm", x, w).cached is True
    lz.rms_norm(torch.randn(5, 64), w)  # another shape: one more selection
    assert runtime.plans.computes == computes + 2


def test_registration_invalidates_cached_plans():
    x = torch.randn(2, 8)
    lz.rms_norm(x)
    generation = runtime.generation
    lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=counting_rms([], "m"), platforms=CPU, priority=91)
    assert runtime.generation > generation
    assert lz.explain("rms_norm", x).cached is False
    assert lz.which("rms_norm", x) == "mine.rms"


def test_select_returns_a_runnable_plan():
    x, w = torch.randn(3, 24), torch.randn(24)
    plan = lz.select("rms_norm", x, w)
    assert isinstance(plan, lz.ExecutionPlan)
    assert plan.kernel_id == lz.which("rms_norm", x, w) and plan.op == "norm.rms" and not plan.fallback
    torch.testing.assert_close(plan(x, w, 1e-6).double(), ref_rms(x, w), **tolerance(torch.float32))
    q = torch.randn(1, 4, 2, 64)
    assert "BSHD->BHSD" in lz.select("attention", q, q, q, is_causal=True).transforms or \
        runtime.registry.kernel(lz.which("attention", q, q, q, is_causal=True)).layout == "BSHD"


# ----------------------------------------------------------------------------- the miss path's shortcuts

MISS_CALLS = [
    dict(shape=(1, 16, 4, 64)),
    dict(shape=(2, 7, 4, 80), is_causal=True),
    dict(shape=(1, 1, 8, 128), kv_heads=2, is_causal=True),
    dict(shape=(1, 33, 2, 256), mask="bool"),
    dict(shape=(1, 12, 4, 96), mask="float", dtype=torch.float64),
    dict(shape=(2, 9, 4, 64), dtype=torch.bfloat16, dropout_p=0.1),
    dict(shape=(1, 5, 2, 320)),
    dict(shape=(1, 8, 2, 64), window_size=(4, 0), softcap=30.0),
    dict(shape=(1, 8, 2, 64), grad=True),
    dict(shape=(1, 8, 2, 64), layout="BHSD", is_causal=True),
]


def _miss_call(shape, kv_heads=None, is_causal=False, mask=None, dtype=torch.float32, dropout_p=0.0, grad=False,
               layout="BSHD", **kwargs):
    b, s, h, d = shape
    q = torch.randn(b, s, h, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, s, kv_heads or h, d, dtype=dtype)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(s, s) > 0.3
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(s, s, dtype=dtype)
    if layout == "BHSD":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return (q, k, k), dict(is_causal=is_causal, dropout_p=dropout_p, layout=layout, **kwargs)


@pytest.mark.parametrize("call", MISS_CALLS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_miss_path_chooses_what_the_complete_evaluation_chooses(call):
    """The miss path skips kernels rejected for shape-independent reasons and stops at the first
    reason; explain evaluates everything. They must agree on the winner and its score."""
    lz.register_kernel(id="mine.attn_small_d", ops=("attention.full", "attention.causal"), impl=lambda *a: None,
                       platforms=CPU, priority=95, max_head_dim=64, mask_kinds=frozenset({"none"}))
    args, kwargs = _miss_call(**call)
    report = lz.explain("attention", *args, **kwargs)
    plan = lz.select("attention", *args, **kwargs)
    assert plan.kernel_id == report.selected_kernel
    assert plan.score == report.score
    assert plan.fallback == report.fallback


def test_miss_path_ties_and_transforms_match_the_complete_evaluation():
    """Equal priorities: the larger id wins; a layout transform costs a kernel its tie."""
    for kid, layout in (("tie.a", "BSHD"), ("tie.c", "BHSD"), ("tie.b", "BSHD"), ("tie.d", "BHSD")):
        lz.register_kernel(id=kid, ops=("attention.full",), impl=lambda *a: None, platforms=CPU, priority=96,
                           layout=layout, mask_kinds=frozenset({"none"}))
    q = torch.randn(1, 6, 2, 64)
    report = lz.explain("attention", q, q, q)
    assert report.selected_kernel == "tie.b"
    assert lz.select("attention", q, q, q).kernel_id == "tie.b"
    q = q.transpose(1, 2)
    assert lz.explain("attention", q, q, q, layout="BHSD").selected_kernel == "tie.d"
    assert lz.select("attention", q, q, q, layout="BHSD").kernel_id == "tie.d"
    with lz.disabled("tie"):  # the disabled backend's kernels drop out on the miss path as in explain
        winner = lz.explain("attention", q, q, q, layout="BHSD").selected_kernel
        assert not winner.startswith("tie.")
        assert lz.select("attention", q, q, q, layout="BHSD").kernel_id == winner


def test_explain_still_lists_every_kernel_after_misses():
    q = torch.randn(1, 16, 4, 64)
    before = str(lz.explain("attention", q, q, q))
    for s in (3, 5, 7):
        x = torch.randn(1, s, 4, 64)
        lz.attention(x, x, x)
    lz.attention(q, q, q)
    report = lz.explain("attention", q, q, q)
    assert {c.kernel_id for c in report.candidates} == {s.id for s in runtime.registry.candidates("attention.full")}
    assert str(report).replace(", cached", "") == before


def test_perfdb_has_rows_only_for_ops_it_measured(tmp_path):
    """The miss path skips PerfDB lookups for an op without rows; rows for the op are still read."""
    from layerzero.distributed import SharedMeasurements
    from layerzero.ops.attention import ATTENTION
    from layerzero.perf.perfdb import Bucket, PerfRecord, current_signature

    q = torch.randn(1, 32, 2, 16)
    ctx = ATTENTION.context(q, q, q, None, True)
    db = lz.perfdb(tmp_path / "perf.sqlite")
    assert not runtime.measurements.has_rows("attention.causal")
    base = lz.which("attention", q, q, q, is_causal=True)
    assert base != "torch.sdpa_math"  # priority 20: never the priority choice

    def row(kernel: str, median: float) -> PerfRecord:
        version = runtime._backend_version(kernel) or ""
        return PerfRecord(kernel, ctx.op, ctx.dtype_name, Bucket.of(ctx), current_signature("cpu", 0), version,
                          median, median * 1.1, 10, (0.05 * median) ** 2, True, 0.0, shape="test")

    db.record([row(base, 50.0), row("torch.sdpa_math", 20.0)])
    assert not runtime.measurements.has_rows("attention.causal"), "the index is read once, as lookups are"
    runtime.measurements.reload()
    runtime.bump()
    assert runtime.measurements.has_rows("attention.causal")
    assert not runtime.measurements.has_rows("attention.full")
    shared = SharedMeasurements([row(base, 50.0)])  # rank 0's rows, as sync_selection shares them
    assert shared.has_rows("attention.causal") and not shared.has_rows("attention.full")
    assert lz.which("attention", q, q, q, is_causal=True) == "torch.sdpa_math"
    assert lz.select("attention", q, q, q, is_causal=True).kernel_id == "torch.sdpa_math"


def test_miss_path_asks_health_once_a_kernel_failed():
    x = torch.randn(2, 8)
    calls: list[str] = []

    def broken(x, weight, eps):
        raise RuntimeError("boom")

    lz.register_kernel(id="mine.rms", ops=("norm.rms",), impl=broken, platforms=CPU, priority=99)
    lz.register_kernel(id="mine.rms2", ops=("norm.rms",), impl=counting_rms(calls, "two"), platforms=CPU, priority=98)
    lz.configure_health(failure_threshold=1)
    lz.rms_norm(x)  # mine.rms fails, its breaker opens, the call falls back
    assert lz.which("rms_norm", x) == "mine.rms2"
    assert Reason.KERNEL_UNHEALTHY in lz.explain("rms_norm", x).rejection_reasons["mine.rms"]


def test_selection_context_init_keeps_the_dataclass_contract():
    """SelectionContext's and ExecutionPlan's __init__ fill slots directly (speed); they must behave as the
    generated ones."""
    import dataclasses

    ctx = lz.SelectionContext("attention.full", head_dim=64)
    for f in dataclasses.fields(lz.SelectionContext):
        if f.name not in ("op", "head_dim"):
            assert getattr(ctx, f.name) == f.default, f.name
    assert (ctx.op, ctx.head_dim) == ("attention.full", 64)
    assert lz.SelectionContext("attention.full", "cuda", 1).device_index == 1  # positional, in field order
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.head_dim = 128  # type: ignore[misc]
    with pytest.raises(TypeError):
        lz.SelectionContext()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lz.SelectionContext("attention.full", head_size=64)  # type: ignore[call-arg]
    assert ctx.replace(batch=2) == lz.SelectionContext("attention.full", head_dim=64, batch=2)
    assert hash(ctx) == hash(lz.SelectionContext("attention.full", head_dim=64))
    assert ctx.replace(tp_rank=3) == ctx  # tp_rank and isa stay out of equality
    plan = ExecutionPlan("k.id", "attention.full", print, ("contiguous",), 2.0)
    assert (plan.run, plan.generation, plan.fallback) == (print, 0, False)
    assert plan == ExecutionPlan("k.id", "attention.full", len, ("contiguous",), 2.0)  # run: compare=False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.score = 3.0  # type: ignore[misc]


# ----------------------------------------------------------------------------- list_kernels, validate


def test_list_kernels_by_id_and_op_pattern():
    sdpa = {k.id for k in lz.list_kernels("torch.sdpa_*")}
    assert {"torch.sdpa_flash", "torch.sdpa_efficient", "torch.sdpa_cudnn", "torch.sdpa_math"} <= sdpa
    assert all(i.startswith("torch.sdpa_") for i in sdpa)
    norms = lz.list_kernels("norm.rms")  # matches the op id
    assert {"torch.rms_norm", "reference.rms_norm"} <= {k.id for k in norms}
    assert all("norm.rms" in k.ops for k in norms)
    info = next(k for k in norms if k.id == "torch.rms_norm")
    assert info.available and info.backend == "torch" and info.priority == 50
    assert lz.list_kernels("no_such_thing*") == []
    ids = [k.id for k in lz.list_kernels()]
    assert ids == sorted(ids)


def test_validate_reports_reasons_without_consulting_policy():
    q = torch.randn(1, 4, 2, 64)
    assert lz.validate("torch.sdpa_math", "attention", q, q, q) == (True, [])
    ok, reasons = lz.validate("torch.sdpa_flash", "attention", q, q, q)
    assert not ok and [r.reason for r in reasons] == [Reason.PLATFORM_MISMATCH, Reason.DTYPE_UNSUPPORTED]
    # the same Rejections (code and values) that explain lists for the kernel
    explained = next(c for c in lz.explain("attention", q, q, q).candidates if c.kernel_id == "torch.sdpa_flash")
    assert reasons == explained.rejections
    assert reasons[0].detail == "device cpu, kernel runs on cuda"
    ok, reasons = lz.validate("torch.sdpa_efficient", lz.attention, q, torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64))
    assert Reason.GQA_UNSUPPORTED in [r.reason for r in reasons]
    lz.configure(deny=["torch.sdpa_math"])
    assert lz.validate("torch.sdpa_math", "attention", q, q, q) == (True, [])
    assert Reason.POLICY_DENIED in lz.explain("attention", q, q, q).rejection_reasons["torch.sdpa_math"]


def test_validate_rejects_bad_input_with_the_op_error():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(lz.InvalidInputError, match="head_dim 64 \\(as q\\), got 32"):
        lz.validate("torch.sdpa_math", "attention", q, q[..., :32], q[..., :32])
