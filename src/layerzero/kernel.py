"""KernelSpec (what a kernel can run, as data), the one generic constraint check, and Backend."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .context import SelectionContext
from .errors import InvalidInputError, UnknownNameError
from .reasons import Reason, Rejection

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
ALL_FLOAT_DTYPES = FLOAT_DTYPES | {torch.float64}
LAYOUTS = ("BSHD", "BHSD")
ANY_PLATFORM = "*"  # in KernelSpec.platforms: every device type
# Device types suggested when a platform name is unknown; any type torch.device parses is accepted.
COMMON_PLATFORMS = (ANY_PLATFORM, "cpu", "cuda", "mps", "xpu", "hpu", "mtia", "meta")
MASK_KINDS = ("none", "bool", "float")
KV_LAYOUTS = ("NHD", "HND")
# Short dtype names that policy conditions, descriptors and the CLI accept besides torch's own.
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def dtype_name(value: str) -> str | None:
    """Canonical torch dtype name for "bfloat16", "torch.bfloat16" or "bf16"; None if unknown."""
    name = value.strip().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    return name if isinstance(getattr(torch, name, None), torch.dtype) else None


@dataclass(frozen=True, slots=True)
class JitVariant:
    """A module a kernel builds on its first call for a kind of input (FlashInfer: one nvcc build
    of 13-110 s per dtype / head_dim / window / softcap). Calls with equal keys share it."""

    key: Hashable
    label: str  # for people: "flashinfer prefill bf16 d128"


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One kernel: its id, the ops it implements, how to call it, and its constraints as data.

    `impl` takes the op's calling convention (see the op module). For attention that is
    `impl(q, k, v, attn_mask, is_causal, dropout_p, scale)` with q/k/v in `layout` and causal
    aligned bottom-right; the plan adds the layout transforms around it.

    Fields are checked when the spec is made (InvalidInputError / UnknownNameError naming the
    field). A set-valued field takes one value or a collection: `platforms="cpu"` is {"cpu"},
    `ops="norm.rms"` is ("norm.rms",). `platforms` are device types as torch names them ("cpu",
    "cuda", "mps", "xpu", ...); the default "*" means every device type: a kernel of plain torch
    code runs wherever its tensors are. Declare the platforms of a kernel that needs one.
    """

    id: str  # "backend.kernel"
    ops: tuple[str, ...]
    impl: Callable[..., Any] = field(compare=False, repr=False)
    priority: int = 50
    platforms: frozenset[str] = frozenset({ANY_PLATFORM})
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
    # Miss-path hook: a callable for exactly this context, taking the op's calling convention in the
    # caller's layout (ctx.layout), with everything that depends only on the context decided once
    # (layout transforms, flags, the library entry point); None: the family binds `impl` as usual.
    prepare: Callable[[SelectionContext], Callable[..., Any] | None] | None = field(
        default=None, compare=False, repr=False
    )
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
    # (min_seq_len_q, priority) pairs for attention: the priority for calls with at least that many
    # query rows per sequence (long prefills, where a kernel's higher launch cost is hidden behind its
    # device time); the largest threshold reached wins, over `priority` and decode_priority.
    seq_priorities: tuple[tuple[int, int], ...] = ()
    # the module a call needs built, None when it is built already (or nothing is built): what
    # lz.warmup compiles in worker processes (perf/warmup.py)
    jit_variant: Callable[[SelectionContext], JitVariant | None] | None = field(default=None, compare=False, repr=False)
    description: str = ""

    backend: str = field(init=False, compare=False)  # "backend" of "backend.kernel", derived from id

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "backend", self.id.split(".", 1)[0])


