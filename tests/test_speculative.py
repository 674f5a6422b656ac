"""Speculative decoding: greedy equals the target token for token, sampling follows the target
distribution (chi-square), acceptance statistics, tree masks through lz.attention and Flex."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scipy_stats

import layerzero as lz
from layerzero.speculative import (
    SpeculativeStats,
    kernel_pair,
    speculative_generate,
    target_greedy,
    tree_attention_mask,
    tree_mask_mod,
    verify_tree_greedy,
)

VOCAB = 48


class TinyLM(torch.nn.Module):
    """A random-init decoder: embeddings, `layers` blocks of rms_norm + lz.attention + MLP, a head."""

    def __init__(self, dim: int, heads: int, layers: int, seed: int, max_len: int = 128) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.dim = heads, dim
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.pos = torch.nn.Embedding(max_len, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, VOCAB)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, S = tokens.shape
        pos = torch.arange(S) if position_ids is None else position_ids
        x = self.emb(tokens) + self.pos(pos)
        for qkv, out in zip(self.qkv, self.out, strict=True):
            q, k, v = qkv(lz.rms_norm(x)).view(B, S, 3, self.heads, -1).unbind(2)
            a = lz.attention(q, k, v, is_causal=attn_mask is None, attn_mask=attn_mask)
            x = x + out(a.reshape(B, S, self.dim))
        return self.head(lz.rms_norm(x)) * 4.0  # peaked enough that drafts get accepted sometimes


@pytest.fixture(scope="module")
def models() -> tuple[TinyLM, TinyLM]:
    return TinyLM(64, 4, 2, seed=1), TinyLM(16, 2, 1, seed=2)


PROMPT = torch.tensor([[3, 17, 5, 9]])


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_greedy_equals_target_greedy_token_for_token(models: tuple[TinyLM, TinyLM], num_draft: int) -> None:
    target, draft = models
    expected = target_greedy(target, PROMPT, 24)
    got, st = speculative_generate(target, draft, PROMPT, 24, num_draft=num_draft)
    assert got.tolist() == expected.tolist()
    assert st.emitted == 24 and st.steps <= 24


def test_forced_acceptance_draft_equal_to_target(models: tuple[TinyLM, TinyLM]) -> None:
    target, _ = models
    got, st = speculative_generate(target, target, PROMPT, 20, num_draft=4)
    assert got.tolist() == target_greedy(target, PROMPT, 20).tolist()
    assert st.acceptance_rate == 1.0
    assert st.steps == 4 and st.tokens_per_step == 5.0  # k accepted + 1 bonus per target pass
    assert st.accepted_at == [4, 4, 4, 4]


def test_acceptance_stats_of_a_weak_draft(models: tuple[TinyLM, TinyLM]) -> None:
    target, draft = models
    st = SpeculativeStats()
    for prompt in ([[1, 2]], [[7, 7, 7]], [[40, 3, 11]]):
        speculative_generate(target, draft, torch.tensor(prompt), 12, num_draft=3, stats=st)
    assert st.emitted == 36 and st.proposed >= st.steps
    assert 0.0 <= st.acceptance_rate < 1.0
    assert st.accepted_at == sorted(st.accepted_at, reverse=True)  # position i kept only after 0..i-1
    assert sum(st.accepted_at) == st.accepted
    assert "target passes" in str(st)


# ----------------------------------------------------------------------------- distribution

V = 5


class Bigram:
    """logits[t] = table[previous token]: an exactly known next-token distribution."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 1.2

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def _joint(model: Bigram, first: int, temperature: float) -> torch.Tensor:
    p = torch.softmax(model.table / temperature, -1)
    return (p[first].unsqueeze(1) * p).flatten()  # P(t1, t2) = p(t1 | first) p(t2 | t1)


@pytest.mark.parametrize("temperature,num_draft", [(1.0, 2), (0.7, 3)])
def test_sampled_outputs_follow_the_target_distribution(temperature: float, num_draft: int) -> None:
    target, draft = Bigram(10), Bigram(11)
    expected = _joint(target, 2, temperature)
    assert (expected - _joint(draft, 2, temperature)).abs().max() > 0.05  # the draft really differs
    g = torch.Generator().manual_seed(1234)
    n = 2000
    counts = torch.zeros(V * V)
    st = SpeculativeStats()
    for _ in range(n):
        out, _ = speculative_generate(target, draft, torch.tensor([[2]]), 2, num_draft=num_draft,
                                      temperature=temperature, generator=g, stats=st)
        counts[out[0, 1] * V + out[0, 2]] += 1
    chi = scipy_stats.chisquare(counts.numpy(), (expected * n).numpy())
    assert chi.pvalue > 1e-3, chi
    assert 0.0 < st.acceptance_rate < 1.0
    # the same test rejects the draft's own distribution (it has the power to fail)
    draft_draws = torch.multinomial(_joint(draft, 2, temperature), n, replacement=True, generator=g)
    wrong = torch.bincount(draft_draws, minlength=V * V).float()
    assert scipy_stats.chisquare(wrong.numpy(), (expected * n).numpy()).pvalue < 1e-6


