"""FlashInfer sampling kernels and torch._scaled_mm fp8 linear layers on the GPU, against the
float64 references.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_ops_gpu_sampling_quant.py -q -s

Self-contained: every input is made here; skips without CUDA, and the FlashInfer tests skip
without an importable flashinfer. The first FlashInfer sampling call loads its module (one nvcc
build of a minute or two when neither FlashInfer's JIT cache nor .gpu/jit-cache.tgz has it; the
tests themselves take a few seconds). Sampling checks are chi-square tests of 50,000 draws against
the renormalized distribution (p-value > 1e-4, fixed CUDA generator seeds) plus exact support
checks; fp8 linear outputs are compared with the float64 reference that quantizes the activations
the same way. Prints a table: check, kernel, statistic, pass.
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.state import runtime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
N = 50_000
ROWS: list[tuple[str, str, str, bool]] = []
# distinct logits, no ties (the same row as tests/test_sampling.py); torch only: the GPU machine may lack numpy/scipy
LOGITS = torch.tensor([2.0, 1.5, 1.1, 0.7, 0.2, -0.3, -0.9, -1.4, -2.2, -3.0, 0.45, 1.3], dtype=torch.float64)
# kernel id -> a call that uses it (op sampling.plain / topk / topp / minp / topk_topp)
FLASHINFER = {
    "flashinfer.sampling_from_logits": dict(temperature=0.8),
    "flashinfer.top_k_sampling": dict(top_k=50),
    "flashinfer.top_p_sampling": dict(top_p=0.9),
    "flashinfer.min_p_sampling": dict(min_p=0.05),
    "flashinfer.top_k_top_p_sampling": dict(top_k=50, top_p=0.9),
}


def expected_probs(logits: torch.Tensor, top_k=None, top_p=None, min_p=None, temperature=1.0) -> torch.Tensor:
    """The documented semantics, written out independently in float64."""
    p = torch.softmax(logits / temperature, -1)
    order = p.argsort(descending=True).tolist()
    if top_k is not None:
        mask = torch.zeros_like(p)
        mask[order[:top_k]] = 1
        p = p * mask / (p * mask).sum()
    if top_p is not None:
        mask, cum = torch.zeros_like(p), 0.0
        for i in order:
            if cum < top_p and p[i] > 0:
                mask[i] = 1
                cum += float(p[i])
        p = p * mask / (p * mask).sum()
    if min_p is not None:
        p = torch.where(p >= min_p * p.max(), p, 0.0)
        p = p / p.sum()
    return p


def chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # chi2 survival function


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print("\n\nsampling / fp8 linear on", torch.cuda.get_device_name() if torch.cuda.is_available() else "?")
    print(f"{'check':<48} {'kernel':<34} {'statistic':<24} pass")
    for check, kernel, stat, ok in ROWS:
        print(f"{check:<48} {kernel:<34} {stat:<24} {'yes' if ok else 'NO'}")
    print(f"{len(ROWS)} checks, {sum(not r[3] for r in ROWS)} failed")


@pytest.fixture
def flashinfer_sampling() -> None:
    """FlashInfer importable, and its sampling kernels registered once by backends/flashinfer.py."""
    pytest.importorskip("flashinfer", reason="FlashInfer is not importable (source .gpu/activate.sh first)")
    runtime.ensure_loaded()
    ids = [s.id for s in runtime.registry.backend("flashinfer").kernels]
    assert all(ids.count(kernel) == 1 for kernel in FLASHINFER), ids
    assert runtime.registry.backend("flashinfer").availability[0]


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def draw(kernel: str, seed: int = 0, **kw) -> torch.Tensor:
    lz.lock("sampling.*", kernel)
    logits = LOGITS.to(DEV, torch.float32).expand(N, -1).contiguous()
    assert lz.which("sample", logits, **kw) == kernel
    out = lz.sample(logits, generator=gen(seed), **kw)
    assert out.dtype == torch.int64 and out.device == logits.device
    return out.cpu()


def check_distribution(name: str, kernel: str, draws: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(draws.clamp(min=0), minlength=len(probs)).double()
    support = probs > 0
    outside = int(counts[~support].sum()) + int((draws < 0).sum())
    pvalue = chi_square_pvalue(counts[support], probs[support] * len(draws)) if outside == 0 else 0.0
    ok = outside == 0 and pvalue > 1e-4
    ROWS.append((name, kernel, f"p={pvalue:.3g} outside={outside}", ok))
    assert ok, (counts, probs * len(draws))


FLASHINFER_CASES = [
    ("flashinfer.sampling_from_logits", dict(temperature=0.8)),
    ("flashinfer.sampling_from_logits", dict(temperature=1.7)),
    ("flashinfer.top_k_sampling", dict(top_k=4)),
    ("flashinfer.top_k_sampling", dict(top_k=6, temperature=0.6)),
    ("flashinfer.top_p_sampling", dict(top_p=0.6)),
    ("flashinfer.top_p_sampling", dict(top_p=0.8, temperature=1.5)),
    ("flashinfer.min_p_sampling", dict(min_p=0.2)),
    ("flashinfer.min_p_sampling", dict(min_p=0.1, temperature=0.7)),
    ("flashinfer.top_k_top_p_sampling", dict(top_k=8, top_p=0.7)),
    ("flashinfer.top_k_top_p_sampling", dict(top_k=5, top_p=0.9, temperature=1.3)),
]


@pytest.mark.parametrize("kernel, case", FLASHINFER_CASES, ids=[f"{c[0]}-{c[1]}" for c in FLASHINFER_CASES])
def test_flashinfer_distribution(flashinfer_sampling, kernel, case):
    check_distribution(f"chi-square {case}", kernel, draw(kernel, **case), expected_probs(LOGITS, **case))


def test_flashinfer_per_row_parameters_distribution(flashinfer_sampling):
    """(B,) tensors of top_k / top_p / temperature: each row follows its own distribution."""
    kernel = "flashinfer.top_k_top_p_sampling"
    lz.lock("sampling.*", kernel)
    params = [dict(top_k=3, top_p=1.0, temperature=1.0), dict(top_k=12, top_p=0.5, temperature=0.7),
              dict(top_k=0, top_p=0.9, temperature=1.4)]  # top_k 0: off
    n = N // len(params)
    logits = LOGITS.to(DEV, torch.float32).expand(n * len(params), -1).contiguous()
    rows = [torch.full((n,), i, device=DEV) for i in range(len(params))]
    pick = torch.cat(rows)
    k = torch.tensor([p["top_k"] for p in params], device=DEV)[pick]
    tp = torch.tensor([p["top_p"] for p in params], device=DEV)[pick]
    t = torch.tensor([p["temperature"] for p in params], device=DEV)[pick]
    assert lz.which("sample", logits, top_k=k, top_p=tp, temperature=t) == kernel
    out = lz.sample(logits, top_k=k, top_p=tp, temperature=t, generator=gen(5)).cpu()
    for i, p in enumerate(params):
        want = expected_probs(LOGITS, top_k=p["top_k"] or None, top_p=p["top_p"], temperature=p["temperature"])
        check_distribution(f"per-row chi-square {p}", kernel, out[i * n:(i + 1) * n], want)


@pytest.mark.parametrize("kernel", list(FLASHINFER) + ["torch_ops.sample"])
def test_cuda_generator_reproducible(request, kernel):
    if kernel.startswith("flashinfer"):
        request.getfixturevalue("flashinfer_sampling")
    kw = FLASHINFER.get(kernel, dict(top_p=0.9))
    lz.lock("sampling.*", kernel)
    logits = torch.randn(256, 32000, device=DEV, generator=gen(0))
    assert lz.which("sample", logits, **kw) == kernel
    a = lz.sample(logits, generator=gen(11), **kw)
    b = lz.sample(logits, generator=gen(11), **kw)
    c = lz.sample(logits, generator=gen(12), **kw)
    ok = torch.equal(a, b) and not torch.equal(a, c)
    ROWS.append(("same CUDA generator seed, same draws", kernel, f"equal={torch.equal(a, b)}", ok))
    assert ok


@pytest.mark.parametrize("kernel", list(FLASHINFER))
def test_flashinfer_temperature_zero_and_minus_inf_rows(flashinfer_sampling, kernel):
    """Per-row temperature 0 takes the argmax; a row of -inf gives -1; a row with one finite logit
    gives that token; the other rows stay inside their filter's support."""
    lz.lock("sampling.*", kernel)
    logits = torch.randn(6, 1000, device=DEV, generator=gen(1))
    logits[1] = float("-inf")
    logits[4] = float("-inf")
    logits[4, 123] = 0.5
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.8], device=DEV)
    kw = FLASHINFER[kernel] | {"temperature": t}
    assert lz.which("sample", logits, **kw) == kernel
    greedy = logits.argmax(-1)
    top = logits.argsort(-1, descending=True)[:, :50]
    g = gen(2)
    bad = 0
    for _ in range(20):
        out = lz.sample(logits, generator=g, **kw)
        bad += int(out[0] != greedy[0]) + int(out[3] != greedy[3]) + int(out[1] != -1) + int(out[4] != 123)
        if "top_k" in kw:  # rows 2 and 5 sample among the 50 most likely tokens
            bad += int(not (top[2] == out[2]).any()) + int(not (top[5] == out[5]).any())
        bad += int(((out[[2, 5]] < 0) | (out[[2, 5]] >= 1000)).sum())
    ROWS.append(("temperature-0 rows / -inf row / one-finite row", kernel, f"violations={bad}", bad == 0))
    assert bad == 0


