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

`speculative_generate(target, draft, prompt, ...)` decodes one prompt speculatively: the draft proposes k
tokens by decode steps on its own paged cache, the target verifies them in one (k + 1)-token chunk through
lz.paged_attention on its cache, rejected tokens are rolled back (PagedKVCache.truncate).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends.reference import filter_probs, tempered
from .capture import graph_call
from .errors import InvalidInputError
from .graphs import warmup_for_capture
from .kv_cache import PagedKVCache
from .ops.activation import fused_mlp
from .ops.attention import attention, attention_varlen, paged_attention
from .ops.embedding import embedding
from .ops.norm import rms_norm
from .ops.posenc import rope_cache, rope_qk
from .ops.sampling import _normalize, sample, sample_greedy
from .selection.inspect import which
from .speculative import SpeculativeStats, UnsupportedBatchError, accept_greedy, accept_sampled

_log = logging.getLogger("layerzero")
# Decode steps left (of the longest running request) from which a new batch size is worth a CUDA graph
# capture (about three eager steps of work) rather than running eagerly.
GRAPH_MIN_STEPS = 4


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
        return cls(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            intermediate_size=8192,
            rope_theta=500000.0,
            rms_eps=1e-5,
            max_positions=4096,
        )


@dataclass(slots=True)
class Layer:
    """One decoder layer's weights, nn.Linear layout (out_features, in_features)."""

    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # ((Hq + 2 Hkv) * D, hidden): q, k, v projections stacked
    wo: torch.Tensor  # (hidden, Hq * D)
    mlp_norm: torch.Tensor  # (hidden,)
    w_gate: torch.Tensor  # (ffn, hidden)
    w_up: torch.Tensor  # (ffn, hidden)
    w_down: torch.Tensor  # (hidden, ffn)


@dataclass(slots=True)
class Model:
    config: ModelConfig
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[Layer]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden)
    cos: torch.Tensor = field(repr=False)  # (max_positions, head_dim) RoPE cache
    sin: torch.Tensor = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def num_params(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head] + [
            t
            for layer in self.layers
            for t in (layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate, layer.w_up, layer.w_down)
        ]
        return sum(t.numel() for t in tensors)

    @classmethod
    def random(
        cls, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
    ) -> Model:
        """Random weights: linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms 1 + N(0, 0.1^2)."""
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        c = config

        def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
            return (t * std + mean).to(dtype)

        def linear(out: int, inp: int) -> torch.Tensor:
            return randn(out, inp, std=inp**-0.5)

        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        layers = [
            Layer(
                randn(c.hidden_size, std=0.1, mean=1.0),
                linear(qkv, c.hidden_size),
                linear(c.hidden_size, c.num_heads * c.head_dim),
                randn(c.hidden_size, std=0.1, mean=1.0),
                linear(c.intermediate_size, c.hidden_size),
                linear(c.intermediate_size, c.hidden_size),
                linear(c.hidden_size, c.intermediate_size),
            )
            for _ in range(c.num_layers)
        ]
        return cls(
            c,
            randn(c.vocab_size, c.hidden_size),
            layers,
            randn(c.hidden_size, std=0.1, mean=1.0),
            linear(c.vocab_size, c.hidden_size),
            *_rope(c, dtype, device),
        )

    @classmethod
    def from_transformers(cls, hf_model: Any) -> Model:
        """The same network as a transformers LlamaForCausalLM (default RoPE, no biases); shares its weights
        except the stacked QKV projection."""
        hc = hf_model.config
        rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
        if (
            rope.get("rope_type", "default") != "default"
            or getattr(hc, "attention_bias", False)
            or getattr(hc, "mlp_bias", False)
            or hc.hidden_act != "silu"
        ):
            raise InvalidInputError(
                "hf_model",
                "a Llama-style model with default RoPE, SiLU MLP and no biases",
                f"rope {rope.get('rope_type')}, act {hc.hidden_act}",
            )
        config = ModelConfig(
            vocab_size=hc.vocab_size,
            hidden_size=hc.hidden_size,
            num_layers=hc.num_hidden_layers,
            num_heads=hc.num_attention_heads,
            num_kv_heads=hc.num_key_value_heads,
            head_dim=getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads,
            intermediate_size=hc.intermediate_size,
            rope_theta=float(theta),
            rms_eps=hc.rms_norm_eps,
            max_positions=hc.max_position_embeddings,
        )
        inner = hf_model.model
        layers = []
        for block in inner.layers:
            a, m = block.self_attn, block.mlp
            layers.append(
                Layer(
                    block.input_layernorm.weight.data,
                    torch.cat([a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data]),
                    a.o_proj.weight.data,
                    block.post_attention_layernorm.weight.data,
                    m.gate_proj.weight.data,
                    m.up_proj.weight.data,
                    m.down_proj.weight.data,
                )
            )
        embed = inner.embed_tokens.weight.data
        return cls(
            config,
            embed,
            layers,
            inner.norm.weight.data,
            hf_model.lm_head.weight.data,
            *_rope(config, embed.dtype, embed.device),
        )


