"""Liger's real kernels on the GPU against the float64 reference, and that LayerZero picks them.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_liger_gpu.py -q -s
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.backends import liger
from layerzero.backends import reference as R

pytestmark = pytest.mark.gpu
pytest.importorskip("liger_kernel", reason="liger-kernel is not importable (source .gpu/activate.sh first)")

TOL = {torch.float16: {"rtol": 1e-3, "atol": 1e-3}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
       torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
# Liger rounds act(gate) to the input dtype before multiplying by up (one extra rounding).
GATED_TOL = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
             torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RESULTS: list[tuple[str, str, str, float, str]] = []


@pytest.fixture(autouse=True)
def needs_liger():
    if not liger.BACKEND.availability[0]:
        pytest.skip(f"liger_kernel not available: {liger.BACKEND.availability[2]}")


def check(name: str, shape: tuple, dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor, tol: dict,
          picked: str) -> None:
    err = (out.double() - ref).abs().max().item()
    ok = torch.allclose(out.double(), ref, **tol)
    RESULTS.append((name, str(shape), str(dtype).removeprefix("torch."), err, f"{'ok' if ok else 'FAIL'} pick={picked}"))
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (37, 1000), (4096, 8192), (33000, 128)])
def test_rms_norm(dtype, rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 2
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    ref = R.rms_norm(x.double(), w.double(), 1e-6)
    check("liger.rms_norm", (rows, hidden), dtype, liger.rms_norm(x, w, 1e-6), ref, TOL[dtype],
          lz.which("rms_norm", x, w))
    check("liger.rms_norm(no w)", (rows, hidden), dtype, liger.rms_norm(x, None, 1e-6),
          R.rms_norm(x.double(), None, 1e-6), TOL[dtype], lz.which("rms_norm", x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(3, 768), (2048, 4096), (129, 77)])
def test_layer_norm(dtype, rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype) + 0.5
    w, b = torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    ref = R.layer_norm(x.double(), w.double(), b.double(), 1e-5)
    check("liger.layer_norm", (rows, hidden), dtype, liger.layer_norm(x, w, b, 1e-5), ref, TOL[dtype],
          lz.which("layer_norm", x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, S, Hq, Hk, D, R_", [(2, 17, 32, 8, 128, 128), (1, 5, 12, 12, 80, 40), (4, 256, 8, 1, 64, 64)])
def test_rope(dtype, B, S, Hq, Hk, D, R_):
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, S, Hk, D, device="cuda", dtype=dtype)
    cos, sin = lz.rope_cache(S, R_, device="cuda")
    q0 = q.clone()
    qo, ko = liger.rope(q, k, cos[None], sin[None])
    assert torch.equal(q, q0)
    qr, kr = R.rope(q.double(), k.double(), cos[None].double(), sin[None].double())
    pick = lz.which("rope_qk", q, k, cos, sin)
    check("liger.rope q", (B, S, Hq, D, R_), dtype, qo, qr, TOL[dtype], pick)
    check("liger.rope k", (B, S, Hk, D, R_), dtype, ko, kr, TOL[dtype], pick)
    q1, none = liger.rope(q, None, cos[None], sin[None])
    assert none is None
    check("liger.rope single", (B, S, Hq, D, R_), dtype, q1, qr, TOL[dtype], lz.which("rope", q, cos, sin))
    # through the public API, BHSD and position_ids
    pos = torch.randint(0, 4 * S, (B, S), device="cuda")
    cache_cos, cache_sin = lz.rope_cache(4 * S, R_, device="cuda")
    qt = q.transpose(1, 2)
    out = lz.rope(qt, cache_cos, cache_sin, position_ids=pos, layout="BHSD")
    ref = R.rope(q.double(), None, cache_cos[pos].double(), cache_sin[pos].double())[0].transpose(1, 2)
    check("lz.rope BHSD+pos", (B, Hq, S, D), dtype, out, ref, TOL[dtype],
          lz.which("rope", qt, cache_cos, cache_sin, position_ids=pos, layout="BHSD"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 11008), (513, 14336), (3, 5, 77)])
def test_swiglu_and_geglu(dtype, shape):
    gate = torch.randn(shape, device="cuda", dtype=dtype) * 2
    up = torch.randn(shape, device="cuda", dtype=dtype)
    check("liger.swiglu", shape, dtype, liger.swiglu(gate, up), R.swiglu(gate.double(), up.double()),
          GATED_TOL[dtype], lz.which("swiglu", gate, up))
    check("liger.geglu(tanh)", shape, dtype, liger.geglu_tanh(gate, up), R.geglu(gate.double(), up.double(), "tanh"),
          GATED_TOL[dtype], lz.which("geglu", gate, up, approximate="tanh"))


def test_selection_picks_liger_where_declared():
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    # our Triton SwiGLU ties Liger's at large sizes and wins at small ones (benchmarks/results/norms_rope-h100.md)
    assert lz.which("swiglu", x, x) == "triton_act.swiglu"
    assert lz.which("geglu", x, x, approximate="tanh") == "triton_act.geglu"
    with lz.disabled("triton_act"):
        assert lz.which("swiglu", x, x) == "liger.swiglu"
        assert lz.which("geglu", x, x, approximate="tanh") == "liger.geglu"
    assert lz.which("geglu", x, x) != "liger.geglu"  # erf GELU: not Liger's
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = lz.rope_cache(8, 64, device="cuda")
    # our Triton RoPE beats Liger's at every size measured (benchmarks/results/norms_rope-h100.md)
    assert lz.which("rope_qk", q, q, cos, sin) == "triton_rope.rope"
    with lz.disabled("triton_rope"):
        assert lz.which("rope_qk", q, q, cos, sin) == "liger.rope"
        assert lz.which("rope_qk", q, q, cos, sin, interleaved=True) != "liger.rope"  # Liger: half pairs only
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    assert lz.which("rms_norm", x, w) == "torch.rms_norm"  # 64 rows: torch's fused norm wins there
    big = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    assert lz.which("rms_norm", big, w) == "liger.rms_norm"  # from 16384 rows Liger's does
    xg = x.clone().requires_grad_()
    assert not lz.which("swiglu", xg, xg).startswith("liger.")  # forward-only kernels


def test_zz_summary():
    print("\n| kernel | shape | dtype | max abs err | result |\n|---|---|---|---|---|")
    for name, shape, dtype, err, result in RESULTS:
        print(f"| {name} | {shape} | {dtype} | {err:.2e} | {result} |")
    assert RESULTS