@pytest.mark.parametrize("kernel", list(FLASHINFER))
def test_flashinfer_all_rows_temperature_zero_is_greedy(flashinfer_sampling, kernel):
    logits = torch.randn(64, 32000, device=DEV, generator=gen(4), dtype=torch.bfloat16)
    lz.lock("sampling.*", kernel)
    kw = FLASHINFER[kernel] | {"temperature": torch.zeros(64, device=DEV)}
    assert lz.which("sample", logits, **kw) == kernel
    out = lz.sample(logits, generator=gen(0), **kw)
    x = logits.float()  # bf16 has ties at the maximum: any maximal token is the argmax
    ok = bool((x.gather(1, out.view(-1, 1)).view(-1) == x.max(-1).values).all())
    ROWS.append(("temperature 0 on every row == argmax (bf16)", kernel, "", ok))
    assert ok


@pytest.mark.parametrize("kernel", list(FLASHINFER))
def test_sample_selects_flashinfer_on_cuda(flashinfer_sampling, kernel, tmp_path):
    """No lock: on CUDA with FlashInfer installed, lz.sample picks FlashInfer's kernel for its op
    (an empty PerfDB, so that timings left on the machine do not decide)."""
    lz.perfdb(tmp_path / "perfdb.sqlite")
    logits = torch.randn(8, 32000, device=DEV, generator=gen(0))
    kw = FLASHINFER[kernel]
    report = lz.explain("sample", logits, **kw)
    assert report.selected_kernel == kernel, str(report)
    assert kernel not in report.rejection_reasons
    assert lz.which("sample", logits, **kw) == kernel
    out = lz.sample(logits, generator=gen(1), **kw)
    ok = out.dtype == torch.int64 and out.shape == (8,) and bool(((out >= 0) & (out < 32000)).all())
    ROWS.append((f"selected without a lock {kw}", kernel, report.op, ok))
    assert ok


