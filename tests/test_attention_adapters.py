"""flash-attn v2/v3/v4 and xFormers adapters: argument and layout mapping against STAND-IN modules
(tests/standins/attention_libs.py, naive float64 implementations of the libraries' documented
semantics), and routing by GPU generation. These libraries cannot be installed on the GPU machine
we measure on, so these adapters have not been run on a GPU (README says so)."""

from __future__ import annotations

import sys

import pytest
import torch

from layerzero.backends import flash_attn as fa
from layerzero.backends import reference as R
from layerzero.backends import xformers as xf
from layerzero.context import SelectionContext
from layerzero.kernel import check_constraints
from layerzero.ops.attention import ATTENTION
from layerzero.reasons import Reason
from layerzero.state import runtime
from tests.standins import attention_libs as standin


@pytest.fixture
def libs(monkeypatch):
    v2 = standin.make_flash_attn_v2()
    v4 = standin.make_flash_attn_v4()
    v2.cute = v4
    monkeypatch.setitem(sys.modules, "flash_attn", v2)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", v4)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", standin.make_flash_attn_v3())
    for name, mod in standin.make_xformers().items():
        monkeypatch.setitem(sys.modules, name, mod)
    standin.CALLS.clear()
    return standin.CALLS


def _qkv(B, Sq, Sk, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Sq, Hq, D, generator=g), torch.randn(B, Sk, Hkv, D, generator=g),
            torch.randn(B, Sk, Hkv, D, generator=g))


def _ref(q, k, v, mask=None, causal=False, window=None, softcap=0.0, alibi=None, scale=None):
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    return R.attention(t(q), t(k), t(v), mask, causal, 0.0, scale, window, softcap, alibi).transpose(1, 2)


DENSE_CASES = [
    dict(shape=(2, 9, 9, 4, 4, 32), causal=True),
    dict(shape=(2, 5, 13, 8, 2, 32), causal=True),             # GQA 4, bottom-right causal
    dict(shape=(1, 7, 11, 6, 1, 16), causal=False),            # MQA
    dict(shape=(2, 12, 12, 4, 2, 16), causal=True, window=(3, 0)),
    dict(shape=(1, 10, 14, 4, 4, 16), causal=False, window=(2, 3)),
    dict(shape=(1, 10, 14, 4, 4, 16), causal=False, window=(-1, 2)),
    dict(shape=(2, 8, 8, 4, 2, 16), causal=True, softcap=3.0, scale=0.3),
]


@pytest.mark.parametrize("impl", [fa.v2_dense, fa.v3_dense, fa.v4_dense], ids=["v2", "v3", "v4"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: str(c))
def test_flash_attn_dense_mapping(libs, impl, case):
    q, k, v = _qkv(*case["shape"])
    window, softcap, scale = case.get("window"), case.get("softcap", 0.0), case.get("scale")
    out = impl(q, k, v, None, case["causal"], 0.0, scale, window, softcap, None)
    ref = _ref(q, k, v, causal=case["causal"], window=window, softcap=softcap, scale=scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert libs, "the stand-in recorded no call: the adapter did not call the library"


def test_flash_attn_v2_alibi(libs):
    q, k, v = _qkv(2, 6, 9, 4, 2, 16)
    slopes = torch.rand(4)
    out = fa.v2_dense(q, k, v, None, True, 0.0, None, None, 0.0, slopes)
    torch.testing.assert_close(out.double(), _ref(q, k, v, causal=True, alibi=slopes), rtol=1e-5, atol=1e-5)


def test_flash_attn_v4_gets_none_for_unbounded_window(libs):
    q, k, v = _qkv(1, 6, 6, 2, 2, 16)
    fa.v4_dense(q, k, v, None, False, 0.0, None, (-1, 2), 0.0, None)
    assert libs[-1] == ("flash_attn.cute.flash_attn_func", {"window_size": (None, 2)})


@pytest.mark.parametrize("impl", [fa.v2_varlen, fa.v3_varlen, fa.v4_varlen], ids=["v2", "v3", "v4"])
def test_flash_attn_varlen_mapping(libs, impl):
    cu_q = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(11, 4, 16, generator=g), torch.randn(16, 2, 16, generator=g), torch.randn(16, 2, 16, generator=g)
    out = impl(q, k, v, cu_q, cu_k, 7, 7, True, None, None, 0.0)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 7, 7, True, None, None, 0.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,page", [(fa.v2_paged, 256), (fa.v3_paged, 16), (fa.v4_paged, 16)],
                         ids=["v2", "v3", "v4"])
def test_flash_attn_paged_mapping(libs, impl, page):
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, pages = 2, 4, 2, 16, 6
    kc, vc = torch.randn(pages, page, Hkv, D, generator=g), torch.randn(pages, page, Hkv, D, generator=g)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([page + 3, 2 * page + 1], dtype=torch.int32)
    q = torch.randn(B, 2, Hq, D, generator=g)
    out = impl(q, kc, vc, table, seq_lens, True, None, None, 0.0, "NHD")
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), table, seq_lens, True, None, None, 0.0, "NHD")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


