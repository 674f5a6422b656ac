"""Embedding lookup: `lz.embedding(ids, table, padding_idx=None)`.

Kernel calling convention: `impl(ids, table, padding_idx) -> (..., D)`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError
from ..state import runtime
from .family import OpFamily, register_family

_grad_enabled = torch.is_grad_enabled


def embedding(ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """Rows of table (V, D) for integer ids of any shape -> (*ids.shape, D) in table's dtype.

    Positions whose id equals padding_idx (negative counts from the end, as in torch) are zero,
    whatever that table row holds. Ids out of [0, V) raise (checked on the CPU; on CUDA the
    kernel's device-side assert fires, since checking would cost a host sync per call).
    """
    try:
        key = _key(ids, table, padding_idx)
    except AttributeError:
        _check(ids=ids, table=table)
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(EMBEDDING, key, (ids, table, padding_idx), {})
    vocab = table.shape[0]
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InvalidInputError("ids", f"token ids in [0, {vocab})", f"range [{int(ids.min())}, {int(ids.max())}]")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += vocab
    try:
        return plan.run(ids, table, padding_idx)
    except Exception as error:
        return plan.recover(error, ids, table, padding_idx)


def _key(ids: Any, table: Any, padding_idx: int | None = None) -> tuple[Any, ...]:
    return (
        "embedding.lookup",
        ids.shape,
        ids.dtype,
        ids.device,
        table.shape,
        table.dtype,
        table.device,
        padding_idx is None,
        _grad_enabled() and table.requires_grad,
    )


def _check(**tensors: Any) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)


def _context(ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None = None) -> SelectionContext:
    _check(ids=ids, table=table)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidInputError("ids", "an integer tensor (int32 or int64)", ids.dtype)
    if table.dim() != 2:
        raise InvalidInputError("table", "a 2-D (vocab, dim) tensor", tuple(table.shape))
    if not table.is_floating_point():
        raise InvalidInputError("table", "a floating-point dtype", table.dtype)
    if ids.device != table.device:
        raise InvalidInputError("ids", f"device {table.device} (as table)", ids.device)
    vocab = table.shape[0]
    if padding_idx is not None and (
        isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -vocab <= padding_idx < vocab
    ):
        raise InvalidInputError("padding_idx", f"None or an int in [-{vocab}, {vocab})", padding_idx)
    return SelectionContext(
        op="embedding.lookup",
        **SelectionContext.device_fields(table.device),  # type: ignore[arg-type]
        dtype=table.dtype,
        hidden_size=table.shape[1],
        num_rows=ids.numel(),
        requires_grad=torch.is_grad_enabled() and table.requires_grad,
    )


EMBEDDING = register_family(OpFamily("embedding", _key, _context, function=embedding))
