"""lz.solve on the GPU: the solved module calls the kernel dynamic selection picks for random shapes in
its ranges, matches the float64 reference, and replays correctly from a CUDA graph.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_solve_gpu.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.graphs import warmup_for_capture
from tests.test_attention import attention_tolerance, reference_attention
from tests.test_perf_solve import _import, _no_dynamic, _record_calls

pytestmark = pytest.mark.gpu

ATTN = dict(batch=(1, 16), seq_q=(1, 2048), seq_k=(1, 2048), heads=[8, 32], kv_heads=[2, 8], head_dim=[64, 128],
            causal=[0, 1])
NORM = dict(rows=(1, 1 << 16), hidden=[2048, 4096])
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    path = tmp_path_factory.mktemp("solve") / "solved_gpu.py"
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, path, dtypes=DTYPES, device="cuda")
    module = _import(result.path, "solved_gpu")
    assert module.PROBLEMS == []
    return module


@pytest.fixture
def instrumented(solved):
    """The solved module with its kernels recording their ids and dynamic selection forbidden; restored after."""
    saved = dict(vars(solved))
    called = _record_calls(solved)
    solved._dynamic_attention = _no_dynamic
    solved._dynamic_rms_norm = _no_dynamic
    yield called
    vars(solved).update(saved)


def test_solved_module_picks_what_dynamic_selection_picks_and_is_correct(solved, instrumented):
    called = instrumented
    rng = random.Random(0)
    for _ in range(40):
        dtype = rng.choice(DTYPES)
        b, hq, hkv = rng.randint(1, 16), rng.choice([8, 32]), rng.choice([2, 8])
        sq = rng.choice([1, rng.randint(1, 2048)])
        sk = sq if rng.random() < 0.4 else rng.randint(sq, 2048)
        d, causal = rng.choice([64, 128]), rng.random() < 0.5
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
        out = solved.attention(q, k, v, is_causal=causal)
        case = (dtype, b, sq, sk, hq, hkv, d, causal)
        assert called[-1] == lz.which("attention", q, k, v, is_causal=causal), case
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, is_causal=causal),
                                   **attention_tolerance(dtype), msg=lambda m, c=case: f"{c}: {m}")
    for _ in range(30):
        dtype, hidden = rng.choice(DTYPES), rng.choice([2048, 4096])
        rows = rng.choice([rng.randint(1, 4096), rng.randint(16380, 16390), rng.randint(16384, 1 << 16)])
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype)  # around Liger's 16384-row threshold
        w = 1 + 0.1 * torch.randn(hidden, device="cuda", dtype=dtype)
        out = solved.rms_norm(x, w)
        assert called[-1] == lz.which("rms_norm", x, w), (dtype, tuple(x.shape))
        tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-3}
        torch.testing.assert_close(out.double(), R.rms_norm(x.double(), w.double(), 1e-6), **tol)
    assert len(set(called)) >= 2, called


def test_solved_calls_replay_from_a_cuda_graph(solved):
    """A decode-like sequence of solved calls, captured once and replayed on new inputs, gives what eager
    solved calls give (the module's capture check runs under capture and lets graph-safe kernels through)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    w = 1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(8, 700, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))

    def calls():
        return solved.rms_norm(x, w), solved.attention(q, k, v, is_causal=True)

    warmup_for_capture(calls, iterations=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = calls()
    for tensor in (x, q, k, v):
        tensor.copy_(torch.randn(tensor.shape, device="cuda", generator=g).to(tensor.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = calls()
    for got, want in zip(outs, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[1].double(), reference_attention(q, k, v, is_causal=True),
                               **attention_tolerance(torch.bfloat16))


def test_a_solved_module_compiles_into_one_graph_on_the_gpu(solved):
    """torch.compile of solved calls: one graph (the solved functions defer to layerzero's custom ops
    while dynamo traces), the same result as eager solved calls."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    w = 1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(2, 300, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))

    def calls(x, w, q, k, v):
        return solved.rms_norm(x, w), solved.attention(q, k, v, is_causal=True)

    eager = calls(x, w, q, k, v)
    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(calls)(x, w, q, k, v).graph_break_count == 0
        compiled = torch.compile(calls, fullgraph=True)(x, w, q, k, v)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