XF_CASES = [
    dict(shape=(2, 9, 9, 4, 4, 16), causal=True),
    dict(shape=(2, 5, 12, 8, 2, 16), causal=True),
    dict(shape=(1, 6, 10, 4, 4, 16), causal=True, window=(2, 0)),
    dict(shape=(1, 6, 10, 4, 2, 16), causal=False, window=(1, 2)),
    dict(shape=(2, 7, 11, 4, 2, 16), mask="bool"),
    dict(shape=(2, 7, 11, 4, 4, 16), mask="float"),
    dict(shape=(1, 7, 11, 4, 2, 16), mask="bool", window=(3, 3)),
]


@pytest.mark.parametrize("case", XF_CASES, ids=lambda c: str(c))
def test_xformers_mapping(libs, case):
    B, Sq, Sk, Hq, Hkv, D = case["shape"]
    q, k, v = _qkv(*case["shape"], seed=3)
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(4)) > 0.3
    elif case.get("mask") == "float":
        mask = torch.randn(1, Hq, Sq, Sk)
    causal, window = case.get("causal", False), case.get("window")
    out = xf.memory_efficient(q, k, v, mask, causal, 0.0, None, window, 0.0, None)
    torch.testing.assert_close(out.double(), _ref(q, k, v, mask, causal, window), rtol=1e-5, atol=1e-5)
    assert libs[-1][1]["dim"] == (5 if Hq != Hkv else 4)


def _cuda_ctx(sm: int, generation: str, **kw) -> SelectionContext:
    fields = dict(op="attention.causal", device_type="cuda", sm=sm, generation=generation, dtype=torch.bfloat16,
                  batch=2, seq_len_q=128, seq_len_k=128, num_heads=8, num_kv_heads=2, head_dim=128, head_dim_v=128,
                  layout="BSHD", is_causal=True)
    fields.update(kw)
    return SelectionContext(**fields)


@pytest.mark.parametrize("sm,generation,expected", [
    (80, "ampere", "flash_attn.v2"), (86, "ampere", "flash_attn.v2"), (89, "ada", "flash_attn.v2"),
    (90, "hopper", "flash_attn3.fwd"), (100, "blackwell", "flash_attn4.fwd"), (103, "blackwell", "flash_attn4.fwd"),
])
def test_flash_attn_routing_by_generation(monkeypatch, sm, generation, expected):
    runtime.ensure_loaded()
    for name in ("flash_attn", "flash_attn3", "flash_attn4"):  # pretend installed: routing only
        monkeypatch.setitem(runtime.registry.backend(name).__dict__, "availability", (True, "stand-in", None))
    report = runtime.engine.evaluate(_cuda_ctx(sm, generation), ATTENTION.transforms)
    flash = [c for c in report.candidates if c.backend.startswith("flash_attn") and c.score is not None]
    assert max(flash, key=lambda c: c.score).kernel_id == expected


