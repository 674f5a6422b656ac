"""lz.solve: the generated module imports, needs no selection engine, matches dynamic selection on
random shapes, has no gaps in its declared ranges, and steps aside on a signature mismatch."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
import torch

import layerzero as lz
from layerzero.perf.perfdb import Bucket, PerfRecord, current_signature
from layerzero.state import runtime

ATTN = dict(batch=(1, 4), seq_q=(1, 80), seq_k=(1, 80), heads=[4], kv_heads=[1, 4], head_dim=[16], causal=[0, 1])
NORM = dict(rows=(1, 300), hidden=[32, 48])


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _record_calls(module):
    """Replace each kernel of the solved module with a recorder; returns the list of ids called."""
    called: list[str] = []
    for var, kernel_id in module.KERNEL_IDS.items():
        impl = getattr(module, var)

        def wrapper(*args, _impl=impl, _id=kernel_id):
            called.append(_id)
            return _impl(*args)

        setattr(module, var, wrapper)
    return called


def _no_dynamic(*args, **kwargs):
    raise AssertionError("a shape inside the solved ranges fell back to dynamic selection")


def _measure_math_faster(tmp_path):
    """PerfDB data that makes torch.sdpa_math win causal attention in one bucket (seq 33..64, batch 2)."""
    lz.perfdb(tmp_path / "perf.sqlite")
    from layerzero.ops.attention import ATTENTION

    q, k = torch.randn(2, 64, 4, 16), torch.randn(2, 64, 1, 16)
    ctx = ATTENTION.context(q, k, k, None, True)
    runtime.ensure_loaded()
    eligible = [c.kernel_id for c in lz.explain("attention", q, k, k, is_causal=True).candidates
                if c.score is not None and c.backend != "reference"]
    sig = current_signature("cpu", 0)
    records = [PerfRecord(kid, ctx.op, "float32", Bucket.of(ctx), sig, runtime._backend_version(kid) or "",
                          5.0 if kid == "torch.sdpa_math" else 50.0, 6.0, 10, 0.01) for kid in eligible]
    lz.perfdb().record(records)
    lz.perfdb(tmp_path / "perf.sqlite")
    assert lz.which("attention", q, k, k, is_causal=True) == "torch.sdpa_math"


def test_solved_module_equals_dynamic_selection_on_random_shapes(tmp_path):
    _measure_math_faster(tmp_path)
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, tmp_path / "solved_eq.py", dtypes=[torch.float32],
                      device="cpu")
    assert "torch.sdpa_math" in result.kernels.values()
    assert result.branches < result.buckets  # adjacent buckets merged
    module = _import(result.path, "solved_eq")
    assert module.PROBLEMS == []
    called = _record_calls(module)
    module._dynamic_attention = _no_dynamic
    module._dynamic_rms_norm = _no_dynamic
    rng = random.Random(0)
    cases = [(rng.randint(1, 4), rng.randint(1, 80), rng.randint(1, 80), rng.choice([1, 4]), rng.random() < 0.5)
             for _ in range(100)]
    cases += [(2, 40, 50, 1, True), (2, 64, 64, 1, True), (2, 33, 33, 1, True)]  # the measured bucket
    for b, sq, sk, hkv, causal in cases:
        if rng.random() < 0.2:
            sk = sq
        q, k, v = torch.randn(b, sq, 4, 16), torch.randn(b, sk, hkv, 16), torch.randn(b, sk, hkv, 16)
        out = module.attention(q, k, v, is_causal=causal)
        assert called[-1] == lz.which("attention", q, k, v, is_causal=causal), (b, sq, sk, hkv, causal)
        torch.testing.assert_close(out, lz.attention(q, k, v, is_causal=causal), rtol=1e-4, atol=1e-5)
    assert "torch.sdpa_math" in called and len(set(called)) >= 2
    for _ in range(50):
        a = rng.randint(1, 17)
        b = rng.randint(1, 300 // a)
        x = torch.randn(*((a * b,) if rng.random() < 0.5 else (a, b)), rng.choice([32, 48]))  # rows: all but the last
        w = torch.randn(x.shape[-1])
        out = module.rms_norm(x, w)
        assert called[-1] == lz.which("rms_norm", x, w)
        torch.testing.assert_close(out, lz.rms_norm(x, w))


def test_solved_module_runs_without_the_selection_engine(tmp_path, monkeypatch):
    result = lz.solve("rms_norm", tmp_path / "solved_noengine.py", dtypes=[torch.float32], device="cpu", **NORM)
    module = _import(result.path, "solved_noengine")

    def no_engine(*args, **kwargs):
        raise AssertionError("the selection engine ran")

    monkeypatch.setattr(runtime.engine, "evaluate", no_engine)
    monkeypatch.setattr(runtime.engine, "select", no_engine)
    x, w = torch.randn(7, 48), torch.randn(48)
    torch.testing.assert_close(module.rms_norm(x, w), lz.backends.reference.rms_norm(x, w, 1e-6))
    with pytest.raises(AssertionError, match="engine ran"):  # outside the ranges: dynamic selection
        module.rms_norm(torch.randn(7, 50), torch.randn(50))


def test_calls_outside_the_solved_options_go_to_dynamic_selection(tmp_path):
    result = lz.solve("attention", tmp_path / "solved_opts.py", dtypes=[torch.float32], device="cpu", **ATTN)
    module = _import(result.path, "solved_opts")
    called = _record_calls(module)
    q = torch.randn(1, 8, 4, 16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    torch.testing.assert_close(module.attention(q, q, q, attn_mask=mask), lz.attention(q, q, q, attn_mask=mask))
    module.attention(q.double(), q.double(), q.double())  # dtype not solved
    module.attention(torch.randn(1, 200, 4, 16), torch.randn(1, 200, 4, 16), torch.randn(1, 200, 4, 16))  # too long
    assert called == []
    with pytest.raises(lz.InvalidInputError, match="k"):  # bad input still gets the dynamic path's error
        module.attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))


def test_signature_mismatch_warns_and_falls_back(tmp_path):
    result = lz.solve("rms_norm", tmp_path / "solved_sig.py", dtypes=[torch.float32], device="cpu", **NORM)
    text = result.path.read_text()
    sig = current_signature("cpu", 0)
    result.path.write_text(text.replace(f"'device': {sig.device!r}", "'device': 'NVIDIA H100 80GB HBM3'", 1))
    with pytest.warns(RuntimeWarning, match="solved on another machine.*device: solved for 'NVIDIA H100"):
        module = _import(result.path, "solved_sig")
    assert module.rms_norm is lz.rms_norm


def test_solve_rejects_bad_dims(tmp_path):
    with pytest.raises(lz.InvalidInputError, match="rows"):
        lz.solve("rms_norm", tmp_path / "x.py", rows=(0, 5), hidden=[4])
    with pytest.raises(lz.InvalidInputError, match="hidden"):
        lz.solve("rms_norm", tmp_path / "x.py", rows=(1, 5))


def local_kernel_factory():
    def impl(x, weight, eps):
        return x

    return impl


def test_unimportable_kernel_is_refused(tmp_path):
    lz.register_kernel(id="mine.local", ops=("norm.rms",), impl=local_kernel_factory(), platforms=frozenset({"cpu"}),
                       priority=99)
    with pytest.raises(lz.ConfigurationError, match="mine.local.*cannot be imported"):
        lz.solve("rms_norm", tmp_path / "x.py", rows=(1, 4), hidden=[8], dtypes=[torch.float32], device="cpu")


def test_a_value_given_twice_is_one_branch(tmp_path):
    result = lz.solve("rms_norm", tmp_path / "solved_twice.py", dtypes=[torch.float32], device="cpu",
                      rows=(1, 64), hidden=(4096, 4096))
    text = result.path.read_text()
    assert text.count("H == 4096") == 1, text  # no dead elif with the same condition


DYNAMIC = object()


def _dynamic_recorder(module, name):
    """Make the module's dynamic fallback return DYNAMIC (and record that it was asked)."""
    asked: list[tuple] = []

    def dynamic(*args):
        asked.append(args)
        return DYNAMIC

    setattr(module, f"_dynamic_{name}", dynamic)
    return asked


