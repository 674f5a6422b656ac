"""`lz.warmup`: select and run each given shape once before serving, so that the first real call
pays neither selection nor JIT compilation (FlashInfer, Triton and FlexAttention compile on their
first call; their on-disk caches then serve later processes).

    print(lz.warmup("attention", shapes=[(8, 1, 4096, 32, 8, 128, 1)], dtypes=[torch.bfloat16]))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInputError
from ..state import runtime
from . import workloads

# A first call this much slower than the second (and by at least 1 ms) counts as compilation.
COMPILE_RATIO = 5.0


@dataclass(frozen=True, slots=True)
class WarmupEntry:
    """One warmed shape: the kernel selected and how long its first and second calls took."""

    family: str
    shape: tuple[int, ...]
    dtype: str
    kernel: str
    needs_jit: bool
    select_ms: float
    first_ms: float
    second_ms: float

    @property
    def compiled(self) -> bool:
        slow_first = self.first_ms > COMPILE_RATIO * self.second_ms and self.first_ms - self.second_ms > 1.0
        return self.needs_jit or slow_first

    @property
    def compile_ms(self) -> float:
        return max(0.0, self.first_ms - self.second_ms)


@dataclass(frozen=True, slots=True)
class WarmupReport:
    entries: tuple[WarmupEntry, ...]
    seconds: float

    @property
    def compiled(self) -> list[WarmupEntry]:
        return [e for e in self.entries if e.compiled]

    def __str__(self) -> str:
        lines = [f"warmed {len(self.entries)} shape(s) in {self.seconds:.2f} s; compiled: "
                 f"{', '.join(sorted({e.kernel for e in self.compiled})) or 'nothing'}",
                 f"{'op':<16} {'shape':<26} {'dtype':<9} {'kernel':<28} {'select ms':>9} {'1st ms':>9} "
                 f"{'2nd ms':>9}  jit"]
        for e in self.entries:
            lines.append(f"{e.family:<16} {'x'.join(map(str, e.shape)):<26} {e.dtype:<9} {e.kernel:<28} "
                         f"{e.select_ms:>9.3f} {e.first_ms:>9.3f} {e.second_ms:>9.3f}  "
                         f"{'compiled' if e.compiled else '-'}")
        return "\n".join(lines)


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def warmup(operation: str, shapes: Sequence[Any] = (), dtypes: Sequence[torch.dtype] = (),
           device: str | torch.device | None = None) -> WarmupReport:
    """Pre-select (the plans stay cached for these exact shapes) and call each kernel once.

    operation: an op id (`"attention.causal"`, `"norm.rms"`) or a family name (`"attention"`).
    shapes: as for lz.tune (attention: batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, or for an
    attention op id also (batch, seq, heads, head_dim); norms: rows, hidden).
    """
    started = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = [workloads.op_shape(operation, raw) for raw in shapes]  # every shape checked before any runs
    if not resolved:
        raise InvalidInputError("shapes", f"at least one shape for {operation}", shapes)
    name = resolved[0][0]
    wl = workloads.workload(name)
    fam = workloads.family(name)
    op = workloads.public_op(name)
    runtime.ensure_loaded()
    entries = []
    for dtype in dtypes or [torch.bfloat16 if dev.type == "cuda" else torch.float32]:
        for _, shape in resolved:
            args = wl.make(shape, dtype, dev, torch.Generator(device=dev).manual_seed(0))
            t0 = time.perf_counter()
            plan = runtime.plan(fam, fam.key(*args), args, {})
            select_ms = (time.perf_counter() - t0) * 1e3
            first = _timed(lambda args=args: op(*args), dev)
            second = _timed(lambda args=args: op(*args), dev)
            spec = runtime.registry.kernel(plan.kernel_id)
            entries.append(WarmupEntry(operation, shape, str(dtype).removeprefix("torch."), plan.kernel_id,
                                       spec.needs_jit, select_ms, first, second))
    return WarmupReport(tuple(entries), time.perf_counter() - started)
