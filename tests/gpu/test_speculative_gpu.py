"""GPU: serve.speculative_generate on CUDA with the GPU kernels (the target's k + 1 token verification chunk
through lz.paged_attention), against serve.generate of the target.

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_speculative_gpu.py -q -s
"""

from __future__ import annotations

import pytest
import torch

from layerzero.serve import Model, ModelConfig, generate, speculative_generate
from tests.test_serve import early_exit, reference_logits

pytestmark = pytest.mark.gpu

CONFIG = ModelConfig(vocab_size=1000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                     intermediate_size=1024, max_positions=1024)
PROMPTS = [list(range(3, 3 + 40)), [7, 1, 9, 4, 400, 12, 88, 5, 300, 2, 41, 17, 60]]


@pytest.mark.parametrize("k", [1, 4, 20])
def test_float32_greedy_speculative_equals_target_greedy(k: int) -> None:
    target = Model.random(CONFIG, dtype=torch.float32, device="cuda", seed=0)
    draft = early_exit(target, 1)
    for prompt in PROMPTS:
        want = generate(target, prompt, max_new_tokens=16, page_size=16).tokens
        out = speculative_generate(target, draft, prompt, 16, num_speculative=k, page_size=16)
        assert out.tokens == want
        assert out.stats.emitted == out.stats.accepted + out.stats.steps == 16


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("k", [2, 5])
def test_bf16_greedy_speculative_equals_target_greedy(kv_layout: str, k: int) -> None:
    """bf16: the (k + 1)-row verification and the 1-row decode may round a near-tie differently, so where the
    tokens first differ both must be top tokens (within 1% of the logit range) of the float64 reference;
    any other difference (a wrong cache read, rollback or position) fails."""
    target = Model.random(CONFIG, dtype=torch.bfloat16, device="cuda", seed=1)
    draft = early_exit(target, 2)
    for prompt in PROMPTS:
        want = generate(target, prompt, max_new_tokens=24, kv_layout=kv_layout).tokens[0]
        got = speculative_generate(target, draft, prompt, 24, num_speculative=k, kv_layout=kv_layout).tokens[0]
        if got == want:
            continue
        i = next(j for j, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        ref = reference_logits(target, prompt + want[:i], torch.float64)[-1]
        spread = float(ref.max() - ref.min())
        for token in (got[i], want[i]):
            assert float(ref.max() - ref[token]) <= 0.01 * spread, (i, got, want)