def _rope(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # kernels compute RoPE in float32; a float64 model keeps float64 angles
    return rope_cache(
        config.max_positions,
        config.head_dim,
        config.rope_theta,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        device=device,
    )


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters for `generate` (None there means greedy). seed makes draws reproducible."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None


class _Throughput:
    """new_tokens and tokens_per_s of a result with `tokens`, `prefill_s` and `decode_s`."""

    __slots__ = ()
    tokens: list[list[int]]
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole generation (prefills included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Generation(_Throughput):
    """What `generate` returns. tokens[i]: the new tokens of prompt i (eos included when it stopped on it).

    kernels: op name -> the kernel ids (lz.which) it ran during this generation, e.g.
    {"paged_attention": ("triton_paged.decode",), ...}. decode_batch_sizes: live requests per decode step.
    graph_batch_sizes: the batch sizes whose decode steps ran as CUDA graphs.
    """

    tokens: list[list[int]]
    kernels: dict[str, tuple[str, ...]]
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    decode_batch_sizes: list[int]
    graph_batch_sizes: tuple[int, ...] = ()

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else math.inf


@dataclass(frozen=True, slots=True)
class SpeculativeGeneration(_Throughput):
    """What `speculative_generate` returns. tokens: [the new tokens of the prompt] (as Generation.tokens).

    target_kernels / draft_kernels: op name -> the kernel ids each model ran (draft: decode steps; target:
    the (k + 1)-token verification chunks). stats: acceptance statistics, one step per target pass.
    """

    tokens: list[list[int]]
    target_kernels: dict[str, tuple[str, ...]]
    draft_kernels: dict[str, tuple[str, ...]]
    stats: SpeculativeStats
    prefill_s: float
    decode_s: float


class _Kernels:
    """Records the kernel of each op on the first layer of a forward whose shapes are new."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}
        self.on = False
        self.shapes: set[Any] = set()

    def first(self, shape: Any) -> None:
        """Record during the next forward only if `shape` (of the phase) was not seen yet."""
        self.on = shape not in self.shapes
        self.shapes.add(shape)

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> None:
        if self.on:
            self.seen.setdefault(op, set()).add(which(op, *args, **kwargs))

    def result(self) -> dict[str, tuple[str, ...]]:
        return {op: tuple(sorted(ids)) for op, ids in sorted(self.seen.items())}


def _forward(
    model: Model,
    cache: PagedKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    attend: Any,
    rec: _Kernels,
) -> torch.Tensor:
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


def _pack(prompts: list[list[int]], device: torch.device) -> torch.Tensor:
    """Prompts (lists of ids) packed back to back into one int64 tensor on `device`."""
    return torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)


def _prefill(
    model: Model,
    cache: PagedKVCache,
    ids: list[int],
    lens: list[int],
    tokens: torch.Tensor,
    rec: _Kernels,
    all_logits: bool = False,
) -> torch.Tensor:
    """Run new sequences' prompts and fill their cache; logits (len(ids), V) of each last token (or
    (total tokens, V) with all_logits). tokens: the prompts packed back to back (sum(lens),), lens[i]
    tokens of sequence ids[i]."""
    for s in ids:
        cache.allocate(s, 0)
    slots, positions = cache.append_slots(ids, lens)
    tokens = tokens.to(model.device, torch.int64, non_blocking=True)
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


def _decode(
    model: Model,
    cache: PagedKVCache,
    ids: list[Any],
    last_tokens: list[int],
    rec: _Kernels,
    max_pages: int | None = None,
) -> torch.Tensor:
    """One token for each live sequence: logits (B, V) after feeding each its last token.

    max_pages: a fixed page-table width, so that the table's shape (part of the plan-cache key) does
    not change every time a sequence crosses a page boundary."""
    return _extend(model, cache, ids, [[t] for t in last_tokens], rec, max_pages)


def _extend(
    model: Model,
    cache: PagedKVCache,
    ids: list[Any],
    chunks: list[list[int]],
    rec: _Kernels,
    max_pages: int | None = None,
) -> torch.Tensor:
    """Feed each live sequence a chunk of T new tokens (T the same for all: 1 = decode, k + 1 = speculative
    verification); logits (B * T, V), sequence by sequence. Token t of a chunk attends causally to its
    sequence's cached tokens and to chunk tokens 0..t, through lz.paged_attention with q (B, T, Hq, D)."""
    return _step(model, cache, *_step_inputs(model, cache, ids, chunks, max_pages), len(chunks[0]), rec)


def _step_inputs(
    model: Model, cache: PagedKVCache, ids: list[Any], chunks: list[list[int]], max_pages: int | None
) -> tuple[torch.Tensor, ...]:
    """Extend each sequence's pages by its chunk; (tokens, positions, slots, page_table, seq_lens) for `_step`."""
    slots, positions = cache.append_slots(ids, [len(chunk) for chunk in chunks])
    page_table, seq_lens = cache.page_table(ids, max_pages)
    tokens = torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.int64, device=model.device)
    return tokens, positions, slots, page_table, seq_lens


