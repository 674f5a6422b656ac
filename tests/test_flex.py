"""FlexAttention backend on CPU (torch's inductor CPU template): numerics against the float64
reference, analytic block masks, one compile per shape bucket, user score_mod/mask_mod, errors.

Each new bucket compiles for 10-30 s on this 2-core CPU, so the cases share buckets where they can.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference
from layerzero.backends import torch_flex as flex
from layerzero.context import SelectionContext
from layerzero.kernel import check_constraints
from layerzero.reasons import Reason

from .conftest import tolerance

pytestmark = pytest.mark.skipif(not flex.BACKEND.availability[0], reason="torch has no FlexAttention")


def _qkv(B, Hq, Hk, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, Sk, D, generator=g).to(dtype)
    return q, k, v


def _ref(q, k, v, is_causal, scale, window, softcap, slopes):
    out = reference.attention(q.double(), k.double(), v.double(), None, is_causal, 0.0, scale, window, softcap,
                              None if slopes is None else slopes.double())
    return out


CASES = [
    # B, Hq, Hk, Sq, Sk, D, dtype, causal, window, softcap, alibi, scale
    (2, 4, 2, 300, 300, 64, torch.float32, True, None, 0.0, None, None),  # GQA 2, causal square
    (2, 4, 2, 200, 333, 64, torch.float32, True, None, 0.0, None, None),  # causal bottom-right, odd sizes
    (2, 4, 2, 200, 333, 64, torch.float32, False, (50, 10), 0.0, None, None),  # two-sided window
    (1, 4, 1, 130, 500, 64, torch.float32, True, (100, -1), 30.0, "1d", 0.2),  # MQA, window+softcap+ALiBi+scale
    (2, 4, 4, 300, 129, 32, torch.float32, True, None, 5.0, "2d", None),  # Sq > Sk: early rows see no key
    (2, 4, 2, 300, 300, 64, torch.bfloat16, True, None, 0.0, None, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}x{c[5]}-{c[6]}-c{int(c[7])}"
                         f"-w{c[8]}-cap{c[9]}-alibi{c[10]}-s{c[11]}")
def test_flex_matches_float64_reference(case):
    B, Hq, Hk, Sq, Sk, D, dtype, causal, window, softcap, alibi, scale = case
    q, k, v = _qkv(B, Hq, Hk, Sq, Sk, D, dtype, seed=Sq + Sk)
    slopes = None
    if alibi == "1d":
        slopes = torch.rand(Hq) * 0.3
    elif alibi == "2d":
        slopes = torch.rand(B, Hq) * 0.3
    out = flex.attention(q, k, v, None, causal, 0.0, scale, window, softcap, slopes)
    expected = _ref(q, k, v, causal, scale, window, softcap, slopes)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype))
    if Sq > Sk and causal:
        assert out[:, :, : Sq - Sk].abs().max() == 0  # rows before the first key see nothing -> zeros


@pytest.mark.parametrize("Sq,Sk,causal,window", [
    (300, 300, True, None), (200, 333, True, None), (333, 200, True, None), (200, 700, False, (50, 10)),
    (700, 700, True, (257, -1)), (129, 1000, False, (-1, 3)), (1, 1000, True, (200, -1)), (64, 64, False, (0, 0)),
])
def test_band_block_mask_visits_exactly_the_blocks_with_allowed_pairs(Sq, Sk, causal, window):
    mask = flex.band_block_mask(Sq, Sk, causal, window, torch.device("cpu"))
    keep = reference.band_mask(Sq, Sk, causal, window, torch.device("cpu"))
    bs = flex.BLOCK_SIZE
    nq, nk = -(-Sq // bs), -(-Sk // bs)
    padded = torch.zeros(nq * bs, nk * bs, dtype=torch.bool)
    padded[:Sq, :Sk] = keep
    blocks = padded.reshape(nq, bs, nk, bs)
    any_pair = blocks.any(dim=(1, 3))
    inside = torch.zeros_like(padded)
    inside[:Sq, :Sk] = True
    all_pairs = (blocks | ~inside.reshape(nq, bs, nk, bs)).all(dim=(1, 3))
    dense = mask.to_dense()[0, 0].bool()
    assert torch.equal(dense, any_pair)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    counts, indices = mask.full_kv_num_blocks[0, 0], mask.full_kv_indices[0, 0]
    for i in range(nq):
        full[i, indices[i, : counts[i]].long()] = True
    assert torch.equal(full, all_pairs & any_pair)


def test_unbounded_band_has_no_block_mask():
    assert flex.band_block_mask(100, 100, False, None, torch.device("cpu")) is None
    assert flex.band_block_mask(100, 100, False, (-1, -1), torch.device("cpu")) is None


@pytest.mark.slow
def test_sweep_of_20_sequence_lengths_compiles_once():
    """20 lengths (all > one block, batch > 1) share one bucket: one compile, no recompile, no fallback."""
    from torch._dynamo.utils import counters

    flex.clear_caches()
    graphs_before = counters["stats"]["unique_graphs"]
    lengths = [129, 130, 150, 191, 200, 255, 256, 257, 300, 333, 384, 400, 449, 500, 511, 512, 600, 640, 700, 777]
    for i, S in enumerate(lengths):
        q, k, v = _qkv(2, 4, 2, S, S, 64, torch.float32, seed=i)
        out = flex.attention(q, k, v, None, True, 0.0, None, None, 0.0, None)
        if i % 7 == 0:
            torch.testing.assert_close(out.double(), _ref(q, k, v, True, None, None, 0.0, None), **tolerance(q.dtype))
    entries = flex.cache_entries()
    assert list(entries.values()) == [1], entries
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    # The window sizes and offsets are tensors in the mask_mod: new values do not compile again.
    for S, left in ((300, 17), (450, 100), (600, 300)):
        q, k, v = _qkv(2, 4, 2, S, S, 64, torch.float32, seed=S)
        out = flex.attention(q, k, v, None, True, 0.0, None, (left, -1), 0.0, None)
        torch.testing.assert_close(out.double(), _ref(q, k, v, True, None, (left, -1), 0.0, None),
                                   **tolerance(q.dtype))
    assert sorted(flex.cache_entries().values()) == [1, 1]
    assert counters["stats"]["unique_graphs"] - graphs_before == 2


@pytest.mark.slow
def test_user_score_mod_and_mask_mod(caplog):
    B, H, S, D = 2, 4, 200, 32
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))  # BSHD
    doc = torch.zeros(S, dtype=torch.long)
    doc[90:] = 1  # two documents packed in one sequence
    bias = torch.randn(H, generator=g) * 0.1

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (q_idx - kv_idx)

    with caplog.at_level(logging.WARNING, logger="layerzero"):
        out = lz_flex(q, k, v, head_bias, same_doc_causal, scale=0.3)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    i = torch.arange(S)
    scores = qd @ kd.transpose(-1, -2) * 0.3 + bias.double()[:, None, None] * (i[:, None] - i[None, :])
    allowed = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    expected = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ vd
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), **tolerance(torch.float32))
    assert "compiled" not in caplog.text


def lz_flex(*args, **kwargs):
    return flex.flex_attention(*args, **kwargs)


@pytest.mark.parametrize("bad,match", [
    (dict(score_mod=3), "score_mod: expected None or a callable"),
    (dict(layout="SBHD"), "unknown layout 'SBHD'"),
])
def test_flex_attention_rejects_bad_arguments(bad, match):
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(lz.LayerZeroError, match=match):
        flex.flex_attention(q, q, q, **bad)


def test_flex_attention_rejects_bad_tensors():
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(lz.InvalidInputError, match="q: expected a 4-D tensor"):
        flex.flex_attention(q[0], q, q)
    with pytest.raises(lz.InvalidInputError, match="head_dim >= 16"):
        flex.flex_attention(q[..., :8], q[..., :8], q[..., :8])
    with pytest.raises(lz.InvalidInputError, match="dividing q's 2 heads"):
        k = torch.randn(1, 8, 3, 32)
        flex.flex_attention(q, k, k)
    with pytest.raises(lz.InvalidInputError, match="k: expected dtype"):
        flex.flex_attention(q, q.double(), q)


def _ctx(**kw):
    base = dict(op="attention.causal", device_type="cuda", sm=90, generation="hopper", dtype=torch.bfloat16, batch=2,
                seq_len_q=512, seq_len_k=512, num_heads=8, num_kv_heads=2, head_dim=128, head_dim_v=128,
                layout="BHSD", is_causal=True)
    base.update(kw)
    return SelectionContext(**base)


def _reasons(spec_id, **kw):
    spec = next(s for s in flex.BACKEND.kernels if s.id == spec_id)
    return [r.reason for r in check_constraints(spec, _ctx(**kw))]


def test_constraints_of_the_cuda_kernel():
    assert _reasons("flex.attention") == []
    assert _reasons("flex.attention", window=(128, 0), softcap=30.0, alibi=True, op="attention.sliding_window") == []
    assert _reasons("flex.attention", num_kv_heads=8, num_heads=24) == [Reason.GQA_UNSUPPORTED]  # ratio 3
    assert _reasons("flex.attention", head_dim=8, head_dim_v=8) == [Reason.HEAD_DIM_TOO_SMALL]
    assert _reasons("flex.attention", head_dim=320, head_dim_v=320) == [Reason.HEAD_DIM_TOO_LARGE]
    assert _reasons("flex.attention", mask_kind="bool", op="attention.masked") == [Reason.OP_UNSUPPORTED,
                                                                                   Reason.BOOL_MASK_UNSUPPORTED]
    assert _reasons("flex.attention", sm=75, generation="turing") == [Reason.SM_TOO_OLD]
    assert _reasons("flex.attention", device_type="cpu", sm=0, generation="cpu") == [Reason.PLATFORM_MISMATCH]
    assert _reasons("flex.attention_cpu", device_type="cpu", sm=0, generation="cpu") == []


def test_registered_and_ranked_below_torch_cpu_flash():
    kernels = {k.id: k for k in lz.list_kernels("flex.*")}
    assert set(kernels) == {"flex.attention", "flex.attention_cpu"}
    q = torch.randn(1, 128, 4, 32)
    ok, reasons = lz.validate("flex.attention_cpu", "attention", q, q, q, is_causal=True, softcap=20.0)
    assert ok, reasons
    # without soft-cap torch's CPU flash kernel (faster, no compile) ranks first
    assert lz.which("attention", q, q, q, is_causal=True) != "flex.attention_cpu"
