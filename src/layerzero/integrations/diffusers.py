"""diffusers: an attention processor that runs self- and cross-attention through `lz.attention`.

    from layerzero.integrations.diffusers import set_layerzero_processor, unset_layerzero_processor
    n = set_layerzero_processor(pipe.unet)        # or pipe.transformer (DiT, PixArt)
    ...
    unset_layerzero_processor(pipe.unet)          # the previous processor objects, exactly

The processor stands in for diffusers' `AttnProcessor2_0` / `AttnProcessor` on the `Attention`
modules of UNets and DiT-style transformers (BasicTransformerBlock): same projections, norms,
residual and rescale, with q/k/v kept in BSHD as the projections give them (no transposes) and the
module's own `scale`. Attention modules with other processors (joint attention of SD3/Flux, IP
adapters, added KV projections) keep theirs and are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..ops.attention import attention

REPLACEABLE = ("AttnProcessor2_0", "AttnProcessor")
_RECORD = "_layerzero_previous_processors"


class LayerZeroAttnProcessor:
    """diffusers attention processor on `lz.attention` (BSHD, the module's scale, masks as additive/bool)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:  # (B, C, H, W) feature map -> (B, H*W, C) tokens
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:  # diffusers norms q/k per head over head_dim: layout-independent
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
            attention_mask = attention_mask.to(query.dtype)

        out = attention(query, key, value, attn_mask=attention_mask, scale=attn.scale, layout="BSHD")
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(model: nn.Module) -> list[Any]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def set_layerzero_processor(model: nn.Module) -> int:
    """Route `model`'s replaceable attention modules through LayerZero; returns how many.

    model: a diffusers model (UNet2DConditionModel, DiTTransformer2DModel, PixArtTransformer2DModel, ...).
    Setting it twice is a no-op; `unset_layerzero_processor` restores the previous processors.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError("model", "a diffusers model (torch.nn.Module)", type(model).__name__)
    if _RECORD in model.__dict__:
        return len(model.__dict__[_RECORD])
    previous = []
    processor = LayerZeroAttnProcessor()
    for module in _attention_modules(model):
        if type(module.processor).__name__ in REPLACEABLE and getattr(module, "added_kv_proj_dim", None) is None:
            previous.append((module, module.processor))
            module.set_processor(processor)
    model.__dict__[_RECORD] = previous
    return len(previous)


def unset_layerzero_processor(model: nn.Module) -> None:
    """Give the modules changed by `set_layerzero_processor` their previous processor objects back."""
    previous = getattr(model, "__dict__", {}).pop(_RECORD, None)
    if previous is None:
        raise InvalidInputError("model", "a model given to set_layerzero_processor", "a model without it")
    for module, processor in previous:
        module.set_processor(processor)


__all__ = ["LayerZeroAttnProcessor", "set_layerzero_processor", "unset_layerzero_processor"]
