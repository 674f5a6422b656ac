"""torch.library ops: torch.compile(fullgraph=True) and torch.export of code calling lz.*, fake tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import layerzero as lz
from layerzero.ops import library  # noqa: F401  (registers torch.ops.layerzero.*)
from tests.conftest import assert_close_to_reference

LZ_OPS = {"attention", "rms_norm", "layer_norm", "group_norm", "rope", "rope_qk", "silu", "gelu", "swiglu", "geglu",
          "fused_mlp"}


def block(x, w, b, q, k, v, cos, sin, wg, wu, wd, mask):
    """Every public tensor op once, as a model would call them."""
    h = lz.rms_norm(x, w)
    h = lz.layer_norm(h, w, b)
    h = lz.group_norm(h.transpose(1, 2), 2, None, None).transpose(1, 2)
    a = lz.silu(h) + lz.gelu(h, "tanh") + lz.swiglu(h, h) + lz.geglu(h, h)
    m = lz.fused_mlp(a, wg, wu, wd)
    qr, kr = lz.rope_qk(q, k, cos, sin, layout="BHSD")
    vr = lz.rope(v, cos, sin, layout="BHSD")
    o1 = lz.attention(qr, kr, vr, is_causal=True, layout="BHSD")
    o2 = lz.attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask, softcap=5.0,
                      window_size=(3, 0))
    return m, o1, o2


def reference(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """block in float64 on LayerZero's reference kernels (every other backend disabled)."""
    with torch.no_grad(), lz.disabled():
        return block(*(a.double() if a.is_floating_point() else a for a in args))


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cos, sin = lz.rope_cache(6, 16)
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.2
    mask[..., 0] = True
    return (r(2, 6, 32), r(32), r(32), r(2, 4, 6, 16), r(2, 2, 6, 16), r(2, 2, 6, 16), cos, sin,
            r(48, 32), r(48, 32), r(32, 48), mask)


