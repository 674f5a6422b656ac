"""backends/liger.py on CPU: argument mapping against a STAND-IN for Liger, and constraints.

The stand-in below is NOT Liger-Kernel. It mimics, in torch, what Liger 0.8.5's forward functions
do according to their source (liger_kernel/ops/{rms_norm,layer_norm,rope,swiglu,geglu}.py):
`view(-1, hidden)` of its input (fails unless contiguous), unit-stride weight reads, the
"llama"/"gemma"/"none" casting modes, rope rotating (B, H, S, D) views of BSHD storage in place
and reading only the first half of cos/sin in cos's dtype, and the tanh-only GeGLU. It is put in
sys.modules by a fixture for these tests only; the real kernels run in tests/gpu/test_liger_gpu.py.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from layerzero import Reason
from layerzero.backends import liger
from layerzero.backends import reference as R
from layerzero.context import SelectionContext
from layerzero.kernel import check_constraints
from layerzero.ops import activation, posenc
from layerzero.ops.family import contiguous_transforms
from layerzero.state import runtime

from .conftest import tolerance

CALLS: list[tuple[str, dict]] = []


def _rms_norm_forward(X, W, eps, offset, casting_mode, row_mode):
    CALLS.append(("rms_norm", {"offset": offset, "casting_mode": casting_mode, "row_mode": row_mode}))
    shape, dt = X.shape, X.dtype
    X = X.view(-1, shape[-1])
    assert W is None or W.is_contiguous(), "Liger reads W with unit stride"
    if casting_mode == "gemma":
        y = X.float() * torch.rsqrt(X.float().pow(2).mean(-1, keepdim=True) + eps)
        y = y if W is None else y * (offset + W.float())
    elif casting_mode == "llama":
        y = (X.float() * torch.rsqrt(X.float().pow(2).mean(-1, keepdim=True) + eps)).to(dt)
        y = y if W is None else y * (offset + W)
    else:
        raise AssertionError(f"unexpected casting mode {casting_mode}")
    return y.to(dt).view(shape), X, None, 0, 0, casting_mode


def _layer_norm_forward(X, W, B, eps):
    CALLS.append(("layer_norm", {}))
    shape = X.shape
    X = X.view(-1, shape[-1])
    assert W.is_contiguous() and B.is_contiguous()
    y = F.layer_norm(X.float(), (shape[-1],), W.float(), B.float(), eps).to(X.dtype)
    return y.view(shape), X, None, None, 0, 0


def _rope_forward(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # back to the BSHD storage
    CALLS.append(("rope", {"q_was_contiguous": q.is_contiguous(), "k_heads": k.shape[2], "cos": cos, "sin": sin}))
    q, k = q.contiguous(), k.contiguous()  # a no-op for contiguous storage: then in place, as Liger
    assert cos.dim() == 3 and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[1]
    half = cos.shape[-1] // 2
    c, s = cos[..., :half][:, :, None], sin[..., :half][:, :, None]
    for t in (q, k):
        x1, x2 = t[..., :half].to(cos.dtype), t[..., half: 2 * half].to(cos.dtype)
        new1, new2 = x1 * c - x2 * s, x2 * c + x1 * s
        t[..., :half], t[..., half: 2 * half] = new1, new2
    return q.transpose(1, 2), k.transpose(1, 2), cos, sin


def _swiglu_forward(a, b, gate_multiplier=1.0):
    CALLS.append(("swiglu", {}))
    n = a.shape[-1]
    c = (F.silu(a.view(-1, n).float()).to(b.dtype) * b.view(-1, n)).view(a.shape)
    return a, b, c


def _geglu_forward(a, b):
    CALLS.append(("geglu", {}))
    n = a.shape[-1]
    c = (F.gelu(a.view(-1, n).float(), approximate="tanh").to(b.dtype) * b.view(-1, n)).view(a.shape)
    return a, b, c


@pytest.fixture
def standin(monkeypatch):
    """liger_kernel stand-in modules in sys.modules; the liger backend re-probed as available."""
    modules = {}
    for name in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.rms_norm", "liger_kernel.ops.layer_norm",
                 "liger_kernel.ops.rope", "liger_kernel.ops.swiglu", "liger_kernel.ops.geglu"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    modules["liger_kernel.ops.rms_norm"].rms_norm_forward = _rms_norm_forward
    modules["liger_kernel.ops.layer_norm"].layer_norm_forward = _layer_norm_forward
    modules["liger_kernel.ops.rope"].rope_forward = _rope_forward
    modules["liger_kernel.ops.swiglu"].swiglu_forward = _swiglu_forward
    modules["liger_kernel.ops.geglu"].geglu_forward = _geglu_forward
    liger.BACKEND.__dict__.pop("availability", None)
    CALLS.clear()
    yield CALLS
    liger.BACKEND.__dict__.pop("availability", None)


def _cuda_ctx(op: str, **kw) -> SelectionContext:
    fields = {"device_type": "cuda", "sm": 90, "generation": "hopper", "dtype": torch.bfloat16, "hidden_size": 4096,
              "num_rows": 64}
    fields.update(kw)
    return SelectionContext(op=op, **fields)


def _spec(kernel_id: str):
    return next(s for s in liger.BACKEND.kernels if s.id == kernel_id)


# ----------------------------------------------------------------------------- argument mapping

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_uses_gemma_casting_matching_the_reference(standin, dtype, with_weight):
    x = torch.randn(3, 5, 96, dtype=dtype) * 3
    w = torch.randn(192, dtype=torch.float32)[::2] if with_weight else None  # strided fp32 weight
    out = liger.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out.double(), R.rms_norm(x.double(), None if w is None else w.double(), 1e-6),
                               **tolerance(dtype))
    assert standin[-1] == ("rms_norm", {"offset": 0.0, "casting_mode": "gemma", "row_mode": None})


def test_layer_norm_mapping(standin):
    x = torch.randn(4, 7, 33, dtype=torch.bfloat16)
    w, b = torch.randn(33, dtype=torch.bfloat16), torch.randn(33, dtype=torch.bfloat16)
    torch.testing.assert_close(liger.layer_norm(x, w, b, 1e-5).double(),
                               R.layer_norm(x.double(), w.double(), b.double(), 1e-5), **tolerance(torch.bfloat16))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_k", [True, False])
def test_rope_copies_before_liger_rotates_in_place(standin, contiguous, with_k):
    q = torch.randn(2, 6, 4, 80, dtype=torch.bfloat16)
    if not contiguous:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # BSHD view of BHSD storage
    k = torch.randn(2, 6, 2, 80, dtype=torch.bfloat16) if with_k else None
    cos, sin = posenc.rope_cache(6, 64, dtype=torch.bfloat16)
    q0, k0 = q.clone(), None if k is None else k.clone()
    qo, ko = liger.rope(q, k, cos[None], sin[None])
    qr, kr = R.rope(q, k, cos[None], sin[None])
    torch.testing.assert_close(qo.double(), qr.double(), **tolerance(torch.bfloat16))
    assert torch.equal(q, q0) and (k is None or torch.equal(k, k0))  # caller's tensors untouched
    call = standin[-1][1]
    assert call["q_was_contiguous"] and call["cos"].dtype == torch.float32 and call["sin"].dtype == torch.float32
    if with_k:
        torch.testing.assert_close(ko.double(), kr.double(), **tolerance(torch.bfloat16))
        assert call["k_heads"] == 2
    else:
        assert ko is None and call["k_heads"] == 1  # one-head scratch k


def test_gated_activations_mapping(standin):
    gate, up = torch.randn(5, 130, dtype=torch.float16), torch.randn(5, 130, dtype=torch.float16)
    tol = {"rtol": 2e-3, "atol": 2e-3}  # Liger rounds act(gate) to fp16 before the product
    torch.testing.assert_close(liger.swiglu(gate, up).double(), R.swiglu(gate.double(), up.double()), **tol)
    torch.testing.assert_close(liger.geglu_tanh(gate, up, "tanh").double(),
                               R.geglu(gate.double(), up.double(), "tanh"), **tol)
    w_g, w_u, w_d = torch.randn(130, 16), torch.randn(130, 16), torch.randn(16, 130)
    x = torch.randn(3, 16)
    torch.testing.assert_close(liger.fused_mlp(x, w_g, w_u, w_d, "geglu_tanh"),
                               R.fused_mlp(x, w_g, w_u, w_d, "geglu_tanh"), rtol=1e-4, atol=1e-3)
    assert [c[0] for c in standin] == ["swiglu", "geglu", "geglu"]


def test_plan_binding_makes_inputs_contiguous(standin):
    ctx = _cuda_ctx("activation.swiglu")
    run, transforms = activation.SWIGLU.bind(_spec("liger.swiglu"), ctx)
    gate = torch.randn(8, 6).t()  # non-contiguous: Liger's view(-1, n) would fail on it
    assert transforms == ("contiguous",)
    torch.testing.assert_close(run(gate, gate), F.silu(gate) * gate)


# ----------------------------------------------------------------------------- constraints

@pytest.mark.parametrize("kernel_id, op", [("liger.rms_norm", "norm.rms"), ("liger.swiglu", "activation.swiglu"),
                                           ("liger.geglu", "activation.geglu_tanh"), ("liger.rope", "posenc.rope")])
def test_accepts_supported_cuda_calls(kernel_id, op):
    ctx = _cuda_ctx(op, has_bias=False, head_dim=128 if op == "posenc.rope" else 0,
                    head_dim_v=128 if op == "posenc.rope" else 0)
    assert check_constraints(_spec(kernel_id), ctx) == []


@pytest.mark.parametrize("kernel_id, op, changes, reason", [
    ("liger.rms_norm", "norm.rms", {"device_type": "cpu"}, Reason.PLATFORM_MISMATCH),
    ("liger.rms_norm", "norm.rms", {"sm": 75}, Reason.SM_TOO_OLD),
    ("liger.rms_norm", "norm.rms", {"dtype": torch.float64}, Reason.DTYPE_UNSUPPORTED),
    ("liger.rms_norm", "norm.rms", {"hidden_size": 70000}, Reason.HIDDEN_SIZE_TOO_LARGE),
    ("liger.rms_norm", "norm.rms", {"requires_grad": True}, Reason.BACKWARD_UNSUPPORTED),
    ("liger.rms_norm", "norm.rms", {"num_rows": 0}, Reason.CUSTOM_CHECK_FAILED),
    ("liger.layer_norm", "norm.layer", {"has_bias": False}, Reason.CUSTOM_CHECK_FAILED),
    ("liger.layer_norm", "norm.layer", {"has_weight": False, "has_bias": True}, Reason.CUSTOM_CHECK_FAILED),
    ("liger.geglu", "activation.geglu", {}, Reason.OP_UNSUPPORTED),
    ("liger.rope", "posenc.rope_interleaved", {}, Reason.OP_UNSUPPORTED),
    ("liger.fused_mlp", "mlp.geglu", {}, Reason.OP_UNSUPPORTED),
])
def test_rejects_what_liger_cannot_run(kernel_id, op, changes, reason):
    ctx = _cuda_ctx(op, **{"has_bias": True, **changes})
    assert reason in [r.reason for r in check_constraints(_spec(kernel_id), ctx)]


def test_selection_on_hopper_follows_the_h100_measurements(standin):
    runtime.ensure_loaded()
    pick = lambda ctx: runtime.engine.evaluate(ctx, contiguous_transforms).selected_kernel  # noqa: E731
    triton_ok = runtime.registry.backend("triton_act").availability[0]
    # our Triton gate*act tied Liger at many rows and beat it 12x at 4 rows on the H100
    assert pick(_cuda_ctx("activation.swiglu")) == ("triton_act.swiglu" if triton_ok else "liger.swiglu")
    assert pick(_cuda_ctx("activation.geglu_tanh")) == ("triton_act.geglu" if triton_ok else "liger.geglu")
    assert pick(_cuda_ctx("activation.geglu")) == ("triton_act.geglu" if triton_ok else "torch.geglu")
    assert pick(_cuda_ctx("activation.swiglu", dtype=torch.float64)) == "torch.swiglu"
    # norms: torch's fused kernels up to a few thousand rows, Liger from 16384 rows on
    norm = _cuda_ctx("norm.rms", num_rows=4096)
    assert runtime.engine.evaluate(norm, contiguous_transforms).selected_kernel == "torch.rms_norm"
    assert runtime.engine.evaluate(norm.replace(num_rows=65536), contiguous_transforms).selected_kernel == "liger.rms_norm"
    rope = _cuda_ctx("posenc.rope", head_dim=128, head_dim_v=128, num_heads=32, num_kv_heads=8, layout="BSHD")
    # our Triton RoPE (where triton imports) beat Liger's on the H100 at every size measured
    rope_ok = runtime.registry.backend("triton_rope").availability[0]
    assert runtime.engine.evaluate(rope, posenc._transforms).selected_kernel == (
        "triton_rope.rope" if rope_ok else "liger.rope")
    interleaved = rope.replace(op="posenc.rope_interleaved")
    assert runtime.engine.evaluate(interleaved, posenc._transforms).selected_kernel == (
        "triton_rope.rope_interleaved" if rope_ok else "torch.rope_interleaved")


def test_without_liger_installed_it_is_rejected_with_the_reason():
    if liger.BACKEND.availability[0]:
        pytest.skip("liger_kernel is installed here")
    runtime.ensure_loaded()
    report = runtime.engine.evaluate(_cuda_ctx("activation.swiglu"), contiguous_transforms)
    assert report.rejection_reasons["liger.swiglu"] == [Reason.BACKEND_NOT_INSTALLED]
