"""The `torch` backend: torch's own kernels. The four SDPA sub-backends, each pinned with
`sdpa_kernel` (or called through its aten entry point, KernelSpec.prepare); the fused norms; RoPE,
activations and the gated MLP in plain torch ops.

Constraints follow torch's dispatcher checks (aten/src/ATen/native/transformers/sdp_utils*):
flash needs SM 8.0-12.1, fp16/bf16, head_dim <= 256, no mask, and a square causal mask;
memory-efficient takes masks and fp32 with head_dim a multiple of 8 but no GQA (seen on the H100 with
torch 2.11: "both fused kernels require query, key and value to have the same num_heads"); cuDNN
needs SM >= 8.0, fp16/bf16, head_dim <= 128 (multiple of 8), and takes GQA through `enable_gqa`
from torch 2.8 on (pytorch#149976; on the H100 with torch 2.11 it ran serve's 32 x 512 GQA 32/8 D64
causal prefill in 129 us against FlashInfer's 180 us); math runs everything. The GPU test suite checks
these declarations against `torch.backends.cuda.can_use_*` on the H100.

RoPE is computed in float32 (half-precision products and differences would cancel badly);
activations use torch's own kernels. The `*_compiled` activation variants fuse the same math with
`torch.compile(dynamic=True)`: one compilation serves every shape; they are CUDA-only and get a low
priority until measurements say otherwise. A compiled RoPE was removed: on the H100 (2026-11-25)
one compiled function serving both RoPE forms and three dtypes hit dynamo's recompile limit of 8.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..context import SelectionContext
from ..kernel import ALL_FLOAT_DTYPES, FLOAT_DTYPES, HALF_DTYPES, Backend, KernelSpec
from ..reasons import Reason, Rejection
from .reference import alibi_bias, band_mask, gated_act

ATTENTION_OPS = ("attention.causal", "attention.full", "attention.masked", "attention.sliding_window")
_ANY_MASK = frozenset({"none", "bool", "float"})
_CPU_CUDA = frozenset({"cpu", "cuda"})

# Pinning a sub-backend sets process-wide flags; the lock keeps two threads from pinning different
# sub-backends at once (it guards the Python dispatch only: the GPU work is asynchronous).
_PIN_LOCK = threading.Lock()

# cuDNN attention honours enable_gqa from torch 2.8 (earlier it needed equal head counts).
_CUDNN_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


class _Pin:
    """What `sdpa_kernel(backend)` does, without its context-manager machinery: on CPU that costs
    24 us per call against 2.6 us for setting and restoring the five flags directly (measured
    2026-11-25, torch 2.13). Falls back to `sdpa_kernel` when torch lacks the flag functions."""

    def __init__(self, backend_name: str) -> None:
        from torch.nn.attention import SDPBackend, _backend_names

        self.backend = getattr(SDPBackend, backend_name)
        names = list(_backend_names)
        self.setters = [getattr(torch._C, f"_set_sdp_use_{n}", None) for n in names]
        self.getters = [getattr(torch._C, f"_get_{n}_sdp_enabled", None) for n in names]
        self.wanted = [_backend_names[n] == backend_name for n in names]
        self.direct = all(self.setters) and all(self.getters)

    def __call__(self, fn: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
        with _PIN_LOCK:
            if not self.direct:
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(self.backend):
                    return fn(*args, **kwargs)
            previous = [get() for get in self.getters]  # type: ignore[misc]
            try:
                for set_flag, on in zip(self.setters, self.wanted, strict=True):
                    set_flag(on)  # type: ignore[misc]
                return fn(*args, **kwargs)
            finally:
                for set_flag, on in zip(self.setters, previous, strict=True):
                    set_flag(on)  # type: ignore[misc]


def _sdpa(backend_name: str) -> Callable[..., torch.Tensor]:
    """The kernel's impl (BHSD), for calls without a prepared plan (lz.solve's modules, fallbacks,
    masked calls): what the prepared call would run when the call allows it, else F.sdpa pinned to
    the sub-backend, which prepares masks, windows, ALiBi and odd head dims itself."""
    fused = backend_name != "MATH"
    pins: list[_Pin] = []  # built on first call: torch.nn.attention is imported lazily
    # per device type: the prepared BHSD calls indexed [causal][compute logsumexp], or None (no aten op)
    direct: dict[str, Any] = {}

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float | None,
        window: tuple[int, int] | None = None,
        softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if is_causal and q.shape[2] == 1:
            is_causal = False  # one query row, bottom-right aligned, sees every key: no mask at all
        if (
            fused
            and attn_mask is None
            and window is None
            and alibi_slopes is None
            and not (is_causal and q.shape[2] != k.shape[2])
            and not q.shape[-1] % 8
            and not v.shape[-1] % 8
        ):
            device_type = q.device.type
            calls = direct.get(device_type, False)
            if calls is False:
                calls = direct[device_type] = _direct_calls(backend_name, device_type)
            if calls is not None:  # compute_log_sumexp as F.sdpa sets it: when an input needs grad
                lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
                return calls[bool(is_causal)][lse](q, k, v, None, False, dropout_p, scale)
        if window is not None or alibi_slopes is not None or (is_causal and q.shape[2] != k.shape[2]):
            # torch's is_causal is aligned top-left, ours bottom-right; windows and ALiBi become a
            # materialized mask (only kernels that take masks declare support for them).
            attn_mask = _materialize_mask(q, k, attn_mask, is_causal, window, alibi_slopes)
            is_causal = False
        if fused and (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
            # torch's fused kernels refuse a last dimension with stride != 1 ("No available kernel");
            # the plan key has no strides, so the copy is decided here, per call.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if not pins:
            pins.append(_Pin(backend_name))
        return pins[0](
            F.scaled_dot_product_attention,
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    run.__qualname__ = f"sdpa_{backend_name.lower()}"
    return run


# torch's own entry points of the fused SDPA kernels: what F.scaled_dot_product_attention calls after
# choosing a backend. Called directly, a pinned kernel skips both that choice (validation and the
# can_use_* checks of every backend, each call) and the flag pinning above. Each returns a tuple
# whose first element is the output (B, Hq, Sq, D); GQA is native (k/v with fewer heads).
_ATEN_SDPA = {
    ("FLASH_ATTENTION", "cuda"): "_scaled_dot_product_flash_attention",
    ("CUDNN_ATTENTION", "cuda"): "_scaled_dot_product_cudnn_attention",
    ("EFFICIENT_ATTENTION", "cuda"): "_scaled_dot_product_efficient_attention",
    ("FLASH_ATTENTION", "cpu"): "_scaled_dot_product_flash_attention_for_cpu",
}


def _prepare_sdpa(backend_name: str) -> Callable[[SelectionContext], Callable[..., torch.Tensor] | None]:
    """KernelSpec.prepare of a fused SDPA sub-backend: its aten entry point with the flags of this
    context bound, and the BSHD<->BHSD transposes inline. None (the pinned F.sdpa path) for what
    F.sdpa prepares itself: masks, windows, ALiBi, a causal mask that is not square (bottom-right),
    head dims it pads (not a multiple of 8)."""

    def prepare(ctx: SelectionContext) -> Callable[..., torch.Tensor] | None:
        op = getattr(torch, _ATEN_SDPA.get((backend_name, ctx.device_type), ""), None)
        causal = ctx.is_causal and ctx.seq_len_q > 1  # one query row, bottom-right aligned: no mask
        if (
            op is None
            or ctx.mask_kind != "none"
            or ctx.window is not None
            or ctx.alibi
            or (causal and ctx.seq_len_q != ctx.seq_len_k)
            or ctx.head_dim % 8
            or ctx.head_dim_v % 8
            or ctx.layout not in ("BSHD", "BHSD")
        ):
            return None
        return _aten_sdpa(op, backend_name, ctx.device_type, causal, ctx.requires_grad, ctx.layout == "BSHD")

    return prepare


def _aten_sdpa(
    op: Callable[..., tuple[torch.Tensor, ...]],
    backend_name: str,
    device_type: str,
    causal: bool,
    lse: bool,
    bshd: bool,
) -> Callable[..., torch.Tensor]:
    """The prepared call of one fused SDPA kernel (see _prepare_sdpa): one frame between `lz.attention`
    and the aten op, which is why each kernel's argument list is written out in its own closure.

    A last dimension with stride != 1 is copied. The CUDA kernels refuse one (torch 2.11 on the H200:
    flash "Input tensor must have contiguous last dimension", cuDNN "The stride for the last dimension
    ... should be 1", efficient "last dimension must be contiguous"), so they retry on that error and
    the common call checks nothing; the CPU flash kernel reads it silently wrong (torch 2.13), so its
    call checks the strides first.
    """
    if device_type == "cpu":

        def run(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: torch.Tensor | None,
            is_causal: bool,
            dropout_p: float,
            scale: float | None,
            window: tuple[int, int] | None = None,
            softcap: float = 0.0,
            alibi_slopes: torch.Tensor | None = None,
        ) -> torch.Tensor:
            if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            if bshd:
                return op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, scale=scale)[
                    0
                ].transpose(1, 2)
            return op(q, k, v, dropout_p, causal, scale=scale)[0]
    elif backend_name == "FLASH_ATTENTION":

        def run(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: torch.Tensor | None,
            is_causal: bool,
            dropout_p: float,
            scale: float | None,
            window: tuple[int, int] | None = None,
            softcap: float = 0.0,
            alibi_slopes: torch.Tensor | None = None,
        ) -> torch.Tensor:
            try:
                if bshd:
                    return op(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, False, scale=scale
                    )[0].transpose(1, 2)
                return op(q, k, v, dropout_p, causal, False, scale=scale)[0]
            except RuntimeError as error:
                return _strided_retry(run, error, q, k, v, dropout_p, scale)
    elif backend_name == "CUDNN_ATTENTION":

        def run(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: torch.Tensor | None,
            is_causal: bool,
            dropout_p: float,
            scale: float | None,
            window: tuple[int, int] | None = None,
            softcap: float = 0.0,
            alibi_slopes: torch.Tensor | None = None,
        ) -> torch.Tensor:
            try:
                if bshd:
                    return op(
                        q.transpose(1, 2),
                        k.transpose(1, 2),
                        v.transpose(1, 2),
                        None,
                        lse,
                        dropout_p,
                        causal,
                        False,
                        scale=scale,
                    )[0].transpose(1, 2)
                return op(q, k, v, None, lse, dropout_p, causal, False, scale=scale)[0]
            except RuntimeError as error:
                return _strided_retry(run, error, q, k, v, dropout_p, scale)
    else:

        def run(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: torch.Tensor | None,
            is_causal: bool,
            dropout_p: float,
            scale: float | None,
            window: tuple[int, int] | None = None,
            softcap: float = 0.0,
            alibi_slopes: torch.Tensor | None = None,
        ) -> torch.Tensor:
            try:
                if bshd:
                    return op(
                        q.transpose(1, 2),
                        k.transpose(1, 2),
                        v.transpose(1, 2),
                        None,
                        lse,
                        dropout_p,
                        causal,
                        scale=scale,
                    )[0].transpose(1, 2)
                return op(q, k, v, None, lse, dropout_p, causal, scale=scale)[0]
            except RuntimeError as error:
                return _strided_retry(run, error, q, k, v, dropout_p, scale)

    run.__qualname__ = f"aten_sdpa_{backend_name.lower()}_{'bshd' if bshd else 'bhsd'}"
    return run


def _direct_calls(backend_name: str, device_type: str) -> tuple[tuple[Callable[..., torch.Tensor], ...], ...] | None:
    """The four prepared BHSD calls of a fused kernel on `device_type`, [causal][logsumexp]; None
    where torch has no aten entry point for it."""
    op = getattr(torch, _ATEN_SDPA.get((backend_name, device_type), ""), None)
    if op is None:
        return None
    return tuple(
        tuple(_aten_sdpa(op, backend_name, device_type, causal, lse, False) for lse in (False, True))
        for causal in (False, True)
    )


def _strided_retry(
    run: Callable[..., torch.Tensor],
    error: RuntimeError,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    scale: float | None,
) -> torch.Tensor:
    """A CUDA fused kernel refused a last dimension with stride != 1: run on contiguous copies. Any
    other error is the kernel's (the plan's recover falls back)."""
    if q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1:
        raise error
    return run(q.contiguous(), k.contiguous(), v.contiguous(), None, False, dropout_p, scale)


def _sdpa_upcast(backend_name: str) -> Callable[..., torch.Tensor]:
    """The sub-backend run in float32 on half inputs, the output cast back: for CPUs whose half
    math is emulated (see FP16_UPCAST_MIN_SEQ_Q)."""
    inner = _sdpa(backend_name)

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float | None,
        window: tuple[int, int] | None = None,
        softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()
        return inner(
            q.float(), k.float(), v.float(), attn_mask, is_causal, dropout_p, scale, window, softcap, alibi_slopes
        ).to(q.dtype)

    run.__qualname__ = f"sdpa_{backend_name.lower()}_fp32"
    return run


def _materialize_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    window: tuple[int, int] | None,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    sq, sk = q.shape[2], k.shape[2]
    keep = band_mask(sq, sk, is_causal, window, q.device)
    if alibi_slopes is None and (attn_mask is None or attn_mask.dtype == torch.bool):
        assert keep is not None or attn_mask is not None
        return keep if attn_mask is None else (attn_mask if keep is None else attn_mask & keep)
    bias = (
        torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
        if alibi_slopes is None
        else alibi_bias(alibi_slopes, sq, sk).to(q.dtype)
    )
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # torch.rms_norm, not F.rms_norm: the same op (F's wrapper only re-checks __torch_function__, which
    # the C binding checks too) without a Python frame: 48-60 us less per eager 22-layer decode step
    # on the H100 host (44 calls; benchmarks/solve_overhead.py, 2026-11-26)
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)  # the C op (F.layer_norm adds a frame)


def _prepare_rms_norm(ctx: SelectionContext) -> Callable[..., torch.Tensor]:
    """rms_norm with this context's normalized shape bound (the plan key holds x's shape)."""
    shape, op = (ctx.hidden_size,), torch.rms_norm
    return lambda x, weight, eps: op(x, shape, weight, eps)


def _prepare_layer_norm(ctx: SelectionContext) -> Callable[..., torch.Tensor]:
    shape, op = (ctx.hidden_size,), torch.layer_norm
    return lambda x, weight, bias, eps: op(x, shape, weight, bias, eps)


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return F.group_norm(x, num_groups, weight, bias, eps)


# ----------------------------------------------------------------------------- RoPE, activations, MLP


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(B, S, H, D) x; cos/sin (1 or B, S, R): rotate the first R dims, computing in float32 (or 64)."""
    half = cos.shape[-1] // 2
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos[..., :half].to(ct)[:, :, None, :]
    s = sin[..., :half].to(ct)[:, :, None, :]
    first, second = (
        (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half), slice(half, 2 * half))
    )
    x1, x2 = x[..., first].to(ct), x[..., second].to(ct)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x2 * c + x1 * s
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


