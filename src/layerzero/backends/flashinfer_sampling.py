"""FlashInfer's sampling kernels (flashinfer.sampling, checked against 0.7.2).

Rejection sampling on the GPU without a sort. Every call passes our `generator` through:
FlashInfer reads the Philox seed and offset from a CUDA generator's state (the default CUDA
generator when None) and advances it, so the same seed gives the same draws. Reading that state
is a host operation, hence graph_safe=False. Temperature, rows without a finite logit and
temperature-0 rows are handled around the kernels exactly as in the torch kernels
(backends/reference.py: tempered, finish_draws).

Argument mapping (0.7.2 signatures): the kernels take float32 logits/probs (B, V) and return
int32 (B,); top_k is an int or an int32 (B,) tensor (our "off" values <= 0 become V), top_p and
min_p a float or a float32 (B,) tensor; min_p keeps p >= min_p * max(p) as ours does; top-k with
top-p runs `filter_apply_order="top_k_first"` (top-p on the renormalised top-k distribution).

These kernels belong to backend "flashinfer": backends/flashinfer.py adds `SAMPLING_KERNELS` to
its Backend, so this module declares none of its own.
"""

from __future__ import annotations

import torch

from ..errors import BackendNotAvailableError
from ..kernel import FLOAT_DTYPES, KernelSpec
from . import reference as ref

Param = torch.Tensor | float | int | None


def _top_k(top_k: torch.Tensor | int, vocab: int) -> torch.Tensor | int:
    if isinstance(top_k, torch.Tensor):
        return torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).to(torch.int32)
    return min(top_k, vocab)


def _float(p: torch.Tensor | float) -> torch.Tensor | float:
    return p.to(torch.float32) if isinstance(p, torch.Tensor) else float(p)


def _run(kind: str):
    def run(
        logits: torch.Tensor,
        top_k: Param,
        top_p: Param,
        min_p: Param,
        temperature: torch.Tensor | float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        try:
            import flashinfer.sampling as fs
        except Exception as e:  # a broken install must raise a LayerZero error, never crash
            raise BackendNotAvailableError(f"flashinfer failed to import: {type(e).__name__}: {e}") from e
        x, best, valid = ref.tempered(logits, temperature, torch.float32)
        if kind == "plain":
            out = fs.sampling_from_logits(x, generator=generator)
        elif kind == "topk_topp":
            out = fs.top_k_top_p_sampling_from_logits(
                x,
                _top_k(top_k, x.shape[-1]),
                _float(top_p),  # type: ignore[arg-type]
                filter_apply_order="top_k_first",
                generator=generator,
            )
        else:
            probs = torch.softmax(x, -1)
            if kind == "topk":
                out = fs.top_k_sampling_from_probs(probs, _top_k(top_k, x.shape[-1]), generator=generator)  # type: ignore[arg-type]
            elif kind == "topp":
                out = fs.top_p_sampling_from_probs(probs, _float(top_p), generator=generator)  # type: ignore[arg-type]
            else:
                out = fs.min_p_sampling_from_probs(probs, _float(min_p), generator=generator)  # type: ignore[arg-type]
        return ref.finish_draws(out, best, valid, temperature)

    run.__qualname__ = f"flashinfer_{kind}_sampling"
    return run


def _spec(name: str, kind: str, description: str) -> KernelSpec:
    return KernelSpec(
        id=f"flashinfer.{name}",
        ops=(f"sampling.{kind}",),
        impl=_run(kind),
        priority=80,
        platforms=frozenset({"cuda"}),
        min_sm=75,
        dtypes=FLOAT_DTYPES,
        graph_safe=False,
        description=description,
    )


SAMPLING_KERNELS = (
    _spec("sampling_from_logits", "plain", "flashinfer.sampling.sampling_from_logits"),
    _spec("top_k_sampling", "topk", "flashinfer.sampling.top_k_sampling_from_probs (rejection sampling)"),
    _spec("top_p_sampling", "topp", "flashinfer.sampling.top_p_sampling_from_probs (rejection sampling)"),
    _spec("min_p_sampling", "minp", "flashinfer.sampling.min_p_sampling_from_probs"),
    _spec("top_k_top_p_sampling", "topk_topp", "flashinfer.sampling.top_k_top_p_sampling_from_logits, top-k first"),
)