@pytest.mark.parametrize("case", [dict(top_k=4), dict(top_p=0.6), dict(top_k=8, top_p=0.8, min_p=0.1, temperature=0.8)])
def test_torch_kernel_distribution_on_gpu(case):
    check_distribution(f"chi-square {case}", "torch_ops.sample", draw("torch_ops.sample", **case),
                       expected_probs(LOGITS, **case))


def test_cpu_generator_with_cuda_logits_is_an_error():
    with pytest.raises(lz.InvalidInputError, match="generator"):
        lz.sample(torch.randn(2, 10, device=DEV), top_k=3, generator=torch.Generator())


def test_greedy_on_gpu():
    logits = torch.randn(64, 32000, device=DEV, dtype=torch.bfloat16)
    ok = torch.equal(lz.sample_greedy(logits), logits.float().argmax(-1))
    ROWS.append(("greedy == argmax (bf16)", lz.which("sample_greedy", logits), "", ok))
    assert ok


def reference_linear(x: torch.Tensor, w: lz.QuantizedTensor, bias: torch.Tensor) -> torch.Tensor:
    from layerzero.backends import reference as R
    from layerzero.ops.quant import activation_scheme

    return R.quant_linear(x, w, activation_scheme(w), bias, torch.float64)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mkn", [(128, 4096, 4096), (7, 200, 72)])
def test_scaled_mm_fp8_vs_reference(fmt, gran, dtype, mkn):
    m, k, n = mkn
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    w = lz.quantize(torch.randn(n, k, device=DEV) / k**0.5, fmt, gran)
    bias = torch.randn(n, device=DEV, dtype=dtype)
    kernel = lz.which("quant_linear", x, w, bias)
    sm = torch.cuda.get_device_capability()
    assert kernel == ("torch_ops.scaled_mm" if sm >= (8, 9) else "reference.quant_linear")
    out = lz.quant_linear(x, w, bias)
    want = reference_linear(x, w, bias)
    err = ((out.double() - want).abs() / (want.abs() + 1.0)).max().item()
    tol = 1e-2 if (gran == "per_channel" or dtype == torch.bfloat16) else 2e-3  # row-wise gives bf16
    ok = out.dtype == dtype and out.shape == (m, n) and err < tol
    ROWS.append((f"fp8 linear {fmt} {gran} {str(dtype)[6:]} {mkn}", kernel, f"max rel err {err:.2e}", ok))
    assert ok


def test_fp8_quantize_round_trip_on_gpu():
    x = torch.randn(256, 512, device=DEV) * 10
    for fmt, rel in (("fp8_e4m3", 2**-4), ("fp8_e5m2", 2**-3)):
        q = lz.quantize(x, fmt, "block", block_size=(128, 128))
        back = lz.dequantize(q, torch.float32)
        s = q.scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
        ok = bool(((back - x).abs() <= x.abs() * rel * 1.0001 + s * 2**-9).all())
        ROWS.append((f"{fmt} block quantize round trip", lz.which("quantize", x, fmt, "block"), "", ok))
        assert ok
