"""What an op family is (OpFamily), the helpers op modules share, and the table of op ids.

The families themselves are the other modules of this package; `layerzero.ops` imports them all,
so FAMILIES is complete once that package is imported.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError
from ..kernel import KernelSpec

# Every `lz.*` call first asks whether torch.compile / torch.export is tracing it (then it becomes one
# custom op node, ops/library.py), as
#     if dynamo_compiling() or compile_flags._is_compiling_flag:
#         from .library import trace  # an import, which dynamo runs for real: registers the ops
#         return trace(FAMILY, *args)
# the two facts torch.compiler.is_compiling() reads (export's flag, dynamo's folded call) without its
# two Python frames: 70 ns instead of 200 on the CPU VM, more on the GPU host. On a torch without the
# flag (< 2.5) only dynamo is seen.
dynamo_compiling = torch.compiler.is_dynamo_compiling
compile_flags = (
    torch.compiler if hasattr(torch.compiler, "_is_compiling_flag") else types.SimpleNamespace(_is_compiling_flag=False)
)


def contiguous_transforms(spec: KernelSpec, ctx: SelectionContext) -> tuple[str, ...]:
    """The transforms of families whose only one is a contiguous copy for kernels that need it."""
    return ("contiguous",) if spec.requires_contiguous else ()


def bind_contiguous(spec: KernelSpec, ctx: SelectionContext) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The kernel itself, or, when its spec requires contiguous inputs, a wrapper that makes every
    tensor argument contiguous (a no-op for tensors that already are)."""
    impl = spec.impl
    if not spec.requires_contiguous:
        return impl, ()

    def run(*args: Any, **kwargs: Any) -> Any:
        return impl(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

    return run, ("contiguous",)


Shape = tuple[int, ...]
Args = tuple[Any, ...]

# Workload dim -> the SelectionContext field that holds it.
CONTEXT_FIELDS = {
    "batch": "batch",
    "seq_q": "seq_len_q",
    "seq_k": "seq_len_k",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "causal": "is_causal",
    "rows": "num_rows",
    "hidden": "hidden_size",
    "seq": "seq_len_q",
    "page_size": "page_size",
}


@dataclass(frozen=True, slots=True)
class Workload:
    """How to build and check one kind of call of a family, for measuring it (perf/): a shape is a
    tuple of ints named by `dims`.

    make(shape, dtype, device, generator) -> the public function's positional arguments.
    ranged: dims bucketed by powers of two (the rest are exact).
    reference_view(args) -> (smaller args, function slicing the full output the same way): the
    slice of the problem checked against the reference, so the check stays cheap on huge shapes.
    op_ids: op id -> the dims it fixes (`attention.causal`: causal 1), for the shapes given for an op id.
    """

    name: str
    dims: tuple[str, ...]
    ranged: tuple[str, ...]
    make: Callable[[Shape, torch.dtype, torch.device, torch.Generator], Args]
    reference_view: Callable[[Args], tuple[Args, Callable[[Any], Any]]] | None = None
    op_ids: dict[str, dict[str, int]] = field(default_factory=dict, hash=False)

    def check_shape(self, shape: Any) -> Shape:
        """The shape as a tuple of ints, or InvalidInputError naming the dims expected."""
        if isinstance(shape, str):
            shape = tuple(int(x) for x in shape.replace(",", "x").split("x") if x)
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != len(self.dims)
            or not all(isinstance(x, int | bool) and x >= 0 for x in shape)
        ):
            raise InvalidInputError(
                "shape", f"{len(self.dims)} non-negative ints ({', '.join(self.dims)}) for {self.name}", shape
            )
        return tuple(int(x) for x in shape)

    def label(self, shape: Shape) -> str:
        return "x".join(str(x) for x in shape)


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Workload inputs: standard normal, drawn in float32 (every dtype gets the same numbers)."""
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


@dataclass(frozen=True, slots=True)
class SolveCode:
    """What `lz.solve` (perf/solve.py) writes to call a family's kernels without the engine.

    handled: public parameters the solved code reads; every other parameter must be at its default
    (else dynamic selection runs). required: parameters that must not be None. first: the argument
    whose device is checked. tensors: arguments checked for grad before a kernel without backward.
    prologue: code that checks the tensors and binds the workload dims (after the guard), reading
    each shape and dtype once. names: workload dim -> variable in the generated code. call: the
    kernel call, with {K} for the kernel, {post} for what follows it, and {name} for each argument
    in `transposed` (transposed (1, 2) for a kernel of another layout than BSHD, and back after)
    or `contiguous` (made contiguous for a kernel that requires it). square: a pair of ranged dims
    whose equality changes what kernels may run (causal masks on Sq == Sk).
    """

    handled: tuple[str, ...]
    required: tuple[str, ...]
    first: str
    tensors: tuple[str, ...]
    prologue: tuple[str, ...]
    names: dict[str, str] = field(hash=False)
    call: str
    transposed: tuple[str, ...] = ()
    contiguous: tuple[str, ...] = ()
    square: tuple[str, str] | None = None

    def kernel_call(self, spec: KernelSpec, var: str) -> str:
        """The call of kernel `spec` (bound to `var` in the module) in the generated code."""
        t = ".transpose(1, 2)" if self.transposed and spec.layout != "BSHD" else ""
        c = ".contiguous()" if spec.requires_contiguous else ""
        args = {name: name + t for name in self.transposed}
        for name in self.contiguous:
            args[name] = args.get(name, name) + c
        return self.call.format(K=var, post=t, **args)


Binder = Callable[[KernelSpec, SelectionContext], tuple[Callable[..., Any], tuple[str, ...]]]


@dataclass(frozen=True, slots=True, eq=False)
class OpFamily:
    """One op family: what selection, inspection, tracing, measuring and solving know about its calls.

    key: call arguments -> the plan-cache key (cheap: the hot path computes it on every call; select,
        explain and solve use the same function).
    context: call arguments -> SelectionContext (validates inputs; miss path only).
    bind: (spec, ctx) -> (callable in the kernels' calling convention, transform names).
    transforms: (spec, ctx) -> transform names the plan would need (scored against the kernel).
    function: the public `lz.<name>`; its signature is the calling convention of key and context.
    library: the call is also a torch.library custom op `torch.ops.layerzero.<name>` (library.py), the
        one node torch.compile/export trace in its place (library.trace). Its schema is inferred from
        the type hints of `real` (or `function`); `real` is the op's real kernel when it is not
        `function` with a contiguous output; `fake` its fake (meta) kernel when not "validate with
        `context`, return an empty tensor like the first argument".
    workloads: the kinds of calls perf/ measures (lz.tune, lz.warmup, lz.solve, benchmarks).
    solve: how lz.solve calls the kernels directly (None: the family is not solved).
    """

    name: str
    key: Callable[..., Any]
    context: Callable[..., SelectionContext]
    bind: Binder = bind_contiguous
    transforms: Callable[[KernelSpec, SelectionContext], tuple[str, ...]] = contiguous_transforms
    function: Callable[..., Any] | None = None
    library: bool = False
    real: Callable[..., Any] | None = None
    fake: Callable[..., Any] | None = None
    workloads: tuple[Workload, ...] = ()
    solve: SolveCode | None = None


FAMILIES: dict[str, OpFamily] = {}


# Op id -> the families whose calls can have that id, the usual one first. Inspection and policy calls
# take an op id (or a glob of them) where they take a family name through this table; the call's own
# context then says which id it is. tests/test_api_spec.py checks it covers every registered op id.
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "attention.causal": ("attention",),
    "attention.full": ("attention",),
    "attention.masked": ("attention",),
    "attention.sliding_window": ("attention",),
    "attention.varlen": ("attention_varlen",),
    "attention.paged": ("paged_attention",),
    "attention.decode": ("paged_attention", "attention"),
    "norm.rms": ("rms_norm",),
    "norm.layer": ("layer_norm",),
    "norm.group": ("group_norm",),
    "posenc.rope": ("rope", "rope_qk"),
    "posenc.rope_interleaved": ("rope", "rope_qk"),
    "activation.silu": ("silu",),
    "activation.gelu": ("gelu",),
    "activation.gelu_tanh": ("gelu",),
    "activation.swiglu": ("swiglu",),
    "activation.geglu": ("geglu",),
    "activation.geglu_tanh": ("geglu",),
    "mlp.swiglu": ("fused_mlp",),
    "mlp.geglu": ("fused_mlp",),
    "mlp.geglu_tanh": ("fused_mlp",),
    "sampling.greedy": ("sample_greedy", "sample"),
    "sampling.topk": ("sample_topk", "sample"),
    "sampling.topp": ("sample_topp", "sample"),
    "sampling.plain": ("sample",),
    "sampling.minp": ("sample",),
    "sampling.topk_topp": ("sample",),
    "sampling.combined": ("sample",),
    "quant.quantize": ("quantize",),
    "quant.dequantize": ("dequantize",),
    "quant.linear": ("quant_linear",),
    "embedding.lookup": ("embedding",),
}
# Arguments an op id implies for a family's call when the call does not give them:
# lz.which("attention.causal", q, k, v) is lz.which("attention", q, k, v, is_causal=True).
IMPLIED: dict[tuple[str, str], dict[str, Any]] = {
    ("attention.causal", "attention"): {"is_causal": True},
    ("posenc.rope_interleaved", "rope"): {"interleaved": True},
    ("posenc.rope_interleaved", "rope_qk"): {"interleaved": True},
    ("activation.gelu_tanh", "gelu"): {"approximate": "tanh"},
    ("activation.geglu_tanh", "geglu"): {"approximate": "tanh"},
    ("mlp.geglu", "fused_mlp"): {"activation": "geglu"},
    ("mlp.geglu_tanh", "fused_mlp"): {"activation": "geglu", "approximate": "tanh"},
}


def is_op_id(name: str) -> bool:
    """An op id or a glob of them (`attention.causal`, `attention.*`), not a family name (`rms_norm`)."""
    return "." in name or any(c in name for c in "*?[")


def families_for(op: str) -> list[str]:
    """The families whose calls can have an op id matching `op` (an id or glob), usual ones first."""
    out: dict[str, None] = {}
    for op_id, names in OP_FAMILIES.items():
        if fnmatch.fnmatchcase(op_id, op):
            out.update(dict.fromkeys(names))
    return list(out)


def op_matches(op: str, ctx: SelectionContext) -> bool:
    """Is a call described by `ctx` an `op` call (an op id or glob)? A dense attention call with one
    query row is also a decode (`attention.decode`), as the kernels that serve decode see it."""
    if fnmatch.fnmatchcase(ctx.op, op):
        return True
    return op == "attention.decode" and ctx.op.startswith("attention.") and ctx.seq_len_q == 1


def register_family(family: OpFamily) -> OpFamily:
    FAMILIES[family.name] = family
    return family
