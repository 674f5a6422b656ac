"""serve.generate on the paged cache vs a plain-torch full recompute of the same network (no cache, no
LayerZero ops), batching vs one prompt at a time, and the logits vs float64 and vs transformers' Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.serve import Generation, Model, ModelConfig, Sampling, forward_logits, generate

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