def _qkv(b=2, sq=8, sk=8, hq=4, hkv=1, d=16, **kw):
    return torch.randn(b, sq, hq, d, **kw), torch.randn(b, sk, hkv, d, **kw), torch.randn(b, sk, hkv, d, **kw)


UNSAFE_ATTENTION = {
    "other device": lambda: (_qkv(device="meta"), {}),
    "other dtype": lambda: (_qkv(dtype=torch.float64), {}),
    "k, v dtype differs from q": lambda: ((_qkv()[0], *_qkv(dtype=torch.float64)[1:]), {}),
    "v shape differs from k": lambda: ((*_qkv()[:2], torch.randn(2, 9, 1, 16)), {}),
    "k batch differs from q": lambda: ((_qkv()[0], *_qkv(b=3)[1:]), {}),
    "q not 4-D": lambda: ((torch.randn(8, 4, 16), *_qkv()[1:]), {}),
    "batch out of range": lambda: (_qkv(b=5), {}),
    "seq_k out of range": lambda: (_qkv(sk=200), {}),
    "heads not solved": lambda: (_qkv(hq=8), {}),
    "head_dim not solved": lambda: (_qkv(d=32), {}),
    "attn_mask": lambda: (_qkv(), {"attn_mask": torch.ones(8, 8, dtype=torch.bool)}),
    "dropout": lambda: (_qkv(), {"dropout_p": 0.1}),
    "layout BHSD": lambda: (_qkv(), {"layout": "BHSD"}),
    "window": lambda: (_qkv(), {"window_size": (4, 0)}),
    "softcap": lambda: (_qkv(), {"softcap": 30.0}),
    "alibi": lambda: (_qkv(), {"alibi_slopes": torch.ones(4)}),
}


