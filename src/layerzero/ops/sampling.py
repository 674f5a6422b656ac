"""Sampling: `lz.sample_greedy`, `lz.sample_topk`, `lz.sample_topp`, `lz.sample`.

logits are (B, V). Every parameter is a Python scalar (all rows) or a (B,)
tensor on the logits' device (one value per row). Order of filters: temperature, top-k, top-p on
the renormalized top-k distribution, min-p (relative to the largest probability). Thresholds are
values: tokens tied with the last kept token are kept. Results are int64 token ids; a row with no
finite logit (all -inf, or a NaN) gives -1 on every kernel.

Per-row values that disable a filter: top_k <= 0 or >= V, top_p >= 1, min_p == 0; temperature
0 takes the argmax of that row. Scalar values are validated on every call; tensor values are not
(that would need a device sync).

`generator` is honoured by every kernel on every device (the draws depend only on it); it must
live on the logits' device. The op id names the filters a call uses, so kernels declare which
combinations they run: sampling.greedy / plain / topk / topp / minp / topk_topp / combined.

Kernel calling conventions: greedy `impl(logits) -> (B,)`; the others
`impl(logits, top_k, top_p, min_p, temperature, generator) -> (B,) int64`, each filter None when
off, temperature a float > 0 or a (B,) tensor (0 = greedy row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError
from ..state import runtime
from .family import OpFamily, register_family

Param = torch.Tensor | float | int | None
_Tensor = torch.Tensor


def _scalar(name: str, value: Any, lo: float, hi: float, lo_open: bool, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(name, f"{expected} or a (B,) tensor", type(value).__name__)
    if value != value or value > hi or value < lo or (lo_open and value == lo):
        raise InvalidInputError(name, expected, value)


def _normalize(
    logits: Any, top_k: Param, top_p: Param, min_p: Param, temperature: Param
) -> tuple[str, Param, Param, Param, Param]:
    """(op id, top_k, top_p, min_p, temperature) with scalars that change nothing turned off."""
    vocab = logits.shape[-1]
    if top_k is not None and not isinstance(top_k, _Tensor):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidInputError("top_k", "an int >= 1, a (B,) int tensor, or None (off)", top_k)
        if top_k >= vocab:
            top_k = None
    if top_p is not None and not isinstance(top_p, _Tensor):
        _scalar("top_p", top_p, 0.0, 1.0, True, "a probability in (0, 1]")
        if top_p >= 1.0:
            top_p = None
    if min_p is not None and not isinstance(min_p, _Tensor):
        _scalar("min_p", min_p, 0.0, 1.0, False, "a probability in [0, 1]")
        if min_p == 0.0:
            min_p = None
    if not isinstance(temperature, _Tensor):
        _scalar("temperature", temperature, 0.0, float("inf"), False, "a float >= 0 (0 = greedy)")
        if temperature == 0.0 or (type(top_k) is int and top_k == 1):
            return "sampling.greedy", None, None, None, 0.0
        temperature = float(temperature)  # type: ignore[arg-type]
    active = (top_k is not None, top_p is not None, min_p is not None)
    op = _OPS.get(active, "sampling.combined")
    return op, top_k, top_p, min_p, temperature


_OPS = {
    (False, False, False): "sampling.plain",
    (True, False, False): "sampling.topk",
    (False, True, False): "sampling.topp",
    (False, False, True): "sampling.minp",
    (True, True, False): "sampling.topk_topp",
}


def _tkey(t: Param) -> Any:
    return (t.shape, t.dtype, t.device) if isinstance(t, _Tensor) else t is None


def sample(
    logits: torch.Tensor,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    temperature: Param = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of logits (B, V) -> int64 (B,); see the module docstring."""
    try:
        key, k, p, m, t = _key_args(logits, top_k, top_p, min_p, temperature, generator)
    except AttributeError:
        _context(logits, top_k, top_p, min_p, temperature, generator)  # raises the precise error
        raise
    plan = runtime.plans.data.get(key)
    if plan is None:
        plan = runtime.plan(SAMPLE, key, (logits, top_k, top_p, min_p, temperature, generator), {})
    if key[0] == "sampling.greedy":
        return plan(logits)
    return plan(logits, k, p, m, t, generator)


