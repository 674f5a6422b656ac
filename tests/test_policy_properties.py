"""Property tests (Hypothesis): the condition parser, the policy loader under fuzzing, cache keys."""

from __future__ import annotations

import operator

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.ops.attention import ATTENTION
from layerzero.policy.conditions import parse_condition
from layerzero.policy.loader import parse_policy_text
from layerzero.selection.cache import PlanCache
from layerzero.state import runtime

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---- the condition parser against an independent evaluator of the same expression tree

INT_FIELDS = ("sm", "batch_size", "seq_len", "head_dim", "num_heads", "num_kv_heads", "gqa_ratio")
COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
           ">=": operator.ge}
DTYPES = ("float16", "bfloat16", "float32")

leaf = st.one_of(
    st.tuples(st.just("cmp"), st.sampled_from(INT_FIELDS), st.sampled_from(sorted(COMPARE)), st.integers(-5, 300)),
    st.tuples(st.just("in"), st.sampled_from(INT_FIELDS), st.booleans(), st.lists(st.integers(0, 200), max_size=4)),
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES), st.booleans()),
    st.tuples(st.just("causal"),),
)
trees = st.recursive(
    leaf,
    lambda sub: st.one_of(
        st.tuples(st.just("not"), sub),
        st.tuples(st.sampled_from(["and", "or"]), sub, sub),
    ),
    max_leaves=8,
)
contexts = st.builds(
    lambda sm, b, sq, sk, h, g, d, dt, causal: SelectionContext(
        op="attention.causal", sm=sm, batch=b, seq_len_q=sq, seq_len_k=sk, num_heads=h * g, num_kv_heads=h,
        head_dim=d, head_dim_v=d, dtype=getattr(torch, dt), is_causal=causal),
    st.sampled_from([0, 75, 80, 86, 89, 90, 100, 120]), st.integers(0, 64), st.integers(0, 4096),
    st.integers(0, 4096), st.integers(1, 16), st.sampled_from([1, 2, 4, 8]), st.sampled_from([32, 64, 80, 128, 256]),
    st.sampled_from(DTYPES), st.booleans(),
)


def to_text(tree: tuple) -> str:
    kind = tree[0]
    if kind == "cmp":
        return f"{tree[1]} {tree[2]} {tree[3]}"
    if kind == "in":
        return f"{tree[1]} {'in' if tree[2] else 'not in'} {list(tree[3])}"
    if kind == "dtype":
        return f"dtype {'==' if tree[2] else '!='} '{tree[1]}'"
    if kind == "causal":
        return "is_causal"
    if kind == "not":
        return f"not ({to_text(tree[1])})"
    return f"({to_text(tree[1])}) {kind} ({to_text(tree[2])})"


def evaluate(tree: tuple, ctx: SelectionContext) -> bool:
    kind = tree[0]
    if kind == "cmp":
        return COMPARE[tree[2]](getattr(ctx, tree[1]), tree[3])
    if kind == "in":
        return (getattr(ctx, tree[1]) in tree[3]) == tree[2]
    if kind == "dtype":
        return (ctx.dtype == getattr(torch, tree[1])) == tree[2]
    if kind == "causal":
        return ctx.is_causal
    if kind == "not":
        return not evaluate(tree[1], ctx)
    left, right = evaluate(tree[1], ctx), evaluate(tree[2], ctx)
    return (left and right) if kind == "and" else (left or right)


@FAST
@given(trees, contexts)
def test_condition_matches_an_independent_evaluator(tree, ctx):
    assert parse_condition(to_text(tree))(ctx) is evaluate(tree, ctx)


CONDITION_ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_0123456789 <>=!()[]'\".,+-*/%&|^~@:;\\{}\n\t")
                                     + ["and ", "or ", "not ", "in ", "sm", "head_dim", "dtype", "lambda", "__"])


@FAST
@given(st.lists(CONDITION_ALPHABET, max_size=30).map("".join), contexts)
def test_condition_parser_only_raises_policy_validation_error(text, ctx):
    try:
        condition = parse_condition(text)
    except lz.PolicyValidationError:
        return
    assert isinstance(condition(ctx), bool)  # what parses also evaluates


# ---- the loader under fuzzing: only PolicyValidationError, never anything else


@FAST
@given(st.binary(max_size=300))
def test_loader_random_bytes(data):
    runtime.ensure_loaded()
    try:
        parse_policy_text(data, runtime.registry, source="fuzz.yaml")
    except lz.PolicyValidationError:
        pass


VOCAB = ["version", "locks", "allows", "denies", "boosts", "prefer", "strict_mode", "operation", "backend",
         "backends", "kernel", "kernels", "condition", "when", "boost_factor", "priority", "attention.*",
         "attention.causal", "norm.rms", "torch", "torch_sdpa", "reference", "torch.sdpa_math", "head_dim",
         "sm >= 80", ">=64", "1.0", "bogus"]
scalars = st.one_of(st.sampled_from(VOCAB), st.integers(-3, 300), st.floats(allow_nan=True), st.booleans(),
                    st.none(), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda sub: st.one_of(st.lists(sub, max_size=4), st.dictionaries(st.sampled_from(VOCAB), sub, max_size=5)),
    max_leaves=20,
)


@FAST
@given(documents)
def test_loader_random_yaml_documents(doc):
    runtime.ensure_loaded()
    text = yaml.safe_dump(doc)
    try:
        policy = parse_policy_text(text, runtime.registry, source="fuzz.yaml")
    except lz.PolicyValidationError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    assert policy.strict in (None, True, False)


# ---- cache keys: equal keys mean equal selection contexts


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 2, 4]), st.sampled_from([8, 16]))


@FAST
@given(st.data())
def test_equal_attention_keys_mean_equal_contexts(data):
    def call():
        b, s, h, d = data.draw(shapes)
        hk = data.draw(st.sampled_from([x for x in (1, 2, 4) if h % x == 0]))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        sk = data.draw(st.integers(1, 3))
        q = torch.zeros(b, s, h, d, dtype=dtype)
        k = torch.zeros(b, sk, hk, d, dtype=dtype)
        mask = data.draw(st.sampled_from([None, "bool"]))
        causal = data.draw(st.booleans()) if mask is None else False
        attn_mask = None if mask is None else torch.ones(s, sk, dtype=torch.bool)
        return (q, k, k.clone(), attn_mask, causal, data.draw(st.sampled_from([0.0, 0.1])))

    a, b = call(), call()
    key_a, key_b = ATTENTION.key(*a), ATTENTION.key(*b)
    hash(key_a)
    if key_a == key_b:
        assert ATTENTION.context(*a) == ATTENTION.context(*b)


@FAST
@given(st.lists(st.one_of(st.tuples(st.just("get"), st.integers(0, 12)), st.just(("invalidate",))), max_size=60),
       st.integers(2, 8))
def test_cache_never_serves_a_plan_of_an_older_generation(ops, maxsize):
    cache = PlanCache(maxsize=maxsize)
    for op in ops:
        if op[0] == "invalidate":
            cache.invalidate()
            continue
        plan = cache.get_or_compute(op[1], lambda g=cache.generation, k=op[1]: (g, k))
        assert plan == (cache.generation, op[1])
        assert len(cache) <= maxsize


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loader_rejects_non_finite_numbers(value):
    runtime.ensure_loaded()
    text = yaml.safe_dump({"boosts": [{"backend": "torch", "boost_factor": value}]})
    with pytest.raises(lz.PolicyValidationError, match="finite number"):
        parse_policy_text(text, runtime.registry)
