"""Our Triton gate*act and RoPE kernels, the torch RoPE/activation kernels (eager and compiled) and the
public ops on the GPU, each against the float64 reference.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_posenc_act_gpu.py -q -s
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.backends import torch_native as T
from layerzero.backends import triton_act, triton_rope

pytestmark = pytest.mark.gpu


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton", reason="triton is not installed")


TOL = {torch.float16: {"rtol": 1e-3, "atol": 1e-3}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
       torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
TWO_ROUNDINGS = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
                 torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RESULTS: list[tuple[str, str, str, float, bool]] = []


def check(name: str, shape: tuple, dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor, tol: dict) -> None:
    err = (out.double() - ref).abs().max().item()
    RESULTS.append((name, str(shape), str(dtype).removeprefix("torch."), err, torch.allclose(out.double(), ref, **tol)))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (4096, 14336), (3, 5, 1001), (2**20 + 3,)])
def test_triton_gated_act(needs_triton, dtype, shape):
    gate = torch.randn(shape, device="cuda", dtype=dtype) * 2
    up = torch.randn(shape, device="cuda", dtype=dtype)
    g, u = gate.double(), up.double()
    check("triton_act.swiglu", shape, dtype, triton_act.swiglu(gate, up), R.swiglu(g, u), TOL[dtype])
    for approximate in ("none", "tanh"):
        check(f"triton_act.geglu({approximate})", shape, dtype, triton_act.geglu(gate, up, approximate),
              R.geglu(g, u, approximate), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_compiled_activations(dtype):
    for shape in [(8, 4096), (3, 1000), (1, 77)]:  # dynamic=True: one compilation for all three
        gate = torch.randn(shape, device="cuda", dtype=dtype) * 2
        up = torch.randn(shape, device="cuda", dtype=dtype)
        check("torch.swiglu_compiled", shape, dtype, T.swiglu_compiled(gate, up),
              R.swiglu(gate.double(), up.double()), TOL[dtype])
        check("torch.geglu_compiled(tanh)", shape, dtype, T.geglu_compiled(gate, up, "tanh"),
              R.geglu(gate.double(), up.double(), "tanh"), TOL[dtype])
        check("torch.swiglu", shape, dtype, T.swiglu(gate, up), R.swiglu(gate.double(), up.double()),
              TWO_ROUNDINGS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("B, S, H, D, R_", [(2, 33, 16, 128, 128), (1, 7, 4, 96, 32)])
def test_torch_rope_eager(dtype, interleaved, B, S, H, D, R_):
    x = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    cos, sin = lz.rope_cache(S, R_, device="cuda")
    ref = R.rotate(x.double(), cos[None].double(), sin[None].double(), interleaved)
    check(f"torch.rope{'_interleaved' if interleaved else ''}", (B, S, H, D, R_), dtype,
          T.rotate(x, cos[None], sin[None], interleaved), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("B, S, Hq, Hk, D, R_", [(2, 33, 16, 4, 128, 128), (32, 17, 32, 8, 64, 64),
                                                  (1, 7, 4, 4, 96, 32), (3, 1, 8, 1, 80, 80), (2, 5, 3, 0, 16, 16)])
def test_triton_rope_strided(needs_triton, dtype, interleaved, B, S, Hq, Hk, D, R_):
    """q/k as strided views of one fused QKV projection (how layerzero.serve calls it), per-row
    positions (a (B, S, R) cos/sin) and partial rotary; Hk == 0: single-tensor rope (k None)."""
    qkv = torch.randn(B, S, (Hq + 2 * max(Hk, 1)) * D, device="cuda", dtype=dtype)
    q = qkv[..., :Hq * D].unflatten(-1, (Hq, D))
    k = qkv[..., Hq * D:(Hq + Hk) * D].unflatten(-1, (Hk, D)) if Hk else None
    cache_cos, cache_sin = lz.rope_cache(4 * S + 8, R_, device="cuda")
    pos = torch.randint(0, 4 * S + 8, (B, S), device="cuda")
    cos, sin = cache_cos[pos].to(dtype), cache_sin[pos].to(dtype)
    before = qkv.clone()
    qo, ko = triton_rope.rotate_qk(q, k, cos, sin, interleaved)
    assert torch.equal(qkv, before)  # inputs untouched
    assert qo.is_contiguous() and qo.shape == q.shape
    rq, rk = R.rope(q.double(), None if k is None else k.double(), cos.double(), sin.double(), interleaved)
    name = f"triton_rope.rope{'_interleaved' if interleaved else ''}"
    check(name, (B, S, Hq, Hk, D, R_), dtype, qo, rq, TOL[dtype])
    if k is None:
        assert ko is None
    else:
        check(name + "[k]", (B, S, Hq, Hk, D, R_), dtype, ko, rk, TOL[dtype])


def test_rope_qk_picks_triton_rope_on_fused_qkv_views(needs_triton):
    qkv = torch.randn(4, 64, (32 + 16) * 64, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[..., :2048].unflatten(-1, (32, 64)), qkv[..., 2048:2560].unflatten(-1, (8, 64))
    cos, sin = lz.rope_cache(128, 64, device="cuda")
    pos = torch.arange(64, device="cuda")
    assert lz.which("rope_qk", q, k, cos, sin, position_ids=pos) == "triton_rope.rope"
    qo, ko = lz.rope_qk(q, k, cos, sin, position_ids=pos)
    with lz.disabled("triton_rope"):
        q2, k2 = lz.rope_qk(q, k, cos, sin, position_ids=pos)
    torch.testing.assert_close(qo, q2, **TOL[torch.bfloat16])
    torch.testing.assert_close(ko, k2, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation, approximate", [("swiglu", "none"), ("geglu", "none"), ("geglu", "tanh")])
def test_public_ops_pick_and_match(needs_triton, dtype, activation, approximate):
    x = torch.randn(4, 9, 1024, device="cuda", dtype=dtype)
    w_g = torch.randn(2816, 1024, device="cuda", dtype=dtype) / 32
    w_u = torch.randn(2816, 1024, device="cuda", dtype=dtype) / 32
    w_d = torch.randn(1024, 2816, device="cuda", dtype=dtype) / 53
    out = lz.fused_mlp(x, w_g, w_u, w_d, activation=activation, approximate=approximate)
    suffix = activation if approximate == "none" else "geglu_tanh"
    ref = R.fused_mlp(x.double(), w_g.double(), w_u.double(), w_d.double(), suffix)
    # The kernels round the two GEMM outputs to the input dtype; the float64 reference does not.
    check(f"lz.fused_mlp[{lz.which('fused_mlp', x, w_g, w_u, w_d, activation=activation, approximate=approximate)}]",
          (4, 9, 1024, 2816), dtype, out, ref, {"rtol": 3e-2, "atol": 3e-2})
    gate, up = x @ w_g.T, x @ w_u.T
    fn = lz.swiglu if activation == "swiglu" else (lambda g, u: lz.geglu(g, u, approximate=approximate))
    act_ref = (R.swiglu(gate.double(), up.double()) if activation == "swiglu"
               else R.geglu(gate.double(), up.double(), approximate))
    name = lz.which("swiglu", gate, up) if activation == "swiglu" else lz.which("geglu", gate, up, approximate=approximate)
    check(f"lz.{activation}({approximate})[{name}]", tuple(gate.shape), dtype, fn(gate, up), act_ref, TWO_ROUNDINGS[dtype])
    if activation == "geglu" and approximate == "none":
        assert name == "triton_act.geglu"  # nothing else fuses the erf form


def test_plans_survive_cuda_graph_capture():
    gate = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    expected = lz.swiglu(gate, up)  # warm: compiled and planned outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lz.swiglu(gate, up)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)


def test_zz_summary():
    print("\n| kernel | shape | dtype | max abs err | ok |\n|---|---|---|---|---|")
    for name, shape, dtype, err, ok in RESULTS:
        print(f"| {name} | {shape} | {dtype} | {err:.2e} | {'ok' if ok else 'FAIL'} |")
    assert RESULTS
