"""KernelSpec (what a kernel can run, as data), the one generic constraint check, and Backend."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .context import SelectionContext
from .reasons import Reason, Rejection

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
ALL_FLOAT_DTYPES = FLOAT_DTYPES | {torch.float64}
LAYOUTS = ("BSHD", "BHSD")


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One kernel: its id, the ops it implements, how to call it, and its constraints as data.

    `impl` takes the op's calling convention (see the op module). For attention that is
    `impl(q, k, v, attn_mask, is_causal, dropout_p, scale)` with q/k/v in `layout` and causal
    aligned bottom-right; the plan adds the layout transforms around it.
    """

    id: str  # "backend.kernel"
    ops: tuple[str, ...]
    impl: Callable[..., Any] = field(compare=False, repr=False)
    priority: int = 50
    platforms: frozenset[str] = frozenset({"cuda"})
    min_sm: int = 0
    max_sm: int = 10_000
    generations: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES
    min_head_dim: int = 1
    max_head_dim: int = 1 << 30
    head_dim_multiple: int = 1
    head_dims: frozenset[int] | None = None  # explicit compiled sizes, if the kernel has them
    same_head_dim_v: bool = True
    supports_gqa: bool = True
    mask_kinds: frozenset[str] = frozenset({"none"})
    supports_causal: bool = True
    supports_non_causal: bool = True
    causal_non_square: bool = True
    supports_dropout: bool = False
    supports_window: bool = False
    supports_softcap: bool = False
    supports_alibi: bool = False
    kv_layouts: frozenset[str] = frozenset({"NHD", "HND"})  # paged KV-cache layouts taken
    page_sizes: frozenset[int] | None = None  # None: any page size >= min_page_size
    min_page_size: int = 1
    supports_backward: bool = False
    layout: str = "BHSD"
    requires_contiguous: bool = False
    graph_safe: bool = True
    deterministic: bool = True
    needs_jit: bool = False
    max_hidden_size: int = 1 << 30
    min_seq_len: int = 0  # applies to max(seq_len_q, seq_len_k)
    max_seq_len: int = 1 << 30
    max_batch: int = 1 << 30
    tp_sizes: frozenset[int] | None = None  # tensor-parallel sizes the kernel supports; None: any
    cpu_isa: frozenset[str] = frozenset()  # all of these are required
    check: Callable[[SelectionContext], list[Rejection]] | None = field(default=None, compare=False, repr=False)
    workspace_bytes: Callable[[SelectionContext], int] | None = field(default=None, compare=False, repr=False)
    # (min_rows, priority) pairs: the priority for calls with at least that many rows (norms,
    # activations: ctx.num_rows); the largest threshold reached wins, else `priority`.
    row_priorities: tuple[tuple[int, int], ...] = ()
    # (cpu flag, priority) pairs: on a CPU with that flag (ctx.isa) the first matching pair's
    # priority replaces `priority` (row thresholds still apply on top). Lets a kernel rank by
    # whether, say, bf16/fp16 math is native (avx512_bf16, amx_bf16, avx512_fp16) or emulated.
    isa_priorities: tuple[tuple[str, int], ...] = ()
    # the priority for attention calls with one query row (decode), where the ranking of prefill
    # kernels and decode kernels differs; None: `priority`
    decode_priority: int | None = None
    description: str = ""

    backend: str = field(init=False, compare=False)  # "backend" of "backend.kernel", derived from id

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", self.id.split(".", 1)[0])


def priority_for(spec: KernelSpec, ctx: SelectionContext) -> int:
    """The spec's default priority for this call (decode, CPU-ISA and row-count dependent where the spec says so)."""
    priority = spec.priority
    if spec.decode_priority is not None and ctx.seq_len_q == 1:
        priority = spec.decode_priority
    for flag, value in spec.isa_priorities:
        if flag in ctx.isa:
            priority = value
            break
    if not spec.row_priorities:
        return priority
    for min_rows, value in sorted(spec.row_priorities):
        if ctx.num_rows >= min_rows:
            priority = value
    return priority


def check_constraints(spec: KernelSpec, ctx: SelectionContext, first_only: bool = False) -> list[Rejection]:
    """Every reason why `spec` cannot run `ctx` (empty list: it can).

    first_only: stop at the first reason; explain wants them all.
    """
    reasons = _reasons(spec, ctx)
    if first_only:
        first = next(reasons, None)
        return [] if first is None else [first]
    return list(reasons)


def fits_device(spec: KernelSpec, ctx: SelectionContext) -> bool:
    """The shape-independent part of the constraints (platform, SM, generation, ISA, dtype) holds."""
    return next(_device_reasons(spec, ctx), None) is None


