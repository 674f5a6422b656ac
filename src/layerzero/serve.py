"""End-to-end generation on a paged KV cache: a small Llama-style decoder whose every op is a LayerZero op.

    model = Model.random(ModelConfig(), dtype=torch.float32, device="cpu", seed=0)
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8)          # greedy
    out.tokens, out.kernels, out.tokens_per_s

The model (plain tensors, nanoGPT-sized code): embedding -> N x [rms_norm -> fused QKV GEMM -> rope_qk ->
attention -> O GEMM -> residual -> rms_norm -> fused_mlp (SwiGLU) -> residual] -> rms_norm -> lm_head.
Weights follow Hugging Face Llama, so `Model.from_transformers(LlamaForCausalLM)` runs the same network.

`generate` does continuous batching: up to `max_batch` requests run together; a request joins when a slot
and its pages are free (prefill: its prompt packed with the other newcomers' and run through
lz.attention, or lz.attention_varlen when their lengths differ, keys/values written to the paged cache)
and leaves when it has its tokens or emitted `eos_token_id` (its pages go back to the pool). Every
decode step runs all live requests at once through lz.paged_attention over the cache. Which kernel each
op ran (lz.which) and the throughput come back with the tokens.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidInputError
from .kv_cache import PagedKVCache
from .ops.activation import fused_mlp
from .ops.attention import attention, attention_varlen, paged_attention
from .ops.embedding import embedding
from .ops.norm import rms_norm
from .ops.posenc import rope_cache, rope_qk
from .ops.sampling import sample, sample_greedy
from .selection.inspect import which


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Sizes of a Llama-style decoder (defaults: a tiny test model)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_positions: int = 2048

    @classmethod
    def llama_1b(cls) -> ModelConfig:
        """~1.1B parameters: Llama-3.2-1B's shape with a 32k vocabulary (untied lm_head)."""
        return cls(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                   intermediate_size=8192, rope_theta=500000.0, rms_eps=1e-5, max_positions=4096)


@dataclass(slots=True)
class Layer:
    """One decoder layer's weights, nn.Linear layout (out_features, in_features)."""

    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor       # ((Hq + 2 Hkv) * D, hidden): q, k, v projections stacked
    wo: torch.Tensor         # (hidden, Hq * D)
    mlp_norm: torch.Tensor   # (hidden,)
    w_gate: torch.Tensor     # (ffn, hidden)
    w_up: torch.Tensor       # (ffn, hidden)
    w_down: torch.Tensor     # (hidden, ffn)


