"""Speculative decoding: a small draft model proposes tokens, the target verifies them in one pass.

Models are callables `model(tokens) -> logits`: tokens (1, S) int64, logits (1, S, V) where row
i predicts token i + 1. Tree verification also passes `attn_mask` (bool (T, S), True = attend)
and `position_ids` (S,) keywords.

- Greedy (`temperature=0`): draft tokens are kept while they equal the target's argmax; the first
  mismatch is replaced by the target's token. The output is the target's greedy output exactly.
- Sampling: rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x from q is
  kept with probability min(1, p(x)/q(x)), else a token is drawn from norm(max(0, p - q)); after k
  kept tokens one more comes from p. Every emitted token is distributed as the target's p.
- `accept_greedy` / `accept_sampled` are these two rules on one verification step; they are shared with
  `layerzero.serve.speculative_generate`, which runs draft and target on their own paged KV caches
  (one target forward of k + 1 tokens per round, rejected tokens rolled back) for serve's models.
- Trees: `tree_attention_mask` lets many candidate continuations share one target pass;
  `verify_tree_greedy` walks the longest accepted path.
- `kernel_pair` selects the draft's and the target's kernels through LayerZero and reports both.

Draws use `lz.sample` (so a generator makes runs reproducible).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidInputError
from .ops.sampling import sample
from .selection.inspect import explain, which

LogitsFn = Callable[..., torch.Tensor]


@dataclass(slots=True)
class SpeculativeStats:
    """Acceptance statistics over the verification steps of one or more generations."""

    num_draft: int = 0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[i]: steps whose draft token i was kept

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens / proposed draft tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per target pass (1 means no speed-up)."""
        return self.emitted / self.steps if self.steps else 0.0

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        if len(self.accepted_at) < proposed:
            self.accepted_at.extend([0] * (proposed - len(self.accepted_at)))
        for i in range(accepted):
            self.accepted_at[i] += 1
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted

    def __str__(self) -> str:
        return (
            f"{self.steps} target passes, {self.accepted}/{self.proposed} draft tokens accepted "
            f"({self.acceptance_rate:.1%}), {self.tokens_per_step:.2f} tokens per pass"
        )


def _check_prompt(prompt: Any) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise InvalidInputError("prompt", "an int64 tensor of shape (1, S) with S >= 1", got)
    if prompt.dtype != torch.int64:
        raise InvalidInputError("prompt", "dtype torch.int64", prompt.dtype)
    return prompt


def _logits(model: LogitsFn, tokens: torch.Tensor, name: str) -> torch.Tensor:
    out = model(tokens)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != tokens.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInputError(name, f"logits of shape (1, {tokens.shape[1]}, V)", got)
    return out[0].float()


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probabilities (V,), through lz.sample."""

    return int(sample(probs.clamp_min(0).log().unsqueeze(0), generator=generator)[0])


def accept_greedy(drafted: Sequence[int], target_tokens: Sequence[int]) -> tuple[list[int], int]:
    """Greedy verification: (the draft tokens kept, the token after them).

    target_tokens (k + 1): the target's argmax after the context and after each draft token. Draft
    tokens are kept while they equal it; the next token is the target's at the first mismatch (or
    after the last draft token when all are kept).
    """
    for i, x in enumerate(drafted):
        if target_tokens[i] != x:
            return list(drafted[:i]), int(target_tokens[i])
    return list(drafted), int(target_tokens[len(drafted)])


def accept_sampled(
    drafted: Sequence[int], p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Rejection sampling: (the draft tokens kept, the token after them), each distributed as the target's.

    p (k + 1, V): the target's probabilities after the context and after each draft token; q (k, V):
    the draft's probabilities that drafted[i] was drawn from. Token x is kept with probability
    min(1, p(x) / q(x)); the first rejected one is replaced by a draw from norm(max(0, p - q)); when all
    are kept the next token is drawn from p's last row.
    """
    for i, x in enumerate(drafted):
        u = torch.rand((), generator=generator, device=p.device) if generator is not None else torch.rand(())
        if float(u) * float(q[i, x]) > float(p[i, x]):  # rejected: draw from the residual
            residual = (p[i] - q[i]).clamp_min(0)
            total = float(residual.sum())
            return list(drafted[:i]), _draw(residual / total if total > 0 else p[i], generator)
    return list(drafted), _draw(p[len(drafted)], generator)


class UnsupportedBatchError(InvalidInputError):
    """Speculative decoding on the paged cache (layerzero.serve.speculative_generate) runs one prompt."""

    def __init__(self, num_prompts: int) -> None:
        super().__init__(
            "prompt_ids",
            "one prompt (speculative decoding runs batch 1)",
            f"{num_prompts} prompts",
            "call it once per prompt, or use serve.generate for batched decoding",
        )


