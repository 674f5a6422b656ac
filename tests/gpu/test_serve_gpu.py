"""GPU: serve.generate over the paged cache with the GPU kernels (FlashInfer / our Triton paged decode /
SDPA), bf16 and float32, against the plain-torch full recompute of tests/test_serve.py.

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_serve_gpu.py -q -s
"""

from __future__ import annotations

import pytest
import torch

from layerzero.serve import Model, ModelConfig, forward_logits, generate
from tests.test_serve import naive_greedy, reference_logits

pytestmark = pytest.mark.gpu

# head_dim 64 and GQA 4: shapes every GPU attention backend takes
CONFIG = ModelConfig(vocab_size=1000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                     intermediate_size=1024, max_positions=1024)
PROMPTS = [list(range(3, 3 + 40)), [7, 1, 9, 4, 400, 12, 88, 5, 300, 2, 41, 17, 60], list(range(900, 900 - 77, -1))]


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_float32_greedy_equals_full_recompute(kv_layout: str) -> None:
    model = Model.random(CONFIG, dtype=torch.float32, device="cuda", seed=0)
    out = generate(model, PROMPTS, max_new_tokens=12, kv_layout=kv_layout, page_size=16)
    assert out.tokens == [naive_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_bf16_decode_picks_a_top_token_of_the_float64_reference(kv_layout: str) -> None:
    """bf16 greedy tokens may differ from float64's at near ties, so each generated token must score within
    3% of the logit range of the float64 reference's best token at that step (a wrong cache read or page
    table would pick tokens far below it)."""
    model = Model.random(CONFIG, dtype=torch.bfloat16, device="cuda", seed=1)
    out = generate(model, PROMPTS, max_new_tokens=16, kv_layout=kv_layout)
    for prompt, new in zip(PROMPTS, out.tokens, strict=True):
        seq = prompt + new
        ref = reference_logits(model, seq, torch.float64)[len(prompt) - 1: -1]  # the logits each token came from
        chosen = ref.gather(1, torch.tensor(new, device="cuda")[:, None])[:, 0]
        spread = ref.max(1).values - ref.min(1).values
        assert bool((ref.max(1).values - chosen <= 0.03 * spread).all()), (ref.max(1).values - chosen) / spread


def test_bf16_prefill_logits_match_float64() -> None:
    model = Model.random(CONFIG, dtype=torch.bfloat16, device="cuda", seed=2)
    ids = PROMPTS[2]
    got = forward_logits(model, ids).double()
    want = reference_logits(model, ids, torch.float64)
    scale = want.abs().max()
    assert float((got - want).abs().max()) <= 0.03 * float(scale)


def test_gpu_kernels_run_the_attention() -> None:
    """Equal-length bf16 prompts: dense prefill and paged decode run GPU kernels, not the torch reference."""
    model = Model.random(CONFIG, dtype=torch.bfloat16, device="cuda", seed=3)
    out = generate(model, [PROMPTS[0], PROMPTS[0][::-1]], max_new_tokens=4)
    print(out.kernels)
    for op in ("attention", "paged_attention", "rms_norm", "rope_qk", "fused_mlp"):
        assert op in out.kernels and not any(k.startswith("reference.") for k in out.kernels[op]), out.kernels


def test_decode_cuda_graphs_match_eager() -> None:
    """Decode steps replayed from CUDA graphs (one per live batch size: 3, then 2, then 1 as requests
    finish) give the same tokens and kernels as every step run eagerly."""
    model = Model.random(CONFIG, dtype=torch.bfloat16, device="cuda", seed=4)
    budgets = [20, 12, 6]
    graphed = generate(model, PROMPTS, max_new_tokens=budgets)
    eager = generate(model, PROMPTS, max_new_tokens=budgets, cuda_graphs=False)
    print(graphed.graph_batch_sizes, graphed.decode_batch_sizes, graphed.kernels)
    assert graphed.graph_batch_sizes == (1, 2, 3)
    assert eager.graph_batch_sizes == ()
    assert graphed.tokens == eager.tokens
    assert graphed.kernels == eager.kernels
