"""STAND-IN for a kernel library that builds a module per variant on first use, as FlashInfer's JIT
does, for CPU tests of lz.warmup's parallel build. NOT a real library.

Its kernel is a correct rms_norm (`standin_jit.rms_norm`, CPU, priority 99). A variant is the pair
(dtype, hidden size). The first call of a variant in any process "compiles" it: sleeps COMPILE_S,
then waits (at most 60 s) until $LZ_STANDIN_JIT_BARRIER compiles (default 1: itself) have started,
which only happens when that many run at the same time, then writes $LZ_STANDIN_JIT_DIR/<variant>.json
with the pid, the times and whether the barrier was met (the on-disk cache). A call of
$LZ_STANDIN_JIT_FAIL's variant raises instead (a library that cannot run). Until the file exists
the kernel's check says NEEDS_JIT_COMPILE (the JIT gate), so
selection avoids it; its `jit_variant` names the variant for lz.warmup. The module registers its
kernel on import, as a plugin would: lz.warmup's worker processes import it (the kernel's impl
module) and so know the kernel too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.kernel import FLOAT_DTYPES, JitVariant, KernelSpec
from layerzero.reasons import Reason, Rejection

COMPILE_S = 0.3


def cache_dir() -> Path:
    return Path(os.environ["LZ_STANDIN_JIT_DIR"])


def variant(dtype: torch.dtype, hidden: int) -> str:
    return f"rms_{str(dtype).removeprefix('torch.')}_{hidden}"


def built(name: str) -> dict | None:
    path = cache_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _compile(name: str) -> None:
    start = time.time()
    (cache_dir() / f"{name}.started").write_text(str(os.getpid()))
    time.sleep(COMPILE_S)  # the "compiler"
    needed = int(os.environ.get("LZ_STANDIN_JIT_BARRIER", "1"))
    while len(list(cache_dir().glob("*.started"))) < needed and time.time() - start < 60:
        time.sleep(0.05)
    met = len(list(cache_dir().glob("*.started"))) >= needed
    (cache_dir() / f"{name}.json").write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time(),
                                                         "barrier_met": met}))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    name = variant(x.dtype, x.shape[-1])
    if os.environ.get("LZ_STANDIN_JIT_FAIL") == name:
        raise RuntimeError(f"standin: {name} failed to build (ptxas fatal: out of registers)")
    if built(name) is None:
        _compile(name)
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out if weight is None else out * weight.float()).to(x.dtype)


def _gate(ctx: SelectionContext) -> list[Rejection]:
    name = variant(ctx.dtype, ctx.hidden_size)
    if built(name) is None:
        return [Rejection(Reason.NEEDS_JIT_COMPILE, f"{name} is not built")]
    return []


def _jit_variant(ctx: SelectionContext) -> JitVariant | None:
    name = variant(ctx.dtype, ctx.hidden_size)
    return None if built(name) is not None else JitVariant(name, f"standin {name}")


SPEC = KernelSpec(id="standin_jit.rms_norm", ops=("norm.rms",), impl=rms_norm, priority=99,
                  platforms=frozenset({"cpu"}), dtypes=FLOAT_DTYPES, needs_jit=True, check=_gate,
                  jit_variant=_jit_variant, description="STAND-IN: a JIT-built rms_norm")


def register() -> None:
    lz.register_kernel(SPEC)


register()
