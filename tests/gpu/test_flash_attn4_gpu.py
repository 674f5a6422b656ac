"""FlashAttention-4 (`flash_attn.cute`, CuTe DSL) for real on the GPU: a correctness matrix against the
float64 reference, our declared constraints against what the library runs, CUDA-graph capture, and the
first-call (JIT) compile time.

    source .fa4b/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_flash_attn4_gpu.py -q -s

Every case is run through the adapter whatever our constraints say, so the table shows what FA4 itself
does (ok / MISMATCH / raised); the assertion is that every case LayerZero's constraints accept runs and
matches (a case FA4 raises on or gets wrong must be one our constraints reject). With $OUT set, the
table is written to $OUT/fa4_correctness.md. Tolerances: tests/test_attention.py attention_tolerance.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch

import layerzero as lz
from layerzero.backends import flash_attn as fa
from layerzero.backends import reference as R
from layerzero.graphs import validate_graph_capture
from layerzero.state import runtime
from tests.test_attention import attention_tolerance, reference_attention

pytestmark = pytest.mark.gpu
pytest.importorskip("flash_attn.cute", reason="FlashAttention-4 is not importable (source .fa4b/activate.sh first)")

DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16
ROWS: list[list[object]] = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    header = ["kernel", "case", "declared", "result", "max abs err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in ROWS]
    text = "\n".join(lines)
    print("\n\nFlashAttention-4 vs float64 reference\n" + text)
    if os.environ.get("OUT"):
        props = torch.cuda.get_device_properties(0)
        with open(os.path.join(os.environ["OUT"], "fa4_correctness.md"), "w") as f:
            f.write(f"# FlashAttention-4 vs float64 reference\n\n{props.name} (sm {props.major}{props.minor}), "
                    f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n\n{text}\n")


def _rand(*shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, dtype=dtype, generator=g)


def _verdict(run, ref, dtype):
    try:
        out = run()
    except Exception as e:  # what FA4 refuses, with its own words
        return f"raised {type(e).__name__}: {str(e).splitlines()[0][:90]}", float("nan")
    err = (out.double() - ref).abs().max().item()
    ok = torch.isfinite(out).all() and torch.allclose(out.double(), ref, **attention_tolerance(dtype))
    return ("ok" if ok else "MISMATCH"), err


DENSE = (
    # (dtype, head_dim, (Hq, Hkv), causal, (Sq, Sk), window, softcap)
    [(BF16, d, h, c, s, None, 0.0) for d, h, c, s in itertools.product(
        [64, 96, 128, 192, 256], [(8, 8), (8, 2)], [True, False], [(128, 128), (77, 131)])]
    + [(FP16, d, (8, 2), True, (128, 128), None, 0.0) for d in (64, 128, 256)]
    + [(BF16, 128, (8, 1), True, (200, 200), None, 0.0),        # MQA
       (BF16, 128, (8, 2), True, (1, 257), None, 0.0),          # one decode row
       (BF16, 128, (8, 2), True, (5, 300), None, 0.0),          # chunked prefill, bottom-right
       (BF16, 128, (8, 2), True, (256, 256), (64, 0), 0.0),     # sliding window
       (BF16, 128, (8, 2), False, (128, 160), (32, 32), 0.0),   # local window both sides
       (BF16, 128, (8, 2), True, (128, 128), None, 30.0),       # softcap (Gemma-2)
       (FP16, 64, (8, 8), True, (128, 128), None, 50.0)]
)


@pytest.mark.parametrize("case", DENSE, ids=lambda c: f"{str(c[0])[6:]}-d{c[1]}-h{c[2][0]}x{c[2][1]}-"
                         f"{'causal' if c[3] else 'full'}-{c[4][0]}x{c[4][1]}-w{c[5]}-cap{c[6]}")
def test_dense_matrix(case):
    dtype, d, (hq, hk), causal, (sq, sk), window, softcap = case
    q, k, v = _rand(2, sq, hq, d, dtype=dtype, seed=d), _rand(2, sk, hk, d, dtype=dtype, seed=d + 1), \
        _rand(2, sk, hk, d, dtype=dtype, seed=d + 2)
    declared, _ = lz.validate("flash_attn4.fwd", "attention", q, k, v, is_causal=causal, window_size=window,
                              softcap=softcap)
    ref = reference_attention(q, k, v, is_causal=causal, window_size=window, softcap=softcap)
    result, err = _verdict(lambda: fa.v4_dense(q, k, v, None, causal, 0.0, None, window, softcap, None), ref, dtype)
    ROWS.append(["flash_attn4.fwd", f"{str(dtype)[6:]} d{d} {hq}/{hk} {'causal' if causal else 'full'} {sq}x{sk} "
                 f"window={window} softcap={softcap}", declared, result, f"{err:.2e}"])
    if declared:
        assert result == "ok", f"declared supported but {result} (err {err:.3g})"


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen(dtype, causal):
    cu_q = torch.tensor([0, 100, 107, 300], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 130, 200, 393], dtype=torch.int32, device=DEV)
    q, k, v = _rand(300, 8, 128, dtype=dtype, seed=1), _rand(393, 2, 128, dtype=dtype, seed=2), \
        _rand(393, 2, 128, dtype=dtype, seed=3)
    declared, _ = lz.validate("flash_attn4.varlen", "attention_varlen", q, k, v, cu_q, cu_k, 193, 193, causal)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 193, 193, causal, None, None, 0.0)
    result, err = _verdict(lambda: fa.v4_varlen(q, k, v, cu_q, cu_k, 193, 193, causal, None, None, 0.0), ref, dtype)
    ROWS.append(["flash_attn4.varlen", f"{str(dtype)[6:]} 3 seqs 8/2 d128 {'causal' if causal else 'full'}",
                 declared, result, f"{err:.2e}"])
    if declared:
        assert result == "ok", f"declared supported but {result} (err {err:.3g})"


@pytest.mark.parametrize("page", [16, 64, 128])
@pytest.mark.parametrize("sq", [1, 4])
def test_paged(page, sq):
    B, hq, hk, d, pages = 3, 8, 2, 128, 64
    kc, vc = _rand(pages, page, hk, d, dtype=BF16, seed=4), _rand(pages, page, hk, d, dtype=BF16, seed=5)
    per_seq = pages // B
    table = torch.randperm(pages, device=DEV, generator=torch.Generator(device=DEV).manual_seed(6))[
        : B * per_seq].view(B, per_seq).to(torch.int32)
    lens = torch.tensor([per_seq * page, per_seq * page // 2 + 3, sq + 1], dtype=torch.int32, device=DEV)
    q = _rand(B, sq, hq, d, dtype=BF16, seed=7)
    declared, _ = lz.validate("flash_attn4.paged", "paged_attention", q, kc, vc, table, lens)
    ref = R.paged_attention(q.double(), kc.double(), vc.double(), table, lens, True, None, None, 0.0, "NHD")
    result, err = _verdict(lambda: fa.v4_paged(q, kc, vc, table, lens, True, None, None, 0.0, "NHD"), ref, BF16)
    ROWS.append(["flash_attn4.paged", f"bf16 page {page} Sq={sq} 8/2 d128", declared, result, f"{err:.2e}"])
    if declared:
        assert result == "ok", f"declared supported but {result} (err {err:.3g})"


def test_selected_through_lz_and_captured_in_a_cuda_graph():
    """With FA4 locked, lz.attention runs it, and a CUDA-graph replay on new inputs equals eager
    (validate_graph_capture): the graph_safe=True it declares holds."""
    q, k, v = _rand(2, 512, 16, 128, dtype=BF16, seed=8), _rand(2, 512, 4, 128, dtype=BF16, seed=9), \
        _rand(2, 512, 4, 128, dtype=BF16, seed=10)
    lz.lock("attention.causal", "flash_attn4.fwd")
    assert lz.which("attention", q, k, v, is_causal=True) == "flash_attn4.fwd"
    out = lz.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, is_causal=True),
                               **attention_tolerance(BF16))
    report = validate_graph_capture(lambda q, k, v: lz.attention(q, k, v, is_causal=True), q, k, v)
    ROWS.append(["flash_attn4.fwd", "CUDA graph replay 2x512 16/4 d128", True,
                 f"{report.replays} replays ok", f"{report.max_abs_error:.2e}"])
    assert lz.health().failures == 0


def test_first_call_compiles_a_variant_in_seconds():
    """The CuTe JIT compiles each new variant on its first call (1.5 s on the H200, 2026-12-04): the
    spec declares needs_jit, so that lz.warmup builds it ahead; the three call times are recorded."""
    q, k, v = _rand(1, 320, 8, 80, dtype=FP16, seed=11), _rand(1, 320, 8, 80, dtype=FP16, seed=12), \
        _rand(1, 320, 8, 80, dtype=FP16, seed=13)  # a variant no other test compiles (fp16, d80, full)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fa.v4_dense(q, k, v, None, False, 0.0, None, None, 0.0, None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ROWS.append(["flash_attn4.fwd", "first / second / third call (fp16 d80 full, new variant)", "",
                 " / ".join(f"{t * 1e3:.1f} ms" for t in times), ""])
    assert times[1] < times[0]
    runtime.ensure_loaded()
    assert runtime.registry.kernel("flash_attn4.fwd").needs_jit


def test_canary_claims_hold():
    report = lz.canary("flash_attn4")
    ROWS.append(["flash_attn4 canary", str(report).splitlines()[0][:100], "", "", ""])
    assert report.claims and report.ok, str(report)
