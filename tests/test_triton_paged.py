"""Our Triton paged decode kernel on CPU: constraints and launch planning, and the kernel itself run
by Triton's interpreter (TRITON_INTERPRET=1) against the float64 reference when triton is installed.

The interpreter's tl.dot mishandles bfloat16 (triton 3.9 CPU: a bf16 x bf16 dot is off by 1e10),
so bf16 is covered by tests/gpu/test_triton_paged_gpu.py only; fp16 and fp32 run here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import layerzero as lz
from layerzero.backends import reference
from layerzero.backends import triton_paged as tp
from layerzero.context import SelectionContext
from layerzero.kernel import check_constraints
from layerzero.reasons import Reason

from .conftest import tolerance

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_usable() -> None:
    """Triton's interpreter breaks ("Cannot call @triton.jit'd outside of the scope of a kernel") once
    torch inductor has used triton in the same process; those runs go to a clean process instead
    (test_interpreter_cases_in_a_clean_process)."""
    if "torch._inductor.codegen" in sys.modules and not os.environ.get("LZ_TRITON_CLEAN_PROCESS"):
        pytest.skip("torch inductor already loaded triton in this process; checked in a clean process")


def _ctx(**kw):
    base = dict(op="attention.decode", device_type="cuda", sm=90, generation="hopper", dtype=torch.bfloat16, batch=4,
                seq_len_q=1, seq_len_k=4096, num_heads=32, num_kv_heads=8, head_dim=128, head_dim_v=128,
                layout="BSHD", is_causal=True, kv_layout="NHD", page_size=16)
    base.update(kw)
    return SelectionContext(**base)


def _reasons(**kw):
    (spec,) = tp.BACKEND.kernels
    return [r.reason for r in check_constraints(spec, _ctx(**kw))]


def test_constraints():
    assert _reasons() == []
    assert _reasons(kv_layout="HND", page_size=64, head_dim=256, head_dim_v=256, dtype=torch.float16) == []
    assert _reasons(window=(128, 0), softcap=50.0) == []
    assert _reasons(op="attention.paged", seq_len_q=8) == [Reason.OP_UNSUPPORTED]
    assert _reasons(page_size=8) == [Reason.PAGE_SIZE_UNSUPPORTED]
    assert _reasons(head_dim=96, head_dim_v=96) == [Reason.HEAD_DIM_UNSUPPORTED]
    assert _reasons(dtype=torch.float32) == [Reason.DTYPE_UNSUPPORTED]
    assert _reasons(sm=75, generation="turing") == [Reason.SM_TOO_OLD]
    assert _reasons(device_type="cpu", sm=0, generation="cpu") == [Reason.PLATFORM_MISMATCH]
    # 64 query heads on one KV head with head_dim 256: a 64 x 256 fp32 accumulator is too large
    assert _reasons(num_heads=64, num_kv_heads=1, head_dim=256, head_dim_v=256) == [Reason.GQA_UNSUPPORTED]
    assert _reasons(num_heads=64, num_kv_heads=1) == []


def test_listed_as_a_backend():
    names = {b.name for b in lz.list_backends()}
    assert "triton_paged" in names
    assert [k.id for k in lz.list_kernels("triton_paged.*")] == ["triton_paged.decode"]


@pytest.mark.parametrize("batch,kv_heads,capacity,splits", [
    (1, 8, 131072, 64),  # one long sequence: split until the GPU is full (capped at MAX_SPLITS)
    (1, 8, 4096, 16),  # capped by MIN_SPLIT_TOKENS per split
    (8, 8, 32768, 17),  # 64 programs -> 17 splits give ~8 programs per SM
    (32, 8, 16384, 5),
    (128, 8, 8192, 1),  # enough programs without splitting: direct output, no reduce kernel
    (2, 4, 100, 1),
])
def test_launch_plan_fills_the_gpu(batch, kv_heads, capacity, splits):
    plan = tp.plan_launch(batch, kv_heads, 4, 128, capacity, num_sms=132)
    assert plan["num_splits"] == splits
    assert plan["g_pad"] == 16 and plan["block_n"] == 64


def test_launch_plan_pads_the_query_group_for_tl_dot():
    assert tp.plan_launch(1, 1, 1, 64, 1024)["g_pad"] == 16
    assert tp.plan_launch(1, 1, 24, 64, 1024)["g_pad"] == 32
    assert tp.plan_launch(1, 1, 4, 256, 1024)["block_n"] == 32


def _paged_inputs(B, Hq, Hk, D, page, lens, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lens) + 1
    num_pages = B * max_pages + 3
    shape = (num_pages, page, Hk, D) if layout == "NHD" else (num_pages, Hk, page, D)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    page_table = torch.randperm(num_pages, generator=g)[: B * max_pages].reshape(B, max_pages).to(torch.int32)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype)
    return q, k_cache, v_cache, page_table, torch.tensor(lens, dtype=torch.int32)


INTERPRETER_CASES = [
    # B, Hq, Hk, D, page, lens, layout, dtype, window, softcap, splits
    (2, 4, 2, 64, 16, [37, 100], "NHD", torch.float16, None, 0.0, None),  # direct path (one split)
    (2, 4, 2, 64, 16, [37, 100], "HND", torch.float16, None, 0.0, 3),  # split-KV + reduce, HND
    (3, 8, 1, 64, 32, [1, 200, 64], "NHD", torch.float16, (50, -1), 0.0, 4),  # MQA, length 1, left window
    (2, 8, 1, 64, 32, [1, 200], "NHD", torch.float16, None, 5.0, 4),  # soft-cap
    (1, 2, 2, 128, 16, [300], "HND", torch.float32, (0, 0), 0.0, 5),  # window 0: only the last token
    (2, 6, 2, 64, 16, [250, 17], "NHD", torch.float16, (30, 0), 20.0, 7),  # group 3 (not a power of 2), splits > blocks
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=str)
def test_kernel_in_triton_interpreter_matches_float64_reference(case, monkeypatch):
    _interpreter_usable()
    B, Hq, Hk, D, page, lens, layout, dtype, window, softcap, splits = case
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tp._kernels.cache_clear()  # re-decorate the kernels under the interpreter
    try:
        q, k_cache, v_cache, page_table, seq_lens = _paged_inputs(B, Hq, Hk, D, page, lens, layout, dtype, seed=B + D)
        out = tp.paged_decode(q, k_cache, v_cache, page_table, seq_lens, True, None, window, softcap, layout,
                              num_splits=splits)
    finally:
        tp._kernels.cache_clear()
    expected = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), page_table, seq_lens, True,
                                         None, window, softcap, layout)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_custom_scale_and_strided_query(monkeypatch):
    _interpreter_usable()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tp._kernels.cache_clear()
    try:
        q, k_cache, v_cache, page_table, seq_lens = _paged_inputs(2, 4, 4, 64, 16, [90, 33], "NHD", torch.float16)
        wide = torch.randn(2, 1, 4, 128).to(torch.float16)
        wide[..., :64] = q
        q = wide[..., :64]  # head stride 128, not contiguous
        out = tp.paged_decode(q, k_cache, v_cache, page_table, seq_lens, True, 0.05, None, 0.0, "NHD", num_splits=2)
    finally:
        tp._kernels.cache_clear()
    expected = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), page_table, seq_lens, True,
                                         0.05, None, 0.0, "NHD")
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float16))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_cases_in_a_clean_process():
    """When this process already ran torch inductor, run the interpreter tests in a fresh one."""
    if "torch._inductor.codegen" not in sys.modules:
        pytest.skip("the interpreter tests ran in this process")
    env = {**os.environ, "LZ_TRITON_CLEAN_PROCESS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "interpreter and not clean_process"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
