"""Inputs for measuring an op family: random tensors for a shape, and the reference to check against.

A shape is a tuple of ints named by `Workload.dims`:
- attention:  (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal), q/k/v in BSHD
- rms_norm / layer_norm: (rows, hidden), with weight (and bias) of size hidden
- rope_qk: (batch, seq, heads, kv_heads, head_dim), q and k in BSHD, a full-width (seq, head_dim) cos/sin
- paged_attention: (batch, seq_q, seq_k, heads, kv_heads, head_dim, page_size), an NHD cache whose
  pages are shuffled (as a serving allocator leaves them), every sequence seq_k tokens long (make
  seq_k a multiple of page_size: the context's seq_len_k is the page table's capacity)
- attention_ext: `lz.attention` with the options of Mistral / Gemma-2 layers: (batch, seq_q, seq_k,
  heads, kv_heads, head_dim, causal, window, softcap); window > 0 is window_size=(window, 0) when
  causal, (window, window) otherwise; softcap > 0 caps the scores
- swiglu: (rows, hidden), gate and up of that shape

Other op families join by calling `register_workload`; a workload whose name is not an op family
names the family it calls in `op_family`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import SelectionContext
from ..errors import InvalidInputError, UnknownNameError
from ..kernel import KernelSpec, check_constraints
from ..ops import FAMILIES, OpFamily
from ..selection.engine import REFERENCE_BACKEND, ExecutionPlan
from ..state import runtime
from .perfdb import Bucket

Shape = tuple[int, ...]
Args = tuple[Any, ...]

# Workload dim -> the SelectionContext field that holds it.
CONTEXT_FIELDS = {"batch": "batch", "seq_q": "seq_len_q", "seq_k": "seq_len_k", "heads": "num_heads",
                  "kv_heads": "num_kv_heads", "head_dim": "head_dim", "causal": "is_causal", "rows": "num_rows",
                  "hidden": "hidden_size", "seq": "seq_len_q", "page_size": "page_size"}


@dataclass(frozen=True, slots=True)
class Workload:
    """How to build and check one op family's inputs.

    make(shape, dtype, device, generator) -> the public op's positional arguments.
    ranged: dims bucketed by powers of two (the rest are exact).
    reference_view(args) -> (smaller args, function slicing the full output the same way): the
    slice of the problem checked against the reference, so the check stays cheap on huge shapes.
    op_family: the op family it calls when that is not its own name (`family`).
    """

    family: str
    dims: tuple[str, ...]
    ranged: tuple[str, ...]
    make: Callable[[Shape, torch.dtype, torch.device, torch.Generator], Args]
    reference_view: Callable[[Args], tuple[Args, Callable[[Any], Any]]] | None = None
    op_family: str = ""

    def check_shape(self, shape: Any) -> Shape:
        """The shape as a tuple of ints, or InvalidInputError naming the dims expected."""
        if isinstance(shape, str):
            shape = tuple(int(x) for x in shape.replace(",", "x").split("x") if x)
        if not isinstance(shape, tuple | list) or len(shape) != len(self.dims) or not all(
                isinstance(x, int | bool) and x >= 0 for x in shape):
            raise InvalidInputError("shape", f"{len(self.dims)} non-negative ints ({', '.join(self.dims)}) for "
                                    f"{self.family}", shape)
        return tuple(int(x) for x in shape)

    def label(self, shape: Shape) -> str:
        return "x".join(str(x) for x in shape)


WORKLOADS: dict[str, Workload] = {}


def register_workload(workload: Workload) -> Workload:
    WORKLOADS[workload.family] = workload
    return workload


def workload(name: str) -> Workload:
    found = WORKLOADS.get(name)
    if found is None:
        raise UnknownNameError("operation with a perf workload", name, WORKLOADS)
    return found


def _op_family(name: str) -> str:
    """The op family a workload (or family) name calls."""
    wl = WORKLOADS.get(name)
    return wl.op_family if wl is not None and wl.op_family else name


# Op id -> (its workload family, the dims the id fixes). Shapes given for an attention op id may also
# take the spec's short form (batch, seq, heads, head_dim): seq keys (seq queries but for decode),
# as many kv heads as heads, causal as the id says.
OP_WORKLOADS: dict[str, tuple[str, dict[str, int]]] = {
    "attention.causal": ("attention", {"causal": 1}),
    "attention.full": ("attention", {"causal": 0}),
    "attention.decode": ("attention", {"seq_q": 1, "causal": 0}),
    "attention.paged": ("paged_attention", {}),
    "norm.rms": ("rms_norm", {}),
    "norm.layer": ("layer_norm", {}),
    "posenc.rope": ("rope_qk", {}),
}


def resolve(operation: str) -> tuple[str, dict[str, int]]:
    """(workload family, dims fixed by the name) for a family name or an op id."""
    if not isinstance(operation, str):
        raise InvalidInputError("operation", "an op id such as 'attention.causal' or a family name", repr(operation))
    if operation in WORKLOADS:
        return operation, {}
    found = OP_WORKLOADS.get(operation)
    if found is None:
        raise UnknownNameError("operation with a perf workload", operation, [*WORKLOADS, *OP_WORKLOADS])
    return found


def op_shape(operation: str, shape: Any) -> tuple[str, Shape]:
    """(workload family, full workload shape) of a shape given for `operation` (family name or op id)."""
    name, fixed = resolve(operation)
    wl = workload(name)
    if isinstance(shape, str) and fixed:  # "1x512x32x128" as the CLI gives it
        shape = tuple(int(x) for x in shape.replace(",", "x").split("x") if x)
    short = name == "attention" and fixed and isinstance(shape, tuple | list) and len(shape) == 4
    if short:
        batch, seq, heads, head_dim = shape
        shape = (batch, fixed.get("seq_q", seq), seq, heads, heads, head_dim, fixed.get("causal", 0))
    try:
        full = wl.check_shape(shape)
    except InvalidInputError:
        if name != "attention" or not fixed:
            raise
        raise InvalidInputError("shape", f"(batch, seq, heads, head_dim) or {len(wl.dims)} non-negative ints "
                                f"({', '.join(wl.dims)}) for {operation}", shape) from None
    for dim, value in fixed.items():
        if full[wl.dims.index(dim)] != value:
            raise InvalidInputError("shape", f"{dim} {value} for {operation} ({', '.join(wl.dims)})", shape)
    return name, full


def family(name: str) -> OpFamily:
    """The OpFamily of a family name, or of the family a workload calls."""
    found = FAMILIES.get(_op_family(name))
    if found is None:
        raise UnknownNameError("operation", name, FAMILIES)
    return found


def public_op(name: str) -> Callable[..., Any]:
    """The public function of a family (`lz.attention` for "attention") or of the family a workload calls."""
    return family(name).function


def run_args(name: str, args: Args, options: dict[str, Any] | None = None) -> Args:
    """The arguments the public op passes to its plan's `run` for `op(*args, **options)` (the kernel
    convention).

    Captured by calling the op once with a recording plan in the cache slot of this call, so this
    follows each op's convention without restating it.
    """
    options = options or {}
    fam = family(name)
    key = fam.key(*args, **options)
    captured: list[Args] = []
    data = runtime.plans.data
    saved = data.get(key)
    data[key] = ExecutionPlan("perf.capture", "", lambda *a: captured.append(a))
    try:
        public_op(name)(*args, **options)
    finally:
        if saved is None:
            data.pop(key, None)
        else:
            data[key] = saved
    if not captured:
        raise RuntimeError(f"{name}: could not capture the run arguments")
    return captured[0]


def context_for(name: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                options: dict[str, Any] | None = None) -> SelectionContext:
    """The SelectionContext of `shape` without allocating it (tiny tensors, then the real sizes);
    `options`: the op's keyword arguments (attention: window_size, softcap, ...)."""
    wl = workload(name)
    shape = wl.check_shape(shape)
    tiny = tuple(1 if d in wl.ranged else x for d, x in zip(wl.dims, shape, strict=True))
    args = wl.make(tiny, dtype, device, torch.Generator(device=device).manual_seed(0))
    ctx = family(name).context(*args, **(options or {}))
    sizes = dict(zip(wl.dims, shape, strict=True))
    return ctx.replace(**{CONTEXT_FIELDS[d]: sizes[d] for d in wl.ranged})