def _key_args(
    logits: Any, top_k: Param, top_p: Param, min_p: Param, temperature: Param, generator: torch.Generator | None
) -> tuple[Any, Param, Param, Param, Param]:
    """(plan-cache key, normalized top_k, top_p, min_p, temperature)."""
    op, k, p, m, t = _normalize(logits, top_k, top_p, min_p, temperature)
    key = (
        op,
        logits.shape,
        logits.dtype,
        logits.device,
        _tkey(k),
        _tkey(p),
        _tkey(m),
        _tkey(t),
        None if generator is None else generator.device,
    )
    return key, k, p, m, t


def sample_greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row of logits (B, V) -> int64 (B,); -1 for rows without a finite logit."""
    return sample(logits, temperature=0.0)


def sample_topk(
    logits: torch.Tensor,
    k: torch.Tensor | int,
    temperature: torch.Tensor | float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample among the k most likely tokens of each row. logits (B, V); k int or (B,)."""
    return sample(logits, top_k=k, temperature=temperature, generator=generator)


def sample_topp(
    logits: torch.Tensor,
    p: torch.Tensor | float,
    temperature: torch.Tensor | float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nucleus sampling: the smallest set of most likely tokens with mass >= p. logits (B, V)."""
    return sample(logits, top_p=p, temperature=temperature, generator=generator)


def _check_logits(logits: Any) -> None:
    if not isinstance(logits, _Tensor):
        raise InvalidInputError("logits", "a torch.Tensor of shape (B, V)", type(logits).__name__)


def _context(
    logits: torch.Tensor,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    temperature: Param = 1.0,
    generator: torch.Generator | None = None,
) -> SelectionContext:
    """Validate the call (miss path only) and describe it."""
    _check_logits(logits)
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise InvalidInputError("logits", "a (B, V) tensor with V >= 1", tuple(logits.shape))
    if not logits.is_floating_point():
        raise InvalidInputError("logits", "a floating-point dtype", logits.dtype)
    op, *_ = _normalize(logits, top_k, top_p, min_p, temperature)
    batch = logits.shape[0]
    for name, value in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p), ("temperature", temperature)):
        if not isinstance(value, _Tensor):
            continue
        if tuple(value.shape) != (batch,):
            raise InvalidInputError(name, f"a ({batch},) tensor, one value per row", tuple(value.shape))
        if value.device != logits.device:
            raise InvalidInputError(name, f"device {logits.device} (as logits)", value.device)
        integer = name == "top_k"
        if integer == value.is_floating_point() or value.dtype == torch.bool:
            raise InvalidInputError(name, "an integer tensor" if integer else "a floating-point tensor", value.dtype)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InvalidInputError("generator", "a torch.Generator or None", type(generator).__name__)
        if generator.device.type != logits.device.type or (
            logits.is_cuda and generator.device.index not in (None, logits.device.index)
        ):
            raise InvalidInputError(
                "generator",
                f"a torch.Generator on {logits.device} (as logits)",
                generator.device,
                f"create it with torch.Generator(device={str(logits.device)!r})",
            )
    return SelectionContext(
        op=op,
        **SelectionContext.device_fields(logits.device),  # type: ignore[arg-type]
        dtype=logits.dtype,
        batch=batch,
        num_rows=batch,
        hidden_size=logits.shape[-1],
    )


def _greedy_args(logits: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (logits,), {"temperature": 0.0}


def _family(function: Callable[..., Any], adapt: Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]) -> OpFamily:
    """A family for one public function: its arguments mapped onto `sample`'s."""

    def key(*args: Any, **kwargs: Any) -> Any:
        a, kw = adapt(*args, **kwargs)
        return _key(*a, **kw)

    def context(*args: Any, **kwargs: Any) -> SelectionContext:
        a, kw = adapt(*args, **kwargs)
        return _context(*a, **kw)

    return register_family(OpFamily(function.__name__, key, context, function=function))


def _key(
    logits: Any,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    temperature: Param = 1.0,
    generator: torch.Generator | None = None,
) -> Any:
    return _key_args(logits, top_k, top_p, min_p, temperature, generator)[0]


SAMPLE = register_family(OpFamily("sample", _key, _context, function=sample))
_family(sample_greedy, _greedy_args)
_family(
    sample_topk,
    lambda logits, k, temperature=1.0, generator=None: (
        (logits,),
        {"top_k": k, "temperature": temperature, "generator": generator},
    ),
)
_family(
    sample_topp,
    lambda logits, p, temperature=1.0, generator=None: (
        (logits,),
        {"top_p": p, "temperature": temperature, "generator": generator},
    ),
)
