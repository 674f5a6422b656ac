"""FlashInfer backend on CPU: constraints, the JIT gate, and argument mapping against a STAND-IN.

The stand-in (tests/standins/flashinfer_standin.py) implements FlashInfer's documented wrapper
semantics naively in float64; our kernels are run against it and compared with the float64
reference (backends/reference.py), so a wrong layout, window, page-table conversion, scale or
GQA mapping fails here. The real kernels run in tests/gpu/test_flashinfer_gpu.py.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys

import pytest
import torch

import layerzero as lz
from layerzero.backends import flashinfer as fi
from layerzero.backends import reference as R
from layerzero.context import SelectionContext
from layerzero.errors import BackendNotAvailableError, InvalidInputError, LayerZeroError
from layerzero.kernel import check_constraints
from layerzero.ops.attention import ATTENTION, ATTENTION_VARLEN, PAGED_ATTENTION
from layerzero.reasons import Reason
from layerzero.state import runtime
from tests.standins import flashinfer_standin as standin

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 inputs; the stand-in computes in float64


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", standin.make_flashinfer())
    monkeypatch.setattr(fi, "WORKSPACE_BYTES", 4096)
    fi.reset(forget_compiled=True)
    standin.CALLS.clear()
    yield standin.CALLS
    fi.reset(forget_compiled=True)


def _calls(calls, name):
    return [kw for n, kw in calls if n == name]


def _prepared(kernel_id, ctx):
    """What a plan of `kernel_id` for `ctx` runs: the kernel's prepared call, which keeps its FlashInfer plan."""
    runtime.ensure_loaded()
    return runtime.registry.kernel(kernel_id).prepare(ctx)


def _qkv(B, Sq, Sk, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Sq, Hq, D, generator=g), torch.randn(B, Sk, Hkv, D, generator=g),
            torch.randn(B, Sk, Hkv, D, generator=g))


def _ref(q, k, v, causal=False, window=None, softcap=0.0, scale=None):
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    return R.attention(t(q), t(k), t(v), None, causal, 0.0, scale, window, softcap).transpose(1, 2)


DENSE = [
    dict(shape=(2, 9, 9, 4, 4, 16), causal=True),
    dict(shape=(2, 5, 13, 8, 2, 16), causal=True),                    # GQA 4, bottom-right causal
    dict(shape=(1, 7, 11, 6, 1, 16), causal=False),                   # MQA
    dict(shape=(2, 12, 7, 4, 2, 16), causal=True),                    # Sq > Sk: rows that see no key
    dict(shape=(2, 12, 12, 4, 2, 16), causal=True, window=(3, 0)),
    dict(shape=(2, 12, 12, 4, 2, 16), causal=True, window=(3, 5)),    # right bound beyond causal: 0
    dict(shape=(1, 10, 14, 4, 4, 16), causal=False, window=(2, -1)),  # non-causal, left only
    dict(shape=(1, 10, 14, 4, 4, 16), causal=False, window=(4, 0)),   # non-causal window ending at p: causal
    dict(shape=(1, 10, 14, 4, 4, 16), causal=False, window=(-1, 0)),  # = causal
    dict(shape=(2, 8, 8, 4, 2, 16), causal=True, softcap=3.0, scale=0.3),
]


@pytest.mark.parametrize("case", DENSE, ids=str)
def test_dense_prefill_mapping(lib, case):
    q, k, v = _qkv(*case["shape"])
    window, softcap, scale = case.get("window"), case.get("softcap", 0.0), case.get("scale")
    out = fi.prefill(q, k, v, None, case["causal"], 0.0, scale, window, softcap)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _ref(q, k, v, case["causal"], window, softcap, scale), **TOL)
    (plan,) = _calls(lib, "ragged.plan")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    assert plan["qo_indptr"].tolist() == [i * Sq for i in range(B + 1)]
    assert plan["kv_indptr"].tolist() == [i * Sk for i in range(B + 1)]
    assert plan["qo_indptr"].device.type == "cpu", "host indptr: the planner must not sync"


@pytest.mark.parametrize("case", [c for c in DENSE if c["shape"][1] > 0], ids=str)
def test_dense_decode_mapping(lib, case):
    B, _, Sk, Hq, Hkv, D = case["shape"]
    if (Hq // Hkv) not in fi.DECODE_GROUP_SIZES:
        pytest.skip("group size")
    q, k, v = _qkv(B, 1, Sk, Hq, Hkv, D)
    window, softcap, scale = case.get("window"), case.get("softcap", 0.0), case.get("scale")
    out = fi.decode(q, k, v, None, case["causal"], 0.0, scale, window, softcap)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _ref(q, k, v, case["causal"], window, softcap, scale), **TOL)


