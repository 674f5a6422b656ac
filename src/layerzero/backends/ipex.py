"""Intel Extension for PyTorch (intel_extension_for_pytorch, "IPEX") on CPU: rms_norm, layer_norm,
RoPE (both forms) and varlen attention through `ipex.llm.functional`.

NOT RUN HERE: IPEX pins torch's major.minor and this project runs torch 2.13, for which no IPEX
exists; tests/test_ipex_mapping.py checks the mapping against a stand-in. What we rely on, read
from IPEX 2.x's sources (intel_extension_for_pytorch/llm/functional/fusions.py and
transformers/models/cpu/fusions/mha_fusion.py):

- `import intel_extension_for_pytorch` calls exit(127) when its major.minor differs from torch's,
  and sys.exit when the CPU lacks AVX2 (`_cpu_isa.check_minimal_isa_support`). So availability
  compares the two versions without importing, and every kernel requires avx2. No CPU vendor is
  required: the check is AVX2, not Intel.
- rms_norm(hidden_states, weight, eps) -> torch_ipex.rmsnorm: a weight is needed (we pass it in
  x's dtype, as IPEX's LLM modules hold it).
- fast_layer_norm(x, normalized_shape, weight, bias, eps) is F.layer_norm itself on CPU: declared
  for completeness, ranked below torch.layer_norm so it never wins by default.
- rotary_embedding(query, key, sin, cos, rotary_dim, rotary_half, position_ids): query/key BSHD
  (B, S, H, D); sin/cos (tokens, D) with equal halves or (tokens, D/2) (only the first half is
  read); it asserts sin's last dim is D or D/2, so only full rotary (R == D) maps. rotary_half
  True is NeoX pairing (i, i + R/2), False GPT-J pairing (2i, 2i + 1). Without position_ids row s
  of sin/cos serves every batch; with (B, S) or (1, S) position_ids row position_ids[b, s]. It
  writes the result INTO query and key (we hand it fresh copies) and needs a key (a one-head
  scratch stands in for single-tensor rope). Math in float32 (sin/cos cast to float32).
- varlen_attention(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  pdropout, softmax_scale, zero_tensors, is_causal, return_softmax, gen_): packed (T, H, D), GQA
  by repeating k/v heads, result written into `out`. On CPU it pads to (B, max_seqlen) and runs
  torch SDPA without passing softmax_scale, with torch's top-left causal mask: we fold our scale
  into q (so the default 1/sqrt(D) gives it, whether or not IPEX applies softmax_scale), and a
  causal call whose query and key lengths differ for some sequence (where top-left and our
  bottom-right alignment differ) is computed by the reference instead, as is one with an empty
  key sequence (IPEX's all -inf mask row would give NaN where we promise zeros).

Priorities are below torch's kernels (none of them measured: IPEX cannot be installed here);
`lz.tune` on a machine with IPEX measures them and PerfDB decides from then on.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch

from ..context import SelectionContext
from ..kernel import Backend, KernelSpec, _version_tuple
from ..reasons import Reason, Rejection
from . import reference

_DTYPES = frozenset({torch.float32, torch.bfloat16})
_ROPE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})  # fp16 has a scalar path
_AVX2 = frozenset({"avx2"})


def _functional() -> Any:
    import intel_extension_for_pytorch as ipex

    return ipex.llm.functional


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    assert weight is not None  # the spec's check keeps weight-less calls away
    return _functional().rms_norm(x, weight.to(x.dtype), eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _functional().fast_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, rotary_half: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, S, _, D = q.shape
    # One sin/cos row per (batch or 1) x position, addressed through position_ids.
    rows = cos.shape[0] * S
    positions = torch.arange(rows, dtype=torch.long, device=q.device).view(cos.shape[0], S)
    qw = q.clone(memory_format=torch.contiguous_format)  # IPEX writes into query and key
    kw = q.new_zeros(B, S, 1, D) if k is None else k.clone(memory_format=torch.contiguous_format)
    _functional().rotary_embedding(
        qw, kw, sin.reshape(rows, D).float(), cos.reshape(rows, D).float(), D, rotary_half, positions
    )
    return qw, None if k is None else kw


def rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _rope(q, k, cos, sin, True)


def rope_interleaved(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _rope(q, k, cos, sin, False)


def varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float | None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens (B + 1,) int32 on the CPU."""
    lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    if (is_causal and not torch.equal(cu_seqlens_q, cu_seqlens_k)) or bool((lens_k == 0).any()):
        return reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, window, softcap
        )
    d = q.shape[-1]
    if scale is not None:
        q = q * (scale * math.sqrt(d))
    out = torch.empty_like(q)
    _functional().varlen_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        0.0,
        1.0 / math.sqrt(d),
        False,
        is_causal,
        False,
        None,
    )
    return out


