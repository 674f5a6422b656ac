"""Hugging Face transformers: the "layerzero" attention implementation and `patch` / `unpatch`.

    import layerzero                                         # registers "layerzero" (see below)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="layerzero")
    import layerzero.integrations.transformers as lzt
    model.set_attn_implementation("layerzero")               # or on a loaded model
    report = lzt.patch(model)    # attention + RMSNorm/LayerNorm + RoPE + gated MLP through LayerZero
    lzt.unpatch(model)           # back to exactly the modules it had

`import layerzero` registers the attention function as soon as transformers' AttentionInterface
exists (`layerzero.integrations.watch_transformers`: at once if transformers' models are loaded,
else right after they load), so no import of this module is needed for `attn_implementation`.

Attention follows transformers' `sdpa` semantics, so the masks transformers builds for "sdpa" are
built for "layerzero" too (`AttentionMaskInterface`): a bool (B, 1, Sq, Sk) mask (True = attend)
that already holds causality, padding and sliding windows, or None when the call is plainly causal
(Sq == Sk, or an empty static cache whose future slots are cut off) or a single query. Query,
key and value arrive as (B, H, S, D) and go to `lz.attention(layout="BHSD")` with their own head
counts (GQA is the kernel's business, no `repeat_kv`); softcap and scaling pass through.

`patch(model)` covers Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi-3 and GPT-2: it sets the
attention implementation and replaces the `forward` of the norm, MLP/activation and attention
modules of those families on the instance only (the class and every other model are untouched):
- RMSNorm -> `lz.rms_norm` (Gemma's `(1 + weight)` form included), `nn.LayerNorm` -> `lz.layer_norm`;
- gated MLPs (gate_proj/up_proj, Phi-3's fused gate_up_proj) -> `lz.swiglu` / `lz.geglu` between
  the model's own projections (quantized or LoRA linears keep working); GPT-2's GELU -> `lz.gelu`;
- the attention modules run their own forward with `apply_rotary_pos_emb` bound to `lz.rope_qk`.
`unpatch(model)` deletes exactly those instance attributes and restores the attention
implementation. GPT-2's Conv1D projections are GEMMs and stay as they are.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..ops.activation import geglu, gelu, swiglu
from ..ops.attention import attention
from ..ops.norm import layer_norm, rms_norm
from ..ops.posenc import rope_qk

NAME = "layerzero"

# Module classes by name, per family: the explicit list of what `patch` knows to be equivalent.
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
OFFSET_RMS_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm"}  # output * (1 + weight), computed in float32
GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP"}
FUSED_GATED_MLPS = {"Phi3MLP"}  # gate_up_proj -> chunk(2) -> up * act(gate)
ACTIVATION_MLPS = {"GPT2MLP"}  # c_fc -> act -> c_proj: the activation module is patched
ROPE_ATTENTIONS = {
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
    "Gemma2Attention",
    "Phi3Attention",
}
# transformers activation classes -> (gated op, approximate)
ACTIVATIONS = {
    "SiLUActivation": ("swiglu", "none"),
    "SiLU": ("swiglu", "none"),
    "GELUTanh": ("geglu", "tanh"),
    "NewGELUActivation": ("geglu", "tanh"),
    "GELUActivation": ("geglu", "none"),
}


# ----------------------------------------------------------------------------- attention interface


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on `lz.attention`.

    query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D); attention_mask: bool or additive, broadcastable
    to (B, Hq, Sq, Sk), or None. Returns ((B, Sq, Hq, D) contiguous, None): no attention weights.
    `sliding_window` is already in the mask whenever it changes the result (see the module doc).
    """
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise InvalidInputError(
                name,
                f"None (attn_implementation={NAME!r} has no {name})",
                "a tensor",
                "use attn_implementation='eager' for this model",
            )
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None:
        causal = bool(causal) and q_len > 1
        if causal and key.shape[2] > q_len:  # empty static cache: the slots past the prompt are future tokens
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    else:
        causal = False
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    out = attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=causal,
        dropout_p=float(dropout),
        scale=scaling,
        layout="BHSD",
        softcap=float(softcap or 0.0),
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "layerzero" in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


# ----------------------------------------------------------------------------- module forwards


def _rms_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _offset_rms_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    weight = 1.0 + self.weight.float()
    if x.dtype == torch.float32:
        return rms_norm(x, weight, self.eps)
    return rms_norm(x.float(), weight, self.eps).type_as(x)  # Gemma scales in float32, then casts


def _layer_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return layer_norm(x, self.weight, self.bias, self.eps)


def _gated(act: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    kind, approximate = ACTIVATIONS[type(act).__name__]
    if kind == "swiglu":
        return swiglu
    return lambda gate, up: geglu(gate, up, approximate)


def _gated_mlp_forward(gated: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x)))

    return forward


def _fused_gated_mlp_forward(gated: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(gated(gate, up))

    return forward


def _activation_forward(approximate: str) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, approximate)

    return forward


def _rope_function(original: Callable[..., Any]) -> Callable[..., Any]:
    """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` on lz.rope_qk; other forms go to the original."""

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if unsqueeze_dim != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or cos.dim() != 3:
            return original(q, k, cos, sin, *args, **kwargs)
        return rope_qk(q, k, cos, sin, layout="BHSD")

    return apply_rotary_pos_emb


