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
        x = torch.randn(rng.randint(1, 300), rng.choice([32, 48]))
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