def _step(
    model: Model,
    cache: PagedKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    T: int,
    rec: _Kernels,
) -> torch.Tensor:
    """The device work of `_extend` once its inputs are tensors (what a decode graph captures)."""
    B = page_table.shape[0]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q4 = q.reshape(B, T, *q.shape[1:])
        kc, vc = cache.k[layer], cache.v[layer]
        if layer == 0:
            rec("paged_attention", q4, kc, vc, page_table, seq_lens, kv_layout=cache.kv_layout)
        return paged_attention(q4, kc, vc, page_table, seq_lens, kv_layout=cache.kv_layout).reshape(q.shape)

    return _logits(model, _forward(model, cache, tokens, positions, slots, attend, rec))


class _DecodeGraphs:
    """The decode step as CUDA graphs, one per live batch size: the way vLLM takes the host out of decode
    (eager, a 1B model's step is ~200 launches and host-bound at every batch size on the H100).

    Each step copies its inputs (token ids, positions, KV slots, the page table at a fixed width, lengths)
    into the graph's static buffers and replays it. Capture follows graphs.py: one eager warm-up
    in graph mode (so LayerZero picks graph-safe kernels and compiles them), then the capture. A batch
    size whose capture fails runs eagerly from then on (the failure is logged, never raised).
    """

    def __init__(self, model: Model, cache: PagedKVCache, max_pages: int) -> None:
        self.model, self.cache, self.max_pages = model, cache, max_pages
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.failed: set[int] = set()
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every batch size's graph

    def step(self, ids: list[Any], last_tokens: list[int], rec: _Kernels) -> torch.Tensor:
        """Logits (B, V) for one decode step of `ids` (the graph's output buffer: read it before the next step)."""
        B = len(ids)
        inputs = _step_inputs(self.model, self.cache, ids, [[t] for t in last_tokens], self.max_pages)
        entry = None if B in self.failed else self.graphs.get(B) or self._capture(B, inputs, rec)
        if entry is None:  # its capture failed: eagerly
            return _step(self.model, self.cache, *inputs, 1, rec)
        graph, static, logits = entry
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return logits

    def _capture(
        self, B: int, inputs: tuple[torch.Tensor, ...], rec: _Kernels
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor] | None:
        static = tuple(t.clone() for t in inputs)

        def run(recorder: _Kernels) -> torch.Tensor:
            return _step(self.model, self.cache, *static, 1, recorder)

        try:
            with graph_call():  # the warm-up selects and compiles what the capture will record
                warmup_for_capture(run, rec, iterations=1)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = run(_Kernels())
        except Exception as error:  # any capture failure means: this batch size runs eagerly
            _log.warning(
                "serve: CUDA graph capture of the decode step at batch %d failed (%s: %s); "
                "that batch size runs eagerly",
                B,
                type(error).__name__,
                error,
            )
            self.failed.add(B)
            return None
        self.graphs[B] = (graph, static, logits)
        return self.graphs[B]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _id_rows(prompt_ids: torch.Tensor) -> torch.Tensor:
    """A (S,) or (B, S) tensor of token ids as (B, S), after checking it is one."""
    if (
        prompt_ids.is_floating_point()
        or prompt_ids.is_complex()
        or prompt_ids.dtype == torch.bool
        or prompt_ids.dim() not in (1, 2)
        or prompt_ids.numel() == 0
    ):
        raise InvalidInputError(
            "prompt_ids",
            "a non-empty (S,) or (B, S) integer tensor of token ids",
            f"{prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}",
        )
    return prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]


