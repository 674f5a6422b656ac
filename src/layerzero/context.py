"""SelectionContext: the hashable facts of one call that kernels are chosen on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch

from .device import DeviceInfo, device_info


def fast_frozen_init(cls: type) -> type:
    """Give a frozen, slotted dataclass an `__init__` that stores its fields as plain attribute writes.

    Same signature and defaults as the generated one, which calls `object.__setattr__` per field
    (about 0.2 us each on CPython 3.11: 6 us per SelectionContext, a tenth of a selection miss).
    The new one lends the object, for the duration of `__init__`, the class of a mutable twin with
    the same slots (so the same memory layout), writes the fields there (a few ns each), and gives
    it back its class: 1 us for a SelectionContext. Immutability afterwards is unchanged.
    """
    mutable = type(f"_Mutable{cls.__name__}", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]
    params, lines = [], []
    scope: dict[str, Any] = {"_lend": object.__dict__["__class__"].__set__, "_mutable": mutable}
    for f in fields(cls):
        if f.default_factory is not MISSING or not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain fields with plain defaults are supported")
        if f.default is MISSING:
            params.append(f.name)
        else:
            scope[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        lines.append(f"    self.{f.name} = {f.name}")
    body = "\n".join(["    kind = type(self)", "    _lend(self, _mutable)", *lines, "    self.__class__ = kind"])
    exec(f"def __init__(self, {', '.join(params)}):\n{body}", scope)  # noqa: S102 - code built above
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls


class _GraphCall(threading.local):
    depth = 0  # LayerZero torch.library ops being run by this thread (see graph_call)


_GRAPH_CALL = _GraphCall()
# What torch.cuda.is_current_stream_capturing calls (it raises RuntimeError on a CPU-only torch build).
# The hottest keys (attention) inline graph_mode for CUDA tensors as
#     GRAPH_CALL.depth > 0 or stream_capturing()
stream_capturing = torch._C._cuda_isCurrentStreamCapturing
GRAPH_CALL = _GRAPH_CALL


def graph_mode() -> bool:
    """True while kernels may end up in a CUDA graph: during stream capture, and inside LayerZero's
    torch.library ops (integrations/torch_ops.py). A compiled graph may be run with CUDA graphs
    (torch.compile mode="reduce-overhead"), whose warm-up run already allocates from the graph's
    memory pool: a kernel that keeps buffers across calls (FlashInfer's workspace and plans) breaks
    it there ("tensors in the cudagraph pool not tracked as outputs", seen on the H100), so those
    calls select graph-safe kernels only. One query of the CUDA runtime (the op keys ask it only for
    CUDA tensors)."""
    if _GRAPH_CALL.depth:
        return True
    try:
        return stream_capturing()
    except RuntimeError:  # a CPU-only torch build has no CUDA runtime to ask
        return False


@contextmanager
def graph_call() -> Iterator[None]:
    """Mark the calls inside as possibly captured (see graph_mode)."""
    _GRAPH_CALL.depth += 1
    try:
        yield
    finally:
        _GRAPH_CALL.depth -= 1


# The fixed facts of each device seen, as device_fields gives them (device_info reads them once;
# this saves building them again on every miss).
_DEVICE_FIELDS: dict[torch.device, dict[str, object]] = {}


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
        """The device-derived fields of a context, for builders that start from a tensor."""
        fixed = _DEVICE_FIELDS.get(device)
        if fixed is None:
            info: DeviceInfo = device_info(device)
            fixed = _DEVICE_FIELDS[device] = {"device_type": info.type, "device_index": info.index, "sm": info.sm,
                                              "generation": info.generation, "isa": info.isa}
        return {**fixed, "graph_capture": fixed["device_type"] == "cuda" and graph_mode(),
                "deterministic": torch.are_deterministic_algorithms_enabled()}

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