def call_rejection(spec: KernelSpec, ctx: SelectionContext) -> Rejection | None:
    """The first reason why `spec` cannot run `ctx`, for a kernel of ctx.op that fits the device.

    The selection miss path: op and device were checked once per generation (fits_device), so
    only the call's own facts (shapes, flags) and the backend's extra check are left.
    """
    first = next(_call_reasons(spec, ctx), None)
    if first is None and spec.check is not None:
        extra = spec.check(ctx)
        return extra[0] if extra else None
    return first


def _reasons(spec: KernelSpec, ctx: SelectionContext) -> Iterator[Rejection]:
    rejected = False
    if ctx.op not in spec.ops:
        rejected = True
        yield Rejection(Reason.OP_UNSUPPORTED, f"{ctx.op} not in {', '.join(spec.ops)}")
    for reasons in (_device_reasons(spec, ctx), _call_reasons(spec, ctx)):
        for rejection in reasons:
            rejected = True
            yield rejection
    if spec.check is not None and not rejected:  # backend checks assume the generic ones hold
        yield from spec.check(ctx)


def _device_reasons(spec: KernelSpec, ctx: SelectionContext) -> Iterator[Rejection]:
    if ctx.device_type not in spec.platforms:
        yield Rejection(Reason.PLATFORM_MISMATCH,
                        f"device {ctx.device_type}, kernel runs on {'/'.join(sorted(spec.platforms))}")
    if ctx.device_type == "cuda":
        if ctx.sm < spec.min_sm:
            yield Rejection(Reason.SM_TOO_OLD, f"sm {ctx.sm} < min {spec.min_sm}")
        if ctx.sm > spec.max_sm:
            yield Rejection(Reason.SM_TOO_NEW, f"sm {ctx.sm} > max {spec.max_sm}")
        if spec.generations is not None and ctx.generation not in spec.generations:
            yield Rejection(Reason.GPU_GENERATION_UNSUPPORTED, f"{ctx.generation} not in {sorted(spec.generations)}")
    if ctx.device_type == "cpu" and spec.cpu_isa and not spec.cpu_isa <= ctx.isa:
        yield Rejection(Reason.CPU_ISA_UNSUPPORTED, f"needs {sorted(spec.cpu_isa - ctx.isa)}")
    if ctx.dtype not in spec.dtypes:
        names = sorted(str(d).removeprefix("torch.") for d in spec.dtypes)
        yield Rejection(Reason.DTYPE_UNSUPPORTED, f"dtype {ctx.dtype_name} not in {names}")


