"""Op ids everywhere: every inspection entry point takes `attention.causal`, `norm.rms`, ... (and
globs where a set makes sense) first or as `operation=`, with the call's inputs or a SelectionContext;
inputs of another op are an error that says what they are (issue 20)."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.ops import FAMILIES, OP_FAMILIES
from layerzero.state import runtime


def qkv(batch: int = 2, seq_q: int = 16, seq_k: int | None = None, heads: int = 4, dim: int = 32):
    q = torch.randn(batch, seq_q, heads, dim)
    k = torch.randn(batch, seq_k or seq_q, heads, dim)
    return q, k, torch.randn_like(k)


def causal_context(**changes: object) -> lz.SelectionContext:
    fields = dict(op="attention.causal", batch=1, seq_len_q=512, seq_len_k=512, num_heads=8, num_kv_heads=8,
                  head_dim=64, head_dim_v=64, layout="BSHD", is_causal=True)
    return lz.SelectionContext(**{**fields, **changes})


def test_op_family_table_covers_every_registered_op_id():
    runtime.ensure_loaded()
    assert set(runtime.registry.by_op) <= set(OP_FAMILIES)
    assert {f for names in OP_FAMILIES.values() for f in names} <= set(FAMILIES)


def test_which_takes_an_op_id_and_its_implied_arguments():
    q, k, v = qkv()
    by_id = lz.explain("attention.causal", q, k, v)
    assert by_id.context.is_causal and by_id.op == "attention.causal"  # is_causal=True implied
    assert lz.which("attention.causal", q, k, v) == lz.which("attention", q, k, v, is_causal=True)
    assert lz.explain("attention.full", q, k, v).op == "attention.full"


def test_explain_with_inputs_first_and_operation_keyword():
    q, k, v = qkv()
    report = lz.explain(q, k, v, operation="attention.causal")
    assert report.op == "attention.causal" and report.selected_kernel
    assert report.context.batch == 2 and report.context.seq_len_q == 16
    assert report.selected_kernel == lz.explain("attention", q, k, v, is_causal=True).selected_kernel
    assert lz.which(q, k, v, operation="attention.causal") == report.selected_kernel


def test_both_an_op_and_a_different_operation_keyword_is_an_error():
    q, k, v = qkv()
    with pytest.raises(lz.InvalidInputError, match="operation: expected 'attention.causal'"):
        lz.explain("attention.causal", q, k, v, operation="attention.full")


def test_no_operation_at_all_is_an_error():
    q, k, v = qkv()
    with pytest.raises(lz.InvalidInputError, match="operation: expected an op id"):
        lz.explain(q, k, v)


def test_decode_op_id_with_a_long_query_says_what_the_tensors_are():
    q, k, v = qkv(batch=2, seq_q=2048)
    with pytest.raises(lz.InvalidInputError) as info:
        lz.which("attention.decode", q, k, v)
    message = str(info.value)
    assert "expected inputs of attention.decode (seq_len_q 1" in message
    assert "seq_len_q=2048" in message and "batch=2" in message and "attention.full inputs" in message


def test_decode_op_id_accepts_dense_single_token_query():
    q, _, _ = qkv(batch=2, seq_q=1)
    _, k, v = qkv(batch=2, seq_q=64)
    assert lz.which("attention.decode", q, k, v) == lz.which("attention", q, k, v)


def test_op_id_contradicted_by_an_explicit_argument_is_an_error():
    q, k, v = qkv()
    with pytest.raises(lz.InvalidInputError, match=r"inputs of attention\.causal \(is_causal=True\), got attention\.full"):
        lz.which("attention.causal", q, k, v, is_causal=False)


def test_norm_op_ids_and_globs():
    x, w = torch.randn(4, 64), torch.ones(64)
    assert lz.which("norm.rms", x, w) == lz.which("rms_norm", x, w)
    assert lz.explain("norm.*", x, w).op == "norm.rms"  # the first family that takes the inputs
    q, k, v = qkv()
    assert lz.explain("attention.*", q, k, v, is_causal=True).op == "attention.causal"


def test_unknown_op_id_lists_the_known_ones():
    with pytest.raises(lz.UnknownNameError, match="unknown operation 'attention.foo'.*attention.causal"):
        lz.which("attention.foo", *qkv())


def test_select_with_a_context_selects_without_tensors():
    plan = lz.select(operation="attention.causal", context=causal_context())
    assert isinstance(plan, lz.ExecutionPlan) and plan.op == "attention.causal"
    q, k, v = torch.randn(1, 512, 8, 64), torch.randn(1, 512, 8, 64), torch.randn(1, 512, 8, 64)
    assert plan.kernel_id == lz.which("attention.causal", q, k, v)
    assert lz.which(context=causal_context()) == plan.kernel_id  # the context's own op


def test_a_context_of_another_op_is_an_error():
    with pytest.raises(lz.InvalidInputError, match="context: expected a context of attention.decode, got a context "
                                                   "of attention.causal inputs"):
        lz.select(operation="attention.decode", context=causal_context())
    with pytest.raises(lz.InvalidInputError, match="context: expected a layerzero.SelectionContext, got dict"):
        lz.select(operation="attention.causal", context={"op": "attention.causal"})
    with pytest.raises(lz.InvalidInputError, match="a context or the call's inputs, not both"):
        lz.select(*qkv(), operation="attention.causal", context=causal_context())


def test_dry_run_is_the_report_for_a_context_and_runs_nothing():
    calls = []

    def spy(*args):
        calls.append(args)
        raise AssertionError("dry_run ran a kernel")

    lz.register_kernel(id="spy.attn", ops=("attention.causal",), impl=spy, platforms=frozenset({"cpu"}),
                       priority=99, dtypes=frozenset({torch.float32}))
    report = lz.dry_run(operation="attention.causal", context=causal_context())
    assert isinstance(report, lz.SelectionReport)
    assert report.selected_kernel == "spy.attn" and not calls
    assert "torch.sdpa_math" in report.scores  # every candidate, not only the winner


def test_validate_with_a_context():
    ok, reasons = lz.validate("torch.sdpa_math", context=causal_context())
    assert ok and reasons == []
    ok, rejections = lz.validate("torch.rms_norm", context=causal_context())
    assert not ok and [r.reason for r in rejections] == [lz.Reason.OP_UNSUPPORTED]
    ok, rejections = lz.validate("torch.sdpa_flash_cpu", context=causal_context(dtype=torch.int8))
    assert not ok and lz.Reason.DTYPE_UNSUPPORTED in [r.reason for r in rejections]
    q, k, v = qkv()
    assert lz.validate("torch.sdpa_math", "attention.causal", q, k, v) == (True, [])


def test_list_kernels_by_operation_glob():
    attention = lz.list_kernels(operation="attention.*")
    ids = {k.id for k in attention}
    assert {"torch.sdpa_math", "flashinfer.decode", "reference.attention"} <= ids
    assert "torch.rms_norm" not in ids
    assert all(any(op.startswith("attention.") for op in k.ops) for k in attention)
    assert {k.id for k in lz.list_kernels(operation="norm.rms")} >= {"torch.rms_norm", "reference.rms_norm"}
    assert {k.id for k in lz.list_kernels("torch.*", operation="attention.causal")} >= {"torch.sdpa_math"}
    with pytest.raises(lz.UnknownNameError, match="unknown operation 'atention.\\*'"):
        lz.list_kernels(operation="atention.*")


# ---- measured selection, warm-up, solve and compile take op ids (and the spec's 4-tuple shapes)


def test_warmup_takes_an_op_id_and_the_spec_four_tuple_shapes():
    report = lz.warmup(operation="attention.causal", shapes=[(1, 32, 2, 16), (2, 64, 2, 16)])
    assert [e.shape for e in report.entries] == [(1, 32, 32, 2, 2, 16, 1), (2, 64, 64, 2, 2, 16, 1)]
    q = torch.randn(2, 64, 2, 16)
    key = FAMILIES["attention"].key(q, q, q, None, True)
    assert runtime.plans.data.get(key) is not None  # the plan of that shape is cached: the call will hit
    assert report.entries[1].kernel == lz.which("attention.causal", q, q, q)
    decode = lz.warmup("attention.decode", [(2, 128, 2, 16)]).entries[0]
    assert decode.shape == (2, 1, 128, 2, 2, 16, 0)
    assert lz.warmup("norm.rms", [(8, 64)]).entries[0].kernel == lz.which("norm.rms", torch.randn(8, 64),
                                                                          torch.ones(64))


def test_warmup_shapes_that_contradict_the_op_id_are_errors():
    with pytest.raises(lz.InvalidInputError, match=r"shape: expected causal 1 for attention.causal"):
        lz.warmup(operation="attention.causal", shapes=[(1, 64, 64, 4, 4, 32, 0)])
    with pytest.raises(lz.InvalidInputError, match=r"shape: expected \(batch, seq, heads, head_dim\) or 7"):
        lz.warmup(operation="attention.causal", shapes=[(1, 64, 4)])
    with pytest.raises(lz.UnknownNameError, match="unknown operation with a perf workload 'attention.varlen'"):
        lz.warmup(operation="attention.varlen", shapes=[(1, 64, 4, 32)])


def test_tune_takes_an_op_id(tmp_path):
    report = lz.tune("attention.causal", shapes=[(1, 32, 2, 16)], dtypes=[torch.float32], device="cpu",
                     perfdb=tmp_path / "perf.sqlite", repeats=2, warmup=1, min_sample_s=0.0, progress=False,
                     kernels="torch.sdpa_*")
    (result,) = report.results
    assert result.op == "attention.causal" and result.shape == (1, 32, 32, 2, 2, 16, 1)
    assert result.best is not None and {r.kernel for r in lz.perfdb().records()} >= {result.best.kernel}


def test_solve_takes_an_op_id_and_fixes_its_dims(tmp_path):
    result = lz.solve("attention.causal", tmp_path / "solved.py", batch=(1, 4), seq_q=(1, 64), seq_k=(1, 64),
                      heads=[2], kv_heads=[2], head_dim=[16], dtypes=[torch.float32], device="cpu")
    text = result.path.read_text()
    assert "causal: [1]" in text or "'causal': [1]" in text
    assert "and is_causal:" in text and "not is_causal" not in text  # only the causal branch was solved
    with pytest.raises(lz.InvalidInputError, match=r"attention.causal.causal: expected \[1\] \(as attention.causal"):
        lz.solve("attention.causal", tmp_path / "x.py", batch=(1, 4), seq_q=(1, 64), seq_k=(1, 64), heads=[2],
                 kv_heads=[2], head_dim=[16], causal=[False], device="cpu")


def test_compile_returns_bucketed_solved_plans_ready_to_save(tmp_path):
    shapes = [(1, 32, 2, 16), (4, 128, 2, 16)]
    compiled = lz.compile(operation="attention.causal", shapes=shapes, dtypes=[torch.float32], device="cpu")
    assert isinstance(compiled, lz.CompiledPlans) and compiled.family == "attention"
    assert compiled.dims["batch"] == (1, 4) and compiled.dims["seq_q"] == (32, 128)
    assert compiled.dims["causal"] == [1] and compiled.dims["heads"] == [2]
    assert [p.shape for p in compiled.plans] == [(1, 32, 32, 2, 2, 16, 1), (4, 128, 128, 2, 2, 16, 1)]
    for plan, (b, s, h, d) in zip(compiled.plans, shapes, strict=True):
        q = torch.randn(b, s, h, d)
        assert plan.kernel == lz.which("attention.causal", q, q, q)
        assert f"batch={b}" in plan.bucket and f"seq_q={s}" in plan.bucket
    assert set(compiled.kernels.values()) >= {p.kernel for p in compiled.plans}
    # ready to save: the module imports and dispatches to the same kernels without the engine
    path = compiled.save(tmp_path / "compiled_attention.py")
    assert path.read_text() == compiled.source
    module = compiled.load()
    q, k, v = torch.randn(3, 100, 2, 16), torch.randn(3, 100, 2, 16), torch.randn(3, 100, 2, 16)
    torch.testing.assert_close(module.attention(q, k, v, is_causal=True), lz.attention(q, k, v, is_causal=True))
    assert "compiled attention.causal" in str(compiled)


def test_compile_solves_only_the_head_combinations_of_its_shapes():
    compiled = lz.compile("attention.causal", [(1, 32, 4, 16), (1, 32, 2, 16)], dtypes=[torch.float32], device="cpu")
    assert compiled.dims["heads"] == [2, 4]
    assert "Hq == 4 and Hkv == 4" in compiled.source and "Hq == 2 and Hkv == 2" in compiled.source
    assert "Hq == 2 and Hkv == 4" not in compiled.source  # not a shape given (and not valid GQA)


# ---- policy calls and the command line take op ids under the spec's names too


def test_lock_unlock_and_prefer_by_operation_keyword():
    q, k, v = qkv()
    lz.lock(operation="attention.causal", kernel="torch.sdpa_math")
    assert lz.which("attention.causal", q, k, v) == "torch.sdpa_math"
    assert lz.unlock(operation="attention.causal") is True
    base = lz.which("attention.causal", q, k, v)
    with lz.prefer("torch.sdpa_math", operation="attention.causal"):
        assert lz.which("attention.causal", q, k, v) == "torch.sdpa_math"
        assert lz.which("attention.full", q, k, v) == base  # the preference is for attention.causal only
    with pytest.raises(lz.PolicyValidationError, match="give op or operation, not both"):
        lz.prefer("torch.sdpa_math", op="attention.full", operation="attention.causal")


def test_cli_explain_takes_an_op_id_and_the_short_shape(capsys):
    import json

    from layerzero import cli

    assert cli.main(["explain", "attention.causal", "--shape", "1x64x4x32", "--dtype", "float32", "--device", "cpu",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["op"] == "attention.causal" and "seq_len_q=64 seq_len_k=64" in data["context"]
    assert data["selected"] == lz.which("attention.causal", *(torch.randn(1, 64, 4, 32),) * 3)



def test_all_is_the_documented_api():
    """`__all__` lists what README.md and docs/ document as `lz.<name>`, the classes the README's API
    table names, and the errors; every documented `lz.<name>` exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    documented = set(re.findall(r"lz\.([A-Za-z_]\w*)", text))
    named = {"Backend", "ExecutionPlan", "KernelSpec", "Reason", "Rejection", "SelectionContext", "SelectionReport"}
    errors = {n for n in lz.__all__ if isinstance(getattr(lz, n), type) and issubclass(getattr(lz, n), Exception)}
    assert set(lz.__all__) == (documented - {"compile"}) | named | errors
    assert all(hasattr(lz, name) for name in documented)

