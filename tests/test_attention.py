"""Dense attention (`lz.attention`): every CPU kernel against an independent float64 reference.

Tolerance (see `attention_tolerance`): the reference is computed in float64 from the *same*
low-precision inputs, so only the kernel's own rounding is measured. rtol is conftest's
`tolerance(dtype)`; atol is 1e-5 for fp32 and 2 * finfo(dtype).eps for half types (about 2e-3
for fp16 and 1.6e-2 for bf16: a few output ulps, since the outputs are O(1) averages of v).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero.backends import reference as R
from layerzero.backends import torch_native
from layerzero.context import SelectionContext
from layerzero.kernel import KernelSpec, priority_for
from layerzero.ops.attention import ATTENTION
from layerzero.reasons import Reason
from layerzero.state import runtime
from tests.conftest import tolerance

CPU_ATTENTION_KERNELS = ["torch.sdpa_flash_cpu", "torch.sdpa_math", "reference.attention"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["BSHD", "BHSD"]

# (batch, seq_len_q, seq_len_k, num_heads, num_kv_heads, head_dim): odd lengths, GQA 1/4/8,
# MQA, head_dim 64/80/128/256, Sq < Sk (decode-like) and Sq > Sk (rows that see no key when causal).
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 13, 13, 4, 4, 64),
    (2, 7, 19, 8, 2, 80),
    (1, 17, 17, 8, 1, 128),
    (2, 5, 9, 4, 1, 256),
    (1, 1, 33, 8, 8, 128),
    (1, 11, 6, 2, 2, 64),
]


def attention_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance for a low-precision attention output against the float64 reference of the same inputs."""
    atol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    return {"rtol": tolerance(dtype)["rtol"], "atol": atol}


def reference_attention(q, k, v, *, layout="BSHD", is_causal=False, attn_mask=None, scale=None,
                        window_size=None, softcap=0.0, alibi_slopes=None) -> torch.Tensor:
    """float64 attention written independently of layerzero's reference; output in `layout`.

    Conventions of ops/attention.py: bottom-right causal/window alignment, softcap before masking,
    ALiBi -slope*|p - j|, a query row that sees no key gives zeros.
    """
    if layout == "BSHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k, v = q.double(), k.double(), v.double()
    _, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (scale if scale is not None else 1.0 / math.sqrt(d))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # each query's position among the keys
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * (pos - j).abs()
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep &= j <= pos
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            keep &= j >= pos - left
        if right >= 0:
            keep &= j <= pos + right
    s = s.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    return out.transpose(1, 2) if layout == "BSHD" else out


def make_qkv(shape, dtype, layout="BSHD", seed=0, contiguous=True):
    """Random q, k, v in `layout`; non-contiguous ones are views into a larger tensor."""
    b, sq, sk, hq, hk, d = shape
    g = torch.Generator().manual_seed(seed)

    def rand(s, h):
        if contiguous:
            t = torch.randn(b, s, h, d, generator=g).to(dtype)
        else:  # every other head_dim element of a wider tensor: strided in all dims
            t = torch.randn(b, s, h, 2 * d, generator=g).to(dtype)[..., ::2]
        return t if layout == "BSHD" else t.transpose(1, 2)

    q, k, v = rand(sq, hq), rand(sk, hk), rand(sk, hk)
    if not contiguous:
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return q, k, v


def spec_of(kernel_id: str):
    runtime.ensure_loaded()
    return runtime.registry.kernel(kernel_id)


def run_kernel(kernel_id, q, k, v, attn_mask=None, is_causal=False, scale=None, layout="BSHD", window_size=None,
               softcap=0.0, alibi_slopes=None):
    """Run one kernel, bound by the attention family as a plan would bind it (validates first)."""
    args = (q, k, v, attn_mask, is_causal, 0.0, scale, layout, window_size, softcap, alibi_slopes)
    ok, reasons = lz.validate(kernel_id, "attention", *args)
    assert ok, f"{kernel_id} rejected these inputs: {reasons}"
    run, _ = ATTENTION.bind(spec_of(kernel_id), ATTENTION.context(*args))
    return run(q, k, v, attn_mask, is_causal, 0.0, scale, window_size, softcap, alibi_slopes)