_INT_FIELDS = (
    "min_sm",
    "max_sm",
    "min_head_dim",
    "max_head_dim",
    "head_dim_multiple",
    "min_page_size",
    "max_hidden_size",
    "min_seq_len",
    "max_seq_len",
    "max_batch",
)
_BOOL_FIELDS = (
    "same_head_dim_v",
    "supports_gqa",
    "supports_causal",
    "supports_non_causal",
    "causal_non_square",
    "supports_dropout",
    "supports_window",
    "supports_softcap",
    "supports_alibi",
    "supports_backward",
    "requires_contiguous",
    "graph_safe",
    "deterministic",
    "needs_jit",
)
# set-valued fields: (the type of one value, its description, the names it may take or None, None allowed);
# all but cpu_isa (no flag required) must name at least one value
_SET_FIELDS: dict[str, tuple[type, str, tuple[str, ...] | None, bool]] = {
    "platforms": (str, "a device type ('cpu', 'cuda', ...) or '*' (every one)", None, False),
    "generations": (str, "a GPU generation name ('ampere', 'hopper', ...)", None, True),
    "dtypes": (torch.dtype, "a torch.dtype", None, False),
    "head_dims": (int, "a head_dim", None, True),
    "mask_kinds": (str, "a mask kind", MASK_KINDS, False),
    "kv_layouts": (str, "a paged KV layout", KV_LAYOUTS, False),
    "page_sizes": (int, "a page size", None, True),
    "tp_sizes": (int, "a tensor-parallel size", None, True),
    "cpu_isa": (str, "a CPU flag ('avx2', 'avx512f', ...)", None, False),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(spec: KernelSpec) -> None:
    """Type and name checks of a KernelSpec's fields; normalizes one value of a set field to a set."""

    def put(name: str, value: object) -> None:
        object.__setattr__(spec, name, value)

    if not isinstance(spec.id, str) or "." not in spec.id.strip(".") or spec.id != spec.id.strip():
        raise InvalidInputError("id", "a kernel id of the form 'backend.name'", repr(spec.id))
    ops = (spec.ops,) if isinstance(spec.ops, str) else spec.ops
    if not isinstance(ops, tuple | list | frozenset | set) or not ops or not all(isinstance(o, str) for o in ops):
        raise InvalidInputError(
            "ops", "an op id such as 'norm.rms' or a non-empty collection of op ids", repr(spec.ops)
        )
    put("ops", tuple(ops))
    if not callable(spec.impl):
        raise InvalidInputError("impl", "a callable taking the op's calling convention", type(spec.impl).__name__)
    for name in ("check", "workspace_bytes", "prepare"):
        value = getattr(spec, name)
        if value is not None and not callable(value):
            raise InvalidInputError(name, "None or a callable of a SelectionContext", type(value).__name__)
    if isinstance(spec.priority, bool) or not isinstance(spec.priority, int | float):
        raise InvalidInputError("priority", "a number (built-in kernels use 0-100)", repr(spec.priority))
    if spec.decode_priority is not None and (
        isinstance(spec.decode_priority, bool) or not isinstance(spec.decode_priority, int | float)
    ):
        raise InvalidInputError("decode_priority", "None or a number", repr(spec.decode_priority))
    for name in ("row_priorities", "seq_priorities"):
        pairs = getattr(spec, name)
        if not isinstance(pairs, tuple) or not all(
            isinstance(p, tuple)
            and len(p) == 2
            and _is_int(p[0])
            and isinstance(p[1], int | float)
            and not isinstance(p[1], bool)
            for p in pairs
        ):
            raise InvalidInputError(name, "a tuple of (threshold, priority) pairs of numbers", repr(pairs))
    for name in _INT_FIELDS:
        if not _is_int(getattr(spec, name)):
            raise InvalidInputError(name, "an integer", repr(getattr(spec, name)))
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(spec, name), bool):
            raise InvalidInputError(name, "True or False", repr(getattr(spec, name)))
    if spec.layout not in LAYOUTS:
        raise UnknownNameError("layout", str(spec.layout), LAYOUTS)
    for name, (kind, what, names, optional) in _SET_FIELDS.items():
        value = getattr(spec, name)
        if value is None and optional:
            continue
        items = (value,) if isinstance(value, kind) else value
        if (
            isinstance(items, str | bytes)
            or not isinstance(items, tuple | list | frozenset | set)
            or not all(isinstance(v, kind) and (kind is not int or _is_int(v)) for v in items)
            or (not items and name != "cpu_isa")
        ):
            expected = f"{what} or a non-empty collection of them" + (", or None" if optional else "")
            raise InvalidInputError(name, expected, repr(value))
        for v in items:
            if names is not None and v not in names:
                raise UnknownNameError(name.removesuffix("s").replace("_", " "), v, names)
            if name == "platforms" and v != ANY_PLATFORM and not _device_type(v):
                raise UnknownNameError("platform", v, COMMON_PLATFORMS)
        if not isinstance(value, frozenset):
            put(name, frozenset(items))


