"""serve.generate on the paged cache vs a plain-torch full recompute of the same network (no cache, no
LayerZero ops), batching vs one prompt at a time, and the logits vs float64 and vs transformers' Llama.
serve.speculative_generate: greedy equals generate token for token, sampling follows the target's
distribution (chi-square), rollback on the paged caches, statistics and kernels."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats

import layerzero as lz
from layerzero.kv_cache import PagedKVCache
from layerzero.serve import (
    Generation,
    Model,
    ModelConfig,
    Sampling,
    SpeculativeGeneration,
    forward_logits,
    generate,
    speculative_generate,
)
from layerzero.speculative import UnsupportedBatchError

CONFIG = ModelConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                     intermediate_size=80, max_positions=128)
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [1, 2, 3], [44, 12, 12, 12, 70, 3, 8, 8, 2, 90, 11]]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.random(CONFIG, dtype=torch.float32, seed=3)


def reference_logits(model: Model, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits (S, V) of the whole sequence, recomputed from scratch: plain torch, RoPE angles of its own."""
    c = model.config
    w = lambda t: t.to(dtype)  # noqa: E731
    S, Hq, Hkv, D = len(ids), c.num_heads, c.num_kv_heads, c.head_dim

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w(weight)

    dev = model.device
    inv = 1.0 / c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=dev) / D)
    ang = torch.arange(S, dtype=torch.float64, device=dev)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype)[:, None], torch.cat([ang.sin()] * 2, -1).to(dtype)[:, None]

    def rope(x: torch.Tensor) -> torch.Tensor:  # (S, H, D), NeoX halves
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w(model.embed)[torch.tensor(ids, device=dev)]
    for layer in model.layers:
        q, k, v = (norm(x, layer.attn_norm) @ w(layer.wqkv).T).split([Hq * D, Hkv * D, Hkv * D], -1)
        q, k, v = rope(q.reshape(S, Hq, D)), rope(k.reshape(S, Hkv, D)), v.reshape(S, Hkv, D)
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + o.transpose(0, 1).reshape(S, Hq * D) @ w(layer.wo).T
        h = norm(x, layer.mlp_norm)
        x = x + (F.silu(h @ w(layer.w_gate).T) * (h @ w(layer.w_up).T)) @ w(layer.w_down).T
    return norm(x, model.norm) @ w(model.lm_head).T


def naive_greedy(model: Model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kv_layout,page_size", [("NHD", 4), ("HND", 3), ("NHD", 16)])
def test_greedy_through_the_paged_cache_equals_full_recompute(model: Model, kv_layout: str, page_size: int) -> None:
    out = generate(model, PROMPTS, max_new_tokens=9, kv_layout=kv_layout, page_size=page_size)
    assert out.tokens == [naive_greedy(model, p, 9) for p in PROMPTS]
    assert out.prefill_tokens == sum(map(len, PROMPTS)) and out.decode_tokens == 3 * 8
    assert out.decode_batch_sizes == [3] * 8


def test_batching_equals_running_alone(model: Model) -> None:
    together = generate(model, PROMPTS[:2], max_new_tokens=8)  # different lengths: packed varlen prefill
    alone = [generate(model, p, max_new_tokens=8).tokens[0] for p in PROMPTS[:2]]
    assert together.tokens == alone
    same_len = [PROMPTS[0], PROMPTS[0][::-1]]  # equal lengths: one dense (B, S) prefill
    dense = generate(model, same_len, max_new_tokens=6)
    assert dense.tokens == [generate(model, p, max_new_tokens=6).tokens[0] for p in same_len]
    assert "attention" in dense.kernels and "attention_varlen" in together.kernels


def test_a_tensor_of_prompts_equals_the_lists(model: Model) -> None:
    """A (B, S) id tensor is packed for prefill by indexing (also with continuous batching, where
    admitted rows are picked out of it); the tokens equal those of the same prompts as lists."""
    same_len = [PROMPTS[0], PROMPTS[0][::-1], PROMPTS[0][1:] + PROMPTS[0][:1]]
    ids = torch.tensor(same_len)
    want = generate(model, same_len, max_new_tokens=[3, 5, 4], max_batch=2).tokens
    assert generate(model, ids, max_new_tokens=[3, 5, 4], max_batch=2).tokens == want
    assert generate(model, ids[0], max_new_tokens=3).tokens == [want[0]]
    for bad in (ids.float(), ids[:, None], torch.empty(0, dtype=torch.int64)):
        with pytest.raises(lz.InvalidInputError, match="prompt_ids"):
            generate(model, bad)


def test_continuous_batching_joins_and_leaves(model: Model) -> None:
    """max_batch=2 with three requests of different budgets: the third joins when the first leaves, using
    the pages it freed (num_pages fits two requests only); tokens equal each request run alone."""
    budgets = [2, 7, 5]
    out = generate(model, PROMPTS, max_new_tokens=budgets, max_batch=2, page_size=4, num_pages=8)
    assert out.tokens == [generate(model, p, max_new_tokens=n).tokens[0] for p, n in zip(PROMPTS, budgets, strict=True)]
    assert out.decode_batch_sizes[0] == 2 and 1 in out.decode_batch_sizes
    assert sum(out.decode_batch_sizes) == out.decode_tokens == sum(budgets) - 3


def test_eos_stops_a_request(model: Model) -> None:
    full = generate(model, PROMPTS[0], max_new_tokens=8).tokens[0]
    eos = full[3]
    stop = full.index(eos)
    out = generate(model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=8, eos_token_id=eos)
    assert out.tokens[0] == full[: stop + 1]


def test_logits_match_a_float64_reference(model: Model) -> None:
    ids = PROMPTS[2] + PROMPTS[0]
    got = forward_logits(model, ids, page_size=4)
    want = reference_logits(model, ids, torch.float64)
    assert got.dtype == torch.float32 and got.shape == (len(ids), CONFIG.vocab_size)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    m64 = Model.random(CONFIG, dtype=torch.float64, seed=3)  # the same weights, run in float64 through lz ops
    torch.testing.assert_close(forward_logits(m64, ids), want, rtol=1e-9, atol=1e-9)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model: Model) -> None:
    s = Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a = generate(model, PROMPTS, max_new_tokens=6, sampling=s)
    b = generate(model, PROMPTS, max_new_tokens=6, sampling=s)
    assert a.tokens == b.tokens and all(0 <= t < CONFIG.vocab_size for row in a.tokens for t in row)
    assert "sample" in a.kernels
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    assert generate(model, PROMPTS, max_new_tokens=6, sampling=Sampling(top_k=1, seed=1)).tokens == greedy.tokens
    assert a.tokens != greedy.tokens  # temperature sampling over 20 tokens: 18 identical draws would be absurd


