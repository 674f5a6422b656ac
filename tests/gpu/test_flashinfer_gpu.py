"""FlashInfer's real kernels on the GPU against the float64 reference, and selection with the JIT gate.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_flashinfer_gpu.py -q -s

Compiled variants (kept small: each prefill module is 75-110 s of nvcc, each decode module ~13 s;
`bash .gpu/save-jit-cache.sh OUT` afterwards keeps them): prefill bf16 d128, prefill bf16 d64,
prefill bf16 d128 window+softcap, prefill bf16 d256, prefill fp16 d128; decode bf16 d128, fp16 d128, bf16 d64, bf16 d128 window,
bf16 d128 softcap. Tolerances against the float64 reference computed from the same half inputs:
bf16 rtol 1e-2 / atol 2e-2, fp16 rtol 1e-3 / atol 2e-3 (attention outputs are O(1) averages of v,
so the absolute term covers outputs near zero). Prints a table: kernel, case, max error, pass.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import layerzero as lz
from layerzero.backends import flashinfer as fi
from layerzero.backends import reference as R
from layerzero.ops.attention import ATTENTION, PAGED_ATTENTION
from layerzero.reasons import Reason
from layerzero.state import runtime

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer", reason="FlashInfer is not importable (source .gpu/activate.sh first)")

DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16
TOL = {BF16: dict(rtol=1e-2, atol=2e-2), FP16: dict(rtol=1e-3, atol=2e-3)}
ROWS: list[tuple[str, str, str, float, bool]] = []
TIMES: list[tuple[str, str, float]] = []


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print("\n\nFlashInfer kernels vs float64 reference")
    print(f"{'kernel':<28} {'case':<66} {'dtype':<9} {'max err':>9}  pass")
    for kernel, case, dtype, err, ok in ROWS:
        print(f"{kernel:<28} {case:<66} {dtype:<9} {err:>9.2e}  {'yes' if ok else 'NO'}")
    print(f"{len(ROWS)} checks, {sum(not r[4] for r in ROWS)} failed")
    if TIMES:
        print("\nmedian latency (CUDA events; informative, not asserted)")
        for kernel, case, us in TIMES:
            print(f"{kernel:<28} {case:<66} {us:>9.1f} us")


def check(kernel: str, case: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    dtype = out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = float((out.double() - ref).abs().max())
    ok = bool(torch.allclose(out.double(), ref, **TOL[dtype]))
    ROWS.append((kernel, case, str(dtype).removeprefix("torch."), err, ok))
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def prepared(kernel_id, ctx):
    """What a plan of `kernel_id` for `ctx` runs: the prepared call, which keeps its FlashInfer plan."""
    runtime.ensure_loaded()
    return runtime.registry.kernel(kernel_id).prepare(ctx)


def rand(*shape, dtype=BF16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, dtype=dtype, generator=g)


def dense_ref(q, k, v, causal, window=None, softcap=0.0, scale=None):
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    return R.attention(t(q), t(k), t(v), None, causal, 0.0, scale, window, softcap).transpose(1, 2)


def paged_inputs(B, Sq, Hq, Hkv, D, page, lens, layout, dtype=BF16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 2
    num_pages = B * max_pages + 5
    table = torch.randperm(num_pages, generator=g)[: B * max_pages].reshape(B, max_pages).to(torch.int32).to(DEV)
    shape = (num_pages, page, Hkv, D) if layout == "NHD" else (num_pages, Hkv, page, D)
    return (rand(B, Sq, Hq, D, dtype=dtype, seed=seed), rand(*shape, dtype=dtype, seed=seed + 1),
            rand(*shape, dtype=dtype, seed=seed + 2), table, torch.tensor(lens, dtype=torch.int32, device=DEV))


def paged_ref(q, kc, vc, table, lens, causal, scale, window, softcap, layout):
    return R.paged_attention(q.double(), kc.double(), vc.double(), table, lens, causal, scale, window, softcap, layout)


def median_us(fn, iters=50):
    for _ in range(10):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


# ----------------------------------------------------------------------------- prefill module, bf16 d128

DENSE_PREFILL = [  # (B, Sq, Sk, Hq, Hkv, causal)
    (2, 512, 512, 32, 8, True),
    (1, 100, 300, 16, 16, False),
    (2, 64, 48, 8, 1, True),      # Sq > Sk: the first 16 rows see no key (zeros)
    (3, 333, 1000, 8, 2, True),   # bottom-right causal, odd lengths
]


@pytest.mark.parametrize("shape", DENSE_PREFILL, ids=str)
def test_dense_prefill(shape):
    B, Sq, Sk, Hq, Hkv, causal = shape
    q, k, v = rand(B, Sq, Hq, 128), rand(B, Sk, Hkv, 128, seed=1), rand(B, Sk, Hkv, 128, seed=2)
    out = fi.prefill(q, k, v, None, causal, 0.0, None, None, 0.0)
    check("flashinfer.prefill", f"B{B} Sq{Sq} Sk{Sk} H{Hq}/{Hkv} d128 causal={causal}", out,
          dense_ref(q, k, v, causal))


def test_dense_prefill_bhsd_through_the_op_binding():
    runtime.ensure_loaded()
    q, k, v = rand(2, 8, 256, 128), rand(2, 2, 256, 128, seed=1), rand(2, 2, 256, 128, seed=2)  # BHSD
    ctx = ATTENTION.context(q, k, v, None, True, 0.0, None, "BHSD")
    run, _ = ATTENTION.bind(runtime.registry.kernel("flashinfer.prefill"), ctx)
    out = run(q, k, v, None, True, 0.0, None, None, 0.0, None)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    check("flashinfer.prefill", "BHSD B2 S256 H8/2 d128 causal", t(out), dense_ref(t(q), t(k), t(v), True))


def test_ragged_prefill():
    lens_q, lens_k = [100, 1, 37, 256, 40], [100, 50, 300, 256, 20]  # the last: causal rows with no key
    cu_q = torch.tensor([0, 100, 101, 138, 394, 434], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 100, 150, 450, 706, 726], dtype=torch.int32, device=DEV)
    q, k, v = rand(sum(lens_q), 16, 128), rand(sum(lens_k), 4, 128, seed=1), rand(sum(lens_k), 4, 128, seed=2)
    for causal in (True, False):
        out = fi.ragged_prefill(q, k, v, cu_q, cu_k, 256, 300, causal, None, None, 0.0)
        ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 256, 300, causal, None, None, 0.0)
        check("flashinfer.ragged_prefill", f"q{lens_q} k{lens_k} H16/4 causal={causal}", out, ref)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_prefill(layout):
    q, kc, vc, table, lens = paged_inputs(3, 32, 10, 2, 128, 16, [40, 33, 100], layout)  # GQA 5
    out = fi.paged_prefill(q, kc, vc, table, lens, True, None, None, 0.0, layout)
    check("flashinfer.paged_prefill", f"{layout} page16 B3 Sq32 lens[40,33,100] H10/2", out,
          paged_ref(q, kc, vc, table, lens, True, None, None, 0.0, layout))


# ----------------------------------------------------------------------------- prefill modules, bf16 d256, fp16 d128

def test_dense_prefill_d256_and_fp16():
    q, k, v = rand(1, 300, 8, 256), rand(1, 300, 2, 256, seed=1), rand(1, 300, 2, 256, seed=2)
    out = fi.prefill(q, k, v, None, True, 0.0, None, None, 0.0)
    check("flashinfer.prefill", "B1 S300 H8/2 d256 causal", out, dense_ref(q, k, v, True))
    q, k, v = (rand(2, 256, 8, 128, dtype=torch.float16, seed=s) for s in range(3))
    out = fi.prefill(q, k, v, None, False, 0.0, None, None, 0.0)
    check("flashinfer.prefill", "fp16 B2 S256 H8/8 d128", out, dense_ref(q, k, v, False))


# ----------------------------------------------------------------------------- prefill module, bf16 d64

def test_dense_prefill_d64():
    q, k, v = rand(2, 200, 8, 64), rand(2, 200, 2, 64, seed=1), rand(2, 200, 2, 64, seed=2)
    out = fi.prefill(q, k, v, None, True, 0.0, None, None, 0.0)
    check("flashinfer.prefill", "B2 S200 H8/2 d64 causal", out, dense_ref(q, k, v, True))


# ----------------------------------------------------------------------------- prefill module, window + softcap

def test_prefill_window_and_softcap():
    """Window (64, 0), softcap 5 and scale 0.5: scores ~N(0, 5.7), so the cap changes the result a lot."""
    q, k, v = rand(2, 512, 8, 128), rand(2, 512, 2, 128, seed=1), rand(2, 512, 2, 128, seed=2)
    out = fi.prefill(q, k, v, None, True, 0.0, 0.5, (64, 0), 5.0)
    ref = dense_ref(q, k, v, True, (64, 0), 5.0, 0.5)
    assert float((dense_ref(q, k, v, True, None, 0.0, 0.5) - ref).abs().max()) > 0.1, "the test would not see it"
    check("flashinfer.prefill", "B2 S512 H8/2 d128 window(64,0) softcap5 scale.5", out, ref)
    q2, kc, vc, table, lens = paged_inputs(2, 24, 8, 2, 128, 16, [200, 70], "NHD", seed=3)
    out = fi.paged_prefill(q2, kc, vc, table, lens, True, 0.5, (32, 0), 5.0, "NHD")
    check("flashinfer.paged_prefill", "NHD page16 B2 Sq24 window(32,0) softcap5 scale.5", out,
          paged_ref(q2, kc, vc, table, lens, True, 0.5, (32, 0), 5.0, "NHD"))


# ----------------------------------------------------------------------------- decode modules

DENSE_DECODE = [  # (B, Sk, Hq, Hkv, dtype, D)
    (4, 4096, 32, 8, BF16, 128),
    (3, 333, 8, 8, BF16, 128),    # odd Sk: pages of one token
    (3, 2048, 16, 16, FP16, 128),
    (2, 1500, 32, 2, BF16, 64),   # group 16
]


@pytest.mark.parametrize("shape", DENSE_DECODE, ids=str)
def test_dense_decode(shape):
    B, Sk, Hq, Hkv, dtype, D = shape
    q, k, v = rand(B, 1, Hq, D, dtype=dtype), rand(B, Sk, Hkv, D, dtype=dtype, seed=1), rand(
        B, Sk, Hkv, D, dtype=dtype, seed=2)
    out = fi.decode(q, k, v, None, True, 0.0, None, None, 0.0)
    check("flashinfer.decode", f"B{B} Sk{Sk} H{Hq}/{Hkv} d{D}", out, dense_ref(q, k, v, True))


def test_dense_decode_bhsd_strided_pages():
    runtime.ensure_loaded()
    q, k, v = rand(2, 8, 1, 128), rand(2, 2, 1000, 128, seed=1), rand(2, 2, 1000, 128, seed=2)  # BHSD
    ctx = ATTENTION.context(q, k, v, None, False, 0.0, None, "BHSD")
    run, _ = ATTENTION.bind(runtime.registry.kernel("flashinfer.decode"), ctx)
    out = run(q, k, v, None, False, 0.0, None, None, 0.0, None)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    check("flashinfer.decode", "BHSD B2 Sk1000 H8/2 d128 (token stride D)", t(out), dense_ref(t(q), t(k), t(v), False))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_paged_decode(layout, dtype):
    lens = [3000, 1, 17, 512, 1023]
    q, kc, vc, table, sl = paged_inputs(5, 1, 32, 8, 128, 16, lens, layout, dtype=dtype, seed=4)
    out = fi.paged_decode(q, kc, vc, table, sl, True, None, None, 0.0, layout)
    check("flashinfer.paged_decode", f"{layout} page16 B5 lens{lens} H32/8", out,
          paged_ref(q, kc, vc, table, sl, True, None, None, 0.0, layout))


def test_paged_decode_plan_reuse_with_new_pages():
    """Same lengths, another page table: the kept plan reads the refreshed indices."""
    q, kc, vc, table, sl = paged_inputs(4, 1, 16, 4, 128, 16, [100, 200, 300, 50], "NHD", seed=5)
    paged_decode = prepared("flashinfer.paged_decode", PAGED_ATTENTION.context(q, kc, vc, table, sl))
    paged_decode(q, kc, vc, table, sl, True, None, None, 0.0, "NHD")
    other = table.flip(0).contiguous()
    out = paged_decode(q, kc, vc, other, sl, True, None, None, 0.0, "NHD")
    check("flashinfer.paged_decode", "plan reused, page table swapped", out,
          paged_ref(q, kc, vc, other, sl, True, None, None, 0.0, "NHD"))


def test_decode_window():
    q, k, v = rand(3, 1, 16, 128), rand(3, 2000, 4, 128, seed=1), rand(3, 2000, 4, 128, seed=2)
    out = fi.decode(q, k, v, None, True, 0.0, None, (256, 0), 0.0)
    check("flashinfer.decode", "B3 Sk2000 H16/4 window(256,0)", out, dense_ref(q, k, v, True, (256, 0)))
    q2, kc, vc, table, sl = paged_inputs(3, 1, 16, 4, 128, 16, [700, 64, 1500], "HND", seed=6)
    out = fi.paged_decode(q2, kc, vc, table, sl, True, None, (100, 0), 0.0, "HND")
    check("flashinfer.paged_decode", "HND page16 B3 window(100,0)", out,
          paged_ref(q2, kc, vc, table, sl, True, None, (100, 0), 0.0, "HND"))


def test_decode_softcap():
    q2, kc, vc, table, sl = paged_inputs(3, 1, 16, 4, 128, 16, [700, 64, 1500], "NHD", seed=7)
    out = fi.paged_decode(q2, kc, vc, table, sl, True, 0.5, None, 5.0, "NHD")
    check("flashinfer.paged_decode", "NHD page16 B3 softcap5 scale.5", out,
          paged_ref(q2, kc, vc, table, sl, True, 0.5, None, 5.0, "NHD"))


# ----------------------------------------------------------------------------- selection and the JIT gate

def test_selection_picks_flashinfer_once_warmed(monkeypatch):
    monkeypatch.delenv(fi.ALLOW_JIT_ENV, raising=False)
    q, k, v = rand(8, 1, 32, 128), rand(8, 1024, 8, 128, seed=1), rand(8, 1024, 8, 128, seed=2)
    ctx = ATTENTION.context(q, k, v, None, True)
    (variant,) = fi.warmup(ctx)
    assert variant.kind == "decode" and fi.is_compiled(variant, ctx.sm)
    # torch's cuDNN and flash SDPA outrank FlashInfer's dense decode on this GPU (benchmarks/results/attention-h100.md)
    assert lz.which("attention", q, k, v, is_causal=True) in ("torch.sdpa_cudnn", "torch.sdpa_flash", "flashinfer.decode")
    with lz.disabled("torch"):
        assert lz.which("attention", q, k, v, is_causal=True) == "flashinfer.decode"
        out = lz.attention(q, k, v, is_causal=True)
    assert runtime.health.fallbacks == 0
    check("lz.attention->flashinfer.decode", "B8 Sk1024 H32/8 d128", out, dense_ref(q, k, v, True))
    qp, kc, vc, table, sl = paged_inputs(4, 1, 32, 8, 128, 16, [900, 33, 4000, 16], "NHD", seed=8)
    # our Triton paged decode outranks FlashInfer's on this GPU (benchmarks/results/attention-h100.md):
    # without it, the warmed FlashInfer kernel is the pick
    report = lz.explain("paged_attention", qp, kc, vc, table, sl, True, None, "NHD")
    assert report.selected_kernel in ("triton_paged.decode", "flashinfer.paged_decode"), str(report)
    with lz.disabled("triton_paged"):
        out = lz.paged_attention(qp, kc, vc, table, sl, is_causal=True, kv_layout="NHD")
        report = lz.explain("paged_attention", qp, kc, vc, table, sl, True, None, "NHD")
    assert report.selected_kernel == "flashinfer.paged_decode", str(report)
    assert runtime.health.fallbacks == 0
    check("lz.paged_attention->paged_decode", "NHD page16 B4 H32/8", out,
          paged_ref(qp, kc, vc, table, sl, True, None, None, 0.0, "NHD"))


def test_uncompiled_variant_is_not_selected(monkeypatch):
    """d256 decode is compiled by no test here: selection must not run nvcc on the hot path."""
    monkeypatch.delenv(fi.ALLOW_JIT_ENV, raising=False)
    q, k, v = rand(2, 1, 8, 256), rand(2, 512, 8, 256, seed=1), rand(2, 512, 8, 256, seed=2)
    ctx = ATTENTION.context(q, k, v, None, True)
    variant = fi.variant_for("decode", ctx)
    report = lz.explain("attention", q, k, v, is_causal=True)
    reasons = report.rejection_reasons.get("flashinfer.decode", [])
    if fi.compiled_on_disk(variant, ctx.sm):  # a JIT cache carried in from elsewhere has it
        assert Reason.NEEDS_JIT_COMPILE not in reasons
    else:
        assert reasons == [Reason.NEEDS_JIT_COMPILE], str(report)
        assert report.selected_kernel != "flashinfer.decode"
        monkeypatch.setenv(fi.ALLOW_JIT_ENV, "1")
        assert "flashinfer.decode" not in lz.explain("attention", q, k, v, is_causal=True).rejection_reasons


def test_timings_against_sdpa():
    """Informative latencies (printed in the summary): FlashInfer vs torch SDPA on a decode and a prefill shape."""
    import torch.nn.functional as F

    q, k, v = rand(32, 1, 32, 128), rand(32, 4096, 8, 128, seed=1), rand(32, 4096, 8, 128, seed=2)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    decode = prepared("flashinfer.decode", ATTENTION.context(q, k, v, None, True))  # as a plan runs it
    TIMES.append(("flashinfer.decode", "B32 Sk4096 H32/8 d128 bf16",
                  median_us(lambda: decode(q, k, v, None, True, 0.0, None, None, 0.0))))
    TIMES.append(("torch sdpa (default)", "B32 Sk4096 H32/8 d128 bf16",
                  median_us(lambda: F.scaled_dot_product_attention(t(q), t(k), t(v), enable_gqa=True))))
    qp, kc, vc, table, sl = paged_inputs(32, 1, 32, 8, 128, 16, [4096] * 32, "NHD", seed=9)
    paged_decode = prepared("flashinfer.paged_decode", PAGED_ATTENTION.context(qp, kc, vc, table, sl))
    TIMES.append(("flashinfer.paged_decode", "B32 KV4096 page16 H32/8 d128 bf16",
                  median_us(lambda: paged_decode(qp, kc, vc, table, sl, True, None, None, 0.0, "NHD"))))
    q, k, v = rand(2, 2048, 32, 128), rand(2, 2048, 8, 128, seed=1), rand(2, 2048, 8, 128, seed=2)
    prefill = prepared("flashinfer.prefill", ATTENTION.context(q, k, v, None, True))
    TIMES.append(("flashinfer.prefill", "B2 S2048 H32/8 d128 causal bf16",
                  median_us(lambda: prefill(q, k, v, None, True, 0.0, None, None, 0.0))))
    TIMES.append(("torch sdpa (default)", "B2 S2048 H32/8 d128 causal bf16",
                  median_us(lambda: F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True))))
    assert all(us > 0 for _, _, us in TIMES)