def test_fa3_never_on_blackwell_and_fa4_not_before_hopper():
    v3 = runtime_spec("flash_attn3.fwd")
    v4 = runtime_spec("flash_attn4.fwd")
    assert Reason.SM_TOO_NEW in [r.reason for r in check_constraints(v3, _cuda_ctx(100, "blackwell"))]
    assert Reason.SM_TOO_OLD in [r.reason for r in check_constraints(v4, _cuda_ctx(80, "ampere"))]
    assert check_constraints(v4, _cuda_ctx(90, "hopper")) == []


def test_flash_attn_v2_paged_needs_page_256():
    spec = runtime_spec("flash_attn.v2_kvcache")
    ctx = _cuda_ctx(80, "ampere", op="attention.decode", seq_len_q=1, kv_layout="NHD", page_size=16)
    assert [r.reason for r in check_constraints(spec, ctx)] == [Reason.PAGE_SIZE_UNSUPPORTED]
    assert check_constraints(spec, ctx.replace(page_size=512)) == []


def test_missing_libraries_are_reasons_not_crashes():
    runtime.ensure_loaded()
    report = runtime.engine.evaluate(_cuda_ctx(90, "hopper"), ATTENTION.transforms)
    by_id = {c.kernel_id: c for c in report.candidates}
    if "flash_attn" not in sys.modules:
        assert by_id["flash_attn.v2"].rejections[0].reason == Reason.BACKEND_NOT_INSTALLED
    assert not any(m.split(".")[0] in ("flash_attn", "flash_attn_interface", "xformers") for m in sys.modules)


def runtime_spec(kernel_id: str):
    runtime.ensure_loaded()
    return runtime.registry.kernel(kernel_id)


def test_flash_attn_4_variants_go_to_warmup_workers_only_with_its_disk_cache(monkeypatch):
    """lz.warmup builds FA4 variants in worker processes only when FA4 keeps compiles on disk."""
    variant_of = runtime_spec("flash_attn4.fwd").jit_variant
    ctx = _cuda_ctx(90, "hopper")
    monkeypatch.delenv(fa.FA4_DISK_CACHE_ENV, raising=False)
    assert variant_of(ctx) is None
    monkeypatch.setenv(fa.FA4_DISK_CACHE_ENV, "1")
    v = variant_of(ctx)
    assert v.label == "flash_attn4 bfloat16 d128 causal gqa4"
    assert variant_of(ctx.replace(batch=8, seq_len_q=4096, seq_len_k=4096)).key == v.key
    assert variant_of(ctx.replace(head_dim=64, head_dim_v=64)).key != v.key
    assert variant_of(ctx.replace(seq_len_q=1)).label.endswith(" decode")


@pytest.mark.parametrize("seq_q, seq_k, head_dim, expected", [
    (512, 512, 128, "torch.sdpa_cudnn"),       # short prefill: cuDNN (FA4's launch costs more than it saves)
    (8192, 8192, 128, "flash_attn4.fwd"),      # long prefill: FA4 from 4096 query rows
    (1, 4096, 128, "torch.sdpa_cudnn"),        # decode: torch's kernels (FA4 1.4x slower on the H200)
    (2048, 2048, 256, "flash_attn4.fwd"),      # D256, which cuDNN cannot take: FA4 over torch flash
    (1, 8192, 256, "torch.sdpa_flash"),        # D256 decode
])
def test_fa4_priorities_on_hopper_follow_the_h200_measurements(monkeypatch, seq_q, seq_k, head_dim, expected):
    runtime.ensure_loaded()
    monkeypatch.setitem(runtime.registry.backend("flash_attn4").__dict__, "availability", (True, "stand-in", None))
    ctx = _cuda_ctx(90, "hopper", seq_len_q=seq_q, seq_len_k=seq_k, head_dim=head_dim, head_dim_v=head_dim,
                    op="attention.causal")
    ranked = [c for c in runtime.engine.evaluate(ctx, ATTENTION.transforms).candidates
              if c.score is not None and c.backend in ("torch", "flash_attn4")]
    assert max(ranked, key=lambda c: c.score).kernel_id == expected