@pytest.mark.parametrize("Sk,page", [(16, 16), (40, 8), (13, 1), (1, 1), (96, 16)])
def test_dense_decode_views_keys_as_pages_without_copy(lib, Sk, page):
    q, k, v = _qkv(3, 1, Sk, 8, 2, 16, seed=Sk)
    out = fi.decode(q, k, v, None, False, 0.0, None, None, 0.0)
    torch.testing.assert_close(out.double(), _ref(q, k, v), **TOL)
    (plan,) = _calls(lib, "decode.plan")
    assert plan["page_size"] == page == fi.dense_page_size(Sk)
    n = Sk // page
    assert plan["indptr"].tolist() == [b * n for b in range(4)]
    assert plan["last"].tolist() == [page] * 3
    assert plan["indices"].tolist() == [b * Sk + i * page for b in range(3) for i in range(n)]
    (run,) = _calls(lib, "decode.run")
    assert run["k_stride"][1:] == k.stride()[1:], "the cache view reads k's own memory"


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
@pytest.mark.parametrize("kernel", ["flashinfer.prefill", "flashinfer.decode"])
def test_layouts_through_the_op_binding(lib, layout, kernel):
    """The plan's BHSD->BSHD transposes give strided views; both kernels read them correctly."""
    Sq = 1 if kernel.endswith("decode") else 6
    q, k, v = _qkv(2, Sq, 10, 4, 2, 16)
    if layout == "BHSD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    runtime.ensure_loaded()
    spec = runtime.registry.kernel(kernel)
    ctx = ATTENTION.context(q, k, v, None, True, 0.0, None, layout)
    run, transforms = ATTENTION.bind(spec, ctx)
    out = run(q, k, v, None, True, 0.0, None, None, 0.0, None)
    if layout == "BHSD":
        assert transforms == ("BHSD->BSHD",)
        q, k, v, out = (x.transpose(1, 2) for x in (q, k, v, out))
    torch.testing.assert_close(out.double(), _ref(q, k, v, True), **TOL)
    if kernel.endswith("decode"):
        (plan,) = _calls(lib, "decode.plan")
        assert plan["page_size"] == 2  # 10 tokens: pages of 2
        if layout == "BHSD":  # no copy: token stride D, pages of sequence b start b * Hkv * Sk tokens apart
            assert plan["indices"].tolist()[:5] == [0, 2, 4, 6, 8] and plan["indices"][5] == 2 * 10


def test_dense_decode_copies_keys_whose_strides_differ_from_values(lib):
    q, k, v = _qkv(2, 1, 12, 4, 4, 16)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    out = fi.decode(q, k, v, None, False, 0.0, None, None, 0.0)
    torch.testing.assert_close(out.double(), _ref(q, k, v), **TOL)


def test_dense_plans_are_made_once_per_shape(lib):
    q, k, v = _qkv(2, 6, 9, 4, 2, 16)
    prefill = _prepared("flashinfer.prefill", ATTENTION.context(q, k, v, None, True))
    decode = _prepared("flashinfer.decode", ATTENTION.context(q[:, :1], k, v))
    for _ in range(3):
        prefill(q, k, v, None, True, 0.0, None, None, 0.0)
        decode(q[:, :1], k, v, None, False, 0.0, None, None, 0.0)
    assert len(_calls(lib, "ragged.plan")) == 1 and len(_calls(lib, "decode.plan")) == 1
    assert len(_calls(lib, "ragged.run")) == 3
    other = _prepared("flashinfer.prefill", ATTENTION.context(q[:1], k[:1], v[:1], None, True))
    other(q[:1], k[:1], v[:1], None, True, 0.0, None, None, 0.0)  # another shape, another plan
    assert len(_calls(lib, "ragged.plan")) == 2


def test_plan_keeps_scale_and_softcap(lib):
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    prefill = _prepared("flashinfer.prefill", ATTENTION.context(q, k, v, None, True))
    a = prefill(q, k, v, None, True, 0.0, 0.5, None, 0.0)
    b = prefill(q, k, v, None, True, 0.0, 0.25, None, 0.0)  # a new scale must not reuse the old plan
    torch.testing.assert_close(b.double(), _ref(q, k, v, True, scale=0.25), **TOL)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("causal,window,softcap", [(True, None, 0.0), (False, None, 0.0), (True, (3, 0), 0.0),
                                                   (False, (2, -1), 2.5), (True, None, 4.0)])
def test_ragged_prefill_mapping(lib, causal, window, softcap):
    g = torch.Generator().manual_seed(1)
    lens_q, lens_k = [3, 1, 7, 4], [5, 6, 7, 4]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 8, 16, generator=g)
    k, v = torch.randn(2, sum(lens_k), 2, 16, generator=g)
    ragged_prefill = _prepared("flashinfer.ragged_prefill",
                               ATTENTION_VARLEN.context(q, k, v, cu_q, cu_k, 7, 7, causal, None, window, softcap))
    out = ragged_prefill(q, k, v, cu_q, cu_k, 7, 7, causal, None, window, softcap)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 7, 7, causal, None, window, softcap)
    torch.testing.assert_close(out.double(), ref, **TOL)
    (plan,) = _calls(lib, "ragged.plan")
    assert plan["qo_indptr"].tolist() == cu_q.tolist() and plan["kv_indptr"].tolist() == cu_k.tolist()
    ragged_prefill(q, k, v, cu_q, cu_k, 7, 7, causal, None, window, softcap)  # same lengths: same plan
    assert len(_calls(lib, "ragged.plan")) == 1
    cu_q2 = torch.tensor([0, 4, 5, 12, 15], dtype=torch.int32)
    out2 = ragged_prefill(q, k, v, cu_q2, cu_k, 7, 7, causal, None, window, softcap)
    assert len(_calls(lib, "ragged.plan")) == 2, "new lengths need a new plan"
    ref2 = R.attention_varlen(q.double(), k.double(), v.double(), cu_q2, cu_k, 7, 7, causal, None, window, softcap)
    torch.testing.assert_close(out2.double(), ref2, **TOL)