def shape_of(name: str, ctx: SelectionContext) -> Shape | None:
    """The workload shape that reproduces a call's context (same op and bucket), or None."""
    wl = workload(name)
    shape = tuple(int(getattr(ctx, CONTEXT_FIELDS[d])) for d in wl.dims)
    try:
        made = context_for(name, shape, ctx.dtype, torch.device(ctx.device_type, ctx.device_index)
                           if ctx.device_type == "cuda" else torch.device(ctx.device_type))
    except Exception:  # noqa: BLE001 - a context the workload cannot build is simply not reproducible
        return None

    return shape if made.op == ctx.op and Bucket.of(made) == Bucket.of(ctx) else None


def reference_spec(ctx: SelectionContext) -> KernelSpec:
    runtime.ensure_loaded()
    for spec in runtime.registry.candidates(ctx.op):
        if spec.backend == REFERENCE_BACKEND and not check_constraints(spec, ctx):
            return spec
    known = [s.id for s in runtime.registry.candidates(ctx.op)]
    raise UnknownNameError(f"reference kernel for {ctx.op}", ctx.op, known)


def reference_output(name: str, args: Args, options: dict[str, Any] | None = None) -> tuple[Any, Callable[[Any], Any]]:
    """(reference output, slicer): the reference on float64 (CPU) / float32 (GPU) copies of the
    inputs, and the function that cuts the kernel's full output down to what it covers."""
    wl = workload(name)
    view, cut = wl.reference_view(args) if wl.reference_view is not None else (args, lambda out: out)
    wide = torch.float64
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in view):
        wide = torch.float32
    up = tuple(a.to(wide) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in view)
    fam = family(name)
    ctx = fam.context(*up, **(options or {}))
    run, _ = fam.bind(reference_spec(ctx), ctx)
    return run(*run_args(name, up, options)), cut