@dataclass(slots=True)
class Model:
    config: ModelConfig
    embed: torch.Tensor     # (vocab, hidden)
    layers: list[Layer]
    norm: torch.Tensor      # (hidden,)
    lm_head: torch.Tensor   # (vocab, hidden)
    cos: torch.Tensor = field(repr=False)  # (max_positions, head_dim) RoPE cache
    sin: torch.Tensor = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def num_params(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head] + [t for layer in self.layers for t in (
            layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate, layer.w_up, layer.w_down)]
        return sum(t.numel() for t in tensors)

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               seed: int = 0) -> Model:
        """Random weights: linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms 1 + N(0, 0.1^2)."""
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        c = config

        def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
            return (t * std + mean).to(dtype)

        def linear(out: int, inp: int) -> torch.Tensor:
            return randn(out, inp, std=inp ** -0.5)

        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        layers = [Layer(randn(c.hidden_size, std=0.1, mean=1.0), linear(qkv, c.hidden_size),
                        linear(c.hidden_size, c.num_heads * c.head_dim), randn(c.hidden_size, std=0.1, mean=1.0),
                        linear(c.intermediate_size, c.hidden_size), linear(c.intermediate_size, c.hidden_size),
                        linear(c.hidden_size, c.intermediate_size)) for _ in range(c.num_layers)]
        return cls(c, randn(c.vocab_size, c.hidden_size), layers, randn(c.hidden_size, std=0.1, mean=1.0),
                   linear(c.vocab_size, c.hidden_size), *_rope(c, dtype, device))

    @classmethod
    def from_transformers(cls, hf_model: Any) -> Model:
        """The same network as a transformers LlamaForCausalLM (default RoPE, no biases); shares its weights
        except the stacked QKV projection."""
        hc = hf_model.config
        rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or getattr(hc, "attention_bias", False) \
                or getattr(hc, "mlp_bias", False) or hc.hidden_act != "silu":
            raise InvalidInputError("hf_model", "a Llama-style model with default RoPE, SiLU MLP and no biases",
                                    f"rope {rope.get('rope_type')}, act {hc.hidden_act}")
        config = ModelConfig(
            vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, num_layers=hc.num_hidden_layers,
            num_heads=hc.num_attention_heads, num_kv_heads=hc.num_key_value_heads,
            head_dim=getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads,
            intermediate_size=hc.intermediate_size, rope_theta=float(theta), rms_eps=hc.rms_norm_eps,
            max_positions=hc.max_position_embeddings)
        inner = hf_model.model
        layers = []
        for block in inner.layers:
            a, m = block.self_attn, block.mlp
            layers.append(Layer(block.input_layernorm.weight.data,
                                torch.cat([a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data]),
                                a.o_proj.weight.data, block.post_attention_layernorm.weight.data,
                                m.gate_proj.weight.data, m.up_proj.weight.data, m.down_proj.weight.data))
        embed = inner.embed_tokens.weight.data
        return cls(config, embed, layers, inner.norm.weight.data, hf_model.lm_head.weight.data,
                   *_rope(config, embed.dtype, embed.device))


def _rope(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # kernels compute RoPE in float32; a float64 model keeps float64 angles
    return rope_cache(config.max_positions, config.head_dim, config.rope_theta,
                      dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters for `generate` (None there means greedy). seed makes draws reproducible."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    """What `generate` returns. tokens[i]: the new tokens of prompt i (eos included when it stopped on it).

    kernels: op name -> the kernel ids (lz.which) it ran during this generation, e.g.
    {"paged_attention": ("triton_paged.decode",), ...}. decode_batch_sizes: live requests per decode step.
    """

    tokens: list[list[int]]
    kernels: dict[str, tuple[str, ...]]
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    decode_batch_sizes: list[int]

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole generation (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else math.inf


class _Kernels:
    """Records the kernel of each op on the first layer of a forward whose shapes are new."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}
        self.on = False

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> None:
        if self.on:
            self.seen.setdefault(op, set()).add(which(op, *args, **kwargs))

    def result(self) -> dict[str, tuple[str, ...]]:
        return {op: tuple(sorted(ids)) for op, ids in sorted(self.seen.items())}


def _forward(model: Model, cache: PagedKVCache, tokens: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, attend: Any, rec: _Kernels) -> torch.Tensor:
    """Hidden states (T, hidden) after the final norm for T packed tokens; writes their K/V at `slots`.

    attend(layer, q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D)) -> (T, Hq, D) is the attention of the phase.
    """
    c = model.config
    T, Hq, Hkv, D = tokens.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
    rec("embedding", tokens, model.embed)
    x = embedding(tokens, model.embed)
    for i, layer in enumerate(model.layers):
        h = rms_norm(x, layer.attn_norm, c.rms_eps)
        q, k, v = (h @ layer.wqkv.T).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.reshape(1, T, Hq, D), k.reshape(1, T, Hkv, D)
        if i == 0:
            rec("rms_norm", x, layer.attn_norm, c.rms_eps)
            rec("rope_qk", q, k, model.cos, model.sin, position_ids=positions)
        q, k = rope_qk(q, k, model.cos, model.sin, position_ids=positions)
        v = v.reshape(T, Hkv, D)
        cache.write(i, k[0], v, slots)
        o = attend(i, q[0], k[0], v)
        x = x + o.reshape(T, Hq * D) @ layer.wo.T
        h = rms_norm(x, layer.mlp_norm, c.rms_eps)
        if i == 0:
            rec("fused_mlp", h, layer.w_gate, layer.w_up, layer.w_down)
        x = x + fused_mlp(h, layer.w_gate, layer.w_up, layer.w_down)
    return rms_norm(x, model.norm, c.rms_eps)


def _prefill(model: Model, cache: PagedKVCache, ids: list[int], prompts: list[list[int]], rec: _Kernels,
             all_logits: bool = False) -> torch.Tensor:
    """Run new sequences' prompts (packed) and fill their cache; logits (len(ids), V) of each last token
    (or (total tokens, V) with all_logits)."""
    lens = [len(p) for p in prompts]
    for s in ids:
        cache.allocate(s, 0)
    slots, positions = cache.append_slots(ids, lens)
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=model.device)
    B, S, device = len(ids), lens[0], model.device
    if all(n == S for n in lens):  # dense batch (B, S)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q4, k4, v4 = q.reshape(B, S, *q.shape[1:]), k.reshape(B, S, *k.shape[1:]), v.reshape(B, S, *v.shape[1:])
            if layer == 0:
                rec("attention", q4, k4, v4, is_causal=True)
            return attention(q4, k4, v4, is_causal=True).reshape(q.shape)
    else:  # packed sequences of different lengths
        cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        longest = max(lens)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                rec("attention_varlen", q, k, v, cu, cu, longest, longest, is_causal=True)
            return attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)

    hidden = _forward(model, cache, tokens, positions, slots, attend, rec)
    if not all_logits:
        last = torch.tensor(lens, device=device).cumsum(0) - 1
        hidden = hidden[last]
    return _logits(model, hidden)