# ----------------------------------------------------------------------------- paged

def _paged_case(B, Sq, Hq, Hkv, D, page_size, lens, kv_layout, seed=0, max_pages=None):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    max_pages = max_pages or max(need) + 1
    num_pages = sum(max_pages for _ in lens) + 3
    perm = torch.randperm(num_pages, generator=g).to(torch.int32)
    page_table = perm[: B * max_pages].reshape(B, max_pages).contiguous()
    shape = (num_pages, page_size, Hkv, D) if kv_layout == "NHD" else (num_pages, Hkv, page_size, D)
    k_cache, v_cache = torch.randn(2, *shape, generator=g)
    q = torch.randn(B, Sq, Hq, D, generator=g)
    return q, k_cache, v_cache, page_table, torch.tensor(lens, dtype=torch.int32)


PAGED = [
    dict(B=3, Sq=1, Hq=8, Hkv=2, page=16, lens=[17, 1, 40], layout="NHD"),
    dict(B=3, Sq=1, Hq=6, Hkv=1, page=4, lens=[9, 12, 3], layout="HND", window=(5, 0)),
    dict(B=2, Sq=1, Hq=4, Hkv=4, page=8, lens=[30, 16], layout="NHD", softcap=2.0, scale=0.2),
    dict(B=3, Sq=5, Hq=8, Hkv=2, page=16, lens=[17, 5, 40], layout="NHD"),
    dict(B=2, Sq=4, Hq=4, Hkv=1, page=4, lens=[10, 13], layout="HND", window=(3, 0)),
    dict(B=2, Sq=3, Hq=4, Hkv=2, page=8, lens=[9, 20], layout="NHD", causal=False, window=(6, -1)),
    dict(B=2, Sq=3, Hq=10, Hkv=2, page=8, lens=[9, 20], layout="HND", softcap=3.0),  # group 5: prefill only
]


@pytest.mark.parametrize("case", PAGED, ids=str)
def test_paged_mapping(lib, case):
    q, kc, vc, table, lens = _paged_case(case["B"], case["Sq"], case["Hq"], case["Hkv"], 16, case["page"],
                                         case["lens"], case["layout"])
    causal, window = case.get("causal", True), case.get("window")
    softcap, scale = case.get("softcap", 0.0), case.get("scale")
    kernel = fi.paged_decode if case["Sq"] == 1 else fi.paged_prefill
    out = kernel(q, kc, vc, table, lens, causal, scale, window, softcap, case["layout"])
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), table, lens, causal, scale, window, softcap,
                            case["layout"])
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, **TOL)
    (plan,) = _calls(lib, "decode.plan" if case["Sq"] == 1 else "paged_prefill.plan")
    pages = [-(-n // case["page"]) for n in case["lens"]]
    assert plan["indptr"].tolist() == [sum(pages[:i]) for i in range(len(pages) + 1)]
    assert plan["last"].tolist() == [n - (p - 1) * case["page"] for n, p in zip(case["lens"], pages, strict=True)]
    assert plan["indices"].tolist() == [int(table[b, i]) for b, p in enumerate(pages) for i in range(p)]
    if case["Sq"] > 1:
        assert plan["qo_indptr"].tolist() == [i * case["Sq"] for i in range(case["B"] + 1)]


def test_paged_metadata_helpers():
    lens = torch.tensor([0, 1, 16, 17, 33], dtype=torch.int32)
    host, indptr, last, total = fi.paged_metadata(lens, 16)
    assert indptr.tolist() == [0, 0, 1, 2, 4, 7] and last.tolist() == [0, 1, 16, 1, 1] and total == 7
    table = torch.arange(5 * 4, dtype=torch.int32).reshape(5, 4) + 100
    assert fi.paged_indices(table, lens, 16, total).tolist() == [104, 108, 112, 113, 116, 117, 118]


def test_paged_plan_reused_while_lengths_hold_and_pages_refreshed(lib):
    q, kc, vc, table, lens = _paged_case(2, 1, 4, 2, 16, 8, [20, 9], "NHD")
    paged_decode = _prepared("flashinfer.paged_decode", PAGED_ATTENTION.context(q, kc, vc, table, lens))
    paged_decode(q, kc, vc, table, lens, True, None, None, 0.0, "NHD")
    other = table.flip(0).contiguous()  # same lengths, other pages
    out = paged_decode(q, kc, vc, other, lens, True, None, None, 0.0, "NHD")
    assert len(_calls(lib, "decode.plan")) == 1, "same lengths: the plan is reused"
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), other, lens, True, None, None, 0.0, "NHD")
    torch.testing.assert_close(out.double(), ref, **TOL)
    lens2 = torch.tensor([21, 9], dtype=torch.int32)
    out = paged_decode(q, kc, vc, table, lens2, True, None, None, 0.0, "NHD")
    assert len(_calls(lib, "decode.plan")) == 2
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), table, lens2, True, None, None, 0.0, "NHD")
    torch.testing.assert_close(out.double(), ref, **TOL)


