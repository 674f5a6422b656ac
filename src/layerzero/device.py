"""What the hardware is: device type, compute capability, GPU generation, CPU ISA."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

# Compute capability (major) -> NVIDIA generation. 8.9 is Ada, 8.0/8.6/8.7 Ampere.
_GENERATIONS = {7: "volta", 8: "ampere", 9: "hopper", 10: "blackwell", 11: "blackwell", 12: "blackwell"}


def gpu_generation(sm: int) -> str:
    """Generation name for a compute capability written as 10*major + minor (e.g. 90)."""
    major, minor = divmod(sm, 10)
    if major == 7 and minor == 5:
        return "turing"
    if major == 8 and minor == 9:
        return "ada"
    return _GENERATIONS.get(major, "unknown")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Facts about one device that kernels constrain on."""

    type: str  # "cuda", "cpu", ...
    index: int
    name: str
    sm: int  # 10*major + minor for CUDA, 0 elsewhere
    generation: str  # "hopper", "ampere", ... for CUDA; "cpu" elsewhere
    isa: frozenset[str]  # CPU instruction sets (avx2, avx512f, amx_tile, ...); empty on GPUs
    total_memory: int  # bytes; 0 where unknown


def _cpu_isa() -> frozenset[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = {
        "avx2",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_fp16",
        "amx_int8",
        "fma",
        "neon",
        "asimd",
        "sve",
    }
    isa = flags & wanted
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if capability:
        isa.add(f"torch:{capability.lower()}")
    return frozenset(isa)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=64)
def device_info(device: torch.device) -> DeviceInfo:
    """DeviceInfo for a torch.device (cached: queried once per device)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        sm = props.major * 10 + props.minor
        return DeviceInfo("cuda", index, props.name, sm, gpu_generation(sm), frozenset(), props.total_memory)
    if device.type == "cpu":
        return DeviceInfo("cpu", 0, _cpu_name(), 0, "cpu", _cpu_isa(), 0)
    return DeviceInfo(device.type, device.index or 0, device.type, 0, device.type, frozenset(), 0)


@functools.lru_cache(maxsize=1)
def local_device_types() -> tuple[str, ...]:
    """The device types this machine and this torch build can run on: "cpu", then "cuda", "mps", "xpu"
    where present (a CPU-only torch build has no "cuda" even on a GPU machine)."""
    found = ["cpu"]
    for name, probe in (
        ("cuda", lambda: torch.cuda.is_available()),
        ("mps", lambda: torch.backends.mps.is_available()),
        ("xpu", lambda: torch.xpu.is_available()),
    ):
        try:
            if probe():
                found.append(name)
        except (AttributeError, RuntimeError):  # a build without that backend
            pass
    return tuple(found)


# The fixed facts of each device seen, as SelectionContext fields (device_info reads them once; this
# saves building the dict again on every selection miss).
_CONTEXT_FIELDS: dict[torch.device, dict[str, object]] = {}


def context_fields(device: torch.device) -> dict[str, object]:
    """The SelectionContext fields that describe `device`: device_type, device_index, sm, generation, isa."""
    fixed = _CONTEXT_FIELDS.get(device)
    if fixed is None:
        info = device_info(device)
        fixed = _CONTEXT_FIELDS[device] = {
            "device_type": info.type,
            "device_index": info.index,
            "sm": info.sm,
            "generation": info.generation,
            "isa": info.isa,
        }
    return fixed
