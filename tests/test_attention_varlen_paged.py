"""Packed variable-length attention and paged KV-cache attention against the float64 reference.

Each sequence of a packed batch, and each sequence gathered from a paged cache, is checked
against `reference_attention` of tests/test_attention.py (independent float64 math; tolerance
`attention_tolerance`: rtol of conftest's `tolerance(dtype)`, atol 1e-5 fp32 / 2 eps half types).
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.errors import InvalidInputError, UnknownNameError
from tests.test_attention import DTYPES, assert_close, reference_attention

# ----------------------------------------------------------------------------- varlen (packed)


def make_packed(lens_q, lens_k, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hk, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hk, d, generator=g).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def varlen_reference(q, k, v, cu_q, cu_k, **options):
    """float64 (total_q, Hq, D): each sequence through the dense reference (BSHD, batch 1)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        if bq[i + 1] > bq[i]:
            seq = reference_attention(q[None, bq[i]:bq[i + 1]], k[None, bk[i]:bk[i + 1]], v[None, bk[i]:bk[i + 1]],
                                      **options)
            out[bq[i]:bq[i + 1]] = seq[0]
    return out


VARLEN_CASES = [  # (lens_q, lens_k, Hq, Hkv, D)
    ([5, 1, 9], [5, 1, 9], 4, 4, 64),  # self-attention, odd lengths, a single-token sequence
    ([3, 7], [11, 7], 8, 2, 80),  # GQA 4, Sq <= Sk (prefix cached)
    ([1, 1, 1], [6, 13, 2], 8, 1, 128),  # MQA decode
    ([4, 0, 6], [4, 3, 6], 4, 1, 256),  # an empty query sequence
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}-{c[3]}d{c[4]}")
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"is_causal": True, "window_size": (2, 0)},
                                     {"softcap": 4.0}, {"scale": 0.2}], ids=str)
def test_varlen_matches_reference(dtype, case, options):
    lens_q, lens_k, hq, hk, d = case
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, hq, hk, d, dtype, seed=len(lens_q))
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **options)
    chosen = lz.which("attention_varlen", q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **options)
    assert_close(out, varlen_reference(q, k, v, cu_q, cu_k, **options), dtype, f"varlen via {chosen}")


def test_varlen_non_contiguous_inputs():
    lens = [3, 8]
    q, k, v, cu_q, cu_k = make_packed(lens, lens, 4, 2, 128, torch.float32, seed=3)
    q, k, v = (t.repeat_interleave(2, dim=-1)[..., ::2] for t in (q, k, v))  # same values, strided
    assert not q.is_contiguous()
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, 8, 8, is_causal=True)
    assert_close(out, varlen_reference(q, k, v, cu_q, cu_k, is_causal=True), torch.float32, "varlen strided")


def test_varlen_equals_dense_for_equal_lengths():
    """Packing B equal sequences is the dense call on (B, S, H, D)."""
    b, s, hq, hk, d = 3, 7, 4, 2, 64
    q, k, v, cu_q, cu_k = make_packed([s] * b, [s] * b, hq, hk, d, torch.float32, seed=5)
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, s, s, is_causal=True)
    dense = lz.attention(q.view(b, s, hq, d), k.view(b, s, hk, d), v.view(b, s, hk, d), is_causal=True)
    torch.testing.assert_close(out, dense.reshape(b * s, hq, d), rtol=1e-5, atol=1e-6)


def _varlen_args():
    return make_packed([3, 4], [3, 4], 4, 2, 64, torch.float32)


@pytest.mark.parametrize(
    ("change", "argument", "fragment"),
    [
        (lambda a: a.update(q=a["q"][None]), "q", "3-D packed tensor"),
        (lambda a: a.update(v=a["v"][:-1]), "v", "7 tokens (as k)"),
        (lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), "k", "head_dim 64 (as q)"),
        (lambda a: a.update(k=torch.randn(7, 3, 64), v=torch.randn(7, 3, 64)), "k", "dividing q's 4 heads"),
        (lambda a: a.update(cu_q=a["cu_q"].long()), "cu_seqlens_q", "1-D int32"),
        (lambda a: a.update(cu_k=torch.tensor([0, 5, 6], dtype=torch.int32)), "cu_seqlens_k", "from 0 to 7"),
        (lambda a: a.update(cu_k=torch.tensor([0, 7], dtype=torch.int32)), "cu_seqlens_k", "3 entries"),
        (lambda a: a.update(max_q=2), "max_seqlen_q/max_seqlen_k", "longest sequences (4, 4)"),
    ],
    ids=["rank", "v_tokens", "head_dim", "heads", "cu_dtype", "cu_total", "cu_count", "max_seqlen"],
)
def test_varlen_bad_input_errors(change, argument, fragment):
    q, k, v, cu_q, cu_k = _varlen_args()
    a = {"q": q, "k": k, "v": v, "cu_q": cu_q, "cu_k": cu_k, "max_q": 4, "max_k": 4}
    change(a)
    with pytest.raises(InvalidInputError) as info:
        lz.attention_varlen(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["max_q"], a["max_k"])
    assert info.value.argument == argument
    assert fragment in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- paged KV cache