def assert_close(out, ref, dtype, what=""):
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{what}: output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    torch.testing.assert_close(out.double(), ref, **attention_tolerance(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kernel_id", CPU_ATTENTION_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_matches_reference(kernel_id, dtype, shape, is_causal, layout):
    q, k, v = make_qkv(shape, dtype, layout, seed=hash((shape, is_causal)) % 1000)
    out = run_kernel(kernel_id, q, k, v, is_causal=is_causal, layout=layout)
    ref = reference_attention(q, k, v, layout=layout, is_causal=is_causal)
    assert_close(out, ref, dtype, kernel_id)


MASK_SHAPES = {  # as a function of (B, Hq, Sq, Sk): full, per-batch broadcast over heads, 2-D, key padding
    "full": lambda b, h, sq, sk: (b, h, sq, sk),
    "b1qk": lambda b, h, sq, sk: (b, 1, sq, sk),
    "qk": lambda b, h, sq, sk: (sq, sk),
    "b11k": lambda b, h, sq, sk: (b, 1, 1, sk),
}


def make_mask(kind, shape_name, b, h, sq, sk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = MASK_SHAPES[shape_name](b, h, sq, sk)
    if kind == "bool":
        mask = torch.rand(shape, generator=g) > 0.3
        mask[..., 0] = True  # every row sees at least one key...
        if len(shape) == 4 and shape[2] > 1:
            mask[..., 1, :] = False  # ...except one row, which must come out as zeros
        return mask
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("kernel_id", CPU_ATTENTION_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_with_mask_matches_reference(kernel_id, dtype, mask_kind, mask_shape, layout):
    b, sq, sk, hq, hk, d = 2, 9, 14, 8, 2, 64
    q, k, v = make_qkv((b, sq, sk, hq, hk, d), dtype, layout, seed=3)
    mask = make_mask(mask_kind, mask_shape, b, hq, sq, sk, dtype)
    out = run_kernel(kernel_id, q, k, v, attn_mask=mask, layout=layout)
    ref = reference_attention(q, k, v, layout=layout, attn_mask=mask)
    assert_close(out, ref, dtype, f"{kernel_id} {mask_kind} mask {tuple(mask.shape)}")


@pytest.mark.parametrize("kernel_id", CPU_ATTENTION_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_kernel_non_contiguous_inputs(kernel_id, dtype, layout, is_causal):
    q, k, v = make_qkv((2, 7, 10, 4, 2, 64), dtype, layout, seed=5, contiguous=False)
    out = run_kernel(kernel_id, q, k, v, is_causal=is_causal, layout=layout)
    assert_close(out, reference_attention(q, k, v, layout=layout, is_causal=is_causal), dtype, kernel_id)


@pytest.mark.parametrize("kernel_id", CPU_ATTENTION_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {"scale": 0.3},
        {"window_size": (3, 0), "is_causal": True},
        {"window_size": (2, 1)},
        {"window_size": (-1, 2)},
        {"softcap": 5.0, "is_causal": True},
        {"alibi_slopes": "per_head", "is_causal": True},
        {"alibi_slopes": "per_batch_head"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_kernel_options_match_reference(kernel_id, dtype, options):
    """scale, sliding window, softcap and ALiBi, for the kernels that declare them."""
    b, sq, sk, hq, hk, d = 2, 6, 11, 4, 2, 64
    q, k, v = make_qkv((b, sq, sk, hq, hk, d), dtype, "BSHD", seed=7)
    options = dict(options)
    if options.get("alibi_slopes") == "per_head":
        options["alibi_slopes"] = torch.rand(hq) + 0.1
    elif options.get("alibi_slopes") == "per_batch_head":
        options["alibi_slopes"] = torch.rand(b, hq) + 0.1
    spec = spec_of(kernel_id)
    needs = {"window_size": spec.supports_window, "softcap": spec.supports_softcap, "alibi_slopes": spec.supports_alibi}
    unsupported = [name for name, ok in needs.items() if name in options and not ok]
    if unsupported:
        ok, reasons = lz.validate(kernel_id, "attention", q, k, v, **options)
        assert not ok and reasons, f"{kernel_id} declares no {unsupported} yet validated"
        return
    out = run_kernel(kernel_id, q, k, v, **options)
    assert_close(out, reference_attention(q, k, v, **options), dtype, f"{kernel_id} {options}")


# ----------------------------------------------------------------------------- the public path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_lz_attention_matches_reference(dtype, layout, shape, is_causal):
    q, k, v = make_qkv(shape, dtype, layout, seed=11)
    out = lz.attention(q, k, v, is_causal=is_causal, layout=layout)
    chosen = lz.which("attention", q, k, v, is_causal=is_causal, layout=layout)
    assert chosen in runtime.registry.kernels
    ref = reference_attention(q, k, v, layout=layout, is_causal=is_causal)
    assert_close(out, ref, dtype, f"lz.attention via {chosen}")


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_lz_attention_with_mask_matches_reference(mask_kind):
    q, k, v = make_qkv((2, 5, 8, 4, 1, 80), torch.float32, "BSHD", seed=13)
    mask = make_mask(mask_kind, "b1qk", 2, 4, 5, 8, torch.float32)
    out = lz.attention(q, k, v, attn_mask=mask)
    assert_close(out, reference_attention(q, k, v, attn_mask=mask), torch.float32, "lz.attention masked")
    assert lz.explain("attention", q, k, v, attn_mask=mask).context.mask_kind == mask_kind


def test_output_keeps_the_input_layout():
    q, k, v = make_qkv((2, 5, 7, 6, 3, 64), torch.float32, "BSHD")
    assert lz.attention(q, k, v).shape == (2, 5, 6, 64)
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out_bhsd = lz.attention(qb, kb, vb, layout="BHSD")
    assert out_bhsd.shape == (2, 6, 5, 64)
    torch.testing.assert_close(out_bhsd.transpose(1, 2), lz.attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_window_given_as_list_runs_and_unbounded_window_is_no_window():
    """window_size=[l, r] is accepted like a tuple; (-1, -1) means no window at all."""
    q, k, v = make_qkv((1, 6, 6, 2, 2, 64), torch.float32, "BSHD", seed=17)
    out = lz.attention(q, k, v, is_causal=True, window_size=[2, 0])
    assert_close(out, reference_attention(q, k, v, is_causal=True, window_size=(2, 0)), torch.float32, "list window")
    report = lz.explain("attention", q, k, v, is_causal=True, window_size=(-1, -1))
    assert report.context.window is None and report.context.op == "attention.causal"
    out = lz.attention(q, k, v, is_causal=True, window_size=(-1, -1))
    assert_close(out, reference_attention(q, k, v, is_causal=True), torch.float32, "unbounded window")


def test_dropout_is_applied_by_a_kernel_that_supports_it():
    q, k, v = make_qkv((1, 16, 16, 2, 2, 64), torch.float32, "BSHD", seed=19)
    plan = lz.select("attention", q, k, v, dropout_p=0.5)
    assert runtime.registry.kernel(plan.kernel_id).supports_dropout
    torch.manual_seed(0)
    dropped = lz.attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, lz.attention(q, k, v), atol=1e-3), "dropout_p=0.5 changed nothing"
    assert torch.isfinite(dropped).all()


def test_gradients_match_reference():
    """requires_grad selects a kernel with a backward, and its gradients are right."""
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 5, 7, 4, 2, 64), torch.float64, "BSHD", seed=23))
    assert runtime.registry.kernel(lz.which("attention", q, k, v, is_causal=True)).supports_backward
    lz.attention(q, k, v, is_causal=True).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v, is_causal=True).sum().backward()
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-7, atol=1e-9)


def test_float64_runs_on_a_kernel_that_declares_it():
    q, k, v = make_qkv((1, 4, 4, 2, 2, 64), torch.float64, "BSHD", seed=29)
    chosen = lz.which("attention", q, k, v)
    assert torch.float64 in runtime.registry.kernel(chosen).dtypes
    torch.testing.assert_close(lz.attention(q, k, v), reference_attention(q, k, v), rtol=1e-10, atol=1e-12)


def test_causal_decode_row_runs_on_square_only_causal_kernels():
    """Sq == 1 with bottom-right causal sees every key, so kernels whose causal mask needs Sq == Sk
    (torch flash, cuDNN) can run it without a mask; the result equals non-causal attention."""
    from layerzero.context import SelectionContext
    from layerzero.kernel import check_constraints
    from layerzero.state import runtime

    runtime.ensure_loaded()
    ctx = SelectionContext(op="attention.causal", device_type="cuda", sm=90, generation="hopper",
                           dtype=torch.bfloat16, batch=2, seq_len_q=1, seq_len_k=4096, num_heads=8,
                           num_kv_heads=8, head_dim=128, head_dim_v=128, layout="BSHD", is_causal=True)
    assert check_constraints(runtime.registry.kernel("torch.sdpa_flash"), ctx) == []
    reasons = [r.reason for r in check_constraints(runtime.registry.kernel("torch.sdpa_flash"), ctx.replace(seq_len_q=2))]
    assert reasons == [lz.Reason.CAUSAL_NON_SQUARE]
    q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 9, 4, 32), torch.randn(2, 9, 4, 32)
    torch.testing.assert_close(lz.attention(q, k, v, is_causal=True), lz.attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_cudnn_is_not_chosen_for_shapes_torch_refuses_it():
    """torch's cuDNN gate refuses a key/value length of 1; with only CUDNN_ATTENTION enabled such a call
    raises, so the spec rejects it (found by the H100 solve test)."""
    from layerzero.context import SelectionContext
    from layerzero.kernel import check_constraints
    from layerzero.state import runtime

    runtime.ensure_loaded()
    cudnn = runtime.registry.kernel("torch.sdpa_cudnn")
    ctx = SelectionContext(op="attention.full", device_type="cuda", sm=90, generation="hopper", dtype=torch.bfloat16,
                           batch=2, seq_len_q=1, seq_len_k=2, num_heads=8, num_kv_heads=8, head_dim=128,
                           head_dim_v=128, layout="BSHD")
    assert check_constraints(cudnn, ctx) == []
    assert [r.reason for r in check_constraints(cudnn, ctx.replace(seq_len_k=1))] == [lz.Reason.SEQ_LEN_TOO_SHORT]
    assert check_constraints(cudnn, ctx.replace(seq_len_q=3, seq_len_k=3)) == []


def test_inspection_accepts_a_list_window_like_the_call():
    q = torch.randn(1, 8, 2, 16)
    assert lz.which("attention", q, q, q, window_size=[2, 0]) == lz.which("attention", q, q, q, window_size=(2, 0))
    assert lz.explain("attention", q, q, q, window_size=[2, 0]).context.window == (2, 0)


# ----------------------------------------------------------------------------- CPU priorities by ISA

def _cpu_attention_ctx(dtype: torch.dtype, seq_len_q: int, isa: frozenset[str]) -> SelectionContext:
    return SelectionContext(op="attention.causal", device_type="cpu", dtype=dtype, batch=1, seq_len_q=seq_len_q,
                            seq_len_k=seq_len_q, num_heads=8, num_kv_heads=8, head_dim=64, head_dim_v=64,
                            layout="BHSD", is_causal=True, isa=isa)


def test_isa_priorities_replace_the_priority_on_cpus_with_the_flag():
    spec = KernelSpec(id="x.k", ops=("norm.rms",), impl=lambda: None, priority=65,
                      isa_priorities=(("avx512_fp16", 40), ("amx_fp16", 30)), row_priorities=((1000, 70),))
    ctx = SelectionContext(op="norm.rms", num_rows=8)
    assert priority_for(spec, ctx.replace(isa=frozenset({"avx2"}))) == 65
    assert priority_for(spec, ctx.replace(isa=frozenset({"avx2", "amx_fp16"}))) == 30
    assert priority_for(spec, ctx.replace(isa=frozenset({"amx_fp16", "avx512_fp16"}))) == 40  # first match
    assert priority_for(spec, ctx.replace(isa=frozenset({"avx512_fp16"}), num_rows=4096)) == 70  # rows on top


@pytest.mark.parametrize("dtype, seq_len_q, isa, expected", [
    (torch.float16, 128, frozenset({"avx2"}), "torch.sdpa_flash_cpu"),  # fp32 copies: evidence mixed, default kept
    (torch.float16, 128, frozenset({"avx2", "avx512f", "avx512_fp16"}), "torch.sdpa_flash_cpu"),
    (torch.float16, 128, frozenset({"avx2", "amx_tile", "amx_fp16"}), "torch.sdpa_flash_cpu"),
    (torch.float16, 1, frozenset({"avx2"}), "torch.sdpa_flash_cpu"),  # decode: the copy of K/V costs more
    (torch.bfloat16, 128, frozenset({"avx2"}), "torch.sdpa_flash_cpu"),  # measured: no gain for bf16
    (torch.float32, 128, frozenset({"avx2"}), "torch.sdpa_flash_cpu"),
])
def test_cpu_attention_pick_follows_the_isa(dtype, seq_len_q, isa, expected):
    runtime.ensure_loaded()
    report = runtime.engine.evaluate(_cpu_attention_ctx(dtype, seq_len_q, isa), ATTENTION.transforms)
    assert report.selected_kernel == expected
    if dtype == torch.float16 and seq_len_q > 1:
        upcast = runtime.registry.kernel("torch.sdpa_flash_cpu_fp32")
        native = bool(isa & {"avx512_fp16", "amx_fp16"})
        assert priority_for(upcast, _cpu_attention_ctx(dtype, seq_len_q, isa)) == (40 if native else 55)
    if dtype == torch.float16 and seq_len_q == 1:
        assert report.rejection_reasons["torch.sdpa_flash_cpu_fp32"] == [Reason.SEQ_LEN_TOO_SHORT]


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_sdpa_flash_cpu_fp32_matches_the_reference_in_float16(mask):
    spec = next(s for s in torch_native.BACKEND.kernels if s.id == "torch.sdpa_flash_cpu_fp32")
    q, k, v = (torch.randn(2, 4, 40, 64, dtype=torch.float16) for _ in range(3))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(40, 40) > 0.3
        attn_mask[:, 0] = True
    elif mask == "float":
        attn_mask = torch.randn(40, 40, dtype=torch.float16)
    out = spec.impl(q, k, v, attn_mask, mask is None, 0.0, None)
    ref = R.attention(q.double(), k.double(), v.double(), None if attn_mask is None else (
        attn_mask if attn_mask.dtype == torch.bool else attn_mask.double()), mask is None, 0.0, None)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float16))


