"""backends/ipex.py on CPU: argument mapping against a STAND-IN for IPEX, constraints, availability.

IPEX is not installed here (no build exists for torch 2.13), so nothing in this file runs IPEX.
The stand-in (tests/standins/ipex_standin.py) implements the CPU semantics of the five
`ipex.llm.functional` calls as read from IPEX 2.x's sources, including its quirks (softmax_scale
ignored by varlen_attention, top-left causal, rotary results written into query/key); our kernels
run against it and are compared with the float64 reference, so a wrong layout, scale, table
shape or position mapping fails here.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

import layerzero as lz
from layerzero.backends import ipex
from layerzero.backends import reference as R
from layerzero.context import SelectionContext
from layerzero.kernel import check_constraints
from layerzero.ops import posenc
from layerzero.ops.family import contiguous_transforms
from layerzero.reasons import Reason
from layerzero.state import runtime
from tests.standins import ipex_standin as standin

from .conftest import tolerance


@pytest.fixture
def lib(monkeypatch):
    """The stand-in as `intel_extension_for_pytorch`; the ipex backend re-probed as available."""
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", standin.make_ipex())
    ipex.BACKEND.__dict__.pop("availability", None)
    standin.CALLS.clear()
    yield standin.CALLS
    ipex.BACKEND.__dict__.pop("availability", None)


def _spec(kernel_id: str):
    return next(s for s in ipex.BACKEND.kernels if s.id == kernel_id)


def _cpu_ctx(op: str, **kw) -> SelectionContext:
    fields = {"device_type": "cpu", "dtype": torch.bfloat16, "hidden_size": 128, "num_rows": 64,
              "isa": frozenset({"avx2", "fma"})}
    fields.update(kw)
    return SelectionContext(op=op, **fields)


# ----------------------------------------------------------------------------- argument mapping

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_passes_the_weight_in_x_dtype(lib, dtype):
    x = torch.randn(3, 5, 96, dtype=dtype) * 3
    w = torch.randn(96, dtype=torch.float32)
    out = ipex.rms_norm(x, w, 1e-6)
    ref = R.rms_norm(x.double(), w.to(dtype).double(), 1e-6)
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))
    assert lib[-1] == ("rms_norm", {"weight_dtype": dtype, "eps": 1e-6})


@pytest.mark.parametrize("with_params", [True, False])
def test_layer_norm_mapping(lib, with_params):
    x = torch.randn(4, 7, 33)
    w, b = (torch.randn(33), torch.randn(33)) if with_params else (None, None)
    ref = R.layer_norm(x.double(), None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    torch.testing.assert_close(ipex.layer_norm(x, w, b, 1e-5).double(), ref, **tolerance(torch.float32))
    assert lib[-1] == ("fast_layer_norm", {"normalized_shape": (33,)})


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("cos_batch", [1, 2])
@pytest.mark.parametrize("with_k", [True, False])
def test_rope_matches_the_reference_and_leaves_inputs_alone(lib, interleaved, cos_batch, with_k):
    B, S, D = 2, 6, 64
    q = torch.randn(B, S, 4, D, dtype=torch.bfloat16)
    k = torch.randn(B, S, 2, D, dtype=torch.bfloat16) if with_k else None
    table_cos, table_sin = posenc.rope_cache(16, D)
    pos = torch.randint(0, 16, (cos_batch, S))  # per-batch positions when cos_batch == B
    cos, sin = table_cos[pos], table_sin[pos]
    q0, k0 = q.clone(), None if k is None else k.clone()
    kernel, ref_fn = (ipex.rope_interleaved, R.rope_interleaved) if interleaved else (ipex.rope, R.rope)
    qo, ko = kernel(q, k, cos, sin)
    qr, kr = ref_fn(q.double(), None if k is None else k.double(), cos.double(), sin.double())
    torch.testing.assert_close(qo.double(), qr, **tolerance(torch.bfloat16))
    assert torch.equal(q, q0) and (k is None or torch.equal(k, k0))  # IPEX wrote into our copies only
    call = lib[-1][1]
    assert call["rotary_dim"] == D and call["rotary_half"] is (not interleaved)
    assert call["sin_shape"] == (cos_batch * S, D) and call["position_ids"].shape == (cos_batch, S)
    if with_k:
        torch.testing.assert_close(ko.double(), kr, **tolerance(torch.bfloat16))
        assert call["key_heads"] == 2
    else:
        assert ko is None and call["key_heads"] == 1  # one-head scratch key


def test_rope_through_the_plan_in_bhsd(lib):
    ctx = _cpu_ctx("posenc.rope", head_dim=64, head_dim_v=64, hidden_size=64, layout="BHSD", num_heads=4,
                   num_kv_heads=4, batch=1, seq_len_q=5, seq_len_k=5)
    run, transforms = posenc._bind(_spec("ipex.rope"), ctx)
    assert transforms == ("BHSD->BSHD",)
    x = torch.randn(1, 4, 5, 64)
    cos, sin = posenc.rope_cache(5, 64)
    out, _ = run(x, None, cos[None], sin[None])
    ref, _ = R.rope(x.transpose(1, 2).double(), None, cos[None].double(), sin[None].double())
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), **tolerance(torch.float32))


def _packed(lens_q, lens_k, hq=4, hk=2, d=32, dtype=torch.float32):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype)
    k, v = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype), torch.randn(int(cu_k[-1]), hk, d, dtype=dtype)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.05])
def test_varlen_folds_the_scale_into_q(lib, causal, scale):
    lens = [3, 7, 1]
    q, k, v, cu_q, cu_k, mq, mk = _packed(lens, lens if causal else [5, 2, 4])
    out = ipex.varlen(q, k, v, cu_q, cu_k, mq, mk, causal, scale)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, causal, scale, None, 0.0)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))
    assert lib[-1][0] == "varlen_attention" and lib[-1][1]["softmax_scale"] == pytest.approx(32 ** -0.5)


@pytest.mark.parametrize("lens_q, lens_k, causal", [([2, 3], [4, 3], True), ([2, 3], [0, 3], False)])
def test_varlen_calls_ipex_cannot_express_go_to_the_reference(lib, lens_q, lens_k, causal):
    q, k, v, cu_q, cu_k, mq, mk = _packed(lens_q, lens_k)
    out = ipex.varlen(q, k, v, cu_q, cu_k, mq, mk, causal, None)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, causal, None, None, 0.0)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))
    assert lib == []  # bottom-right causal with unequal lengths / an empty key set: IPEX is not called


# ----------------------------------------------------------------------------- constraints

@pytest.mark.parametrize("kernel_id, op, changes", [
    ("ipex.rms_norm", "norm.rms", {}),
    ("ipex.layer_norm", "norm.layer", {"has_weight": False}),
    ("ipex.rope", "posenc.rope", {"head_dim": 128, "head_dim_v": 128, "dtype": torch.float16}),
    ("ipex.rope_interleaved", "posenc.rope_interleaved", {"head_dim": 128, "head_dim_v": 128}),
    ("ipex.varlen", "attention.varlen", {"head_dim": 128, "head_dim_v": 128, "num_heads": 8, "num_kv_heads": 2,
                                         "seq_len_q": 64, "seq_len_k": 64, "is_causal": True}),
])
def test_accepts_supported_cpu_calls(kernel_id, op, changes):
    assert check_constraints(_spec(kernel_id), _cpu_ctx(op, **changes)) == []


@pytest.mark.parametrize("kernel_id, op, changes, reason", [
    ("ipex.rms_norm", "norm.rms", {"device_type": "cuda", "sm": 90}, Reason.PLATFORM_MISMATCH),
    ("ipex.rms_norm", "norm.rms", {"isa": frozenset({"neon", "asimd"})}, Reason.CPU_ISA_UNSUPPORTED),
    ("ipex.rms_norm", "norm.rms", {"dtype": torch.float64}, Reason.DTYPE_UNSUPPORTED),
    ("ipex.rms_norm", "norm.rms", {"has_weight": False}, Reason.CUSTOM_CHECK_FAILED),
    ("ipex.rms_norm", "norm.rms", {"requires_grad": True}, Reason.BACKWARD_UNSUPPORTED),
    ("ipex.rope", "posenc.rope", {"head_dim": 128, "head_dim_v": 128, "hidden_size": 64}, Reason.CUSTOM_CHECK_FAILED),
    ("ipex.varlen", "attention.varlen", {"head_dim": 64, "head_dim_v": 64, "seq_len_q": 4, "seq_len_k": 9,
                                         "is_causal": True}, Reason.CAUSAL_NON_SQUARE),
    ("ipex.varlen", "attention.varlen", {"head_dim": 64, "head_dim_v": 64, "window": (8, 0)}, Reason.WINDOW_UNSUPPORTED),
    ("ipex.varlen", "attention.varlen", {"head_dim": 64, "head_dim_v": 64, "softcap": 30.0}, Reason.SOFTCAP_UNSUPPORTED),
    ("ipex.varlen", "attention.varlen", {"head_dim": 64, "head_dim_v": 64, "dtype": torch.float16},
     Reason.DTYPE_UNSUPPORTED),
])
def test_rejects_what_ipex_cannot_run(kernel_id, op, changes, reason):
    assert reason in [r.reason for r in check_constraints(_spec(kernel_id), _cpu_ctx(op, **changes))]


# ----------------------------------------------------------------------------- availability and selection

def test_without_ipex_installed_it_is_rejected_with_the_reason():
    if ipex.BACKEND.availability[0]:
        pytest.skip("intel_extension_for_pytorch is installed here")
    assert ipex.BACKEND.availability[2].reason == Reason.BACKEND_NOT_INSTALLED
    runtime.ensure_loaded()
    report = runtime.engine.evaluate(_cpu_ctx("norm.rms"), contiguous_transforms)
    assert report.rejection_reasons["ipex.rms_norm"] == [Reason.BACKEND_NOT_INSTALLED]


def test_an_ipex_built_for_another_torch_is_never_imported(lib, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.8.10+cpu" if name == "intel_extension_for_pytorch" else real(name))
    ok, version, why = ipex.BACKEND.availability
    assert not ok and version == "2.8.10+cpu" and why.reason == Reason.BACKEND_VERSION_UNSUPPORTED
    assert f"torch is {torch.__version__}" in why.detail


def test_matching_versions_are_available(lib, monkeypatch):
    major_minor = ".".join(torch.__version__.split(".")[:2])
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: f"{major_minor}.0+cpu" if name == "intel_extension_for_pytorch" else real(name))
    assert ipex.BACKEND.availability[:2] == (True, f"{major_minor}.0+cpu")


def test_selection_with_the_standin_on_cpu(lib):
    # unmeasured, so below torch for the norms and RoPE; for varlen only the reference is besides it
    x = torch.randn(4, 64)
    assert lz.which("rms_norm", x, torch.ones(64)) == "torch.rms_norm"
    if "avx2" not in SelectionContext.device_fields(torch.device("cpu"))["isa"]:
        pytest.skip("this CPU has no AVX2: every ipex kernel is rejected")
    q, k, v, cu_q, cu_k, mq, mk = _packed([3, 5], [3, 5])
    assert lz.which("attention_varlen", q, k, v, cu_q, cu_k, mq, mk, True) == "ipex.varlen"
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, True)
    ref = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk, True, None, None, 0.0)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))
    assert lib[-1][0] == "varlen_attention"


def test_import_layerzero_never_imports_ipex():
    code = ("import sys, layerzero as lz; from layerzero.state import runtime; runtime.ensure_loaded(); "
            "import torch; lz.rms_norm(torch.randn(2, 8)); "
            "assert 'intel_extension_for_pytorch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
