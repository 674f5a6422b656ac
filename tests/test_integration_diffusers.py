"""diffusers integration: the LayerZero attention processor on tiny random-init UNet and DiT models."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import layerzero as lz  # noqa: E402
from layerzero.integrations.diffusers import (  # noqa: E402
    LayerZeroAttnProcessor,
    set_layerzero_processor,
    unset_layerzero_processor,
)
from layerzero.state import runtime  # noqa: E402


def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8).eval()


def dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def processors(model: torch.nn.Module) -> list[object]:
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in model.modules() if isinstance(m, Attention)]


def attention_calls() -> list[tuple]:
    return [k for k in runtime.plans.data if k[0] == "attention"]


def test_unet_self_and_cross_attention_match_the_default_processor():
    model = unet()
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    text_mask = torch.ones(2, 5)
    text_mask[1, 3:] = 0
    before = processors(model)
    with torch.no_grad():
        ref = model(sample, 3, encoder_hidden_states=text).sample
        ref_masked = model(sample, 3, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample

    n = set_layerzero_processor(model)
    assert n == len(before) == 8  # attn1 (self) + attn2 (cross) in the down, mid and two up transformer blocks
    assert all(isinstance(p, LayerZeroAttnProcessor) for p in processors(model))
    with torch.no_grad():
        got = model(sample, 3, encoder_hidden_states=text).sample
        got_masked = model(sample, 3, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
    shapes = {(k[2], k[3]) for k in attention_calls()}  # (q shape, k shape) in BSHD
    assert any(q[1] != kk[1] for q, kk in shapes)  # cross-attention: 5 text tokens against 64 or 16 pixels
    assert any(k[11] is not None for k in attention_calls())  # the masked call reached lz.attention with its mask
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_masked, ref_masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, ref_masked)  # the mask changed the result: the comparison means something

    unset_layerzero_processor(model)
    assert all(a is b for a, b in zip(processors(model), before, strict=True))
    with torch.no_grad():
        assert torch.equal(model(sample, 3, encoder_hidden_states=text).sample, ref)


def test_dit_matches_the_default_processor():
    model = dit()
    g = torch.Generator().manual_seed(2)
    x, t, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=labels).sample
    assert set_layerzero_processor(model) == 2
    assert set_layerzero_processor(model) == 2  # a second call changes nothing
    with torch.no_grad():
        got = model(x, timestep=t, class_labels=labels).sample
    assert attention_calls()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    unset_layerzero_processor(model)
    assert not any(isinstance(p, LayerZeroAttnProcessor) for p in processors(model))


def test_errors():
    with pytest.raises(lz.InvalidInputError, match="model: expected a diffusers model"):
        set_layerzero_processor("unet")
    with pytest.raises(lz.InvalidInputError, match="model: expected a model given to set_layerzero_processor"):
        unset_layerzero_processor(dit())