def _with_globals(fn: Any, replacements: dict[str, Any]) -> Any:
    """A copy of fn whose global names in `replacements` resolve to them.

    Decorators made with functools.wraps (`__wrapped__` held in a closure cell) are copied around
    the copied inner function, so the instance runs the class's own code with new globals.
    """
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    if inner is not None and closure:
        new_inner = _with_globals(inner, replacements)
        closure = tuple(types.CellType(new_inner) if _cell(c) is inner else c for c in closure)
        glob = fn.__globals__
    else:
        glob = {**fn.__globals__, **{k: v for k, v in replacements.items() if k in fn.__globals__}}
    copy = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    if inner is not None and closure:
        copy.__wrapped__ = new_inner  # type: ignore[attr-defined]
    return copy


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # empty cell
        return None


def _uses_global(fn: Any, name: str) -> bool:
    while fn is not None:
        if name in fn.__code__.co_names and name in fn.__globals__:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


# ----------------------------------------------------------------------------- patch / unpatch


@dataclasses.dataclass
class PatchReport:
    """What `patch` replaced: module names per kind, and the attention implementation it replaced."""

    attention: str
    previous_attention: str | None
    norms: list[str] = dataclasses.field(default_factory=list)
    mlps: list[str] = dataclasses.field(default_factory=list)
    rope: list[str] = dataclasses.field(default_factory=list)
    modules: list[nn.Module] = dataclasses.field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        return {"norms": len(self.norms), "mlps": len(self.mlps), "rope": len(self.rope)}


_RECORD = "_layerzero_patch"


def _forward_for(module: Any, rope: bool) -> tuple[str, Callable[..., Any]] | None:
    """(kind, forward function taking self) for a module patch knows, else None."""
    name = type(module).__name__
    if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
        return "norms", _rms_forward
    if name in OFFSET_RMS_NORMS and hasattr(module, "eps"):
        return "norms", _offset_rms_forward
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return "norms", _layer_norm_forward
    if name in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in ACTIVATIONS:
        return "mlps", _gated_mlp_forward(_gated(module.act_fn))
    if name in FUSED_GATED_MLPS and type(getattr(module, "activation_fn", None)).__name__ in ACTIVATIONS:
        return "mlps", _fused_gated_mlp_forward(_gated(module.activation_fn))
    if rope and name in ROPE_ATTENTIONS and _uses_global(type(module).forward, "apply_rotary_pos_emb"):
        original = type(module).forward
        inner = original
        while getattr(inner, "__wrapped__", None) is not None:
            inner = inner.__wrapped__  # type: ignore[attr-defined]
        replacement = _rope_function(inner.__globals__["apply_rotary_pos_emb"])
        return "rope", _with_globals(original, {"apply_rotary_pos_emb": replacement})
    return None


def _activation_target(module: nn.Module) -> tuple[nn.Module, Callable[..., Any]] | None:
    if type(module).__name__ in ACTIVATION_MLPS:
        act = getattr(module, "act", None)
        kind = ACTIVATIONS.get(type(act).__name__)
        if act is not None and kind is not None and kind[0] == "geglu":
            return act, _activation_forward(kind[1])
    return None


def patch(
    model: nn.Module, attention: bool = True, norms: bool = True, rope: bool = True, mlp: bool = True
) -> PatchReport:
    """Route `model`'s attention, norms, RoPE and gated MLPs through LayerZero (in place; see the module doc).

    model: a transformers PreTrainedModel. Returns a PatchReport; `unpatch(model)` undoes it exactly.
    Patching a patched model returns its existing report.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InvalidInputError("model", "a transformers PreTrainedModel", type(model).__name__)
    existing = model.__dict__.get(_RECORD)
    if existing is not None:
        return existing
    previous = model.config._attn_implementation
    report = PatchReport(attention=previous, previous_attention=previous)
    if attention and previous != NAME:
        model.set_attn_implementation(NAME)
        report.attention = model.config._attn_implementation
    for name, module in model.named_modules():
        if "forward" in module.__dict__:  # someone else's instance forward: leave it alone
            continue
        target = _forward_for(module, rope)
        if target is not None:
            kind, forward = target
            if (kind == "norms" and not norms) or (kind == "mlps" and not mlp):
                continue
            module.forward = types.MethodType(forward, module)
            getattr(report, kind).append(name)
            report.modules.append(module)
        elif mlp:
            act = _activation_target(module)
            if act is not None and "forward" not in act[0].__dict__:
                act[0].forward = types.MethodType(act[1], act[0])
                report.mlps.append(f"{name}.act")
                report.modules.append(act[0])
    model.__dict__[_RECORD] = report
    return report


def unpatch(model: Any) -> None:
    """Undo `patch(model)`: the patched modules get their class forward back, attention its implementation."""
    report = getattr(model, "__dict__", {}).get(_RECORD)
    if report is None:
        raise InvalidInputError(
            "model", "a model patched by layerzero.integrations.transformers.patch", "an unpatched model"
        )
    for module in report.modules:
        module.__dict__.pop("forward", None)
    if model.config._attn_implementation != report.previous_attention:
        model.set_attn_implementation(report.previous_attention)
    del model.__dict__[_RECORD]


def is_patched(model: nn.Module) -> bool:
    return _RECORD in getattr(model, "__dict__", {})


__all__ = ["NAME", "PatchReport", "attention_forward", "is_patched", "patch", "register", "unpatch"]