def target_greedy(target: LogitsFn, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Plain greedy decoding with the target (the reference speculative greedy must equal)."""
    tokens = _check_prompt(prompt)
    for _ in range(max_new_tokens):
        nxt = _logits(target, tokens, "target")[-1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens


def speculative_generate(
    target: LogitsFn,
    draft: LogitsFn,
    prompt: torch.Tensor,
    max_new_tokens: int,
    num_draft: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stats: SpeculativeStats | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate `max_new_tokens` after `prompt` (1, S); returns (tokens (1, S + max_new_tokens), stats).

    temperature 0: greedy verification (output == target_greedy). temperature > 0: rejection
    sampling; the output follows softmax(target_logits / temperature) exactly.
    """
    tokens = _check_prompt(prompt)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InvalidInputError("max_new_tokens", "an int >= 0", max_new_tokens)
    if not isinstance(num_draft, int) or num_draft < 1:
        raise InvalidInputError("num_draft", "an int >= 1", num_draft)
    if not isinstance(temperature, int | float) or temperature < 0:
        raise InvalidInputError("temperature", "a float >= 0 (0 = greedy)", temperature)
    stats = stats if stats is not None else SpeculativeStats()
    stats.num_draft = num_draft
    goal = tokens.shape[1] + max_new_tokens
    greedy = temperature == 0
    while tokens.shape[1] < goal:
        k = min(num_draft, goal - tokens.shape[1])
        proposal, q_rows = tokens, []
        for _ in range(k):  # the draft proposes k tokens
            row = _logits(draft, proposal, "draft")[-1]
            if greedy:
                nxt = int(row.argmax())
            else:
                q = torch.softmax(row / temperature, -1)
                q_rows.append(q)
                nxt = _draw(q, generator)
            proposal = torch.cat([proposal, torch.tensor([[nxt]], dtype=torch.int64, device=tokens.device)], 1)
        start = tokens.shape[1]
        p_logits = _logits(target, proposal, "target")[start - 1 :]  # (k + 1, V): one target pass
        drafted = proposal[0, start:].tolist()
        if greedy:
            kept, extra = accept_greedy(drafted, p_logits.argmax(-1).tolist())
        else:
            kept, extra = accept_sampled(
                drafted, torch.softmax(p_logits / temperature, -1), torch.stack(q_rows), generator
            )
        new = (kept + [extra])[: goal - start]
        stats.record(k, len(kept), len(new))
        tokens = torch.cat([tokens, torch.tensor([new], dtype=torch.int64, device=tokens.device)], 1)
    return tokens, stats


# ----------------------------------------------------------------------------- trees of candidates


def tree_attention_mask(
    parents: Sequence[int], prefix_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, position_ids) for verifying a token tree after a prefix in one pass.

    parents[i] is the index of node i's parent in the tree (-1: a child of the prefix's last
    token); parents come before children. mask: bool (prefix_len + T, prefix_len + T), True =
    attend: the prefix is causal, node i sees the whole prefix, its ancestors and itself.
    position_ids: (prefix_len + T,), a node's position is prefix_len + its depth - 1.
    """
    if not isinstance(prefix_len, int) or prefix_len < 1:
        raise InvalidInputError("prefix_len", "an int >= 1", prefix_len)
    n = len(parents)
    for i, p in enumerate(parents):
        if not isinstance(p, int) or not -1 <= p < i:
            raise InvalidInputError(f"parents[{i}]", f"-1 or the index of an earlier node (< {i})", p)
    size = prefix_len + n
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:prefix_len, :prefix_len] = torch.ones(prefix_len, prefix_len, dtype=torch.bool).tril()
    mask[prefix_len:, :prefix_len] = True
    positions = list(range(prefix_len)) + [0] * n
    for i, p in enumerate(parents):
        row = prefix_len + i
        if p >= 0:
            mask[row] |= mask[prefix_len + p]
        mask[row, row] = True
        positions[row] = prefix_len if p < 0 else positions[prefix_len + p] + 1
    return mask.to(device), torch.tensor(positions, dtype=torch.int64, device=device)


def tree_mask_mod(mask: torch.Tensor) -> Callable[..., Any]:
    """A FlexAttention mask_mod(b, h, q_idx, kv_idx) reading a (S, S) bool mask."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return mask[q_idx, kv_idx]

    return mask_mod


def verify_tree_greedy(
    target: LogitsFn, prefix: torch.Tensor, tree_tokens: Sequence[int], parents: Sequence[int]
) -> tuple[list[int], int]:
    """Greedy verification of a candidate tree in one target pass.

    target is called as target(tokens (1, P + T), attn_mask=mask, position_ids=positions).
    Returns (tokens to append: the longest accepted path plus the target's next token, number of
    tree tokens accepted). The result equals the first tokens of the target's greedy output.
    """
    prefix = _check_prompt(prefix)
    if len(tree_tokens) != len(parents):
        raise InvalidInputError("tree_tokens", f"{len(parents)} tokens (one per node of parents)", len(tree_tokens))
    mask, positions = tree_attention_mask(parents, prefix.shape[1], prefix.device)
    tokens = torch.cat([prefix, torch.tensor([list(tree_tokens)], dtype=torch.int64, device=prefix.device)], 1)
    logits = target(tokens, attn_mask=mask, position_ids=positions)[0]
    base = prefix.shape[1]
    node, out = -1, []
    while True:
        best = int(logits[base - 1 if node < 0 else base + node].argmax())
        child = next((i for i, p in enumerate(parents) if p == node and tree_tokens[i] == best), None)
        out.append(best)
        if child is None:
            return out, len(out) - 1
        node = child


# ----------------------------------------------------------------------------- kernel pair


@dataclass(frozen=True, slots=True)
class KernelPair:
    """The kernels LayerZero selects for one op of the draft and of the target model."""

    op: str
    draft: str
    target: str
    draft_report: Any = field(repr=False, compare=False)
    target_report: Any = field(repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.op}: draft -> {self.draft}, target -> {self.target}"


def kernel_pair(
    op: str | Callable[..., Any],
    draft_args: tuple[Any, ...],
    target_args: tuple[Any, ...],
    draft_kwargs: dict[str, Any] | None = None,
    target_kwargs: dict[str, Any] | None = None,
) -> KernelPair:
    """Select `op`'s kernel for the draft's call and for the target's verification call (e.g. Sq = 1
    decode for the draft, Sq = k + 1 for the target) and report both with their explanations."""

    dk, tk = draft_kwargs or {}, target_kwargs or {}
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    return KernelPair(
        name,
        which(op, *draft_args, **dk),
        which(op, *target_args, **tk),
        explain(op, *draft_args, **dk),
        explain(op, *target_args, **tk),
    )