def test_bad_inputs_raise_layerzero_errors(models: tuple[TinyLM, TinyLM]) -> None:
    target, draft = models
    with pytest.raises(lz.InvalidInputError, match="prompt"):
        speculative_generate(target, draft, torch.tensor([1, 2]), 4)
    with pytest.raises(lz.InvalidInputError, match="num_draft"):
        speculative_generate(target, draft, PROMPT, 4, num_draft=0)
    with pytest.raises(lz.InvalidInputError, match="temperature"):
        speculative_generate(target, draft, PROMPT, 4, temperature=-1.0)
    with pytest.raises(lz.InvalidInputError, match="draft"):
        speculative_generate(target, lambda t: torch.zeros(3), PROMPT, 4)
    with pytest.raises(lz.InvalidInputError, match=r"parents\[1\]"):
        tree_attention_mask([-1, 1], 3)


# ----------------------------------------------------------------------------- trees


PARENTS = [-1, -1, 0, 0, 2, 1]  # two roots; node 4 is a grandchild of node 0


def test_tree_mask_structure() -> None:
    mask, pos = tree_attention_mask(PARENTS, 3)
    assert mask.shape == (9, 9)
    assert pos.tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 4]
    node4 = mask[3 + 4].tolist()
    assert node4 == [True, True, True, True, False, True, False, True, False]  # prefix, 0, 2, itself
    assert not mask[3 + 1, 3 + 0]  # siblings do not see each other


def _path_tokens(i: int, tokens: list[int]) -> list[int]:
    path = []
    while i >= 0:
        path.append(tokens[i])
        i = PARENTS[i]
    return path[::-1]


def test_tree_attention_equals_each_path_run_causally(models: tuple[TinyLM, TinyLM]) -> None:
    target, _ = models
    prefix = [3, 17, 5]
    tree = [8, 21, 30, 2, 11, 40]
    mask, pos = tree_attention_mask(PARENTS, len(prefix))
    logits = target(torch.tensor([prefix + tree]), attn_mask=mask, position_ids=pos)[0]
    for i in range(len(tree)):
        alone = target(torch.tensor([prefix + _path_tokens(i, tree)]))[0, -1]
        torch.testing.assert_close(logits[len(prefix) + i], alone, rtol=1e-4, atol=1e-4)


def test_verify_tree_greedy_accepts_the_target_path(models: tuple[TinyLM, TinyLM]) -> None:
    target, _ = models
    prefix = torch.tensor([[3, 17, 5]])
    greedy = target_greedy(target, prefix, 4)[0, 3:].tolist()
    wrong = [(t + 1) % VOCAB for t in greedy]
    # node 0: a wrong first token; node 1 -> 3 -> 4: the greedy path; node 2: a wrong branch under 1
    tree, parents = [wrong[0], greedy[0], wrong[1], greedy[1], greedy[2]], [-1, -1, 1, 1, 3]
    out, accepted = verify_tree_greedy(target, prefix, tree, parents)
    assert accepted == 3 and out == greedy[:4]


@pytest.mark.slow  # inductor compiles the CPU template (~15 s on 2 cores)
def test_tree_mask_through_flex_mask_mod_matches_lz_attention() -> None:
    from layerzero.backends import torch_flex

    if not torch_flex.BACKEND.availability[0]:
        pytest.skip("torch has no FlexAttention")
    pytest.importorskip("torch._inductor")
    mask, _ = tree_attention_mask(PARENTS, 10)
    S = mask.shape[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, 2, 16, generator=g) for _ in range(3))
    reference = lz.attention(q, k, v, attn_mask=mask)
    try:
        got = torch_flex.flex_attention(q, k, v, mask_mod=tree_mask_mod(mask))
    except Exception as e:  # noqa: BLE001 - inductor's CPU codegen needs a C++ toolchain
        pytest.skip(f"FlexAttention cannot compile on this machine: {type(e).__name__}: {e}")
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_kernel_pair_reports_both_selections() -> None:
    g = torch.Generator().manual_seed(0)
    draft_q = torch.randn(1, 1, 2, 32, generator=g)
    draft_k = torch.randn(1, 16, 2, 32, generator=g)
    target_q = torch.randn(1, 5, 8, 64, generator=g)
    target_k = torch.randn(1, 16, 8, 64, generator=g)
    pair = kernel_pair("attention", (draft_q, draft_k, draft_k), (target_q, target_k, target_k),
                       {"is_causal": True}, {"is_causal": True})
    assert pair.draft == lz.which("attention", draft_q, draft_k, draft_k, is_causal=True)
    assert pair.target == lz.which("attention", target_q, target_k, target_k, is_causal=True)
    assert pair.draft_report.context.seq_len_q == 1 and pair.target_report.context.seq_len_q == 5
    assert str(pair).startswith("attention: draft -> ")
    assert math.isfinite(pair.target_report.score)