# What may differ in one of q, k, v from the common (B, S, H, D) float32 CPU tensor (None: nothing).
_DEFECTS = [None, None, None, None, "batch", "seq", "heads", "head_dim", "rank 3", "rank 5", "float16", "int64",
            "meta"]


@settings(max_examples=400, deadline=None)
@given(dims=st.tuples(*[st.integers(1, 4)] * 4), other=st.integers(1, 8),
       defects=st.lists(st.sampled_from(_DEFECTS), min_size=3, max_size=3),
       layout=st.sampled_from(["BSHD", "BHSD", "NHD"]), mask=st.sampled_from([None, "tensor", "list"]))
def test_one_pass_input_check_accepts_exactly_what_the_full_checks_accept(dims, other, defects, layout, mask):
    """_valid_dims (the miss path's one-pass check) gives the dims of _checked_dims, or None where
    _checked_dims raises: bad inputs always reach the checks that name the problem."""
    from layerzero.errors import LayerZeroError
    from layerzero.ops.attention import _checked_dims, _valid_dims

    def tensor(defect: str | None) -> torch.Tensor:
        b, s, h, d = (other if defect == name else n for n, name in zip(dims, ("batch", "seq", "heads", "head_dim"),
                                                                         strict=True))
        shape = [b, h, s, d] if layout == "BHSD" else [b, s, h, d]
        shape = {"rank 3": shape[1:], "rank 5": [*shape, 1]}.get(str(defect), shape)
        dtype = {"float16": torch.float16, "int64": torch.int64}.get(str(defect), torch.float32)
        return torch.empty(shape, dtype=dtype, device="meta" if defect == "meta" else "cpu")

    q, k, v = (tensor(d) for d in defects)
    attn_mask = {None: None, "tensor": torch.ones(1, 1, dtype=torch.bool), "list": [[True]]}[mask]
    fast = _valid_dims(q, k, v, attn_mask, None, layout)
    try:
        full = _checked_dims(q, k, v, attn_mask, None, layout)
    except LayerZeroError:
        assert fast is None
    else:
        assert fast == full