def _needs_weight(ctx: SelectionContext) -> list[Rejection]:
    if not ctx.has_weight:
        return [Rejection(Reason.CUSTOM_CHECK_FAILED, "ipex rms_norm needs a weight")]
    return []


def _full_rotary(ctx: SelectionContext) -> list[Rejection]:
    if ctx.hidden_size != ctx.head_dim:
        return [
            Rejection(
                Reason.CUSTOM_CHECK_FAILED,
                f"rotary dim {ctx.hidden_size} != head_dim {ctx.head_dim}: ipex rotary_embedding is full-rotary only",
            )
        ]
    return []


class _IpexBackend(Backend):
    """Backend whose availability also requires IPEX's major.minor to equal torch's (IPEX exits the
    process on import otherwise, so a mismatch must be caught before any import)."""

    @cached_property
    def availability(self) -> tuple[bool, str | None, Rejection | None]:
        ok, version, why = Backend.availability.func(self)  # type: ignore[attr-defined]
        if not ok or version is None:
            return ok, version, why
        if _version_tuple(version)[:2] != _version_tuple(torch.__version__)[:2]:
            return (
                False,
                version,
                Rejection(
                    Reason.BACKEND_VERSION_UNSUPPORTED,
                    f"ipex {version} needs torch {'.'.join(version.split('.')[:2])}.*, torch is {torch.__version__}",
                ),
            )
        return True, version, None


def _spec(name: str, ops: tuple[str, ...], impl: Any, priority: int, description: str, **kw: Any) -> KernelSpec:
    return KernelSpec(
        id=f"ipex.{name}",
        ops=ops,
        impl=impl,
        priority=priority,
        platforms=frozenset({"cpu"}),
        cpu_isa=_AVX2,
        dtypes=kw.pop("dtypes", _DTYPES),
        requires_contiguous=kw.pop("requires_contiguous", True),
        description=description,
        **kw,
    )


BACKEND = _IpexBackend(
    name="ipex",
    module="intel_extension_for_pytorch",
    distribution="intel_extension_for_pytorch",
    aliases=("intel_extension_for_pytorch",),
    description="Intel Extension for PyTorch CPU kernels (ipex.llm.functional); stand-in tested only",
    probes=(("ipex.rms_norm", "rms_norm"), ("ipex.rope", "rope"), ("ipex.varlen", "varlen")),
    kernels=(
        _spec(
            "rms_norm",
            ("norm.rms",),
            rms_norm,
            45,
            "ipex.llm.functional.rms_norm (torch_ipex.rmsnorm)",
            check=_needs_weight,
        ),
        _spec(
            "layer_norm", ("norm.layer",), layer_norm, 40, "ipex.llm.functional.fast_layer_norm (F.layer_norm on CPU)"
        ),
        _spec(
            "rope",
            ("posenc.rope",),
            rope,
            45,
            "ipex.llm.functional.rotary_embedding, rotary_half=True",
            layout="BSHD",
            check=_full_rotary,
            dtypes=_ROPE_DTYPES,
            requires_contiguous=False,
        ),
        _spec(
            "rope_interleaved",
            ("posenc.rope_interleaved",),
            rope_interleaved,
            45,
            "ipex.llm.functional.rotary_embedding, rotary_half=False",
            layout="BSHD",
            check=_full_rotary,
            dtypes=_ROPE_DTYPES,
            requires_contiguous=False,
        ),
        _spec(
            "varlen",
            ("attention.varlen",),
            varlen,
            45,
            "ipex.llm.functional.varlen_attention (padded torch SDPA on CPU)",
            causal_non_square=False,
        ),
    ),
)