# --- the built-in workloads -----------------------------------------------------------------------

def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _attention_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    b, sq, sk, hq, hkv, d, causal = shape
    q = _randn((b, sq, hq, d), dtype, device, gen)
    k = _randn((b, sk, hkv, d), dtype, device, gen)
    v = _randn((b, sk, hkv, d), dtype, device, gen)
    return (q, k, v, None, bool(causal))


def _attention_view(args: Args) -> tuple[Args, Callable[[Any], Any]]:
    """Batch 0 and the query heads of the first KV head: memory Sq*Sk*group, whatever the batch."""
    q, k, v, *rest = args
    group = q.shape[2] // k.shape[2]
    return (q[:1, :, :group], k[:1, :, :1], v[:1, :, :1], *rest), lambda out: out[:1, :, :group]


def _rows_inputs(bias: bool) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Args]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
        rows, hidden = shape
        x = _randn((rows, hidden), dtype, device, gen)
        weight = (1.0 + 0.1 * _randn((hidden,), torch.float32, device, gen)).to(dtype)
        if not bias:
            return (x, weight)
        return (x, weight, (0.1 * _randn((hidden,), torch.float32, device, gen)).to(dtype))

    return make


def _rope_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    b, s, hq, hkv, d = shape
    q = _randn((b, s, hq, d), dtype, device, gen)
    k = _randn((b, s, hkv, d), dtype, device, gen)
    angles = torch.rand((s, d // 2), generator=gen, device=device, dtype=torch.float32) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    return (q, k, angles.cos().to(dtype), angles.sin().to(dtype))


def _paged_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    b, sq, sk, hq, hkv, d, page = shape
    sk = max(sk, sq, 1)
    per_seq = -(-sk // page)
    q = _randn((b, sq, hq, d), dtype, device, gen)
    k_cache = _randn((b * per_seq, page, hkv, d), dtype, device, gen)
    v_cache = _randn((b * per_seq, page, hkv, d), dtype, device, gen)
    order = torch.randperm(b * per_seq, generator=gen, device=device)
    page_table = order.view(b, per_seq).to(torch.int32)
    seq_lens = torch.full((b,), sk, dtype=torch.int32, device=device)
    return (q, k_cache, v_cache, page_table, seq_lens)


def _attention_ext_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    *dense, window, softcap = shape
    q, k, v, mask, causal = _attention_inputs(tuple(dense), dtype, device, gen)
    window_size = (window, 0 if causal else window) if window > 0 else None
    return (q, k, v, mask, causal, 0.0, None, "BSHD", window_size, float(softcap))


def _pair_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Args:
    return (_randn(shape, dtype, device, gen), _randn(shape, dtype, device, gen))


def _paged_view(args: Args) -> tuple[Args, Callable[[Any], Any]]:
    """Sequence 0 only (its pages stay where they are in the shared cache)."""
    q, k_cache, v_cache, page_table, seq_lens, *rest = args
    return (q[:1], k_cache, v_cache, page_table[:1], seq_lens[:1], *rest), lambda out: out[:1]


register_workload(Workload("attention", ("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "causal"),
                           ("batch", "seq_q", "seq_k"), _attention_inputs, _attention_view))
register_workload(Workload("rms_norm", ("rows", "hidden"), ("rows",), _rows_inputs(bias=False)))
register_workload(Workload("layer_norm", ("rows", "hidden"), ("rows",), _rows_inputs(bias=True)))
register_workload(Workload("rope_qk", ("batch", "seq", "heads", "kv_heads", "head_dim"), (), _rope_inputs))
register_workload(Workload("attention_ext", ("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "causal",
                                             "window", "softcap"), ("batch", "seq_q", "seq_k"), _attention_ext_inputs,
                           _attention_view, op_family="attention"))
register_workload(Workload("swiglu", ("rows", "hidden"), ("rows",), _pair_inputs))
register_workload(Workload("paged_attention", ("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "page_size"),
                           ("batch", "seq_k"), _paged_inputs, _paged_view))