def test_reports_kernels_and_throughput(model: Model) -> None:
    out = generate(model, PROMPTS, max_new_tokens=4)
    assert isinstance(out, Generation)
    assert set(out.kernels) == {"embedding", "rms_norm", "rope_qk", "attention_varlen", "paged_attention",
                                "fused_mlp", "sample_greedy"}
    known = {k.id for k in lz.list_kernels()}
    assert all(set(ids) <= known for ids in out.kernels.values()), out.kernels
    assert out.prefill_s > 0 and out.decode_s > 0 and out.tokens_per_s > 0 and out.decode_tokens_per_s > 0
    assert out.new_tokens == 12


def test_bad_requests_raise_named_errors(model: Model) -> None:
    with pytest.raises(lz.InvalidInputError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(lz.InvalidInputError, match="max_new_tokens: expected an int >= 1 or 3 of them"):
        generate(model, PROMPTS, max_new_tokens=[1, 2])
    with pytest.raises(lz.InvalidInputError, match=r"prompt_ids\[1\]: expected a non-empty list"):
        generate(model, [[1], []])
    with pytest.raises(lz.InvalidInputError, match="max_positions 128"):
        generate(model, [1] * 120, max_new_tokens=9)
    with pytest.raises(lz.InvalidInputError, match="num_pages"):
        generate(model, PROMPTS, max_new_tokens=4, page_size=2, num_pages=3)
    with pytest.raises(lz.InvalidInputError, match="ids"):
        generate(model, [[1, CONFIG.vocab_size]])  # token id out of the vocabulary


def test_same_network_as_transformers_llama() -> None:
    transformers = pytest.importorskip("transformers")
    hc = transformers.LlamaConfig(vocab_size=91, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hc).eval()
    for p in hf.parameters():  # HF init (std 0.02) gives near-uniform logits: spread them
        p.data.normal_(0, 0.3)
    model = Model.from_transformers(hf)
    ids = [3, 14, 15, 9, 26, 5, 35]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, 7))
    torch.testing.assert_close(forward_logits(model, ids), want, rtol=1e-4, atol=1e-4)
    assert generate(model, ids, max_new_tokens=6).tokens[0] == ref[0, len(ids):].tolist()


# ----------------------------------------------------------------------------- speculative decoding