def _assert_goes_dynamic(tmp_path, op, dims, solved_call, unsafe_call):
    """solved_call(fn) runs the solved kernel once; unsafe_call(fn) must go to dynamic selection."""
    result = lz.solve(op, tmp_path / f"solved_unsafe_{op}.py", dtypes=[torch.float32], device="cpu", **dims)
    module = _import(result.path, f"solved_unsafe_{op}")
    called = _record_calls(module)
    asked = _dynamic_recorder(module, op)
    solved_call(getattr(module, op))  # the baseline call is solved
    assert len(called) == 1 and asked == []
    assert unsafe_call(getattr(module, op)) is DYNAMIC
    assert len(called) == 1


@pytest.mark.parametrize("case", UNSAFE_ATTENTION)
def test_each_unsolved_attention_call_goes_to_dynamic_selection(tmp_path, case):
    args, kwargs = UNSAFE_ATTENTION[case]()
    _assert_goes_dynamic(tmp_path, "attention", ATTN, lambda fn: fn(*_qkv(), is_causal=True),
                         lambda fn: fn(*args, is_causal=True, **kwargs))


UNSAFE_NORM = {
    "other device": lambda: (torch.randn(4, 32, device="meta"), torch.randn(32, device="meta")),
    "other dtype": lambda: (torch.randn(4, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)),
    "hidden not solved": lambda: (torch.randn(4, 40), torch.randn(40)),
    "rows out of range": lambda: (torch.randn(2, 300, 32), torch.randn(32)),
    "0-d x": lambda: (torch.tensor(1.0), torch.randn(32)),
    "empty hidden": lambda: (torch.randn(4, 0), torch.randn(0)),
    "no weight": lambda: (torch.randn(4, 32), None),
}


@pytest.mark.parametrize("case", UNSAFE_NORM)
def test_each_unsolved_norm_call_goes_to_dynamic_selection(tmp_path, case):
    _assert_goes_dynamic(tmp_path, "rms_norm", NORM, lambda fn: fn(torch.randn(4, 32), torch.randn(32)),
                         lambda fn: fn(*UNSAFE_NORM[case]()))


def rms_norm_no_backward(x, weight, eps):
    """A module-level kernel (a solved module imports it) without backward, determinism or graph safety."""
    return lz.backends.reference.rms_norm(x, weight, eps)


