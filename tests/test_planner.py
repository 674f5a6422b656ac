"""Offline multi-op planner: joint choice beats per-op greedy once transforms are counted."""

from __future__ import annotations

import random

import pytest
import torch

import layerzero as lz
from layerzero.kernel import KernelSpec
from layerzero.perf.planner import BlockPlanner, BlockStep, default_estimate, plan_block

CPU = frozenset({"cpu"})
TIMES = {"blk.rope_bshd": 3.0, "blk.rope_bhsd": 2.5, "blk.attn_bshd": 11.0, "blk.attn_bhsd": 10.0,
         "blk.norm": 1.0}
TRANSFORM_US = 4.0


def _impl(*args: object) -> object:
    return args[0]


def _register() -> None:
    for kid, op, layout in (("blk.rope_bshd", "posenc.rope", "BSHD"), ("blk.rope_bhsd", "posenc.rope", "BHSD"),
                            ("blk.attn_bshd", "attention.causal", "BSHD"),
                            ("blk.attn_bhsd", "attention.causal", "BHSD"), ("blk.norm", "norm.rms", "BHSD")):
        lz.register_kernel(KernelSpec(id=kid, ops=(op,), impl=_impl, platforms=CPU, layout=layout, priority=95,
                                      dtypes=frozenset({torch.float32})))


def _estimate(spec: KernelSpec, ctx: lz.SelectionContext) -> float:
    return TIMES.get(spec.id, 1000.0)  # built-in kernels: far slower, never planned


def _transform(src: str, dst: str, ctx: lz.SelectionContext) -> float:
    return 0.0 if src == dst else TRANSFORM_US


def _block() -> list[BlockStep]:
    x = torch.randn(2, 16, 4 * 32)
    q = torch.randn(2, 16, 4, 32)
    cos, sin = torch.randn(16, 16), torch.randn(16, 16)
    w = torch.ones(4 * 32)
    return [BlockStep.of("rms_norm", x, w), BlockStep.of("rope", q, cos, sin),
            BlockStep.of("attention", q, q, q, is_causal=True), BlockStep.of("rms_norm", x, w)]


def test_joint_plan_beats_per_op_greedy_because_of_transforms() -> None:
    _register()
    planner = BlockPlanner(_estimate, _transform)
    greedy = planner.plan(_block(), method="greedy")
    joint = planner.plan(_block())
    # alone, the BHSD kernels are faster, and per-op selection takes them ...
    assert greedy.kernels == ("blk.norm", "blk.rope_bhsd", "blk.attn_bhsd", "blk.norm")
    assert greedy.total_us == pytest.approx(1 + 4 + 2.5 + 10 + 1 + 4)  # in and out of BHSD
    # ... but the block stays in BSHD for less
    assert joint.method == "exact"
    assert joint.kernels == ("blk.norm", "blk.rope_bshd", "blk.attn_bshd", "blk.norm")
    assert joint.total_us == pytest.approx(1 + 3 + 11 + 1)
    assert joint.total_us < greedy.total_us
    assert "blk.attn_bshd" in str(joint)


def test_joint_plan_moves_to_bhsd_when_the_saving_pays_for_the_transposes() -> None:
    _register()
    TIMES_FAST = dict(TIMES, **{"blk.attn_bhsd": 2.0})
    planner = BlockPlanner(lambda s, c: TIMES_FAST.get(s.id, 1000.0), _transform)
    plan = planner.plan(_block())
    assert plan.kernels[1:3] == ("blk.rope_bhsd", "blk.attn_bhsd")  # one transpose in, one out, shared
    assert plan.total_us == pytest.approx(1 + 4 + 2.5 + 2.0 + 1 + 4)


def test_plans_are_cached_by_block_signature_and_generation() -> None:
    _register()
    planner = BlockPlanner(_estimate, _transform)
    first = planner.plan(_block())
    assert planner.plan(_block()) is first
    lz.register_kernel(KernelSpec(id="blk.attn_other", ops=("attention.causal",), impl=_impl, platforms=CPU,
                                  layout="BSHD"))  # the registry changes: the generation bumps
    assert planner.plan(_block()) is not first
    assert len(planner.cache) == 2


def test_dynamic_programming_equals_exhaustive_search_on_random_costs() -> None:
    _register()
    rng = random.Random(7)
    for _ in range(20):
        times = {k: rng.uniform(0.5, 12.0) for k in TIMES}
        cost = rng.uniform(0.0, 8.0)
        planner = BlockPlanner(lambda s, c, t=times: t.get(s.id, 1000.0),  # type: ignore[misc]
                               lambda a, b, c, x=cost: 0.0 if a == b else x)
        exact, dp = planner.plan(_block(), method="exact"), planner.plan(_block(), method="dp")
        assert dp.total_us == pytest.approx(exact.total_us)
        assert planner.plan(_block(), method="greedy").total_us >= exact.total_us - 1e-9


def test_large_blocks_use_dp_and_apply_feeds_locks() -> None:
    _register()
    planner = BlockPlanner(_estimate, _transform, exact_limit=1)
    plan = planner.plan(_block())
    assert plan.method == "dp" and plan.kernels[2] == "blk.attn_bshd"
    locks = plan.apply()
    assert locks == {"norm.rms": "blk.norm", "posenc.rope": "blk.rope_bshd", "attention.causal": "blk.attn_bshd"}
    assert lz.get_locks()["attention.causal"] == "blk.attn_bshd"


def test_default_estimate_reads_perfdb_and_bad_input_raises(tmp_path) -> None:
    from layerzero.perf.perfdb import Bucket, PerfRecord, current_signature
    from layerzero.state import runtime

    _register()
    step = _block()[2]
    spec = runtime.registry.kernel("blk.attn_bshd")
    db = lz.perfdb(tmp_path / "p.sqlite")
    db.record([PerfRecord(k, step.ctx.op, "float32", Bucket.of(step.ctx), current_signature("cpu", 0),
                          runtime._backend_version(k) or "", 7.0, 8.0, 10, 0.01)
               for k in ("blk.attn_bshd", "blk.attn_bhsd")])
    runtime.measurements.reload()
    assert default_estimate(runtime)(spec, step.ctx) == pytest.approx(7.0)
    with pytest.raises(lz.ConfigurationError, match="method"):
        plan_block(_block(), method="fastest")
    with pytest.raises(lz.InvalidInputError, match="layout"):
        plan_block(_block(), layout="NHD")
    with pytest.raises(lz.InvalidInputError, match="family"):
        BlockStep.of("no_such_op")