def early_exit(model: Model, num_layers: int) -> Model:
    """A draft that shares the target's embedding, first layers, final norm and head: it agrees with the
    target on some tokens and not on others (acceptance between 0 and 1)."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, num_layers=num_layers),
                               layers=model.layers[:num_layers])


@pytest.fixture(scope="module")
def draft(model: Model) -> Model:
    return early_exit(model, 1)


def check_stats_add_up(out: SpeculativeGeneration, k: int, n: int) -> None:
    st = out.stats
    assert st.num_draft == k and st.emitted == out.new_tokens == n
    assert st.emitted == st.accepted + st.steps  # each target pass: its kept draft tokens + one of its own
    assert st.accepted <= st.proposed <= k * st.steps and sum(st.accepted_at) == st.accepted
    assert st.accepted_at == sorted(st.accepted_at, reverse=True) and len(st.accepted_at) <= k


@pytest.mark.parametrize("k", [1, 2, 4, 12])  # 12: more than the tokens left
@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_greedy_equals_target_greedy(model: Model, draft: Model, prompt: list[int], k: int) -> None:
    want = generate(model, prompt, max_new_tokens=10, page_size=4).tokens
    out = speculative_generate(model, draft, prompt, max_new_tokens=10, num_speculative=k, page_size=4)
    assert out.tokens == want
    check_stats_add_up(out, k, 10)


@pytest.mark.parametrize("kv_layout,page_size", [("HND", 3), ("NHD", 16), ("NHD", 1)])
def test_speculative_greedy_layouts_and_page_sizes(model: Model, draft: Model, kv_layout: str, page_size: int
                                                   ) -> None:
    st = None
    for prompt in PROMPTS:
        want = generate(model, prompt, max_new_tokens=9).tokens
        out = speculative_generate(model, draft, prompt, 9, num_speculative=3, kv_layout=kv_layout,
                                   page_size=page_size)
        assert out.tokens == want
        st = out.stats
    assert st is not None and 0.0 < st.acceptance_rate < 1.0  # both branches of verification ran


def test_speculative_with_the_target_as_draft_accepts_everything(model: Model) -> None:
    """Every proposal kept: k + 1 tokens per target pass, the draft catching up on 2 tokens per round."""
    prompt = PROMPTS[0]
    out = speculative_generate(model, model, prompt, max_new_tokens=13, num_speculative=4, page_size=4)
    assert out.tokens == generate(model, prompt, max_new_tokens=13).tokens
    st = out.stats  # rounds: k = 4, 4, then 2 (13 - 10 tokens left, the last one from the target)
    assert (st.steps, st.proposed, st.accepted, st.emitted) == (3, 10, 10, 13)
    assert st.acceptance_rate == 1.0 and st.accepted_at == [3, 3, 2, 2]


def test_speculative_single_token_prompt_and_single_new_token(model: Model, draft: Model) -> None:
    assert speculative_generate(model, draft, [7], 6, num_speculative=2).tokens == generate(model, [7], 6).tokens
    one = speculative_generate(model, draft, PROMPTS[1], 1, num_speculative=4)
    assert one.tokens == generate(model, PROMPTS[1], 1).tokens and one.stats.proposed == 0


def test_speculative_rollback_frees_the_rejected_pages(model: Model, draft: Model,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After every round the target cache holds exactly prompt + emitted - 1 tokens and the pages of the
    rejected proposals went back to the pool (page_size 2, k = 5: a rejection often frees pages)."""
    cuts: list[tuple[int, int, int, list[int]]] = []  # (cache, length before, after, pages freed)
    original = PagedKVCache.truncate

    def spy(self: PagedKVCache, seq_id: object, length: int) -> list[int]:
        before, pages = self.length(seq_id), len(self.allocator.pages(seq_id))
        freed = original(self, seq_id, length)
        assert len(self.allocator.pages(seq_id)) == pages - len(freed) == -(-length // self.page_size)
        assert set(freed) <= set(self.allocator.free_pages())
        cuts.append((id(self), before, length, freed))
        return freed

    monkeypatch.setattr(PagedKVCache, "truncate", spy)
    prompt = PROMPTS[2]
    out = speculative_generate(model, draft, prompt, max_new_tokens=12, num_speculative=5, page_size=2)
    assert out.tokens == generate(model, prompt, 12).tokens
    target = [c for c in cuts if c[0] == cuts[0][0]]  # the target cache is cut first in every round
    assert len(target) == out.stats.steps
    assert all(0 <= before - after <= 5 for _, before, after, _ in target)  # at most k rejected proposals
    assert sum(before - after for _, before, after, _ in target) == out.stats.proposed - out.stats.accepted
    lengths = [after for _, _, after, _ in target]
    assert lengths == sorted(lengths) and lengths[-1] == len(prompt) + 12 - 1
    assert any(freed for _, _, _, freed in cuts), "no rollback crossed a page boundary"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Many tiny generations: intra-op threads only add overhead (and contend with parallel test runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _filtered(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution generate() samples from: softmax(logits / T), top-k, renormalized (float64)."""
    p = torch.softmax(logits.double() / s.temperature, -1)
    if s.top_k is not None:
        p = torch.where(p >= p.topk(s.top_k).values[-1], p, 0.0)
    return p / p.sum()


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, cells expecting < 5 draws pooled; 0 when an impossible cell was drawn."""
    n = float(counts.sum())
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    return float(scipy_stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=4)])
def test_speculative_sampling_follows_the_target_distribution(sampling: Sampling, one_thread: None) -> None:
    """Tiny vocabulary, a draft that disagrees: the first token (accepted draft token or a residual draw) and
    the first two tokens jointly follow the target's sampling distribution, and not the draft's."""
    V = 6
    config = ModelConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                         intermediate_size=16, max_positions=16)
    target, other = Model.random(config, seed=1), Model.random(config, seed=2)
    prompt = [1, 2, 3]
    first = _filtered(forward_logits(target, prompt)[-1], sampling)
    joint = torch.stack([first[a] * _filtered(forward_logits(target, prompt + [a])[-1], sampling)
                         for a in range(V)]).flatten()
    draft_first = _filtered(forward_logits(other, prompt)[-1], sampling)
    assert (first - draft_first).abs().max() > 0.05  # the draft really differs
    g = torch.Generator().manual_seed(1234)
    n, counts, st = 1000, torch.zeros(V * V), None
    accepted = proposed = 0
    for _ in range(n):
        out = speculative_generate(target, other, prompt, 2, num_speculative=3, sampling=sampling, generator=g)
        a, b = out.tokens[0]
        counts[a * V + b] += 1
        accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
        st = out.stats
    assert st is not None and st.proposed == 1  # k = min(3, 2 - 1): one proposal, then the bonus or a decode
    assert 0 < accepted < proposed
    assert _pvalue(counts.view(V, V).sum(1), first) > 1e-3
    assert _pvalue(counts, joint) > 1e-3
    assert _pvalue(counts.view(V, V).sum(1), draft_first) < 1e-6  # the test has the power to fail