def rope(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate(q, cos, sin, False), None if k is None else rotate(k, cos, sin, False)


def rope_interleaved(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rotate(q, cos, sin, True), None if k is None else rotate(k, cos, sin, True)


@functools.cache
def _compiled(name: str) -> Callable[..., torch.Tensor]:
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "swiglu": lambda g, u: (F.silu(g.float()) * u.float()).to(g.dtype),
        "geglu": lambda g, u, approximate: (F.gelu(g.float(), approximate=approximate) * u.float()).to(g.dtype),
    }
    return torch.compile(fns[name], dynamic=True, fullgraph=True)


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def swiglu_compiled(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _compiled("swiglu")(gate, up)


def geglu_compiled(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _compiled("geglu")(gate, up, approximate)


def fused_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str
) -> torch.Tensor:
    """Two cuBLAS/oneDNN GEMMs, torch's activation, the down GEMM."""
    return F.linear(gated_act(activation)(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


_MLP_OPS = ("mlp.swiglu", "mlp.geglu", "mlp.geglu_tanh")
_CUDA_ONLY = {"platforms": frozenset({"cuda"}), "dtypes": FLOAT_DTYPES, "needs_jit": True}

# CPU priorities by ISA, from benchmarks/results/cpu_isa-cpu.md (AMD EPYC, AVX2 without
# avx512_bf16/avx512_fp16/AMX, torch 2.13, 2026-11-25, a shared and noisy VM): flash_cpu beat math in
# float32 and bfloat16 at every shape, and bfloat16 flash_cpu was no slower than the same kernel on
# float32 copies, so those defaults stay. float16 without avx512_fp16 / amx_fp16 (emulated): three
# interleaved sweeps had flash_cpu on float32 copies ahead in 10 of 11 prefill cases (1.1-6x), the
# final benchmark run (under heavier load) had native flash_cpu ahead in 3 of 4. Not clear enough to
# change the default: `sdpa_flash_cpu_fp32` ranks just below flash_cpu (55) and lower still (40) on
# CPUs with native fp16 math; `lz.tune` measures both and PerfDB decides per machine.
FP16_UPCAST_MIN_SEQ_Q = 32
_NATIVE_FP16 = (("avx512_fp16", 40), ("amx_fp16", 40))


def _prefill_only(ctx: SelectionContext) -> list[Rejection]:
    if ctx.seq_len_q < FP16_UPCAST_MIN_SEQ_Q:
        return [
            Rejection(
                Reason.SEQ_LEN_TOO_SHORT,
                f"seq_len_q {ctx.seq_len_q} < {FP16_UPCAST_MIN_SEQ_Q}: "
                "for decode the float32 copy of K/V costs more than emulated fp16 math",
            )
        ]
    return []


def _cudnn_shapes(ctx: SelectionContext) -> list[Rejection]:
    """A shape torch's cuDNN SDPA gate refuses (sdp_utils.cpp check_cudnn_tensor_shapes, torch 2.5-2.11;
    its other refusal, dropout with one query row, is covered by the spec's lack of dropout): with only
    CUDNN_ATTENTION enabled the call would raise "No available kernel"."""
    if ctx.seq_len_k == 1:
        return [Rejection(Reason.SEQ_LEN_TOO_SHORT, "cuDNN SDPA does not take a key/value length of 1")]
    return []


def _has_rms_norm(ctx: SelectionContext) -> list[Rejection]:
    """torch.rms_norm exists from torch 2.4 (pyproject allows 2.3): refused there, not tried and failed."""
    if not hasattr(torch, "rms_norm"):
        return [
            Rejection(Reason.BACKEND_VERSION_UNSUPPORTED, f"torch.rms_norm needs torch >= 2.4, not {torch.__version__}")
        ]
    return []


BACKEND = Backend(
    name="torch",
    aliases=("torch_sdpa", "pytorch", "sdpa"),
    groups=(("torch_sdpa", "torch.sdpa_*"), ("sdpa", "torch.sdpa_*")),  # as policy targets: the SDPA kernels only
    description="torch: SDPA sub-backends, fused norms, RoPE in plain ops, F.silu/F.gelu activations, "
    "torch.compile'd fused variants",
    kernels=(
        KernelSpec(
            id="torch.sdpa_flash",
            ops=ATTENTION_OPS,
            impl=_sdpa("FLASH_ATTENTION"),
            prepare=_prepare_sdpa("FLASH_ATTENTION"),
            priority=80,
            platforms=frozenset({"cuda"}),
            min_sm=80,
            max_sm=121,
            dtypes=HALF_DTYPES,
            max_head_dim=256,
            causal_non_square=False,
            supports_dropout=True,
            supports_backward=True,
            deterministic=False,
            description="FlashAttention-2 inside torch (SDPBackend.FLASH_ATTENTION)",
        ),
        KernelSpec(
            id="torch.sdpa_flash_cpu",
            ops=ATTENTION_OPS,
            impl=_sdpa("FLASH_ATTENTION"),
            prepare=_prepare_sdpa("FLASH_ATTENTION"),
            priority=60,
            platforms=frozenset({"cpu"}),
            dtypes=ALL_FLOAT_DTYPES,
            mask_kinds=_ANY_MASK,
            supports_backward=True,
            supports_window=True,
            supports_alibi=True,
            description="torch's CPU flash-attention kernel (SDPBackend.FLASH_ATTENTION on CPU)",
        ),
        KernelSpec(
            id="torch.sdpa_flash_cpu_fp32",
            ops=ATTENTION_OPS,
            impl=_sdpa_upcast("FLASH_ATTENTION"),
            priority=55,
            isa_priorities=_NATIVE_FP16,
            platforms=frozenset({"cpu"}),
            dtypes=frozenset({torch.float16}),
            mask_kinds=_ANY_MASK,
            supports_window=True,
            supports_alibi=True,
            check=_prefill_only,
            description="torch's CPU flash-attention kernel on float32 copies of float16 inputs",
        ),
        KernelSpec(
            id="torch.sdpa_efficient",
            ops=ATTENTION_OPS,
            impl=_sdpa("EFFICIENT_ATTENTION"),
            prepare=_prepare_sdpa("EFFICIENT_ATTENTION"),
            priority=60,
            platforms=frozenset({"cuda"}),
            min_sm=50,
            max_sm=121,
            dtypes=FLOAT_DTYPES,
            head_dim_multiple=8,
            supports_gqa=False,
            mask_kinds=_ANY_MASK,
            supports_dropout=True,
            supports_backward=True,
            deterministic=False,
            supports_window=True,
            supports_alibi=True,
            description="xFormers-derived memory-efficient kernel (SDPBackend.EFFICIENT_ATTENTION)",
        ),
        KernelSpec(
            # 89 (87 after the BSHD->BHSD transform penalty) > flashinfer.prefill (86): on the H100
            # (benchmarks/results/attention-h100.md, regret-h100.md) it was the fastest MHA prefill (D64
            # causal and not, 1.01-1.29x) and GQA prefill at 512 tokens (1.07-1.34x over FlashInfer);
            # FlashInfer led GQA D128 prefill at 1k x 8 and 8k tokens by 5-7 %. Decode 82 (80) > torch.sdpa_flash
            # (80 -> 78): GQA D128 decode at 1k-32k context was 1.00-1.20x faster than torch flash.
            id="torch.sdpa_cudnn",
            ops=ATTENTION_OPS,
            impl=_sdpa("CUDNN_ATTENTION"),
            prepare=_prepare_sdpa("CUDNN_ATTENTION"),
            priority=89,
            decode_priority=82,
            platforms=frozenset({"cuda"}),
            min_sm=80,
            dtypes=HALF_DTYPES,
            max_head_dim=128,
            head_dim_multiple=8,
            supports_gqa=_CUDNN_GQA,
            causal_non_square=False,
            supports_backward=True,
            deterministic=False,
            check=_cudnn_shapes,
            description="cuDNN fused attention (SDPBackend.CUDNN_ATTENTION)",
        ),
        KernelSpec(
            id="torch.sdpa_math",
            ops=ATTENTION_OPS,
            impl=_sdpa("MATH"),
            priority=20,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            mask_kinds=_ANY_MASK,
            supports_dropout=True,
            supports_backward=True,
            supports_window=True,
            supports_alibi=True,
            same_head_dim_v=False,
            description="unfused matmul-softmax-matmul (SDPBackend.MATH)",
        ),
        KernelSpec(
            id="torch.rms_norm",
            ops=("norm.rms",),
            impl=rms_norm,
            prepare=_prepare_rms_norm,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            check=_has_rms_norm,
            description="torch.rms_norm",
        ),
        KernelSpec(
            id="torch.layer_norm",
            ops=("norm.layer",),
            impl=layer_norm,
            prepare=_prepare_layer_norm,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="torch.nn.functional.layer_norm",
        ),
        KernelSpec(
            id="torch.group_norm",
            ops=("norm.group",),
            impl=group_norm,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="torch.nn.functional.group_norm",
        ),
        KernelSpec(
            id="torch.rope",
            ops=("posenc.rope",),
            impl=rope,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            layout="BSHD",
            supports_backward=True,
            description="RoPE (half rotation) in float32 torch ops",
        ),
        KernelSpec(
            id="torch.rope_interleaved",
            ops=("posenc.rope_interleaved",),
            impl=rope_interleaved,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            layout="BSHD",
            supports_backward=True,
            description="RoPE (GPT-J interleaved pairs) in float32 torch ops",
        ),
        KernelSpec(
            id="torch.silu",
            ops=("activation.silu",),
            impl=silu,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="torch.nn.functional.silu",
        ),
        KernelSpec(
            id="torch.gelu",
            ops=("activation.gelu", "activation.gelu_tanh"),
            impl=gelu,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="torch.nn.functional.gelu",
        ),
        KernelSpec(
            id="torch.swiglu",
            ops=("activation.swiglu",),
            impl=swiglu,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="F.silu(gate) * up (two kernels)",
        ),
        KernelSpec(
            id="torch.geglu",
            ops=("activation.geglu", "activation.geglu_tanh"),
            impl=geglu,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="F.gelu(gate) * up (two kernels)",
        ),
        KernelSpec(
            id="torch.swiglu_compiled",
            ops=("activation.swiglu",),
            impl=swiglu_compiled,
            priority=30,
            supports_backward=True,
            description="silu(gate) * up, torch.compile(dynamic=True)",
            **_CUDA_ONLY,
        ),  # type: ignore[arg-type]
        KernelSpec(
            id="torch.geglu_compiled",
            ops=("activation.geglu", "activation.geglu_tanh"),
            impl=geglu_compiled,
            priority=30,
            supports_backward=True,
            description="gelu(gate) * up, torch.compile(dynamic=True)",
            **_CUDA_ONLY,
        ),  # type: ignore[arg-type]
        KernelSpec(
            id="torch.fused_mlp",
            ops=_MLP_OPS,
            impl=fused_mlp,
            priority=50,
            platforms=_CPU_CUDA,
            dtypes=ALL_FLOAT_DTYPES,
            supports_backward=True,
            description="F.linear x2, torch gate*act, F.linear",
        ),
    ),
)