def test_grad_and_deterministic_calls_skip_a_kernel_that_cannot_take_them(tmp_path):
    lz.register_kernel(id="mine.rms_no_backward", ops=("norm.rms",), impl=rms_norm_no_backward,
                       platforms=frozenset({"cpu"}), priority=99, supports_backward=False, deterministic=False,
                       graph_safe=False)
    result = lz.solve("rms_norm", tmp_path / "solved_nobw.py", dtypes=[torch.float32], device="cpu", **NORM)
    assert set(result.kernels.values()) == {"mine.rms_no_backward"}
    assert "_capturing" not in result.path.read_text()  # capture is a CUDA matter (SelectionContext.device_fields)
    module = _import(result.path, "solved_nobw")
    called = _record_calls(module)
    asked = _dynamic_recorder(module, "rms_norm")
    x, w = torch.randn(4, 32), torch.randn(32)
    module.rms_norm(x, w)
    assert called == ["mine.rms_no_backward"]
    assert module.rms_norm(x.clone().requires_grad_(), w) is DYNAMIC
    assert module.rms_norm(x, w.clone().requires_grad_()) is DYNAMIC
    with torch.no_grad():  # nothing needs the grad: as dynamic selection, the kernel may run
        module.rms_norm(x.clone().requires_grad_(), w.clone().requires_grad_())
    assert called == ["mine.rms_no_backward"] * 2
    torch.use_deterministic_algorithms(True)
    try:
        assert module.rms_norm(x, w) is DYNAMIC
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(asked) == 3 and len(called) == 2


def test_a_kernel_with_backward_takes_grad_calls_without_a_check(tmp_path):
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, tmp_path / "solved_bw.py", dtypes=[torch.float32],
                      device="cpu")
    assert all(runtime.registry.kernel(k).supports_backward for k in result.kernels.values())
    assert "requires_grad" not in result.path.read_text()
    module = _import(result.path, "solved_bw")
    called = _record_calls(module)
    _dynamic_recorder(module, "rms_norm")
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    module.rms_norm(x, w).square().sum().backward()
    assert called == [lz.which("rms_norm", x, w)]
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lz.backends.reference.rms_norm(x2, w2, 1e-6).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float())
    torch.testing.assert_close(w.grad, w2.grad.float())


def test_capture_is_checked_before_a_kernel_that_is_not_graph_safe_on_cuda_only():
    """The generated leaf for flashinfer.decode (no backward, not graph-safe), run as code."""
    from layerzero.perf.solve import FAMILY_CODE, _emit_leaf, _Writer

    runtime.ensure_loaded()
    spec = runtime.registry.kernel("flashinfer.decode")
    assert not spec.graph_safe and not spec.supports_backward and spec.deterministic
    stream = {"capturing": False}
    scope = {"_K0": lambda *a: "kernel", "_capturing": lambda: stream["capturing"],
             "_grad_enabled": torch.is_grad_enabled}
    q = torch.randn(1, 1, 4, 16)
    for cuda in (True, False):
        w = _Writer(cuda)
        _emit_leaf(w, FAMILY_CODE["attention"], spec.id, 1)
        text = "\n".join(w.lines)
        assert ("_capturing()" in text) is cuda, text
        exec(f"def attention(q, k, v, attn_mask, is_causal, dropout_p, scale, window_size, softcap, alibi_slopes):"
             f"\n{text}\n    return 'dynamic'", scope)
        stream["capturing"] = False
        assert scope["attention"](q, q, q, None, True, 0.0, None, None, 0.0, None) == "kernel"
        assert scope["attention"](q.clone().requires_grad_(), q, q, None, True, 0.0, None, None, 0.0, None) == "dynamic"
        stream["capturing"] = True
        assert scope["attention"](q, q, q, None, True, 0.0, None, None, 0.0, None) == ("dynamic" if cuda else "kernel")