def make_paged(lens, sq, hq, hk, d, page_size, kv_layout, dtype, seed=0, extra_pages=3):
    """Random dense per-sequence K/V scattered into shuffled pages; returns cache, table and the dense K/V."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    max_pages = max(-(-n // page_size) for n in lens)
    num_pages = b * max_pages + extra_pages
    order = torch.randperm(num_pages, generator=g)  # pages in a random order, some unused
    table = order[: b * max_pages].view(b, max_pages).to(torch.int32)
    k_cache = torch.randn(num_pages, page_size, hk, d, generator=g).to(dtype)  # NHD; garbage where unused
    v_cache = torch.randn(num_pages, page_size, hk, d, generator=g).to(dtype)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    dense_k = [k_cache[table[i].long()].reshape(-1, hk, d)[:n] for i, n in enumerate(lens)]
    dense_v = [v_cache[table[i].long()].reshape(-1, hk, d)[:n] for i, n in enumerate(lens)]
    if kv_layout == "HND":
        k_cache, v_cache = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), dense_k, dense_v


def paged_reference(q, dense_k, dense_v, **options):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, (k, v) in enumerate(zip(dense_k, dense_v, strict=True)):
        out[i] = reference_attention(q[i : i + 1], k[None], v[None], **options)[0]
    return out


PAGED_CASES = [  # (lens, Sq, Hq, Hkv, D, page_size)
    ([9, 1, 16], 1, 4, 4, 64, 4),  # decode, one sequence of one token, one that fills its pages
    ([7, 12], 1, 8, 1, 128, 16),  # MQA decode, a page larger than a sequence
    ([13, 6], 3, 8, 2, 80, 4),  # chunked prefill, GQA 4
    ([5], 5, 4, 4, 256, 1),  # page size 1 (token-level), prefill of the whole sequence
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"len{c[0]}-sq{c[1]}-h{c[2]}-{c[3]}-d{c[4]}-p{c[5]}")
@pytest.mark.parametrize("options", [{}, {"is_causal": False}, {"window_size": (3, 0)}, {"softcap": 3.0}], ids=str)
def test_paged_matches_reference(dtype, kv_layout, case, options):
    lens, sq, hq, hk, d, page_size = case
    q, kc, vc, table, seq_lens, dk, dv = make_paged(lens, sq, hq, hk, d, page_size, kv_layout, dtype, seed=d)
    out = lz.paged_attention(q, kc, vc, table, seq_lens, kv_layout=kv_layout, **options)
    ref = paged_reference(q, dk, dv, is_causal=options.pop("is_causal", True), **options)
    assert_close(out, ref, dtype, f"paged {kv_layout}")


def test_paged_decode_and_prefill_are_different_ops():
    q, kc, vc, table, lens, _, _ = make_paged([6, 3], 1, 4, 4, 64, 4, "NHD", torch.float32)
    assert lz.explain("paged_attention", q, kc, vc, table, lens).context.op == "attention.decode"
    q, kc, vc, table, lens, _, _ = make_paged([6, 3], 2, 4, 4, 64, 4, "NHD", torch.float32)
    report = lz.explain("paged_attention", q, kc, vc, table, lens)
    assert report.context.op == "attention.paged" and report.context.page_size == 4


def _paged_args(kv_layout="NHD"):
    # Hq 6: not a multiple of 4, so reading the NHD cache as HND (4 heads) is caught
    q, kc, vc, table, lens, _, _ = make_paged([6, 3], 1, 6, 2, 64, 4, kv_layout, torch.float32)
    return {"q": q, "k_cache": kc, "v_cache": vc, "page_table": table, "seq_lens": lens, "kv_layout": kv_layout}


@pytest.mark.parametrize(
    ("change", "argument", "fragment"),
    [
        (lambda a: a.update(q=a["q"][0]), "q", "4-D tensor (B, Sq, Hq, D)"),
        (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache", "(num_pages, page_size, Hkv, D)"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :2]), "v_cache", "(as k_cache)"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), "k_cache",
         "head_dim 64 (as q)"),
        (lambda a: a.update(kv_layout="HND"), "k_cache", "check kv_layout (given 'HND'"),
        (lambda a: a.update(page_table=a["page_table"].long()), "page_table", "dtype torch.int32"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens", "shape (2,)"),
        (lambda a: a.update(seq_lens=torch.tensor([6, 9], dtype=torch.int32)), "seq_lens", "values in [1, 8]"),
        (lambda a: a.update(v_cache=a["v_cache"].double()), "v_cache", "dtype torch.float32 (as q)"),
    ],
    ids=["q_rank", "cache_rank", "v_cache_shape", "head_dim", "wrong_kv_layout", "table_dtype", "lens_shape",
         "lens_capacity", "v_dtype"],
)
def test_paged_bad_input_errors(change, argument, fragment):
    a = _paged_args()
    change(a)
    with pytest.raises(InvalidInputError) as info:
        lz.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seq_lens"], kv_layout=a["kv_layout"])
    assert info.value.argument == argument
    assert fragment in str(info.value), str(info.value)


def test_paged_unknown_kv_layout_names_close_matches():
    a = _paged_args()
    with pytest.raises(UnknownNameError, match=r"unknown kv_layout 'NDH'.*did you mean 'NHD'"):
        lz.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seq_lens"], kv_layout="NDH")