class Capture:
    """A torch.compile backend that records the FX graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        out = set()
        for gm in self.graphs:
            for node in gm.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    ns, name = node.target.name().split("::")
                    if ns == "layerzero":
                        out.add(name.split(".")[0])
        return out


def test_compile_fullgraph_one_graph_every_op_is_a_layerzero_node():
    torch._dynamo.reset()
    args = inputs()
    eager = block(*args)
    capture = Capture()
    got = torch.compile(block, fullgraph=True, backend=capture)(*args)
    assert len(capture.graphs) == 1
    assert capture.targets() == LZ_OPS
    # eager and compiled each against the float64 reference: their kernel picks may differ
    for e, o, r in zip(eager, got, reference(args), strict=True):
        assert_close_to_reference(e, r)
        assert_close_to_reference(o, r)


def test_compile_aot_eager_matches_float64_reference():
    torch._dynamo.reset()
    args = inputs()
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    for o, r in zip(got, reference(args), strict=True):
        assert_close_to_reference(o, r)


def test_compile_inductor_attention_and_norm():
    torch._dynamo.reset()

    def f(x, w, q, k, v):
        return lz.attention(q, k, v, is_causal=True, layout="BHSD") * 2, lz.rms_norm(x, w) + 1

    args = (torch.randn(3, 32), torch.randn(32), torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16),
            torch.randn(1, 2, 5, 16))
    for e, o in zip(f(*args), torch.compile(f, fullgraph=True)(*args), strict=True):
        torch.testing.assert_close(o, e)


def test_compile_dynamic_shapes_one_graph_two_lengths():
    torch._dynamo.reset()
    capture = Capture()

    def f(q, k, v):
        return lz.attention(q, k, v, is_causal=True)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=capture)
    for s in (5, 9):
        q, k, v = torch.randn(1, s, 4, 16), torch.randn(1, s, 2, 16), torch.randn(1, s, 2, 16)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), is_causal=True,
            enable_gqa=True).transpose(1, 2)
        assert_close_to_reference(cf(q, k, v), ref)
        assert_close_to_reference(f(q, k, v), ref)
    assert len(capture.graphs) == 1


@pytest.mark.parametrize("strict", [False, True])
def test_export_graph_holds_layerzero_ops_and_runs(strict: bool):
    class Block(torch.nn.Module):
        def forward(self, *args):
            return block(*args)

    args = inputs()
    ep = torch.export.export(Block(), args, strict=strict)
    names = {n.target.name().split("::")[1].split(".")[0] for n in ep.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
             and n.target.name().startswith("layerzero::")}
    assert names == LZ_OPS
    for e, o, r in zip(block(*args), ep.module()(*args), reference(args), strict=True):
        assert_close_to_reference(e, r)
        assert_close_to_reference(o, r)


def test_fake_tensors_give_shapes_and_strides_of_the_real_kernels():
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 8)
    real = torch.ops.layerzero.attention(q, k, v, None, True, 0.0, None, "BHSD")
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.layerzero.attention(fq, fk, fv, None, True, 0.0, None, "BHSD")
        assert fake.shape == (2, 4, 7, 8)
        assert fake.stride() == real.stride() == (4 * 7 * 8, 8, 4 * 8, 1)  # BHSD view of BSHD memory
        x = mode.from_tensor(torch.randn(5, 8, 32).transpose(0, 1))  # non-contiguous input
        assert torch.ops.layerzero.rms_norm(x, None).stride() == (5 * 32, 32, 1)


@pytest.mark.parametrize("op,args", [
    ("attention", lambda: (torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), None,
                           False, 0.0, None, "BHSD", [2, 0], 3.0)),
    ("rms_norm", lambda: (torch.randn(3, 5, 32).transpose(0, 1), torch.randn(32), 1e-5)),
    ("layer_norm", lambda: (torch.randn(4, 32), torch.randn(32), torch.randn(32), 1e-5)),
    ("rope", lambda: (torch.randn(2, 6, 3, 16), *lz.rope_cache(6, 16), False, None, "BSHD")),
    ("rope_qk", lambda: (torch.randn(2, 3, 6, 16), torch.randn(2, 1, 6, 16), *lz.rope_cache(6, 8), False, None,
                         "BHSD")),
    ("geglu", lambda: (torch.randn(4, 32), torch.randn(4, 32), "tanh")),
    ("fused_mlp", lambda: (torch.randn(4, 32), torch.randn(48, 32), torch.randn(48, 32), torch.randn(32, 48),
                           "swiglu", "none")),
])
def test_opcheck(op: str, args):
    torch.library.opcheck(getattr(torch.ops.layerzero, op).default, args(),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_bad_input_raises_layerzero_error_at_trace_time():
    def f(q, k, v):
        return lz.attention(q, k, v)

    torch._dynamo.reset()
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16)  # 3 does not divide 4
    with pytest.raises(RuntimeError) as info:  # dynamo reports what the fake kernel raised, with its message
        torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert "InvalidInputError" in str(info.value)
    assert "k: expected a head count dividing q's 4 heads" in str(info.value)
    with FakeTensorMode() as mode:
        with pytest.raises(lz.InvalidInputError, match="x: expected a floating-point dtype"):
            torch.ops.layerzero.rms_norm(mode.from_tensor(torch.ones(3, 4, dtype=torch.int64)), None)


def test_inputs_that_need_grad_run_eagerly_with_correct_gradients():
    torch._dynamo.reset()
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    out = torch.compile(lambda x, w: lz.rms_norm(x, w).sum(), backend="aot_eager")(x, w)
    out.backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6) * w2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad.float(), rtol=1e-4, atol=1e-5)


def test_import_layerzero_stays_light():
    code = ("import sys, layerzero as lz, torch; lz.rms_norm(torch.randn(2, 8)); "
            "print(sorted(m for m in ('layerzero.ops.library', 'transformers', 'diffusers', "
            "'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_on_gpu(mode: str):
    torch._dynamo.reset()

    def f(x, w, q, k, v):
        h = lz.rms_norm(x, w)
        return lz.attention(q, k, v, is_causal=True, layout="BHSD"), lz.swiglu(h, h)

    dev, dt = "cuda", torch.bfloat16
    args = (torch.randn(8, 256, device=dev, dtype=dt), torch.randn(256, device=dev, dtype=dt),
            torch.randn(2, 8, 128, 64, device=dev, dtype=dt), torch.randn(2, 2, 128, 64, device=dev, dtype=dt),
            torch.randn(2, 2, 128, 64, device=dev, dtype=dt))
    expected = f(*args)
    cf = torch.compile(f, fullgraph=True, mode=mode)
    for _ in range(3):  # warmup, capture, replay
        got = cf(*args)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=2e-2, atol=2e-2)


def test_compiled_graph_nodes_run_in_graph_mode():
    """The real kernel of a layerzero custom op marks its calls as possibly captured (a compiled
    graph may be replayed as a CUDA graph), so CUDA selection keeps graph-unsafe kernels out."""
    from layerzero.capture import graph_call, graph_mode

    seen: list[bool] = []

    def spy(x, weight, eps):
        seen.append(graph_mode())
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    lz.register_kernel(id="spy.rms", ops=("norm.rms",), impl=spy, priority=999,
                       platforms=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
    x, w = torch.randn(4, 16), torch.randn(16)
    lz.rms_norm(x, w)
    torch.ops.layerzero.rms_norm(x, w, 1e-6)
    assert seen == [False, True] and not graph_mode()
    with graph_call(), graph_call():
        assert graph_mode()
    assert not graph_mode()


def test_bhsd_strides_warning_fires_under_compile_too(caplog):
    """The fake kernel builds the same context as an eager miss, so a traced call warns as well."""
    torch._dynamo.reset()
    q = torch.randn(2, 16, 8 * 32).view(2, 16, 8, 32).transpose(1, 2)  # BHSD, given without layout=
    with caplog.at_level("WARNING", logger="layerzero"):
        torch.compile(lambda q: lz.attention(q, q, q), fullgraph=True, backend=Capture())(q)
    assert any("strides are those of BHSD tensors" in r.getMessage() for r in caplog.records)