def test_a_solved_branch_calls_the_kernel_itself(tmp_path):
    """No wrapper between a branch and the kernel (the plan's run adds the health guard and, for
    attention here, a layout wrapper; the solved code writes the transposes inline)."""
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, tmp_path / "solved_same.py", dtypes=[torch.float32],
                      device="cpu")
    module = _import(result.path, "solved_same")
    for var, kernel_id in module.KERNEL_IDS.items():
        assert getattr(module, var) is runtime.registry.kernel(kernel_id).impl
    assert lz.select("attention", *_qkv(), None, True).transforms  # BSHD in, a BHSD kernel
    assert ".transpose(1, 2)" in result.path.read_text()


def short_keys_refused(ctx):
    """A check refusing seq_len_k < 37 (a threshold inside the power-of-two bucket 33..64)."""
    from layerzero.reasons import Reason, Rejection

    return [Rejection(Reason.SEQ_LEN_TOO_SHORT, "seq_len_k < 37")] if ctx.seq_len_k < 37 else []


def test_a_choice_changing_inside_a_bucket_is_found_by_bisection(tmp_path):
    """Thresholds that fall inside power-of-two buckets (rows >= 100, seq_len_k >= 37) are located
    exactly: the solved module calls what dynamic selection picks at every shape around them."""
    from layerzero.backends import reference

    lz.register_kernel(id="mine.rms_rows100", ops=("norm.rms",), impl=reference.rms_norm,
                       platforms=frozenset({"cpu"}), priority=1, row_priorities=((100, 99),), supports_backward=True)
    lz.register_kernel(id="mine.attn_long", ops=("attention.causal", "attention.full"),
                       impl=reference.attention, platforms=frozenset({"cpu"}), priority=99,
                       supports_backward=True, check=short_keys_refused)
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, tmp_path / "solved_bisect.py", dtypes=[torch.float32],
                      device="cpu")
    assert not any("varies" in n for n in result.notes), result.notes
    assert {"mine.rms_rows100", "mine.attn_long"} <= set(result.kernels.values())
    text = result.path.read_text()
    assert "100 <= R <= " in text and "37 <= Sk <= " in text, text
    module = _import(result.path, "solved_bisect")
    called = _record_calls(module)
    module._dynamic_attention = _no_dynamic
    module._dynamic_rms_norm = _no_dynamic
    for rows in range(90, 131):
        x, w = torch.randn(rows, 32), torch.randn(32)
        torch.testing.assert_close(module.rms_norm(x, w), lz.rms_norm(x, w))
        assert called[-1] == lz.which("rms_norm", x, w) == ("mine.rms_rows100" if rows >= 100 else "torch.rms_norm")
    for sq in (1, 2, 5, 33, 36, 37, 38, 40, 64, 65):
        for sk in (1, 33, 36, 37, 38, 40, 64, 65, 80):
            for causal in (False, True):
                q, k = torch.randn(2, sq, 4, 16), torch.randn(2, sk, 4, 16)
                out = module.attention(q, k, k, is_causal=causal)
                assert called[-1] == lz.which("attention", q, k, k, is_causal=causal), (sq, sk, causal)
                assert (called[-1] == "mine.attn_long") == (sk >= 37), (sq, sk, causal)
                torch.testing.assert_close(out, lz.attention(q, k, k, is_causal=causal), rtol=1e-4, atol=1e-5)


def test_a_solved_module_compiles_into_one_graph(tmp_path):
    """Under torch.compile the solved functions defer to layerzero's ops (one custom-op node each): a
    traced kernel adapter would break the graph (SDPA's flag pinning takes a lock)."""
    result = lz.solve({"attention": ATTN, "rms_norm": NORM}, tmp_path / "solved_compile.py", dtypes=[torch.float32],
                      device="cpu")
    module = _import(result.path, "solved_compile")

    def f(x, w, q, k, v):
        return module.rms_norm(x, w), module.attention(q, k, v, is_causal=True)

    args = (torch.randn(6, 32), torch.randn(32), torch.randn(2, 9, 4, 16), torch.randn(2, 9, 1, 16),
            torch.randn(2, 9, 1, 16))
    eager = f(*args)
    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(f)(*args).graph_break_count == 0
        compiled = torch.compile(f, fullgraph=True, backend="eager")(*args)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want)