def _logits(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    logits = hidden @ model.lm_head.T
    return logits if logits.dtype == torch.float64 else logits.float()


def _decode(model: Model, cache: PagedKVCache, ids: list[int], last_tokens: list[int], rec: _Kernels,
            max_pages: int | None = None) -> torch.Tensor:
    """One token for each live sequence: logits (B, V) after feeding each its last token.

    max_pages: a fixed page-table width, so that the table's shape (part of the plan-cache key) does
    not change every time a sequence crosses a page boundary."""
    slots, positions = cache.append_slots(ids, [1] * len(ids))
    page_table, seq_lens = cache.page_table(ids, max_pages)
    tokens = torch.tensor(last_tokens, dtype=torch.int64, device=model.device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q4 = q[:, None]  # (B, 1, Hq, D)
        kc, vc = cache.k[layer], cache.v[layer]
        if layer == 0:
            rec("paged_attention", q4, kc, vc, page_table, seq_lens, kv_layout=cache.kv_layout)
        return paged_attention(q4, kc, vc, page_table, seq_lens, kv_layout=cache.kv_layout)[:, 0]

    return _logits(model, _forward(model, cache, tokens, positions, slots, attend, rec))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(prompt_ids: Any) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise InvalidInputError("prompt_ids", "token ids of one prompt or a list of prompts", type(prompt_ids).__name__)
    prompts = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InvalidInputError(f"prompt_ids[{i}]", "a non-empty list of int token ids", p)
    return prompts


def generate(model: Model, prompt_ids: Any, max_new_tokens: int | Sequence[int] = 16,
             sampling: Sampling | None = None, eos_token_id: int | None = None, max_batch: int = 8,
             page_size: int = 16, num_pages: int | None = None, kv_layout: str = "NHD") -> Generation:
    """Generate from one prompt (list of ids) or several (list of lists) with continuous batching.

    max_new_tokens: one int for all prompts or one per prompt (>= 1). sampling: None = greedy.
    num_pages defaults to what `max_batch` of the longest requests need at once; a request waits for
    free pages and a batch slot, then holds its pages until it finishes.
    """
    prompts = _prompts(prompt_ids)
    n = len(prompts)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise InvalidInputError("max_new_tokens", f"an int >= 1 or {n} of them (one per prompt)", max_new_tokens)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidInputError("max_batch", "an int >= 1", max_batch)
    c = model.config
    need = [len(p) + b for p, b in zip(prompts, budgets, strict=True)]
    if max(need) > c.max_positions:
        raise InvalidInputError("max_new_tokens", f"prompt + new tokens <= max_positions {c.max_positions}",
                                max(need))
    pages_of = [-(-t // page_size) for t in need]
    if num_pages is None:
        num_pages = sum(sorted(pages_of, reverse=True)[:max_batch])
    if max(pages_of) > num_pages:
        raise InvalidInputError("num_pages", f">= {max(pages_of)} (the longest request's pages)", num_pages)
    cache = PagedKVCache(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim, dtype=model.dtype,
                         device=model.device, kv_layout=kv_layout)
    gen = None
    if sampling is not None and sampling.seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(sampling.seed)

    def pick(logits: torch.Tensor) -> list[int]:
        if rec.on:
            if sampling is None:
                rec("sample_greedy", logits)
            else:
                rec("sample", logits, sampling.top_k, sampling.top_p, sampling.min_p, sampling.temperature, gen)
        if sampling is None:
            return sample_greedy(logits).tolist()
        return sample(logits, sampling.top_k, sampling.top_p, sampling.min_p, sampling.temperature, gen).tolist()

    out: list[list[int]] = [[] for _ in range(n)]
    waiting, running = deque(range(n)), list[int]()
    rec, shapes = _Kernels(), set[tuple[str, Any]]()
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = 0
    batch_sizes: list[int] = []
    reserved = 0  # pages held or promised to running requests (each reserves its whole budget on admission)

    def finish(r: int, token: int) -> bool:
        out[r].append(token)
        return len(out[r]) >= budgets[r] or token == eos_token_id

    with torch.inference_mode():
        while waiting or running:
            admitted: list[int] = []
            while waiting and len(running) + len(admitted) < max_batch and \
                    reserved + pages_of[waiting[0]] <= num_pages:
                r = waiting.popleft()
                admitted.append(r)
                reserved += pages_of[r]
            done: list[int] = []
            if admitted:
                rec.on = ("prefill", tuple(len(prompts[r]) for r in admitted)) not in shapes
                shapes.add(("prefill", tuple(len(prompts[r]) for r in admitted)))
                _sync(model.device)
                t0 = time.perf_counter()
                first = pick(_prefill(model, cache, admitted, [prompts[r] for r in admitted], rec))
                prefill_s += time.perf_counter() - t0
                prefill_tokens += sum(len(prompts[r]) for r in admitted)
                for r, tok in zip(admitted, first, strict=True):
                    (done if finish(r, tok) else running).append(r)
            if running:
                rec.on = ("decode", len(running)) not in shapes
                shapes.add(("decode", len(running)))
                _sync(model.device)
                t0 = time.perf_counter()
                toks = pick(_decode(model, cache, running, [out[r][-1] for r in running], rec, max(pages_of)))
                decode_s += time.perf_counter() - t0
                decode_tokens += len(running)
                batch_sizes.append(len(running))
                still: list[int] = []
                for r, tok in zip(running, toks, strict=True):
                    (done if finish(r, tok) else still).append(r)
                running = still
            for r in done:
                cache.free(r)
                reserved -= pages_of[r]
    return Generation(out, rec.result(), prefill_s, decode_s, prefill_tokens, decode_tokens, batch_sizes)


def forward_logits(model: Model, prompt_ids: Sequence[int], kv_layout: str = "NHD", page_size: int = 16
                   ) -> torch.Tensor:
    """Logits (S, V) float32 at every position of one prompt, through the same prefill path as `generate`."""
    prompt = _prompts(prompt_ids)[0]
    c = model.config
    cache = PagedKVCache(c.num_layers, -(-len(prompt) // page_size), page_size, c.num_kv_heads, c.head_dim,
                         dtype=model.dtype, device=model.device, kv_layout=kv_layout)
    with torch.inference_mode():
        return _prefill(model, cache, [0], [prompt], _Kernels(), all_logits=True)
