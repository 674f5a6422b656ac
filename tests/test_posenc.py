"""lz.rope / lz.rope_qk / lz.rope_cache / lz.alibi_slopes against independent float64 formulations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero import InvalidInputError, Reason, UnknownNameError

from .conftest import tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hf_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's apply_rotary_pos_emb in float64, with partial rotary (Phi/NeoX): BSHD x, cos (B|1, S, R)."""
    r = cos.shape[-1]
    xd, rest = x.double()[..., :r], x.double()[..., r:]
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]
    rotated = torch.cat((-xd[..., r // 2:], xd[..., : r // 2]), dim=-1)
    return torch.cat((xd * c + rotated * s, rest), dim=-1)


def gptj_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J's interleaved form as a complex multiplication of adjacent pairs, float64."""
    r = cos.shape[-1]
    pairs = torch.view_as_complex(x.double()[..., :r].reshape(*x.shape[:-1], r // 2, 2).contiguous())
    angle = torch.atan2(sin.double()[..., : r // 2], cos.double()[..., : r // 2])[:, :, None]
    out = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
    return torch.cat((out, x.double()[..., r:]), dim=-1)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [64, 32])  # full and partial (head_dim 64)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_hf_and_gptj(dtype, rotary, interleaved):
    x = torch.randn(2, 7, 3, 64, dtype=dtype)
    cos, sin = lz.rope_cache(7, rotary)
    before = x.clone()
    out = lz.rope(x, cos, sin, interleaved=interleaved)
    ref = (gptj_rope if interleaved else hf_rope)(x, cos[None], sin[None])
    assert out.dtype == dtype and out.shape == x.shape
    close(out, ref, dtype)
    assert torch.equal(x, before)  # never in place
    if rotary < 64:
        assert torch.equal(out[..., rotary:], x[..., rotary:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qk_gqa_bhsd_and_per_batch_cos(dtype):
    q = torch.randn(3, 8, 5, 80, dtype=dtype)  # BHSD, head_dim 80, rotary 80
    k = torch.randn(3, 2, 5, 80, dtype=dtype)
    cos = torch.randn(3, 5, 40).repeat(1, 1, 2)  # arbitrary per-batch angles as cos/sin pairs
    angle = torch.rand(3, 5, 40).repeat(1, 1, 2) * 6
    cos, sin = angle.cos(), angle.sin()
    qo, ko = lz.rope_qk(q, k, cos, sin, layout="BHSD")
    close(qo, hf_rope(q.transpose(1, 2), cos, sin).transpose(1, 2), dtype)
    close(ko, hf_rope(k.transpose(1, 2), cos, sin).transpose(1, 2), dtype)


@pytest.mark.parametrize("batched", [False, True])
def test_position_ids_index_the_cache(batched):
    x = torch.randn(2, 4, 2, 32)
    cos, sin = lz.rope_cache(100, 32)
    pos = torch.tensor([[5, 9, 50, 99], [0, 1, 2, 3]]) if batched else torch.tensor([7, 8, 9, 10])
    out = lz.rope(x, cos, sin, position_ids=pos)
    p = pos if batched else pos[None]
    close(out, hf_rope(x, cos[p], sin[p]), torch.float32)


def test_rope_preserves_pair_norms_and_position_zero_is_identity():
    x = torch.randn(1, 3, 2, 16, dtype=torch.float64)
    cos, sin = lz.rope_cache(3, 16, dtype=torch.float64)
    out = lz.rope(x, cos, sin)
    assert torch.equal(out[:, 0], x[:, 0])
    norms = lambda t: t[..., :8].pow(2) + t[..., 8:].pow(2)  # noqa: E731
    torch.testing.assert_close(norms(out), norms(x))
    assert not torch.allclose(out[:, 1:], x[:, 1:])


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 9), h=st.integers(1, 4), half=st.integers(1, 8),
       extra=st.integers(0, 6), interleaved=st.booleans())
def test_rope_property_any_shape(b, s, h, half, extra, interleaved):
    x = torch.randn(b, s, h, 2 * half + extra)
    cos, sin = lz.rope_cache(s, 2 * half, base=500.0)
    out = lz.rope(x, cos, sin, interleaved=interleaved)
    close(out, (gptj_rope if interleaved else hf_rope)(x, cos[None], sin[None]), torch.float32)


def test_rope_selects_torch_on_cpu_and_explains_liger():
    x = torch.randn(1, 4, 2, 16)
    cos, sin = lz.rope_cache(4, 16)
    report = lz.explain("rope", x, cos, sin)
    assert report.selected_kernel == "torch.rope" and report.context.op == "posenc.rope"
    assert lz.explain("rope_qk", x, x, cos, sin, interleaved=True).selected_kernel == "torch.rope_interleaved"
    liger = report.rejection_reasons.get("liger.rope", [])
    assert Reason.BACKEND_NOT_INSTALLED in liger or Reason.PLATFORM_MISMATCH in liger
    # torch.compile'd RoPE was removed: on the H100 it hit dynamo's recompile limit across dtypes/modes
    assert not any("compiled" in c.kernel_id for c in report.candidates)


@pytest.mark.parametrize("call, argument, fragment", [
    (lambda x, c, s: lz.rope(x, c[:, :15], s[:, :15]), "cos", "even rotary dim"),
    (lambda x, c, s: lz.rope(x, c[:3], s[:3]), "cos", "S = 4"),
    (lambda x, c, s: lz.rope(x, c, s[:, :8]), "sin", "as cos"),
    (lambda x, c, s: lz.rope(x[0], c, s), "x", "4-D"),
    (lambda x, c, s: lz.rope(x.int(), c, s), "x", "floating-point"),
    (lambda x, c, s: lz.rope_qk(x, x[..., :8], c, s), "k", "head_dim"),
    (lambda x, c, s: lz.rope_qk(x, x.double(), c, s), "k", "dtype"),
    (lambda x, c, s: lz.rope(x, c, s, position_ids=torch.tensor([0, 1, 2, 4])), "position_ids", "[0, 4)"),
    (lambda x, c, s: lz.rope(x, c, s, position_ids=torch.tensor([0.0, 1, 2, 3])), "position_ids", "int64"),
    (lambda x, c, s: lz.rope(x, c, s, position_ids=torch.tensor([0, 1])), "position_ids", "shape"),
    (lambda x, c, s: lz.rope(x, c, s, interleaved=1), "interleaved", "bool"),
    (lambda x, c, s: lz.rope(x, [c], s), "cos", "torch.Tensor"),
])
def test_rope_errors_name_the_argument(call, argument, fragment):
    x = torch.randn(1, 4, 2, 16)
    cos, sin = lz.rope_cache(4, 16)
    with pytest.raises(InvalidInputError) as info:
        call(x, cos, sin)
    assert info.value.argument == argument and fragment in str(info.value)


def test_rope_unknown_layout():
    x = torch.randn(1, 4, 2, 16)
    cos, sin = lz.rope_cache(4, 16)
    with pytest.raises(UnknownNameError, match="BSHD"):
        lz.rope(x, cos, sin, layout="SBHD")


def test_position_out_of_range_is_caught_after_the_plan_is_cached():
    x = torch.randn(1, 2, 1, 8)
    cos, sin = lz.rope_cache(4, 8)
    lz.rope(x, cos, sin, position_ids=torch.tensor([0, 3]))
    with pytest.raises(InvalidInputError, match="position_ids"):
        lz.rope(x, cos, sin, position_ids=torch.tensor([0, 4]))


# ----------------------------------------------------------------------------- rope_cache

def test_rope_cache_default_is_hf_formula():
    cos, sin = lz.rope_cache(50, 16, base=10000.0, dtype=torch.float64)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    freqs = torch.arange(50, dtype=torch.float64)[:, None] * inv
    torch.testing.assert_close(cos, torch.cat((freqs, freqs), -1).cos())
    torch.testing.assert_close(sin, torch.cat((freqs, freqs), -1).sin())
    assert lz.rope_cache(3, 8)[0].dtype == torch.float32


def test_linear_scaling_divides_positions():
    plain, _ = lz.rope_cache(64, 32, dtype=torch.float64)
    scaled, _ = lz.rope_cache(64, 32, scaling={"type": "linear", "factor": 4.0}, dtype=torch.float64)
    torch.testing.assert_close(scaled[8], plain[2])
    torch.testing.assert_close(scaled[60], plain[15])


def test_dynamic_ntk_grows_base_only_past_the_original_length():
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    torch.testing.assert_close(lz.rope_inv_freq(8, 10000.0, scaling, seq_len=10), lz.rope_inv_freq(8, 10000.0))
    grown = lz.rope_inv_freq(8, 10000.0, scaling, seq_len=64)
    base = 10000.0 * ((2.0 * 64 / 16) - 1.0) ** (8 / 6)
    torch.testing.assert_close(grown, 1.0 / base ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))


def test_llama3_scaling_bands():
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain = lz.rope_inv_freq(128, 500000.0)
    scaled = lz.rope_inv_freq(128, 500000.0, scaling)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4.0  # high frequencies: unchanged
    low = wavelen > 8192 / 1.0  # low frequencies: divided by factor
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    mid = ~high & ~low
    smooth = (8192 / wavelen[mid] - 1.0) / 3.0
    torch.testing.assert_close(scaled[mid], (1 - smooth) * plain[mid] / 8.0 + smooth * plain[mid])


@pytest.mark.parametrize("kwargs, argument", [
    ({"dim": 7}, "dim"),
    ({"scaling": {"type": "linear"}}, "scaling['factor']"),
    ({"scaling": {"type": "llama3", "factor": 8.0}}, "scaling['original_max_position_embeddings']"),
])
def test_rope_cache_errors(kwargs, argument):
    with pytest.raises(InvalidInputError) as info:
        lz.rope_cache(**{"seq_len": 8, "dim": 8, **kwargs})
    assert info.value.argument == argument


def test_rope_cache_unknown_scaling():
    with pytest.raises(UnknownNameError, match="llama3"):
        lz.rope_cache(8, 8, scaling={"type": "yarnish", "factor": 2.0})


# ----------------------------------------------------------------------------- ALiBi

def test_alibi_slopes_power_of_two():
    torch.testing.assert_close(lz.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert lz.alibi_slopes(1).tolist() == [2.0 ** -8]


def test_alibi_slopes_non_power_of_two_follow_bloom():
    # 12 heads: the 8 slopes of 8 heads, then slopes 1, 3, 5, 7 of 16 heads (2^-0.5 i).
    expected = [2.0 ** -i for i in range(1, 9)] + [2.0 ** (-0.5 * i) for i in (1, 3, 5, 7)]
    torch.testing.assert_close(lz.alibi_slopes(12), torch.tensor(expected))
    assert lz.alibi_slopes(12).dtype == torch.float32
    with pytest.raises(InvalidInputError, match="num_heads"):
        lz.alibi_slopes(0)


def test_alibi_slopes_feed_attention():
    q = torch.randn(1, 6, 5, 16)
    out = lz.attention(q, q, q, is_causal=True, alibi_slopes=lz.alibi_slopes(5))
    assert not torch.allclose(out, lz.attention(q, q, q, is_causal=True))
