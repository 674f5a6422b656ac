"""Memory-aware selection: a kernel whose declared workspace would eat into the configured
headroom of free device memory is rejected (WORKSPACE_TOO_LARGE) in favour of one that fits.

Only kernels that declare `KernelSpec.workspace_bytes` are checked, on the miss path only.
Free memory on CUDA is the driver's free memory plus what torch's caching allocator holds
unused; on CPU it is MemAvailable of /proc/meminfo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..context import SelectionContext
from ..errors import ConfigurationError
from ..kernel import KernelSpec
from ..reasons import Reason, Rejection

# Free memory is read at most this often per device (selections come in bursts).
_FREE_MEMORY_TTL_S = 0.5


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """Headroom kept free: the larger of `headroom_bytes` and `headroom_fraction` of the device total.

    `free_memory(device_type, index) -> (free, total) | None` replaces the measurement (tests).
    """

    headroom_fraction: float = 0.05
    headroom_bytes: int = 0
    free_memory: Callable[[str, int], tuple[int, int] | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.headroom_fraction, (int, float)) or not 0.0 <= self.headroom_fraction < 1.0:
            raise ConfigurationError(
                f"headroom_fraction: expected a fraction in [0, 1), got {self.headroom_fraction!r}"
            )
        if not isinstance(self.headroom_bytes, int) or self.headroom_bytes < 0:
            raise ConfigurationError(f"headroom_bytes: expected an integer >= 0, got {self.headroom_bytes!r}")

    def headroom(self, total: int) -> int:
        return max(self.headroom_bytes, int(self.headroom_fraction * total))


def free_memory(device_type: str, index: int = 0) -> tuple[int, int] | None:
    """(free bytes, total bytes) of a device, or None where it cannot be measured."""
    try:
        if device_type == "cuda":
            free, total = torch.cuda.mem_get_info(index)
            cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
            return int(free + max(cached, 0)), int(total)
        if device_type == "cpu":
            info: dict[str, int] = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in ("MemAvailable", "MemTotal"):
                        info[name] = int(rest.split()[0]) * 1024
            if len(info) == 2:
                return info["MemAvailable"], info["MemTotal"]
    except (OSError, RuntimeError, ValueError):
        pass
    return None


class MemoryGuard:
    """The runtime's headroom check, with a short-lived cache of free memory per device."""

    def __init__(self) -> None:
        self.config = MemoryConfig()
        self._cache: dict[tuple[str, int], tuple[float, tuple[int, int] | None]] = {}

    def configure(self, config: MemoryConfig) -> None:
        self.config = config
        self._cache.clear()

    def free(self, device_type: str, index: int, capturing: bool = False) -> tuple[int, int] | None:
        """(free, total) bytes; under CUDA graph capture only a cached value (no driver query)."""
        measure = self.config.free_memory
        if measure is not None:
            return measure(device_type, index)
        now = time.monotonic()
        hit = self._cache.get((device_type, index))
        if hit is not None and (capturing or now - hit[0] < _FREE_MEMORY_TTL_S):
            return hit[1]
        if capturing:
            return None
        value = free_memory(device_type, index)
        self._cache[(device_type, index)] = (now, value)
        return value

    def rejections(self, spec: KernelSpec, ctx: SelectionContext) -> list[Rejection]:
        """WORKSPACE_TOO_LARGE if `spec`'s workspace for `ctx` does not fit above the headroom."""
        if spec.workspace_bytes is None:
            return []
        try:
            need = int(spec.workspace_bytes(ctx))
        except Exception as e:  # a broken estimate must not break selection
            return [Rejection(Reason.CUSTOM_CHECK_FAILED, f"workspace estimate raised {type(e).__name__}: {e}")]
        if need <= 0:
            return []
        measured = self.free(ctx.device_type, ctx.device_index, ctx.graph_capture)
        if measured is None:
            return []
        free, total = measured
        budget = free - self.config.headroom(total)
        if need > budget:
            return [
                Rejection(
                    Reason.WORKSPACE_TOO_LARGE,
                    f"workspace {_mib(need)} > free {_mib(free)} minus headroom "
                    f"{_mib(self.config.headroom(total))} on {ctx.device_type}:{ctx.device_index}",
                )
            ]
        return []


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
