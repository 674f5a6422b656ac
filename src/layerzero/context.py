"""SelectionContext: the hashable facts of one call that kernels are chosen on."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .capture import graph_mode
from .device import context_fields
from .frozen import fast_frozen_init


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class SelectionContext:
    """Facts of one call. Built only on a plan-cache miss; fields that do not apply stay at 0/None.

    Attention fields follow flash-attn naming: batch, seq_len_q/k, num_heads (query heads),
    num_kv_heads, head_dim (query/key), head_dim_v. Norm fields: hidden_size (the normalized size),
    num_rows (the product of the other dimensions), num_groups.
    """

    op: str
    device_type: str = "cpu"
    device_index: int = 0
    sm: int = 0
    generation: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch: int = 0
    seq_len_q: int = 0
    seq_len_k: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    head_dim_v: int = 0
    layout: str = ""
    # attention given without layout=, read as BSHD, with the strides of BHSD tensors (a likely
    # mistake, warned about once; selection does not depend on it)
    bhsd_strides: bool = False
    is_causal: bool = False
    mask_kind: str = "none"  # "none" | "bool" | "float"
    window: tuple[int, int] | None = None  # (left, right); -1 = unbounded on that side
    softcap: float = 0.0  # 0 = off; the value itself is passed at run time
    alibi: bool = False
    dropout: bool = False
    requires_grad: bool = False
    graph_capture: bool = False
    deterministic: bool = False
    kv_layout: str | None = None
    page_size: int = 0
    quant_format: str | None = None
    tp_size: int = 1
    tp_rank: int = field(default=0, compare=False, hash=False)  # never a selection input: every rank must agree
    hidden_size: int = 0
    num_rows: int = 0
    num_groups: int = 0
    has_weight: bool = True
    has_bias: bool = False
    isa: frozenset[str] = field(default=frozenset(), compare=False, hash=False)

    @staticmethod
    def device_fields(device: torch.device) -> dict[str, object]:
        """The fields a context builder takes from the tensors' device: the device's facts, and whether
        the call may be captured (capture.graph_mode) or must be deterministic."""
        fixed = context_fields(device)
        return {
            **fixed,
            "graph_capture": fixed["device_type"] == "cuda" and graph_mode(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }

    # Names that policy conditions may use, besides the field names themselves.
    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def seq_len(self) -> int:
        return max(self.seq_len_q, self.seq_len_k)

    @property
    def device(self) -> str:
        return self.device_type

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def replace(self, **changes: Any) -> SelectionContext:
        return replace(self, **changes)

    def summary(self) -> str:
        """The fields that differ from their defaults, one line, for reports."""
        parts = [f"op={self.op}"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("op", "isa") or value == f.default:
                continue
            parts.append(f"{f.name}={self.dtype_name if f.name == 'dtype' else value}")
        return " ".join(parts)