def test_paged_kv_with_different_strides_is_refused(lib):
    q, kc, vc, table, lens = _paged_case(1, 1, 2, 2, 16, 4, [7], "NHD")
    vc = vc.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(InvalidInputError, match="strides of k_cache"):
        fi.paged_decode(q, kc, vc, table, lens, True, None, None, 0.0, "NHD")


def test_paged_op_binding(lib):
    runtime.ensure_loaded()
    q, kc, vc, table, lens = _paged_case(2, 3, 4, 2, 16, 4, [5, 11], "HND")
    ctx = PAGED_ATTENTION.context(q, kc, vc, table, lens, True, None, "HND")
    run, _ = PAGED_ATTENTION.bind(runtime.registry.kernel("flashinfer.paged_prefill"), ctx)
    out = run(q, kc, vc, table, lens, True, None, None, 0.0, "HND")
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), table, lens, True, None, None, 0.0, "HND")
    torch.testing.assert_close(out.double(), ref, **TOL)


# ----------------------------------------------------------------------------- errors and availability

def test_unsupported_window_is_an_input_error(lib):
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    with pytest.raises(InvalidInputError, match="window_size") as e:
        fi.prefill(q, k, v, None, False, 0.0, None, (2, 3), 0.0)
    assert isinstance(e.value, LayerZeroError)