def test_speculative_sampling_is_seeded(model: Model, draft: Model) -> None:
    s = Sampling(temperature=0.9, top_p=0.9, seed=5)
    a = speculative_generate(model, draft, PROMPTS[0], 8, num_speculative=3, sampling=s)
    b = speculative_generate(model, draft, PROMPTS[0], 8, num_speculative=3, sampling=s)
    assert a.tokens == b.tokens and a.new_tokens == 8
    assert "sample" in a.target_kernels and "sample" in a.draft_kernels
    greedy = speculative_generate(model, draft, PROMPTS[0], 8, sampling=Sampling(top_k=1, seed=1))
    assert greedy.tokens == generate(model, PROMPTS[0], 8).tokens


def test_speculative_eos_stops_like_generate(model: Model, draft: Model) -> None:
    full = generate(model, PROMPTS[0], max_new_tokens=10).tokens[0]
    eos = full[4]
    want = generate(model, PROMPTS[0], max_new_tokens=10, eos_token_id=eos).tokens
    for k in (1, 3, 6):
        out = speculative_generate(model, draft, PROMPTS[0], 10, num_speculative=k, eos_token_id=eos)
        assert out.tokens == want and out.stats.emitted == len(want[0])


def test_speculative_reports_kernels_of_both_models(model: Model, draft: Model) -> None:
    out = speculative_generate(model, draft, PROMPTS[0], 6, num_speculative=2)
    known = {k.id for k in lz.list_kernels()}
    for kernels in (out.target_kernels, out.draft_kernels):
        assert set(kernels) == {"embedding", "rms_norm", "rope_qk", "attention", "paged_attention", "fused_mlp",
                                "sample_greedy"}
        assert all(set(ids) <= known for ids in kernels.values()), kernels
    assert out.prefill_s > 0 and out.decode_s > 0 and out.tokens_per_s > 0


def test_speculative_bad_requests_raise_named_errors(model: Model, draft: Model) -> None:
    with pytest.raises(UnsupportedBatchError, match=r"prompt_ids: expected one prompt .* got 2 prompts") as err:
        speculative_generate(model, draft, PROMPTS[:2], 4)
    assert isinstance(err.value, lz.LayerZeroError)
    with pytest.raises(lz.InvalidInputError, match="num_speculative: expected an int >= 1, got 0"):
        speculative_generate(model, draft, PROMPTS[0], 4, num_speculative=0)
    with pytest.raises(lz.InvalidInputError, match="max_new_tokens: expected an int >= 1"):
        speculative_generate(model, draft, PROMPTS[0], 0)
    with pytest.raises(lz.InvalidInputError, match="max_positions 128"):
        speculative_generate(model, draft, [1] * 120, 9)
    small = Model.random(dataclasses.replace(CONFIG, vocab_size=50), seed=0)
    with pytest.raises(lz.InvalidInputError, match=r"draft: expected a model with the target's vocabulary \(97\)"):
        speculative_generate(model, small, PROMPTS[0], 4)
    with pytest.raises(lz.InvalidInputError, match="top_p"):
        speculative_generate(model, draft, PROMPTS[0], 4, sampling=Sampling(top_p=0.0))