# -- prepared aten calls of torch's fused SDPA kernels (KernelSpec.prepare) ----------------------

def _plan(q, k, v, **kw):
    return lz.select("attention", q, k, v, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_cpu_flash_plan_runs_the_prepared_aten_call(layout, is_causal):
    q, k, v = make_qkv((2, 9, 9, 8, 2, 64), torch.float32, layout, seed=11)
    plan = _plan(q, k, v, is_causal=is_causal, layout=layout)
    assert plan.kernel_id == "torch.sdpa_flash_cpu"
    # the plan's run is the prepared call itself: no wrapper frame, no flag pinning
    assert plan.run.__qualname__ == f"aten_sdpa_flash_attention_{layout.lower()}", plan.run.__qualname__
    out = lz.attention(q, k, v, is_causal=is_causal, layout=layout)
    assert_close(out, reference_attention(q, k, v, layout=layout, is_causal=is_causal), torch.float32, plan.kernel_id)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 33, 8, 2, 64), (2, 1, 5, 4, 1, 128), (3, 1, 1, 4, 4, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_prepared_decode_row_is_unmasked_and_matches_reference(dtype, shape, contiguous):
    """Sq = 1 with is_causal: bottom-right alignment sees every key, so the prepared call passes
    is_causal=False to the kernel (torch's top-left mask would hide all keys but the first)."""
    q, k, v = make_qkv(shape, dtype, "BSHD", seed=4, contiguous=contiguous)
    lz.lock("attention.causal", "torch.sdpa_flash_cpu")
    out = lz.attention(q, k, v, is_causal=True)
    assert_close(out, reference_attention(q, k, v, is_causal=True), dtype, "torch.sdpa_flash_cpu")


@pytest.mark.parametrize("what", ["bool mask", "head_dim 20", "non-square causal", "window"])
def test_prepare_leaves_what_fsdpa_prepares_to_the_pinned_path(what):
    shape = (1, 6, 6, 4, 2, 20 if what == "head_dim 20" else 16)
    if what == "non-square causal":
        shape = (1, 4, 7, 4, 2, 16)
    q, k, v = make_qkv(shape, torch.float32, seed=2)
    kw = {"is_causal": what != "bool mask"}
    if what == "bool mask":
        kw["attn_mask"] = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
        kw["attn_mask"][:, 0] = True
    if what == "window":
        kw["window_size"] = (2, 0)
    lz.lock("attention.*", "torch.sdpa_flash_cpu")
    plan = _plan(q, k, v, **kw)
    assert plan.kernel_id == "torch.sdpa_flash_cpu" and "aten_sdpa" not in repr(plan.run)
    out = lz.attention(q, k, v, **kw)
    ref_kw = {k_: v_ for k_, v_ in kw.items()}
    assert_close(out, reference_attention(q, k, v, **ref_kw), torch.float32, plan.kernel_id)


def test_prepared_kernel_that_raises_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("aten flash exploded")

    monkeypatch.setattr(torch, "_scaled_dot_product_flash_attention_for_cpu", broken)
    q, k, v = make_qkv((1, 5, 5, 4, 2, 32), torch.float32, seed=8)
    assert "aten_sdpa" in repr(_plan(q, k, v, is_causal=True).run)
    out = lz.attention(q, k, v, is_causal=True)
    assert_close(out, reference_attention(q, k, v, is_causal=True), torch.float32, "fallback")
    assert lz.health().breaker("torch.sdpa_flash_cpu").total_failures == 1


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_aten_argument_mapping(backend, requires_grad, layout, monkeypatch):
    """The CUDA entry points cannot run here: check what the prepared call passes them, against the
    schema each has (torch 2.4-2.13: flash takes no bias and always returns its logsumexp; cuDNN and
    efficient take a bias and a compute_log_sumexp flag, which F.sdpa sets when an input needs grad)."""
    seen = {}

    def fake(*a, **kw):
        seen["args"], seen["kw"] = a, kw
        return (a[0].new_zeros(a[0].shape),)

    name = torch_native._ATEN_SDPA[(backend, "cuda")]
    monkeypatch.setattr(torch, name, fake)
    ctx = SelectionContext(op="attention.causal", device_type="cuda", sm=90, dtype=torch.float16, batch=2,
                           seq_len_q=6, seq_len_k=6, num_heads=4, num_kv_heads=2, head_dim=64, head_dim_v=64,
                           layout=layout, is_causal=True, requires_grad=requires_grad)
    run = torch_native._prepare_sdpa(backend)(ctx)
    q, k, v = make_qkv((2, 6, 6, 4, 2, 64), torch.float32, layout)
    out = run(q, k, v, None, True, 0.25, 0.5)
    qa, ka, va = seen["args"][:3]
    if layout == "BSHD":  # the kernel sees BHSD views of the caller's tensors, the caller gets BSHD back
        assert qa.shape == (2, 4, 6, 64) and ka.shape == (2, 2, 6, 64) and qa.data_ptr() == q.data_ptr()
        assert out.shape == q.shape
    else:
        assert qa is q and ka is k and va is v
    rest = seen["args"][3:]
    if backend == "FLASH_ATTENTION":
        assert rest == (0.25, True, False)
    elif backend == "CUDNN_ATTENTION":
        assert rest == (None, requires_grad, 0.25, True, False)
    else:
        assert rest == (None, requires_grad, 0.25, True)
    assert seen["kw"] == {"scale": 0.5}


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
def test_cuda_prepared_call_retries_a_strided_last_dim_on_contiguous_copies(backend, monkeypatch):
    """The CUDA aten kernels refuse a last dim with stride != 1 (the H200 run: each raises); the prepared
    call checks nothing up front and retries on copies; any other error reaches the plan's recover."""
    calls = []

    def refuses_strided(q, k, v, *rest, **kw):
        calls.append(q.stride(-1))
        if q.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
        return (q.clone(),)

    monkeypatch.setattr(torch, torch_native._ATEN_SDPA[(backend, "cuda")], refuses_strided)
    ctx = SelectionContext(op="attention.full", device_type="cuda", sm=90, dtype=torch.float16, batch=1,
                           seq_len_q=3, seq_len_k=3, num_heads=2, num_kv_heads=2, head_dim=8, head_dim_v=8,
                           layout="BSHD")
    run = torch_native._prepare_sdpa(backend)(ctx)
    q, k, v = make_qkv((1, 3, 3, 2, 2, 8), torch.float32, contiguous=False)
    out = run(q, k, v, None, False, 0.0, None)
    assert calls == [2, 1] and torch.equal(out, q)  # refused, then ran on copies; output back in BSHD
    calls.clear()
    q, k, v = make_qkv((1, 3, 3, 2, 2, 8), torch.float32)
    monkeypatch.setattr(torch, torch_native._ATEN_SDPA[(backend, "cuda")],
                        lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    run = torch_native._prepare_sdpa(backend)(ctx)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(q, k, v, None, False, 0.0, None)


# ----------------------------------------------------------------------------- BHSD tensors given as BSHD


def _hf_style(b: int, s: int, h: int, d: int) -> torch.Tensor:
    """A BHSD tensor as models build it: a (B, S, H*D) projection viewed and transposed."""
    return torch.randn(b, s, h * d).view(b, s, h, d).transpose(1, 2)


def _bhsd_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "their strides are those of BHSD tensors" in r.getMessage()]


def test_bhsd_tensors_given_without_layout_warn_once_with_the_fix(caplog):
    """The issue's case: (2, 8, 16, 64) BHSD tensors fit BSHD too and silently gave another result."""
    q, k, v = _hf_style(2, 16, 8, 64), _hf_style(2, 16, 8, 64), _hf_style(2, 16, 8, 64)
    with caplog.at_level("WARNING", logger="layerzero"):
        wrong = lz.attention(q, k, v)  # read as BSHD: S=8, H=16
        lz.attention(q, k, v)  # a cache hit: nothing more
        lz.attention(_hf_style(2, 32, 8, 64), _hf_style(2, 32, 8, 64), _hf_style(2, 32, 8, 64))  # a miss: once only
    warnings = _bhsd_warnings(caplog)
    assert len(warnings) == 1
    assert "q (2, 8, 16, 64) as B=2, S=8, H=16, D=64" in warnings[0]
    assert 'pass layout="BHSD"' in warnings[0] and 'pass layout="BSHD" to say so' in warnings[0]
    want = reference_attention(q, k, v, layout="BHSD")
    assert (wrong.double() - want).abs().max() > 0.1  # the warning is about a real difference
    torch.testing.assert_close(lz.attention(q, k, v, layout="BHSD").double(), want, **tolerance(torch.float32))
    assert lz.explain("attention", q, k, v).context.bhsd_strides


def test_bhsd_strides_of_k_or_v_are_enough(caplog):
    q = _hf_style(2, 16, 8, 64).contiguous()  # a contiguous BHSD q: its strides cannot tell
    with caplog.at_level("WARNING", logger="layerzero"):
        lz.attention(q, _hf_style(2, 16, 8, 64), _hf_style(2, 16, 8, 64))
    assert len(_bhsd_warnings(caplog)) == 1


@pytest.mark.parametrize("case", ["contiguous_bshd", "explicit_bshd", "explicit_bhsd", "one_head"])
def test_no_bhsd_warning_when_the_layout_is_clear(caplog, case):
    t = _hf_style(2, 16, 8, 64)
    calls = {
        "contiguous_bshd": lambda: lz.attention(*(torch.randn(2, 16, 8, 64) for _ in range(3))),
        "explicit_bshd": lambda: lz.attention(t, t, t, layout="BSHD"),  # BSHD on purpose, BHSD memory
        "explicit_bhsd": lambda: lz.attention(t, t, t, layout="BHSD"),
        "one_head": lambda: lz.attention(*(_hf_style(2, 16, 1, 64) for _ in range(3))),  # strides of a size-1 axis
    }
    with caplog.at_level("WARNING", logger="layerzero"):
        calls[case]()
    assert _bhsd_warnings(caplog) == []


def test_layout_not_given_and_bshd_are_separate_plan_keys():
    """Only a call without layout= can warn, so its plan is not shared with an explicit BSHD call's."""
    q = torch.randn(1, 4, 2, 16)
    assert ATTENTION.key(q, q, q) != ATTENTION.key(q, q, q, layout="BSHD")
    assert ATTENTION.context(q, q, q) == ATTENTION.context(q, q, q, layout="BSHD")  # the same facts otherwise


def test_sdpa_impl_without_a_plan_takes_the_aten_call_where_the_call_allows(monkeypatch):
    """A kernel's impl (what lz.solve's modules and fallbacks call) runs the same prepared aten call
    as a plan when the call has no mask, window, ALiBi or odd head dim, and F.sdpa pinned otherwise."""
    real = torch._scaled_dot_product_flash_attention_for_cpu
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[4])  # is_causal as the aten op gets it
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_dot_product_flash_attention_for_cpu", counting)
    impl = torch_native._sdpa("FLASH_ATTENTION")
    for sq, causal in ((7, True), (1, True), (7, False)):
        q, k, v = make_qkv((2, sq, 7, 4, 2, 16), torch.float32, "BHSD", seed=sq)
        out = impl(q, k, v, None, causal, 0.0, None)
        assert_close(out, reference_attention(q, k, v, layout="BHSD", is_causal=causal), torch.float32, "impl")
    assert calls == [True, False, False]  # a decode row needs no mask: passed as not causal
    q, k, v = make_qkv((2, 5, 5, 4, 2, 16), torch.float32, "BHSD", seed=9)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    out = impl(q, k, v, mask, False, 0.0, None)
    assert len(calls) == 3  # masked: F.sdpa pinned, not the Python-level aten call
    assert_close(out, reference_attention(q, k, v, layout="BHSD", attn_mask=mask), torch.float32, "impl mask")