def test_missing_flashinfer_raises_backend_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` raises ImportError
    fi.reset()
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    with pytest.raises(BackendNotAvailableError, match="flashinfer failed to import"):
        fi.prefill(q, k, v, None, True, 0.0, None, None, 0.0)


def test_backend_declared_and_not_installed_here():
    ids = [k.id for k in lz.list_kernels("flashinfer.*") if k.ops[0].startswith("attention.")]
    assert ids == ["flashinfer.decode", "flashinfer.paged_decode", "flashinfer.paged_prefill", "flashinfer.prefill",
                   "flashinfer.ragged_prefill"]
    if not fi.BACKEND.availability[0]:
        report = lz.explain("attention", *_qkv(1, 4, 4, 2, 2, 16), is_causal=True)
        assert report.rejection_reasons["flashinfer.prefill"] == [Reason.BACKEND_NOT_INSTALLED]


def test_reset_drops_wrappers_but_remembers_compiled(lib):
    """The wrapper belongs to the plan: lz.reset() drops the plans, and their wrappers with them."""
    runtime.ensure_loaded()
    spec = runtime.registry.kernel("flashinfer.prefill")  # declared for CUDA; here on the CPU stand-in
    lz.register_kernel(dataclasses.replace(spec, id="fi_cpu.prefill", platforms=frozenset({"cpu"}),
                                           dtypes=frozenset({torch.float32}), head_dims=None, check=None, priority=99))
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    lz.attention(q, k, v, is_causal=True)  # compiles the variant: plans chosen before are dropped, this one too
    lz.attention(q, k, v, is_causal=True)
    assert lz.which("attention", q, k, v, is_causal=True) == "fi_cpu.prefill"
    assert fi.live_wrappers() == 1 and len(fi.COMPILED) == 1
    lz.reset()
    gc.collect()
    assert fi.live_wrappers() == 0 and len(fi.COMPILED) == 1


def test_wrapper_cache_is_bounded(lib, monkeypatch):
    monkeypatch.setattr(fi, "MAX_WRAPPERS", 3)
    plans = []  # six plans alive at once
    for s in range(1, 7):
        q, k, v = _qkv(1, s, s, 2, 2, 16)
        plans.append(_prepared("flashinfer.prefill", ATTENTION.context(q, k, v, None, True)))
        plans[-1](q, k, v, None, True, 0.0, None, None, 0.0)
    assert fi.live_wrappers() == 3
    q, k, v = _qkv(1, 1, 1, 2, 2, 16)
    out = plans[0](q, k, v, None, True, 0.0, None, None, 0.0)  # gave its wrapper up: makes a new one and plans
    torch.testing.assert_close(out.double(), _ref(q, k, v, True), **TOL)
    assert fi.live_wrappers() == 3


# ----------------------------------------------------------------------------- constraints and the JIT gate

def _ctx(**kw):
    base = dict(op="attention.causal", device_type="cuda", sm=90, generation="hopper", dtype=torch.bfloat16,
                batch=2, seq_len_q=128, seq_len_k=128, num_heads=8, num_kv_heads=2, head_dim=128, head_dim_v=128,
                layout="BSHD", is_causal=True)
    base.update(kw)
    return SelectionContext(**base)


def _spec(name):
    return next(s for s in fi.BACKEND.kernels if s.id == f"flashinfer.{name}")


@pytest.fixture
def allow_jit(monkeypatch):
    monkeypatch.setenv(fi.ALLOW_JIT_ENV, "1")


@pytest.mark.parametrize("name,ctx,reason", [
    ("prefill", _ctx(dtype=torch.float32), Reason.DTYPE_UNSUPPORTED),
    ("prefill", _ctx(head_dim=96, head_dim_v=96), Reason.HEAD_DIM_UNSUPPORTED),
    ("prefill", _ctx(head_dim=128, head_dim_v=64), Reason.HEAD_DIM_V_MISMATCH),
    ("prefill", _ctx(sm=70, generation="volta"), Reason.SM_TOO_OLD),
    ("prefill", _ctx(sm=75, generation="turing"), Reason.DTYPE_UNSUPPORTED),  # bf16 needs sm 80
    ("prefill", _ctx(device_type="cpu", sm=0, generation="cpu"), Reason.PLATFORM_MISMATCH),
    ("prefill", _ctx(mask_kind="bool", is_causal=False, op="attention.masked"), Reason.OP_UNSUPPORTED),
    ("prefill", _ctx(mask_kind="bool", is_causal=False), Reason.BOOL_MASK_UNSUPPORTED),
    ("prefill", _ctx(alibi=True), Reason.ALIBI_UNSUPPORTED),
    ("prefill", _ctx(dropout=True), Reason.DROPOUT_UNSUPPORTED),
    ("prefill", _ctx(requires_grad=True), Reason.BACKWARD_UNSUPPORTED),
    ("prefill", _ctx(graph_capture=True), Reason.NOT_GRAPH_SAFE),
    ("prefill", _ctx(op="attention.sliding_window", is_causal=False, window=(8, 8)), Reason.WINDOW_UNSUPPORTED),
    ("decode", _ctx(seq_len_q=4), Reason.SEQ_LEN_TOO_LONG),
    ("decode", _ctx(seq_len_q=1, num_heads=10, num_kv_heads=2), Reason.GQA_UNSUPPORTED),
    ("paged_decode", _ctx(op="attention.decode", seq_len_q=1, num_heads=12, num_kv_heads=1, kv_layout="NHD",
                          page_size=16), Reason.GQA_UNSUPPORTED),
    ("ragged_prefill", _ctx(op="attention.varlen", layout="THD", head_dim=512, head_dim_v=512),
     Reason.HEAD_DIM_UNSUPPORTED),
])
def test_constraint_rejections(allow_jit, name, ctx, reason):
    reasons = [r.reason for r in check_constraints(_spec(name), ctx)]
    assert reason in reasons, reasons


@pytest.mark.parametrize("name,ctx", [
    ("prefill", _ctx()),
    ("prefill", _ctx(op="attention.sliding_window", is_causal=False, window=(8, -1), softcap=30.0)),
    ("prefill", _ctx(seq_len_q=7, seq_len_k=300, dtype=torch.float16, head_dim=64, head_dim_v=64)),
    ("decode", _ctx(seq_len_q=1, seq_len_k=4096, num_heads=32, num_kv_heads=8, window=(100, 7))),
    ("paged_prefill", _ctx(op="attention.paged", seq_len_q=16, kv_layout="HND", page_size=1, head_dim=256,
                           head_dim_v=256)),
    ("paged_decode", _ctx(op="attention.decode", seq_len_q=1, kv_layout="NHD", page_size=16, num_heads=48,
                          num_kv_heads=3)),
    ("ragged_prefill", _ctx(op="attention.varlen", layout="THD", is_causal=False)),
])
def test_constraint_accepts(allow_jit, name, ctx):
    assert check_constraints(_spec(name), ctx) == []


def test_needs_jit_until_compiled(monkeypatch, tmp_path):
    monkeypatch.delenv(fi.ALLOW_JIT_ENV, raising=False)
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path))
    fi.reset(forget_compiled=True)
    ctx = _ctx(seq_len_q=1)
    (rej,) = check_constraints(_spec("decode"), ctx)
    assert rej.reason is Reason.NEEDS_JIT_COMPILE and "batch_decode_with_kv_cache" in rej.detail
    monkeypatch.setenv(fi.ALLOW_JIT_ENV, "1")
    assert check_constraints(_spec("decode"), ctx) == []
    monkeypatch.setenv(fi.ALLOW_JIT_ENV, "0")
    assert check_constraints(_spec("decode"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE
    fi.COMPILED.add(fi.variant_for("decode", ctx))  # what a run or warmup in this process records
    assert check_constraints(_spec("decode"), ctx) == []
    # the prefill module of the same shape is another variant, still uncompiled
    assert check_constraints(_spec("prefill"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE
    fi.reset(forget_compiled=True)


def test_jit_cache_on_disk_counts_as_compiled(monkeypatch, tmp_path):
    monkeypatch.delenv(fi.ALLOW_JIT_ENV, raising=False)
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path))
    monkeypatch.setattr(fi, "_flashinfer_version", lambda: "0.7.2.post1")
    fi.reset(forget_compiled=True)
    ctx = _ctx(op="attention.varlen", layout="THD")
    variant = fi.variant_for("prefill", ctx)
    assert check_constraints(_spec("ragged_prefill"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE
    other_arch = tmp_path / ".cache/flashinfer/0.7.2.post1/80/cached_ops" / variant.uri
    other_arch.mkdir(parents=True)
    (other_arch / f"{variant.uri}.so").touch()
    assert check_constraints(_spec("ragged_prefill"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE, "sm80 build"
    here = tmp_path / ".cache/flashinfer/0.7.2.post1/90a/cached_ops" / variant.uri
    here.mkdir(parents=True)
    (here / f"{variant.uri}.so").touch()
    assert check_constraints(_spec("ragged_prefill"), ctx) == []
    fi.reset(forget_compiled=True)


@pytest.fixture
def aot_site(tmp_path, monkeypatch):
    """(jit_cache dir, dist(version)): files laid out as an installed flashinfer-jit-cache package (its
    `jit_cache/` and dist-info), on sys.path; found, never imported. The JIT cache itself is empty."""
    site = tmp_path / "site"
    package = site / "flashinfer_jit_cache"
    (package / "jit_cache").mkdir(parents=True)
    (package / "__init__.py").write_text("")

    def dist(version: str) -> None:
        info = site / f"flashinfer_jit_cache-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flashinfer-jit-cache\nVersion: {version}\n")

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(fi.ALLOW_JIT_ENV, raising=False)
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path / "empty"))
    monkeypatch.setattr(fi, "_flashinfer_version", lambda: "0.7.2.post1")
    fi.reset(forget_compiled=True)
    yield package / "jit_cache", dist
    fi.reset(forget_compiled=True)


def test_modules_of_the_flashinfer_jit_cache_package_count_as_compiled(aot_site):
    jit_cache, dist = aot_site
    dist("0.7.2.post1+cu130")
    ctx = _ctx(seq_len_q=1, seq_len_k=4096)
    variant = fi.variant_for("decode", ctx)
    needed = _spec("decode").jit_variant(ctx)  # what lz.warmup would build in a worker process
    assert needed.key == variant and needed.label == "flashinfer decode bf16 d128 (fa2)"
    assert check_constraints(_spec("decode"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE
    (jit_cache / variant.uri).mkdir()
    (jit_cache / variant.uri / f"{variant.uri}.so").touch()
    assert fi.aot_dir() == str(jit_cache)
    assert check_constraints(_spec("decode"), ctx) == []  # FlashInfer loads it with no JIT
    assert _spec("decode").jit_variant(ctx) is None  # nothing left for lz.warmup
    assert fi.aot_packages()["flashinfer-jit-cache"] == "0.7.2.post1+cu130"
    assert "flashinfer_jit_cache" not in sys.modules


def test_a_jit_cache_package_for_another_flashinfer_is_not_counted(aot_site):
    """FlashInfer refuses (raises on import) a flashinfer-jit-cache whose version does not start with its own."""
    jit_cache, dist = aot_site
    dist("0.6.1+cu129")
    ctx = _ctx(seq_len_q=1, seq_len_k=4096)
    variant = fi.variant_for("decode", ctx)
    (jit_cache / variant.uri).mkdir()
    (jit_cache / variant.uri / f"{variant.uri}.so").touch()
    assert fi.aot_dir() is None
    assert check_constraints(_spec("decode"), ctx)[0].reason is Reason.NEEDS_JIT_COMPILE


def test_module_uris_match_flashinfer_072():
    """The names jit/attention/modules.py of FlashInfer 0.7.2.post1 gives these modules."""
    ctx = _ctx(dtype=torch.bfloat16, head_dim=128)
    assert fi.variant_for("decode", ctx).uri == (
        "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_"
        "head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False")
    windowed = _ctx(dtype=torch.float16, head_dim=64, head_dim_v=64, window=(16, 0), softcap=5.0)
    expected_fa3 = ("batch_prefill_with_kv_cache_dtype_q_f16_dtype_kv_f16_dtype_o_f16_dtype_idx_i32_head_dim_qk_64_"
                    "head_dim_vo_64_posenc_0_use_swa_True_use_logits_cap_True_f16qk_False")
    variant = fi.variant_for("prefill", windowed)
    assert variant.uri == expected_fa3 + ("_sm90" if variant.backend == "fa3" else "_kv_stride_equal")
    assert fi.variant_for("prefill", windowed.replace(sm=80)).uri == expected_fa3 + "_kv_stride_equal"


def test_warmup_skips_contexts_flashinfer_cannot_run():
    assert fi.warmup(_ctx(dtype=torch.float32)) == []
    assert fi.warmup(_ctx(device_type="cpu", sm=0)) == []


def test_warmup_variant_validates_arguments():
    with pytest.raises(InvalidInputError, match="head_dim"):
        fi.warmup_variant("prefill", torch.bfloat16, 80)
    with pytest.raises(InvalidInputError, match="kind"):
        fi.warmup_variant("append")


def test_warmup_variant_runs_the_kernel_and_records_it(lib):
    before = runtime.generation
    variant = fi.warmup_variant("decode", torch.bfloat16, 64, sliding_window=True,
                                device="cpu")
    assert variant.kind == "decode" and variant.sliding_window and variant in fi.COMPILED
    assert _calls(lib, "decode.plan")[0]["window_left"] == 8
    assert runtime.generation > before, "plans chosen before the compile are dropped"


def test_workspace_estimate(lib):
    ctx = _ctx(device_type="cpu")
    assert fi._workspace_bytes(ctx) == fi.INT_WORKSPACE_BYTES + fi.WORKSPACE_BYTES
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    fi.prefill(q, k, v, None, True, 0.0, None, None, 0.0)
    assert fi._workspace_bytes(ctx) == fi.INT_WORKSPACE_BYTES


def test_broken_flashinfer_never_takes_the_process_down(tmp_path):
    """A `flashinfer` that raises on import: layerzero imports, lists, selects and runs (attention and
    sampling); our kernel raises BackendNotAvailableError (which the runtime's fallback turns into another kernel)."""
    (tmp_path / "flashinfer").mkdir()
    (tmp_path / "flashinfer" / "__init__.py").write_text("raise RuntimeError('broken build')\n")
    code = (
        "import sys, torch, layerzero as lz\n"
        "from layerzero.backends import flashinfer as fi\n"
        "assert 'flashinfer' not in sys.modules, 'imported at load time'\n"
        "assert [k.available for k in lz.list_kernels('flashinfer.prefill')] == [True]\n"
        "q = torch.randn(1, 4, 2, 64)\n"
        "lz.attention(q, q, q, is_causal=True)\n"
        "assert len([k for k in lz.list_kernels('sampling.*') if k.id.startswith('flashinfer.')]) == 5\n"
        "lz.sample(torch.randn(2, 10), top_k=3, top_p=0.5)\n"
        "assert 'flashinfer' not in sys.modules\n"
        "try:\n"
        "    fi.prefill(q, q, q, None, True, 0.0, None, None, 0.0)\n"
        "except lz.BackendNotAvailableError as e:\n"
        "    assert 'broken build' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# ----------------------------------------------------------------------------- sampling kernels

SAMPLING_IDS = {"flashinfer.sampling_from_logits": "sampling.plain", "flashinfer.top_k_sampling": "sampling.topk",
                "flashinfer.top_p_sampling": "sampling.topp", "flashinfer.min_p_sampling": "sampling.minp",
                "flashinfer.top_k_top_p_sampling": "sampling.topk_topp"}


def test_sampling_kernels_registered_once_under_flashinfer():
    from layerzero.backends import flashinfer_sampling as fs

    runtime.ensure_loaded()
    assert not hasattr(fs, "BACKEND"), "backends/flashinfer.py owns the Backend"
    backend_ids = [s.id for s in runtime.registry.backend("flashinfer").kernels]
    assert len(backend_ids) == len(set(backend_ids))
    assert set(SAMPLING_IDS) <= set(backend_ids)
    for kernel_id, op in SAMPLING_IDS.items():
        spec = runtime.registry.kernel(kernel_id)
        assert spec.ops == (op,) and spec.backend == "flashinfer" and not spec.graph_safe
        assert [s.id for s in runtime.registry.candidates(op)].count(kernel_id) == 1
    # on CPU it shows up once in explain, rejected (CUDA only; FlashInfer is not installed here)
    report = lz.explain("sample", torch.randn(2, 10), top_k=3, top_p=0.5)
    rejected = [k for k in report.rejection_reasons if k.startswith("flashinfer.")]
    assert rejected == ["flashinfer.top_k_top_p_sampling"]
    assert report.rejection_reasons["flashinfer.top_k_top_p_sampling"][0] in (Reason.BACKEND_NOT_INSTALLED,
                                                                           Reason.PLATFORM_MISMATCH)


@pytest.fixture
def sampling_lib(monkeypatch):
    """The stand-in `flashinfer.sampling`, and CPU copies of our kernels that call it (ids
    standin_flashinfer.*): lz.sample then runs the whole path (normalisation, binding, our mapping)."""
    from layerzero.backends.flashinfer_sampling import SAMPLING_KERNELS

    mod = standin.make_flashinfer()
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", mod.sampling)
    for spec in SAMPLING_KERNELS:
        lz.register_kernel(dataclasses.replace(spec, id="standin_" + spec.id, platforms=frozenset({"cpu"})))
    standin.CALLS.clear()
    yield standin.CALLS


V = 50
INF = float("inf")


def _logits(dtype=torch.float32):
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    x[1, 7:] = -INF  # a row with few finite logits
    x[4] = -INF  # no finite logit: -1
    return x.to(dtype)


T_ROWS = torch.tensor([0.7, 1.0, 1.6, 0.0, 1.0, 0.9])  # row 3: temperature 0 -> argmax
SAMPLING_CASES = [
    ("sampling_from_logits", "sampling_from_logits", dict(temperature=0.7)),
    ("sampling_from_logits", "sampling_from_logits", dict(temperature=T_ROWS)),
    ("top_k_sampling", "top_k_sampling_from_probs", dict(top_k=5)),
    ("top_k_sampling", "top_k_sampling_from_probs", dict(top_k=torch.tensor([3, 0, 1, 60, 7, -2]), temperature=T_ROWS)),
    ("top_p_sampling", "top_p_sampling_from_probs", dict(top_p=0.6, temperature=1.3)),
    ("top_p_sampling", "top_p_sampling_from_probs",
     dict(top_p=torch.tensor([0.3, 0.95, 1.0, 0.5, 0.5, 0.05], dtype=torch.float64))),
    ("min_p_sampling", "min_p_sampling_from_probs", dict(min_p=0.1, temperature=0.8)),
    ("min_p_sampling", "min_p_sampling_from_probs", dict(min_p=torch.tensor([0.0, 0.3, 0.05, 0.2, 0.5, 1.0]))),
    ("top_k_top_p_sampling", "top_k_top_p_sampling_from_logits", dict(top_k=8, top_p=0.7)),
    ("top_k_top_p_sampling", "top_k_top_p_sampling_from_logits",
     dict(top_k=torch.tensor([4, 9, 0, 2, 3, 30], dtype=torch.int32), top_p=torch.tensor([0.5, 0.9, 0.6, 1.0, 0.2, 0.8]),
          temperature=T_ROWS)),
]


@pytest.mark.parametrize("kernel, function, kw", SAMPLING_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SAMPLING_CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_mapping(sampling_lib, kernel, function, kw, dtype):
    """What reaches FlashInfer (function, dtypes, filters, the distribution they describe) and what
    comes back (int64, argmax on temperature-0 rows, -1 on rows without a finite logit)."""
    logits = _logits(dtype)
    lz.lock("sampling.*", "standin_flashinfer." + kernel)
    assert lz.which("sample", logits, **kw) == "standin_flashinfer." + kernel
    gen = torch.Generator().manual_seed(1)
    out = lz.sample(logits, generator=gen, **kw)
    (name, call), = sampling_lib
    assert name == "sampling." + function and call["generator"] is gen
    for arg, value in call.items():
        if arg == "top_k" and isinstance(value, torch.Tensor):
            assert value.dtype == torch.int32 and int(value.min()) >= 1 and int(value.max()) <= V
        elif arg in ("top_p", "min_p") and isinstance(value, torch.Tensor):
            assert value.dtype == torch.float32
    # the distribution FlashInfer was asked to sample from, against the float64 reference semantics
    t = kw.get("temperature", 1.0)
    t_col = torch.where(t > 0, t, 1.0).double().view(-1, 1) if isinstance(t, torch.Tensor) else t
    want = R.filter_probs(torch.softmax(logits.double() / t_col, -1), kw.get("top_k"), kw.get("top_p"),
                          kw.get("min_p"))
    rows = [0, 1, 2, 3, 5]  # row 4 has no finite logit: FlashInfer sees zeros, we return -1
    torch.testing.assert_close(call["dist"][rows], want[rows], rtol=0, atol=1e-5)
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert out[4] == -1
    greedy = logits.float().argmax(-1)
    for r in rows:
        if isinstance(t, torch.Tensor) and t[r] == 0:
            assert out[r] == greedy[r]
        else:
            assert want[r, out[r]] > 0, f"row {r} drew filtered token {int(out[r])}"


def test_sampling_generator_passes_through(sampling_lib):
    lz.lock("sampling.*", "standin_flashinfer.top_p_sampling")
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    a = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    c = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_without_flashinfer_raises_backend_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer.sampling` raises ImportError
    runtime.ensure_loaded()
    spec = runtime.registry.kernel("flashinfer.top_k_sampling")
    with pytest.raises(BackendNotAvailableError, match="flashinfer failed to import"):
        spec.impl(torch.randn(2, 10), 3, None, None, 1.0, None)


