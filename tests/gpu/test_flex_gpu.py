"""GPU: FlexAttention backend against the float64 reference over bf16/fp16, head_dim 64/128/256,
GQA 1/4/8, causal and not, prefill and decode, window / soft-cap / ALiBi; one compile per shape
bucket over a 20-length sweep (and its speed against a fresh compile of the same shape); a user
mask_mod/score_mod. Prints a results table ($OUT/flex_gpu.md when OUT is set).

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_flex_gpu.py -q -s

Every case is a new compiled bucket (a few seconds each on the H100), so the matrix covers each
dimension without taking the full product.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference
from layerzero.backends import torch_flex as flex

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not flex.BACKEND.availability[0], reason="no FlexAttention")]

# bf16 1e-2 / fp16 1e-3 relative; absolute 1e-2 / 2e-3 (outputs are O(1) averages of N(0,1) values)
TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=1e-3, atol=2e-3),
       torch.float32: dict(rtol=1e-4, atol=1e-4)}
RESULTS: list[tuple[str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    lines = ["| case | result |", "|---|---|"] + [f"| {c} | {r} |" for c, r in RESULTS]
    table = "\n".join(["# flex.attention on " + torch.cuda.get_device_name(), ""] + lines)
    print("\n" + table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "flex_gpu.md"), "w") as f:
            f.write(table + "\n")


def _qkv(B, Hq, Hk, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, device="cuda").to(dtype)
                 for h, s in ((Hq, Sq), (Hk, Sk), (Hk, Sk)))


CASES = [
    # dtype, D, Hq, Hk, Sq, Sk, causal, window, softcap, alibi
    (torch.bfloat16, 128, 8, 8, 1024, 1024, True, None, 0.0, False),
    (torch.bfloat16, 64, 8, 2, 777, 1500, True, None, 0.0, False),  # GQA 4, bottom-right causal
    (torch.bfloat16, 256, 8, 1, 513, 513, False, None, 0.0, False),  # GQA 8, non-causal
    (torch.float16, 128, 16, 4, 1000, 1000, True, (256, 0), 0.0, False),  # sliding window
    (torch.float16, 64, 8, 8, 600, 900, False, (100, 50), 30.0, False),  # two-sided window + soft-cap
    (torch.bfloat16, 128, 8, 2, 700, 700, True, None, 50.0, True),  # soft-cap + ALiBi
    (torch.float16, 256, 8, 2, 300, 300, True, None, 0.0, True),
    (torch.bfloat16, 128, 32, 8, 1, 4000, True, None, 0.0, False),  # decode (flex decoding template)
    (torch.float16, 64, 8, 1, 1, 2048, True, (512, 0), 20.0, False),  # decode, window + soft-cap
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-D{c[1]}-{c[2]}/{c[3]}-{c[4]}x{c[5]}"
                         f"-c{int(c[6])}-w{c[7]}-cap{c[8]}-alibi{int(c[9])}")
def test_matches_float64_reference(case):
    dtype, D, Hq, Hk, Sq, Sk, causal, window, softcap, alibi = case
    q, k, v = _qkv(2, Hq, Hk, Sq, Sk, D, dtype, seed=Sq + D)
    slopes = (torch.rand(Hq, device="cuda") * 0.2) if alibi else None
    t0 = time.perf_counter()
    out = flex.attention(q, k, v, None, causal, 0.0, None, window, softcap, slopes)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    expected = reference.attention(q.double(), k.double(), v.double(), None, causal, 0.0, None, window, softcap,
                                   None if slopes is None else slopes.double())
    err = (out.double() - expected).abs().max().item()
    RESULTS.append((f"{str(dtype)[6:]} D={D} Hq/Hk={Hq}/{Hk} {Sq}x{Sk} causal={causal} window={window} "
                    f"softcap={softcap} alibi={alibi}", f"max abs err {err:.2e}; first call (compile) {first:.1f} s"))
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


def test_sweep_of_20_lengths_compiles_once_and_stays_fast():
    from torch._dynamo.utils import counters

    flex.clear_caches()
    graphs = counters["stats"]["unique_graphs"]
    lengths = [129, 160, 200, 255, 256, 300, 384, 511, 512, 640, 777, 1000, 1024, 1500, 2000, 2048, 3000, 4000,
               4096, 5000]
    for i, S in enumerate(lengths):
        q, k, v = _qkv(4, 16, 4, S, S, 128, torch.bfloat16, seed=i)
        out = flex.attention(q, k, v, None, True, 0.0, None, None, 0.0, None)
    expected = reference.attention(q[:1].double(), k[:1].double(), v[:1].double(), None, True, 0.0, None, None, 0.0,
                                   None)
    torch.testing.assert_close(out[:1].double(), expected, **TOL[torch.bfloat16])
    entries = flex.cache_entries()
    RESULTS.append(("20-length sweep", f"buckets {len(entries)}, dynamo entries {list(entries.values())}, "
                                       f"new graphs {counters['stats']['unique_graphs'] - graphs}"))
    assert list(entries.values()) == [1]
    assert counters["stats"]["unique_graphs"] - graphs == 1
    # The 20th length through the shared bucket is as fast as a bucket compiled for it alone.
    triton = pytest.importorskip("triton.testing", reason="triton is not installed")

    shared = triton.do_bench(lambda: flex.attention(q, k, v, None, True, 0.0, None, None, 0.0, None))
    flex.clear_caches()
    flex.attention(q, k, v, None, True, 0.0, None, None, 0.0, None)
    alone = triton.do_bench(lambda: flex.attention(q, k, v, None, True, 0.0, None, None, 0.0, None))
    RESULTS.append(("S=5000 after the sweep vs compiled alone", f"{shared:.3f} ms vs {alone:.3f} ms"))
    assert shared < 1.5 * alone


def test_user_mask_and_score_mod():
    B, H, S, D = 2, 8, 1000, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(B, S, H, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    doc = (torch.arange(S, device="cuda") >= 371).long()
    bias = torch.randn(H, device="cuda") * 0.01

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (q_idx - kv_idx)

    out = flex.flex_attention(q, k, v, head_bias, same_doc_causal)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    i = torch.arange(S, device="cuda")
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(D) + bias.double()[:, None, None] * (i[:, None] - i[None, :])
    allowed = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    expected = (torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ vd).transpose(1, 2)
    err = (out.double() - expected).abs().max().item()
    RESULTS.append(("user mask_mod (documents) + score_mod (per-head bias)", f"max abs err {err:.2e}"))
    torch.testing.assert_close(out.double(), expected, **TOL[torch.bfloat16])


def test_softcap_call_can_select_flex():
    q, k, v = (t.transpose(1, 2) for t in _qkv(2, 8, 2, 512, 512, 128, torch.bfloat16, seed=5))  # BSHD
    ok, reasons = lz.validate("flex.attention", "attention", q, k, v, is_causal=True, softcap=30.0)
    assert ok, reasons
    picked = lz.which("attention", q, k, v, is_causal=True, softcap=30.0)
    out = lz.attention(q, k, v, is_causal=True, softcap=30.0)
    expected = reference.attention(*(t.transpose(1, 2).double() for t in (q, k, v)), None, True, 0.0, None, None,
                                   30.0, None).transpose(1, 2)
    RESULTS.append(("lz.attention(softcap=30) picks", picked))
    torch.testing.assert_close(out.double(), expected, **TOL[torch.bfloat16])