@functools.lru_cache(maxsize=64)
def _device_type(name: str) -> bool:
    """Whether torch knows `name` as a device type (not a device: 'cuda:0' is not one)."""
    try:
        return torch.device(name).type == name and ":" not in name
    except (RuntimeError, ValueError):
        return False


def runs_on(spec: KernelSpec, device_type: str) -> bool:
    """Whether the spec declares `device_type` (or every device type) among its platforms."""
    return device_type in spec.platforms or ANY_PLATFORM in spec.platforms


def priority_for(spec: KernelSpec, ctx: SelectionContext) -> int:
    """The spec's default priority for this call (decode, CPU-ISA, query-length and row-count dependent
    where the spec says so)."""
    priority = spec.priority
    if spec.decode_priority is not None and ctx.seq_len_q == 1:
        priority = spec.decode_priority
    for flag, value in spec.isa_priorities:
        if flag in ctx.isa:
            priority = value
            break
    for min_seq, value in sorted(spec.seq_priorities):
        if ctx.seq_len_q >= min_seq:
            priority = value
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
    if not runs_on(spec, ctx.device_type):
        yield Rejection(
            Reason.PLATFORM_MISMATCH, f"device {ctx.device_type}, kernel runs on {'/'.join(sorted(spec.platforms))}"
        )
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
    """A kernel library: how to find it without importing it, and the kernels it provides.

    `probes`: (kernel id, case) pairs, one per kernel family, that monitor/probe.py runs once on a
    device before the backend's kernels compete there (cases: prefill, decode, paged, varlen,
    rms_norm, layer_norm, rope, swiglu). Empty: nothing to prove (pure torch, user kernels).
    """

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
    requires: tuple[str, ...] = ()  # further import names that must exist (a library's compiled extension)
    probes: tuple[tuple[str, str], ...] = ()
    # Set by the registry that holds the backend: called by `changed()`.
    on_change: Callable[[], None] | None = field(default=None, init=False, repr=False)

    def changed(self) -> None:
        """What this backend can run has changed (a JIT module got built): the runtime that registered it
        drops the plans chosen before."""
        if self.on_change is not None:
            self.on_change()

    @cached_property
    def availability(self) -> tuple[bool, str | None, Rejection | None]:
        """(available, version, why not). Found once, without importing the library; a failed
        probe (monitor/probe.py) or import replaces it for the process."""
        if self.module is None:
            return True, torch.__version__, None
        if not module_exists(self.module):
            return False, None, Rejection(Reason.BACKEND_NOT_INSTALLED, f"python module {self.module!r} not found")
        for name in self.requires:
            if not module_exists(name):
                return (
                    False,
                    None,
                    Rejection(
                        Reason.BACKEND_NOT_INSTALLED,
                        f"python module {name!r} not found ({self.module!r} is there without it)",
                    ),
                )
        version = None
        try:
            version = importlib.metadata.version(self.distribution or self.module)
        except importlib.metadata.PackageNotFoundError:
            pass
        if self.min_version and version and _version_tuple(version) < _version_tuple(self.min_version):
            return (
                False,
                version,
                Rejection(Reason.BACKEND_VERSION_UNSUPPORTED, f"{self.name} {version} < required {self.min_version}"),
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
        found = [
            p
            for loc in locations
            for p in (os.path.join(loc, part), os.path.join(loc, part + ".py"))
            if os.path.exists(p)
        ]
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