def test_default_picks_follow_the_h100_measurements(monkeypatch, allow_jit):
    """benchmarks/results/attention-h100.md and regret-h100.md (H100, bf16, torch 2.11): cuDNN wins MHA
    prefill (D <= 128), GQA prefill at 512 tokens (FlashInfer leads long GQA D128 prefill by 5-7 %, left
    to tuning) and GQA decode; FlashInfer wins D256 prefill; torch flash wins D256 decode. The engine's
    own choice (transform penalties included), with FlashInfer declared installed on a made-up H100 context."""
    from layerzero.ops.attention import ATTENTION
    from layerzero.state import runtime

    runtime.ensure_loaded()
    monkeypatch.setitem(runtime.registry.backend("flashinfer").__dict__, "availability", (True, "0.7.2", None))
    lz.configure_memory(free_memory=lambda device, index: (64 << 30, 80 << 30))
    runtime.bump()

    def pick(ctx):
        return runtime.engine.evaluate(ctx, ATTENTION.transforms).selected_kernel

    assert pick(_ctx(seq_len_q=512, seq_len_k=512)) == "torch.sdpa_cudnn"  # GQA 4
    assert pick(_ctx(seq_len_q=512, seq_len_k=512, head_dim=256, head_dim_v=256)) == "flashinfer.prefill"
    mha = _ctx(num_kv_heads=8, head_dim=64, head_dim_v=64, seq_len_q=1024, seq_len_k=1024)
    assert pick(mha) == "torch.sdpa_cudnn"
    assert pick(mha.replace(is_causal=False, op="attention.full")) == "torch.sdpa_cudnn"
    assert pick(mha.replace(head_dim=256, head_dim_v=256)) == "flashinfer.prefill"  # cuDNN: D <= 128
    assert pick(_ctx(seq_len_q=1, seq_len_k=4096)) == "torch.sdpa_cudnn"  # GQA decode
    assert pick(_ctx(seq_len_q=1, seq_len_k=8192, num_kv_heads=16, head_dim=256, head_dim_v=256)) == "torch.sdpa_flash"
    assert pick(_ctx(seq_len_q=1, seq_len_k=4096, softcap=30.0)) == "flashinfer.decode"  # flash has no softcap
