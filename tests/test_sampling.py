"""Sampling: distributions (chi-square against an independent float64 computation), greedy,
reproducibility, edge cases and errors, for every CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import layerzero as lz
from layerzero.state import runtime

KERNELS = ["torch_ops.sample", "reference.sample"]
N_DRAWS = 20_000
LOGITS = torch.tensor([2.0, 1.5, 1.1, 0.7, 0.2, -0.3, -0.9, -1.4, -2.2, -3.0, 0.45, 1.3], dtype=torch.float64)


def lock(kernel_id: str) -> None:
    lz.lock("sampling.*", kernel_id)


def expected_probs(logits: np.ndarray, top_k=None, top_p=None, min_p=None, temperature=1.0) -> np.ndarray:
    """Independent float64 version of the documented semantics (no ties in the test logits)."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    if top_k is not None:
        mask = np.zeros_like(p)
        mask[order[:top_k]] = 1
        p = p * mask / (p * mask).sum()
    if top_p is not None:
        mask, cum = np.zeros_like(p), 0.0
        for i in order:
            if cum < top_p and p[i] > 0:
                mask[i] = 1
                cum += p[i]
        p = p * mask / (p * mask).sum()
    if min_p is not None:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def draw(kernel: str, dtype=torch.float32, seed: int = 0, **kw) -> np.ndarray:
    lock(kernel)
    logits = LOGITS.to(dtype).expand(N_DRAWS, -1).contiguous()
    out = lz.sample(logits, generator=torch.Generator().manual_seed(seed), **kw)
    assert out.dtype == torch.int64 and out.shape == (N_DRAWS,)
    assert lz.which("sample", logits, **kw) == kernel
    return out.numpy()


def assert_matches(draws: np.ndarray, probs: np.ndarray) -> None:
    counts = np.bincount(draws, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew filtered tokens {np.nonzero(counts * ~support)[0]}"
    result = chisquare(counts[support], probs[support] * len(draws))
    assert result.pvalue > 1e-4, (counts, probs * len(draws), result)


CASES = [
    dict(),
    dict(top_k=4),
    dict(top_p=0.6),
    dict(min_p=0.2),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=6),
    dict(top_k=8, top_p=0.7),
    dict(top_k=8, top_p=0.8, min_p=0.1, temperature=0.8),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "plain")
def test_chi_square_against_renormalized_distribution(kernel, case):
    probs = expected_probs(LOGITS.numpy(), **case)
    assert_matches(draw(kernel, **case), probs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_wrong_distribution_is_detected(kernel):
    """The chi-square check has power: top_k=4 draws do not pass as top_k=5."""
    with pytest.raises(AssertionError):
        assert_matches(draw(kernel, top_k=4), expected_probs(LOGITS.numpy(), top_k=5))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_keep_support(kernel, dtype):
    draws = draw(kernel, dtype=dtype, top_k=3)
    top3 = set(np.argsort(-LOGITS.numpy())[:3].tolist())
    assert set(np.unique(draws).tolist()) == top3


@pytest.mark.parametrize("kernel", KERNELS)
def test_per_row_parameters(kernel):
    lock(kernel)
    rows, vocab, reps = 6, 50, 300
    logits = torch.randn(1, vocab).expand(rows * reps, -1).contiguous()
    k = torch.tensor([1, 2, 5, 0, 100, 3]).repeat_interleave(reps)  # 0 and >= vocab: no top-k
    p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.3]).repeat_interleave(reps)
    t = torch.tensor([1.0, 0.7, 1.3, 1.0, 1.0, 0.0]).repeat_interleave(reps)  # the last row is greedy
    out = lz.sample(logits, top_k=k, top_p=p, temperature=t, generator=torch.Generator().manual_seed(1))
    seen = [set(out[r * reps:(r + 1) * reps].tolist()) for r in range(rows)]
    order = logits[0].argsort(descending=True)
    assert seen[0] == {int(order[0])}
    assert seen[1] == set(order[:2].tolist())
    assert seen[2] == set(order[:5].tolist())
    assert len(seen[3]) > 5 and len(seen[4]) > 5
    assert seen[5] == {int(order[0])}


@pytest.mark.parametrize("kernel", KERNELS)
def test_same_seed_same_draws(kernel):
    lock(kernel)
    logits = torch.randn(64, 1000)
    a = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = lz.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_is_the_only_randomness():
    logits = torch.randn(32, 500)
    torch.manual_seed(0)
    a = lz.sample(logits, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    b = lz.sample(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(37, 1001).to(dtype)
    assert torch.equal(lz.sample_greedy(logits), logits.float().argmax(-1))
    assert torch.equal(lz.sample(logits, temperature=0.0), logits.float().argmax(-1))
    assert torch.equal(lz.sample_topk(logits, 1, temperature=0.7), logits.float().argmax(-1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_edge_values_route_and_behave(kernel):
    lock(kernel)
    logits = torch.randn(8, 20)
    assert lz.explain("sample", logits, top_k=20).context.op == "sampling.plain"  # k >= vocab
    assert lz.explain("sample", logits, top_k=500, top_p=1.0).context.op == "sampling.plain"  # p = 1
    assert lz.explain("sample_greedy", logits).context.op == "sampling.greedy"
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(lz.sample(logits, top_k=20, generator=g()), lz.sample(logits, generator=g()))
    assert torch.equal(lz.sample_topp(logits, 1.0, generator=g()), lz.sample(logits, generator=g()))


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_of_minus_inf(kernel):
    lock(kernel)
    logits = torch.randn(4, 16)
    logits[0] = float("-inf")
    logits[1, :12] = float("-inf")  # only 12..15 allowed
    logits[2, 3] = float("nan")
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        out = lz.sample(logits, top_p=0.95, generator=gen)
        assert out[0] == -1 and out[2] == -1
        assert 12 <= out[1] <= 15 and 0 <= out[3] < 16
    greedy = lz.sample_greedy(logits)
    assert greedy[0] == -1 and greedy[1] == logits[1].argmax()


def test_explain_lists_kernels_and_reasons():
    report = lz.explain("sample_topk", torch.randn(2, 10), 3)
    assert report.selected_kernel == "torch_ops.sample"
    ids = {c.kernel_id for c in report.candidates}
    assert {"reference.sample", "torch_ops.sample"} <= ids
    for c in report.candidates:
        if c.kernel_id.startswith("flashinfer."):
            assert c.rejections  # not installed here, or not a CUDA tensor


@pytest.mark.parametrize("kwargs, argument", [
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=torch.tensor([1, 2])), "top_k"), (dict(top_p=torch.tensor([1, 1, 1])), "top_p"),
    (dict(generator="seed"), "generator"),
])
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(lz.InvalidInputError) as err:
        lz.sample(torch.randn(3, 10), **kwargs)
    assert err.value.argument == argument
    assert argument in str(err.value)


def test_bad_logits():
    with pytest.raises(lz.InvalidInputError, match="logits"):
        lz.sample(torch.randn(10))
    with pytest.raises(lz.InvalidInputError, match="logits"):
        lz.sample([1.0, 2.0])
    with pytest.raises(lz.InvalidInputError, match="floating"):
        lz.sample(torch.ones(2, 3, dtype=torch.int64))


def test_hot_path_is_cached():
    logits = torch.randn(4, 100)
    lz.sample(logits, top_k=5)
    computes = runtime.plans.computes
    for k in (5, 7, 9):
        lz.sample(logits, top_k=k)
    assert runtime.plans.computes == computes  # the value of k is not part of the key