def _call_reasons(spec: KernelSpec, ctx: SelectionContext) -> Iterator[Rejection]:
    d = ctx.head_dim
    if d:
        if d > spec.max_head_dim:
            yield Rejection(Reason.HEAD_DIM_TOO_LARGE, f"head_dim {d} > max {spec.max_head_dim}")
        if d < spec.min_head_dim:
            yield Rejection(Reason.HEAD_DIM_TOO_SMALL, f"head_dim {d} < min {spec.min_head_dim}")
        if d % spec.head_dim_multiple:
            yield Rejection(Reason.HEAD_DIM_ALIGNMENT, f"head_dim {d} is not a multiple of {spec.head_dim_multiple}")
        if spec.head_dims is not None and d not in spec.head_dims:
            yield Rejection(Reason.HEAD_DIM_UNSUPPORTED, f"head_dim {d} not in {sorted(spec.head_dims)}")
        if spec.same_head_dim_v and ctx.head_dim_v != d:
            yield Rejection(Reason.HEAD_DIM_V_MISMATCH, f"head_dim_v {ctx.head_dim_v} != head_dim {d}")
        if not spec.supports_gqa and ctx.num_kv_heads != ctx.num_heads:
            yield Rejection(Reason.GQA_UNSUPPORTED, f"num_heads {ctx.num_heads} != num_kv_heads {ctx.num_kv_heads}")
        if ctx.is_causal:
            if not spec.supports_causal:
                yield Rejection(Reason.CAUSAL_UNSUPPORTED, "is_causal=True")
            # A single query row with bottom-right causal alignment sees every key: nothing to mask.
            if not spec.causal_non_square and ctx.seq_len_q not in (1, ctx.seq_len_k):
                yield Rejection(Reason.CAUSAL_NON_SQUARE, f"seq_len_q {ctx.seq_len_q} != seq_len_k {ctx.seq_len_k}")
        elif not spec.supports_non_causal:
            yield Rejection(Reason.NON_CAUSAL_UNSUPPORTED, "is_causal=False")
    if ctx.mask_kind not in spec.mask_kinds:
        reason = {"bool": Reason.BOOL_MASK_UNSUPPORTED, "float": Reason.FLOAT_MASK_UNSUPPORTED}.get(
            ctx.mask_kind, Reason.MASK_UNSUPPORTED
        )
        yield Rejection(reason, f"{ctx.mask_kind} attn_mask given")
    if ctx.dropout and not spec.supports_dropout:
        yield Rejection(Reason.DROPOUT_UNSUPPORTED, "dropout_p > 0")
    if ctx.window is not None and not spec.supports_window:
        yield Rejection(Reason.WINDOW_UNSUPPORTED, f"window {ctx.window}")
    if ctx.softcap and not spec.supports_softcap:
        yield Rejection(Reason.SOFTCAP_UNSUPPORTED, f"softcap {ctx.softcap}")
    if ctx.alibi and not spec.supports_alibi:
        yield Rejection(Reason.ALIBI_UNSUPPORTED, "alibi_slopes given")
    if ctx.kv_layout is not None:
        if ctx.kv_layout not in spec.kv_layouts:
            yield Rejection(Reason.KV_LAYOUT_UNSUPPORTED, f"kv_layout {ctx.kv_layout} not in {sorted(spec.kv_layouts)}")
        if ctx.page_size < spec.min_page_size or (spec.page_sizes is not None and ctx.page_size not in spec.page_sizes):
            allowed = sorted(spec.page_sizes) if spec.page_sizes is not None else f">= {spec.min_page_size}"
            yield Rejection(Reason.PAGE_SIZE_UNSUPPORTED, f"page_size {ctx.page_size}, kernel takes {allowed}")
    if ctx.requires_grad and not spec.supports_backward:
        yield Rejection(Reason.BACKWARD_UNSUPPORTED, "an input requires grad")
    if ctx.graph_capture and not spec.graph_safe:
        yield Rejection(Reason.NOT_GRAPH_SAFE, "the current CUDA stream is capturing")
    if ctx.deterministic and not spec.deterministic:
        yield Rejection(Reason.NOT_DETERMINISTIC, "torch.use_deterministic_algorithms(True) is on")
    if ctx.hidden_size > spec.max_hidden_size:
        yield Rejection(Reason.HIDDEN_SIZE_TOO_LARGE, f"hidden size {ctx.hidden_size} > max {spec.max_hidden_size}")
    seq_len = ctx.seq_len_q if ctx.seq_len_q > ctx.seq_len_k else ctx.seq_len_k  # ctx.seq_len, inlined
    if seq_len > spec.max_seq_len:
        yield Rejection(Reason.SEQ_LEN_TOO_LONG, f"seq_len {seq_len} > max {spec.max_seq_len}")
    if d and seq_len < spec.min_seq_len:
        yield Rejection(Reason.SEQ_LEN_TOO_SHORT, f"seq_len {seq_len} < min {spec.min_seq_len}")
    if ctx.batch > spec.max_batch:
        yield Rejection(Reason.BATCH_TOO_LARGE, f"batch {ctx.batch} > max {spec.max_batch}")
    if spec.tp_sizes is not None and ctx.tp_size not in spec.tp_sizes:
        yield Rejection(Reason.TP_UNSUPPORTED, f"tp_size {ctx.tp_size} not in {sorted(spec.tp_sizes)}")


@dataclass(eq=False)
class Backend:
    """A kernel library: how to find it without importing it, and the kernels it provides."""

    name: str
    kernels: tuple[KernelSpec, ...]
    module: str | None = None  # import name probed with find_spec; None = always present
    distribution: str | None = None  # pip distribution name, for the version
    aliases: tuple[str, ...] = ()
    # (name, kernel-id glob): names for part of the backend that policy targets (lock, deny, prefer,
    # disabled, ...) resolve to those kernels: ("torch_sdpa", "torch.sdpa_*") is torch's SDPA kernels
    groups: tuple[tuple[str, str], ...] = ()
    min_version: str | None = None
    description: str = ""

    @cached_property
    def availability(self) -> tuple[bool, str | None, Rejection | None]:
        """(available, version, why not). Probed once, without importing the library."""
        if self.module is None:
            return True, torch.__version__, None
        if not module_exists(self.module):
            return False, None, Rejection(Reason.BACKEND_NOT_INSTALLED, f"python module {self.module!r} not found")
        version = None
        try:
            version = importlib.metadata.version(self.distribution or self.module)
        except importlib.metadata.PackageNotFoundError:
            pass
        if self.min_version and version and _version_tuple(version) < _version_tuple(self.min_version):
            return False, version, Rejection(
                Reason.BACKEND_VERSION_UNSUPPORTED, f"{self.name} {version} < required {self.min_version}"
            )
        return True, version, None


def module_exists(name: str) -> bool:
    """Whether `name` (dotted or not) is importable, without importing it or its parents."""
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None or not rest:
        return spec is not None
    locations = list(spec.submodule_search_locations or [])
    for part in rest.split("."):
        found = [p for loc in locations for p in (os.path.join(loc, part), os.path.join(loc, part + ".py"))
                 if os.path.exists(p)]
        if not found:
            return False
        locations = [p for p in found if os.path.isdir(p)]
    return True


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