def _prompts(prompt_ids: Any) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        return _id_rows(prompt_ids).tolist()  # ints by construction: no per-token check
    if not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise InvalidInputError("prompt_ids", "token ids of one prompt or a list of prompts", type(prompt_ids).__name__)
    prompts = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InvalidInputError(f"prompt_ids[{i}]", "a non-empty list of int token ids", p)
    return prompts


def generate(
    model: Model,
    prompt_ids: Any,
    max_new_tokens: int | Sequence[int] = 16,
    sampling: Sampling | None = None,
    eos_token_id: int | None = None,
    max_batch: int = 8,
    page_size: int = 16,
    num_pages: int | None = None,
    kv_layout: str = "NHD",
    cuda_graphs: bool = True,
) -> Generation:
    """Generate from one prompt (list of ids) or several (list of lists, or a (B, S) tensor of ids) with
    continuous batching.

    max_new_tokens: one int for all prompts or one per prompt (>= 1). sampling: None = greedy.
    num_pages defaults to what `max_batch` of the longest requests need at once; a request waits for
    free pages and a batch slot, then holds its pages until it finishes. cuda_graphs: on a CUDA device,
    run decode steps as CUDA graphs (one capture per live batch size with at least GRAPH_MIN_STEPS
    steps to go; Generation.graph_batch_sizes lists them); False: every step eagerly.
    """
    # a tensor of ids stays a tensor: its rows are packed for prefill by indexing (no host copy)
    dense = _id_rows(prompt_ids) if isinstance(prompt_ids, torch.Tensor) else None
    prompts = None if dense is not None else _prompts(prompt_ids)
    lens = [dense.shape[1]] * dense.shape[0] if dense is not None else [len(p) for p in prompts]
    n = len(lens)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise InvalidInputError("max_new_tokens", f"an int >= 1 or {n} of them (one per prompt)", max_new_tokens)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidInputError("max_batch", "an int >= 1", max_batch)
    c = model.config
    need = [s + b for s, b in zip(lens, budgets, strict=True)]
    if max(need) > c.max_positions:
        raise InvalidInputError("max_new_tokens", f"prompt + new tokens <= max_positions {c.max_positions}", max(need))
    pages_of = [-(-t // page_size) for t in need]
    if num_pages is None:
        num_pages = sum(sorted(pages_of, reverse=True)[:max_batch])
    if max(pages_of) > num_pages:
        raise InvalidInputError("num_pages", f">= {max(pages_of)} (the longest request's pages)", num_pages)
    cache = PagedKVCache(
        c.num_layers,
        num_pages,
        page_size,
        c.num_kv_heads,
        c.head_dim,
        dtype=model.dtype,
        device=model.device,
        kv_layout=kv_layout,
    )
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
    rec = _Kernels()
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = 0
    batch_sizes: list[int] = []
    reserved = 0  # pages held or promised to running requests (each reserves its whole budget on admission)

    def finish(r: int, token: int) -> bool:
        out[r].append(token)
        return len(out[r]) >= budgets[r] or token == eos_token_id

    graphs = _DecodeGraphs(model, cache, max(pages_of)) if cuda_graphs and model.device.type == "cuda" else None
    with torch.inference_mode():
        while waiting or running:
            admitted: list[int] = []
            while waiting and len(running) + len(admitted) < max_batch and reserved + pages_of[waiting[0]] <= num_pages:
                r = waiting.popleft()
                admitted.append(r)
                reserved += pages_of[r]
            done: list[int] = []
            if admitted:
                rec.first(("prefill", tuple(lens[r] for r in admitted)))
                _sync(model.device)
                t0 = time.perf_counter()
                if dense is None:
                    packed = _pack([prompts[r] for r in admitted], model.device)
                elif admitted == list(range(n)):
                    packed = dense.reshape(-1)
                else:
                    packed = dense[torch.tensor(admitted, device=dense.device)].reshape(-1)
                first = pick(_prefill(model, cache, admitted, [lens[r] for r in admitted], packed, rec))
                prefill_s += time.perf_counter() - t0
                prefill_tokens += sum(lens[r] for r in admitted)
                for r, tok in zip(admitted, first, strict=True):
                    (done if finish(r, tok) else running).append(r)
            if running:
                rec.first(("decode", len(running)))
                _sync(model.device)
                t0 = time.perf_counter()
                last = [out[r][-1] for r in running]
                if graphs is not None and (
                    len(running) in graphs.graphs or max(budgets[r] - len(out[r]) for r in running) >= GRAPH_MIN_STEPS
                ):
                    toks = pick(graphs.step(running, last, rec))
                else:
                    toks = pick(_decode(model, cache, running, last, rec, max(pages_of)))
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
    captured = () if graphs is None else tuple(sorted(graphs.graphs))
    return Generation(out, rec.result(), prefill_s, decode_s, prefill_tokens, decode_tokens, batch_sizes, captured)


def forward_logits(
    model: Model, prompt_ids: Sequence[int], kv_layout: str = "NHD", page_size: int = 16
) -> torch.Tensor:
    """Logits (S, V) float32 at every position of one prompt, through the same prefill path as `generate`."""
    prompt = _prompts(prompt_ids)[0]
    c = model.config
    cache = PagedKVCache(
        c.num_layers,
        -(-len(prompt) // page_size),
        page_size,
        c.num_kv_heads,
        c.head_dim,
        dtype=model.dtype,
        device=model.device,
        kv_layout=kv_layout,
    )
    with torch.inference_mode():
        return _prefill(model, cache, [0], [len(prompt)], _pack([prompt], model.device), _Kernels(), all_logits=True)


def speculative_generate(
    target: Model,
    draft: Model,
    prompt_ids: Any,
    max_new_tokens: int = 16,
    num_speculative: int = 4,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    page_size: int = 16,
    kv_layout: str = "NHD",
) -> SpeculativeGeneration:
    """Generate from one prompt with `draft` proposing and `target` verifying, each on its own paged cache.

    A round: the draft runs k = min(num_speculative, tokens left - 1) decode steps on its cache; the target
    scores the k proposals plus one more position in ONE forward (a chunk of k + 1 query tokens through
    lz.paged_attention, causal over its cache and the chunk); the kept tokens stay in both caches and the
    rest are rolled back (PagedKVCache.truncate frees their pages). sampling None (or temperature 0):
    greedy verification, the tokens equal `generate(target, prompt_ids, max_new_tokens)`'s. Otherwise
    rejection sampling (speculative.accept_sampled) with the same parameters for both models: every
    token follows the distribution `generate(target, ..., sampling)` draws from. `generator` (or
    sampling.seed) makes the draws reproducible. Batch 1 only: several prompts raise
    UnsupportedBatchError. The models must share the vocabulary and the device.
    """
    prompts = _prompts(prompt_ids)
    if len(prompts) != 1:
        raise UnsupportedBatchError(len(prompts))
    prompt = prompts[0]
    for name, value in (("max_new_tokens", max_new_tokens), ("num_speculative", num_speculative)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(name, "an int >= 1", value)
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab or draft.device != target.device:
        raise InvalidInputError(
            "draft",
            f"a model with the target's vocabulary ({vocab}) on {target.device}",
            f"vocab_size {draft.config.vocab_size} on {draft.device}",
        )
    total = len(prompt) + max_new_tokens
    for name, m in (("target", target), ("draft", draft)):
        if total > m.config.max_positions:
            raise InvalidInputError(
                "max_new_tokens", f"prompt + new tokens <= the {name}'s max_positions {m.config.max_positions}", total
            )
    filters: tuple[Any, ...] = ("sampling.greedy", None, None, None, 0.0)
    if sampling is not None:  # validated and normalized as lz.sample does
        filters = _normalize(
            torch.empty(0, vocab), sampling.top_k, sampling.top_p, sampling.min_p, sampling.temperature
        )
        if generator is None and sampling.seed is not None:
            generator = torch.Generator(device=target.device).manual_seed(sampling.seed)
    pages = -(-total // page_size)  # a cache never holds more than prompt + new tokens - 1
    sides = []
    for m in (target, draft):
        c = m.config
        sides.append(
            (
                m,
                PagedKVCache(
                    c.num_layers,
                    pages,
                    page_size,
                    c.num_kv_heads,
                    c.head_dim,
                    dtype=m.dtype,
                    device=m.device,
                    kv_layout=kv_layout,
                ),
                _Kernels(),
            )
        )
    (_, target_cache, target_rec), (_, draft_cache, draft_rec) = sides

    def run(side: tuple[Model, PagedKVCache, _Kernels], tokens: list[int]) -> torch.Tensor:
        model, cache, rec = side
        rec.first(("chunk", len(tokens)))
        return _extend(model, cache, [0], [tokens], rec, pages)

    def probs(logits: torch.Tensor) -> torch.Tensor:  # the distribution lz.sample draws from, (rows, V)
        return filter_probs(torch.softmax(tempered(logits, temperature, torch.float32)[0], -1), top_k, top_p, min_p)

    def draw(q: torch.Tensor, rec: _Kernels) -> int:
        if rec.on:
            rec("sample", q.log()[None], generator=generator)
        return int(sample(q.log()[None], generator=generator)[0])

    def argmax(logits: torch.Tensor, rec: _Kernels) -> list[int]:
        if rec.on:
            rec("sample_greedy", logits)
        return sample_greedy(logits).tolist()

    op, top_k, top_p, min_p, temperature = filters
    greedy = op == "sampling.greedy"
    stats = SpeculativeStats(num_draft=num_speculative)
    out: list[int] = []
    seq = list(prompt)  # invariant: both caches hold a prefix of seq[:-1]; the target's is all of it
    with torch.inference_mode():
        _sync(target.device)
        t0 = time.perf_counter()
        for model, cache, rec in sides:
            if len(prompt) > 1:
                rec.first(("prefill", len(prompt) - 1))
                _prefill(model, cache, [0], [len(prompt) - 1], _pack([prompt[:-1]], model.device), rec)
            else:
                cache.allocate(0, 0)
        _sync(target.device)
        prefill_s = time.perf_counter() - t0
        draft_len = len(prompt) - 1
        while len(out) < max_new_tokens and (not out or out[-1] != eos_token_id):
            start = len(seq)
            k = min(num_speculative, max_new_tokens - len(out) - 1)  # the last token needs no proposal
            feed, proposed, q_rows = seq[draft_len:], list[int](), list[torch.Tensor]()
            for _ in range(k):
                row = run(sides[1], feed)[-1:]
                if greedy:
                    proposed += argmax(row, draft_rec)
                else:
                    q_rows.append(probs(row)[0])
                    proposed.append(draw(q_rows[-1], draft_rec))
                feed = proposed[-1:]
            p_logits = run(sides[0], [seq[-1], *proposed])  # (k + 1, V): the one target pass of the round
            if greedy:
                kept, extra = accept_greedy(proposed, argmax(p_logits, target_rec))
            else:
                p = probs(p_logits)
                q = torch.stack(q_rows) if q_rows else p[:0]
                kept, extra = accept_sampled(proposed, p, q, generator)
                if target_rec.on:
                    target_rec("sample", p[-1:].log(), generator=generator)
            new = kept + [extra]
            if eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            stats.record(k, min(len(kept), len(new)), len(new))
            out += new
            seq += new
            target_cache.truncate(0, len(seq) - 1)  # drop the K/V of rejected proposals
            if k:  # the draft cached seq[:start] + proposed[:-1]; keep what agrees with seq
                draft_len = start + min(len(kept), k - 1)
                draft_cache.truncate(0, draft_len)
        _sync(target.device)
        decode_s = time.perf_counter() - t0 - prefill_s
    return SpeculativeGeneration([out], target_rec.result(), draft_rec.result(), stats, prefill_s, decode_s)
