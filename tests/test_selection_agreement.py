"""Selection is one routine (SelectionEngine.evaluate); its callers agree on what runs.

For random CPU calls of attention and the norms: `lz.which` (the miss path: viable kernels, first
reasons, the early exit), the kernel the call's cached plan runs, `lz.explain(...).selected_kernel`
(every kernel with every reason) and a solved module (`lz.compile`: the engine's choice per shape
bucket, then the kernel called with no engine) name the same kernel. Besides the built-in kernels,
each example registers a few of its own whose score differs from their declared priority (decode,
query-length and row-count priorities, layout transforms, requests the kernel declines), so that
the early exit, which goes by declared priority, has something to get wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero.backends import reference
from layerzero.ops import FAMILIES
from layerzero.state import runtime

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
ATTENTION_OPS = ("attention.causal", "attention.full")


def attention_bshd(q, k, v, *rest):  # noqa: ANN001, ANN201 - kernels in the op's calling convention
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(reference.attention(t(q), t(k), t(v), *rest))


def attention_bhsd(q, k, v, *rest):  # noqa: ANN001, ANN201
    return reference.attention(q, k, v, *rest)


def rms_norm(x, weight, eps):  # noqa: ANN001, ANN201
    return reference.rms_norm(x, weight, eps)


def layer_norm(x, weight, bias, eps):  # noqa: ANN001, ANN201
    return reference.layer_norm(x, weight, bias, eps)


# A user kernel: (priority, decode or row priority, seq priority, layout / causal support)
KERNELS = st.lists(st.tuples(st.integers(40, 75), st.one_of(st.none(), st.integers(40, 75)),
                             st.one_of(st.none(), st.tuples(st.integers(2, 32), st.integers(40, 75))),
                             st.booleans()), max_size=3)


def register_attention(kernels: list[tuple[Any, ...]]) -> None:
    for i, (priority, decode, seq, bhsd) in enumerate(kernels):
        lz.register_kernel(id=f"agree.attention{i}", ops=ATTENTION_OPS, impl=attention_bhsd if bhsd else attention_bshd,
                           layout="BHSD" if bhsd else "BSHD", priority=priority, decode_priority=decode,
                           seq_priorities=(seq,) if seq else (), supports_causal=i != 1, platforms="cpu",
                           dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}), max_head_dim=64 + 32 * i)


def register_norms(kernels: list[tuple[Any, ...]]) -> None:
    for i, (priority, rows, _seq, half) in enumerate(kernels):
        dtypes = frozenset({torch.float16, torch.bfloat16} if half else {torch.float32, torch.bfloat16})
        row_priorities = ((4 * (i + 1), rows),) if rows else ()
        lz.register_kernel(id=f"agree.rms{i}", ops="norm.rms", impl=rms_norm, priority=priority,
                           row_priorities=row_priorities, platforms="cpu", dtypes=dtypes, max_hidden_size=512 * (i + 1))
        lz.register_kernel(id=f"agree.layer{i}", ops="norm.layer", impl=layer_norm, priority=priority,
                           row_priorities=row_priorities, platforms="cpu", dtypes=dtypes)


def solved_kernel(operation: str, shape: tuple[int, ...], dtype: torch.dtype, call: Any) -> str:
    """The kernel that the module lz.compile solves for `shape` runs for `call(module)`."""
    compiled = lz.compile(operation, [shape], dtypes=[dtype], device="cpu")
    module = compiled.load()
    ran: list[str] = []
    for var, kernel_id in compiled.kernels.items():
        impl = getattr(module, var)
        setattr(module, var, lambda *a, _impl=impl, _id=kernel_id: ran.append(_id) or _impl(*a))
    call(module)
    assert compiled.plans[0].kernel in (ran or [""]), (compiled.plans, ran)
    return ran[0] if ran else "(dynamic selection)"


def agree(family: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    which = lz.which(family, *args, **kwargs)
    getattr(lz, family)(*args, **kwargs)  # the call: its plan is cached under its key
    cached = runtime.plans.data[FAMILIES[family].key(*args, **kwargs)].kernel_id
    report = lz.explain(family, *args, **kwargs)
    assert (which, cached, report.selected_kernel) == (which, which, which), str(report)
    assert report.cached
    return which


@SETTINGS
@given(batch=st.integers(1, 3), seq_q=st.integers(1, 40), seq_k=st.integers(1, 40), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16, 32, 64, 80, 128]), causal=st.booleans(),
       dtype=DTYPES, kernels=KERNELS)
def test_which_explain_plan_and_solve_agree_on_attention(batch, seq_q, seq_k, kv_heads, group, head_dim, causal, dtype,
                                                         kernels):
    lz.reset()
    register_attention(kernels)
    heads = kv_heads * group
    g = torch.Generator().manual_seed(seq_q * 41 + seq_k)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, seq_k, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, seq_k, kv_heads, head_dim, generator=g).to(dtype)
    chosen = agree("attention", (q, k, v), {"is_causal": causal})
    shape = (batch, seq_q, seq_k, heads, kv_heads, head_dim, int(causal))
    assert solved_kernel("attention", shape, dtype, lambda m: m.attention(q, k, v, is_causal=causal)) == chosen


@SETTINGS
@given(rows=st.integers(1, 64), hidden=st.sampled_from([8, 64, 100, 512, 1000, 4096]), weighted=st.booleans(),
       layer=st.booleans(), dtype=DTYPES, kernels=KERNELS)
def test_which_explain_plan_and_solve_agree_on_norms(rows, hidden, weighted, layer, dtype, kernels):
    lz.reset()
    register_norms(kernels)
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    name = "layer_norm" if layer else "rms_norm"
    if layer:
        args = (x, w, torch.randn(hidden, generator=g).to(dtype)) if weighted else (x, None, None)
    else:
        args = (x, w) if weighted else (x, None)
    chosen = agree(name, args, {})
    if weighted:  # solved modules take the weighted call only (FamilyCode.required)
        assert solved_kernel(name, (rows, hidden), dtype, lambda m: getattr(m, name)(*args)) == chosen
