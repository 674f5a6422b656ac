"""`lz.solve`: compile selection decisions into a standalone Python module.

For each op, each dtype and each combination of exact dims (heads, head_dim, hidden, causal), the
ranged dims (batch, seq_q, seq_k, rows) are split into power-of-two buckets; the engine chooses a
kernel for each bucket (from PerfDB timings where confident, priorities otherwise) at the bucket's
corners. A bucket whose corners disagree is bisected along the dim where the choice changes until
each part agrees, so a threshold inside a bucket (Liger from 16384 rows, cuDNN from 2 keys) lands
exactly where dynamic selection has it; past MAX_BOXES_PER_CELL parts the bucket takes a kernel
valid at all its corners instead. Adjacent buckets with the same choice merge, and the result is
written as nested `if lo <= X <= hi:` chains that call the kernel functions directly. Calls outside
the solved ranges, with options the solve did not cover (masks, dropout, ...), that a chosen kernel
cannot take (grad without a backward, deterministic mode, graph capture), under torch.compile, or on
a machine whose signature differs, go to dynamic selection.

    lz.solve({"attention": dict(batch=(1, 64), seq_q=(1, 8192), seq_k=(1, 8192), heads=[32],
                                kv_heads=[8], head_dim=[128], causal=[True])},
             "solved_llama.py", dtypes=[torch.bfloat16])
    import solved_llama; out = solved_llama.attention(q, k, v, is_causal=True)
"""

from __future__ import annotations

import builtins
import datetime
import importlib
import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..backends import builtin_backend_modules
from ..context import SelectionContext
from ..errors import ConfigurationError, InvalidInputError, NoKernelFoundError
from ..kernel import KernelSpec
from ..ops import FAMILIES
from ..ops.family import SolveCode
from ..selection.engine import REFERENCE_BACKEND
from ..state import runtime
from . import workloads
from .perfdb import Bucket, bucket_low, current_signature, pow2_bucket

Interval = tuple[int, int]


# What the generator knows about calling each solvable family's kernels without the engine: the
# family's own SolveCode (ops/family.py; attention's in ops/attention.py, the norms' in ops/norm.py).
FAMILY_CODE: dict[str, SolveCode] = {name: f.solve for name, f in FAMILIES.items() if f.solve is not None}


@dataclass(frozen=True, slots=True)
class SolveResult:
    """What `lz.solve` wrote."""

    path: Path
    kernels: dict[str, str]  # variable in the module -> kernel id
    buckets: int  # buckets (cells) decided
    branches: int  # kernel calls in the generated code after merging
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        used = ", ".join(sorted(set(self.kernels.values()))) or "none"
        lines = [f"wrote {self.path}: {self.buckets} buckets -> {self.branches} branches; kernels: {used}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# --- deciding ---------------------------------------------------------------------------------------


def _intervals(lo: int, hi: int) -> list[Interval]:
    """Power-of-two buckets covering [lo, hi], the first starting at lo."""
    out, upper = [], pow2_bucket(lo)
    while True:
        out.append((max(lo, bucket_low(upper)), upper))
        if upper >= hi:
            return out
        upper = max(upper * 2, 1)


def _rank(report: Any) -> list[str]:
    """Eligible kernel ids in the engine's order of preference (accelerated first, then score, then id)."""
    eligible = [c for c in report.candidates if c.score is not None]
    eligible.sort(key=lambda c: (c.backend != REFERENCE_BACKEND, c.score, c.kernel_id), reverse=True)
    return [c.kernel_id for c in eligible]


def _rankings(
    name: str,
    corners: list[SelectionContext],
    memo: dict[SelectionContext, list[str] | None],
    order: Sequence[str] | None = None,
) -> list[list[str] | None]:
    """The engine's ranking at each corner (None: no kernel there); neighbouring boxes share corners.
    order: only these kernels, in this order of preference (a static dispatcher's table)."""
    fam = workloads.family(name)
    out = []
    for ctx in corners:
        if ctx not in memo:
            try:
                ranked = _rank(runtime.engine.evaluate(ctx, fam.transforms))
                memo[ctx] = ranked if order is None else [k for k in order if k in ranked] or None
            except NoKernelFoundError:
                memo[ctx] = None
        out.append(memo[ctx])
    return out


def _settle(name: str, rankings: list[list[str] | None], notes: list[str]) -> str | None:
    """A box whose corners disagree and that may not be split further: the kernel the last corner ranks
    highest among those eligible at every corner (None when a corner has no kernel or none is common)."""
    if any(r is None for r in rankings):
        return None
    ranked = [r for r in rankings if r is not None]
    common = set(ranked[0]).intersection(*ranked[1:])
    pick = next((k for k in ranked[-1] if k in common), None)
    firsts = sorted({r[0] for r in ranked if r})
    notes.append(
        f"{name}: choice varies inside a bucket ({', '.join(firsts)}); "
        f"solved with {pick or 'dynamic selection'}, valid at every corner"
    )
    return pick


def _join(chain: list[list[Any]], dim: str, iv: Interval, child: Any) -> None:
    """Append `child` over `iv` to a chain of [lo, hi, node] on `dim`, merging equal neighbours; a child
    bisected along the same dim joins with its parts (one compare per part, not two)."""
    pieces = child[2] if isinstance(child, tuple) and child[:2] == ("split", dim) else [(*iv, child)]
    for lo, hi, node in pieces:
        if chain and chain[-1][2] == node:
            chain[-1][1] = hi
        else:
            chain.append([lo, hi, node])


# Boxes decided per power-of-two cell: a cell whose corners disagree is bisected where the choice
# changes (a threshold such as Liger's 16384 rows) until each part agrees; past this many the cell
# takes a kernel valid at all its corners instead (and the solve says so in its notes).
MAX_BOXES_PER_CELL = 96


def _tree(
    name: str,
    template: SelectionContext,
    ranged: list[str],
    intervals: dict[str, list[Interval]],
    notes: list[str],
    counter: list[int],
    order: Sequence[str] | None = None,
) -> Any:
    """Nested [(lo, hi, child)] over `ranged` dims; leaves are kernel ids, None (dynamic),
    ("square", same, other) where Sq == Sk matters, or ("split", dim, [(lo, hi, leaf)]) where a cell
    was bisected."""
    fields = workloads.CONTEXT_FIELDS
    pair = FAMILY_CODE[name].square
    memo: dict[SelectionContext, list[str] | None] = {}

    def at(point: dict[str, int]) -> SelectionContext:
        return template.replace(**{fields[d]: v for d, v in point.items()})

    def diagonal(box: dict[str, Interval]) -> bool:  # the pair's intervals are equal (else disjoint)
        return pair is not None and box[pair[0]] == box[pair[1]]

    def groups(box: dict[str, Interval]) -> list[list[dict[str, int]]]:
        """The box's corners, split into square (Sq == Sk) and other points on a diagonal box."""
        axes = [sorted(set(box[d])) for d in ranged]
        points = [dict(zip(ranged, p, strict=True)) for p in itertools.product(*axes)]
        if not diagonal(box):
            return [points]
        same = [p for p in points if p[pair[0]] == p[pair[1]]]
        other = [p for p in points if p[pair[0]] != p[pair[1]]]
        return [same, other] if other else [same]

    def split_dims(box: dict[str, Interval], group: list[dict[str, int]], firsts: list[Any]) -> list[str]:
        """Dims along which two corners of one group, differing in that dim alone, pick differently."""
        active = set()
        for (a, fa), (b, fb) in itertools.combinations(zip(group, firsts, strict=True), 2):
            moved = [d for d in ranged if a[d] != b[d]]
            if fa != fb and (len(moved) == 1 or (diagonal(box) and set(moved) == set(pair))):
                active.update(moved)
        return [d for d in ranged if d in active and box[d][0] < box[d][1]]

    def decide(box: dict[str, Interval], budget: list[int]) -> Any:
        budget[0] -= 1
        results, wanted = [], []
        for group in groups(box):
            rankings = _rankings(name, [at(p) for p in group], memo, order)
            firsts = [r[0] if r else None for r in rankings]  # the engine's pick per corner (None: no kernel)
            ok = len(set(firsts)) == 1
            results.append((ok, firsts[0], rankings))
            if not ok:
                wanted += split_dims(box, group, firsts)
        if all(ok for ok, _, _ in results) or budget[0] <= 0 or all(lo == hi for lo, hi in box.values()):
            chosen = [c if ok else _settle(name, r, notes) for ok, c, r in results]
            return chosen[0] if len(chosen) == 1 or chosen[0] == chosen[1] else ("square", *chosen)
        dims = wanted or [d for d in ranged if box[d][0] < box[d][1]]
        dim = max(dims, key=lambda d: (box[d][1] / box[d][0], d))  # the widest, relatively
        if diagonal(box) and dim in pair:  # keep the pair's intervals equal or disjoint
            return split(box, pair[0], budget, lambda sub, b: split(sub, pair[1], b, decide))
        return split(box, dim, budget, decide)

    def split(box: dict[str, Interval], dim: str, budget: list[int], inner: Any) -> Any:
        lo, hi = box[dim]
        mid = (lo + hi) // 2
        parts: list[list[Any]] = []
        for iv in ((lo, mid), (mid + 1, hi)):
            _join(parts, dim, iv, inner({**box, dim: iv}, budget))
        return parts[0][2] if len(parts) == 1 else ("split", dim, [tuple(p) for p in parts])

    def leaf(chosen: dict[str, Interval]) -> Any:
        counter[0] += 1
        return decide(chosen, [MAX_BOXES_PER_CELL])

    def build(i: int, chosen: dict[str, Interval]) -> Any:
        if i == len(ranged):
            return leaf(chosen)
        merged: list[list[Any]] = []
        for iv in intervals[ranged[i]]:
            _join(merged, ranged[i], iv, build(i + 1, {**chosen, ranged[i]: iv}))
        return [tuple(m) for m in merged]

    return build(0, {})


# --- writing ------------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda  # graph capture exists (and is checked) on CUDA only, as in SelectionContext
        self.lines: list[str] = []
        self.kernels: dict[str, str] = {}  # kernel id -> variable
        self.branches = 0

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def var(self, kernel_id: str) -> str:
        if kernel_id not in self.kernels:
            self.kernels[kernel_id] = f"_K{len(self.kernels)}"
        return self.kernels[kernel_id]


def _emit_leaf(w: _Writer, code: SolveCode, node: Any, depth: int) -> None:
    if node is None:
        w.emit(depth, "pass  # no kernel valid in the whole bucket: dynamic selection")
        return
    if isinstance(node, tuple) and node and node[0] == "square":
        _, same, other = node
        w.emit(depth, "if Sq == Sk:")
        _emit_leaf(w, code, same, depth + 1)
        w.emit(depth, "else:")
        _emit_leaf(w, code, other, depth + 1)
        return
    if isinstance(node, tuple) and node and node[0] == "split":  # the parts cover the enclosing interval
        _, dim, parts = node
        for j, (lo, hi, child) in enumerate(parts):
            w.emit(depth, f"{'if' if j == 0 else 'elif'} {lo} <= {code.names[dim]} <= {hi}:")
            _emit_leaf(w, code, child, depth + 1)
        return
    spec = runtime.registry.kernel(node)
    var = w.var(node)
    w.branches += 1
    # What would make the engine reject this kernel at run time; the checks a kernel does not need
    # (a backward, determinism, graph safety it has) cost nothing.
    unsafe = []
    if not spec.supports_backward:  # the dynamic key's grad test: grad mode on and an input requiring it
        unsafe.append(f"(_grad_enabled() and ({' or '.join(t + '.requires_grad' for t in code.tensors)}))")
    if not spec.deterministic:
        unsafe.append("_deterministic()")
    if not spec.graph_safe and w.cuda:
        unsafe.append("_capturing()")
    if unsafe:
        w.emit(depth, f"if not {unsafe[0] if len(unsafe) == 1 else '(' + ' or '.join(unsafe) + ')'}:")
        w.emit(depth + 1, f"return {code.kernel_call(spec, var)}")
    else:
        w.emit(depth, f"return {code.kernel_call(spec, var)}")


def _emit_tree(w: _Writer, code: SolveCode, ranged: list[str], node: Any, depth: int, i: int = 0) -> None:
    if i == len(ranged):
        _emit_leaf(w, code, node, depth)
        return
    var = code.names[ranged[i]]
    for j, (lo, hi, child) in enumerate(node):
        w.emit(depth, f"{'if' if j == 0 else 'elif'} {lo} <= {var} <= {hi}:")
        _emit_tree(w, code, ranged, child, depth + 1, i + 1)


def _kernel_source(spec: KernelSpec, modules: dict[str, str]) -> str:
    if spec.id in modules:
        return f"_kernel({modules[spec.id]!r}, {spec.id!r})"
    module, qualname = getattr(spec.impl, "__module__", None), getattr(spec.impl, "__qualname__", "")
    if not module or "<" in qualname:
        raise ConfigurationError(
            f"kernel {spec.id}: its impl {spec.impl!r} cannot be imported by a solved module; "
            "define it at module level (or register it in a backend module)"
        )
    return f"_attr({module!r}, {qualname!r})"


def _backend_modules() -> dict[str, str]:
    """Kernel id and backend name -> the built-in module that defines it."""
    out: dict[str, str] = {}
    for name in builtin_backend_modules():
        module = importlib.import_module(f"layerzero.backends.{name}")
        backend = getattr(module, "BACKEND", None)
        if backend is not None:
            out.setdefault(backend.name, module.__name__)
            out.update({spec.id: module.__name__ for spec in backend.kernels})
    return out


def _parse_dims(name: str, dims: Mapping[str, Any]) -> tuple[dict[str, Interval], dict[str, list[int]]]:
    wl = workloads.workload(name)
    unknown = set(dims) - set(wl.dims)
    if unknown:
        raise InvalidInputError(f"{name} dims", f"names among {', '.join(wl.dims)}", ", ".join(sorted(unknown)))
    ranges, exact = {}, {}
    for d in wl.dims:
        if d not in dims:
            raise InvalidInputError(f"{name}.{d}", "(lo, hi) for a ranged dim or a list of values", "nothing")
        value = dims[d]
        if d in wl.ranged:
            if not (isinstance(value, tuple | list) and len(value) == 2 and 1 <= int(value[0]) <= int(value[1])):
                raise InvalidInputError(f"{name}.{d}", "a range (lo, hi) with 1 <= lo <= hi", value)
            ranges[d] = (int(value[0]), int(value[1]))
        else:
            values = list(value) if isinstance(value, list | tuple | set) else [value]
            if not values:
                raise InvalidInputError(f"{name}.{d}", "at least one value", value)
            exact[d] = [int(x) for x in values]
    return ranges, exact


def _by_family(ops: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{family: dims} for {op id or family: dims}; the dims an op id fixes (causal for attention.causal,
    seq_q for attention.decode) are set, and given values that contradict them are an error."""
    out: dict[str, dict[str, Any]] = {}
    for op, given in ops.items():
        name, fixed = workloads.resolve(op)
        if name in out:
            raise InvalidInputError("ops", f"one entry per op family ({name})", op)
        if not isinstance(given, Mapping):
            raise InvalidInputError(f"ops[{op!r}]", "a mapping of dims", type(given).__name__)
        dims = dict(given)
        ranged = workloads.workload(name).ranged
        for dim, value in fixed.items():
            want: Any = (value, value) if dim in ranged else [value]
            if dim in dims:
                have = dims[dim]
                have = (
                    tuple(int(x) for x in have)
                    if dim in ranged
                    else [int(x) for x in (have if isinstance(have, list | tuple | set) else [have])]
                )
                if list(have) != list(want):
                    raise InvalidInputError(f"{op}.{dim}", f"{want!r} (as {op} says) or nothing", dims[dim])
            dims[dim] = want
        out[name] = dims
    return out


def solve(
    ops: str | Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    dtypes: Sequence[torch.dtype] = (),
    device: str | torch.device | None = None,
    **dims: Any,
) -> SolveResult:
    """Write a module at `path` that dispatches `ops` by flat bucket bounds, with no selection engine.

    ops: an op family name or op id (`attention.causal`: causal fixed) with its dims as keyword
    arguments, or {name: {dim: value}}. Ranged dims (attention batch/seq_q/seq_k, norm rows) take
    (lo, hi); the others a list of exact values.
    """
    text, result = _generate(ops, dtypes, device, dims)
    path = Path(path)
    path.write_text(text)
    return SolveResult(path, *result)


def _generate(
    ops: str | Mapping[str, Mapping[str, Any]],
    dtypes: Sequence[torch.dtype],
    device: str | torch.device | None,
    dims: Mapping[str, Any],
    combos: Mapping[str, set[tuple[int, ...]]] | None = None,
    order: Mapping[str, Sequence[str]] | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """(module text, SolveResult fields after the path) for lz.solve and lz.compile.

    combos: per family, the combinations of exact dims to solve (lz.compile: those of its shapes);
    None solves every combination of the values given. order: per family, only these kernels, the
    first that can run a bucket winning (layerzero.dispatch's static dispatcher)."""
    if isinstance(ops, str):
        ops = {ops: dims}
    elif dims:
        raise TypeError("pass dims inside the ops mapping or as keywords with one op name, not both")
    ops = _by_family(ops)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_list = list(dtypes) or [torch.bfloat16 if dev.type == "cuda" else torch.float32]
    runtime.ensure_loaded()
    modules = _backend_modules()
    w = _Writer(dev.type == "cuda")
    notes: list[str] = []
    cells = 0
    bodies: list[list[str]] = []
    names = list(ops)
    for name in names:
        if name not in FAMILY_CODE:
            raise InvalidInputError("ops", f"op families among {', '.join(FAMILY_CODE)}", name)
        code = FAMILY_CODE[name]
        wl = workloads.workload(name)
        ranges, exact = _parse_dims(name, ops[name])
        ranged = [d for d in wl.dims if d in wl.ranged]
        intervals = {d: _intervals(*ranges[d]) for d in ranged}
        sig = inspect.signature(workloads.public_op(name))
        params = list(sig.parameters.values())
        start = len(w.lines)
        signature = ", ".join(p.name + ("" if p.default is p.empty else f"={p.default!r}") for p in params)
        w.emit(0, f"def {name}({signature}):")
        w.emit(1, f'"""Solved {name}: see the module docstring; anything else goes to layerzero.{name}."""')
        # under torch.compile / strict torch.export the call goes to layerzero's op, one custom-op node in
        # the graph: traced, a kernel adapter could break the graph (SDPA's flag pinning takes a lock)
        guard = ["not _compiling()", f"{code.first}.{'is_cuda' if dev.type == 'cuda' else 'is_cpu'}"]
        guard += [f"{p.name} is not None" for p in params if p.name in code.required]
        for p in params:
            if p.name in code.handled or p.default is p.empty:
                continue
            guard.append(f"{p.name} is None" if p.default is None else f"{p.name} == {p.default!r}")
        w.emit(1, f"if {' and '.join(guard)}:")
        for line in code.prologue:
            w.emit(2, line)
        depth = 2 + sum(1 for line in code.prologue if line.rstrip().endswith(":"))
        first = True
        for dtype in dtype_list:
            # dict.fromkeys: a value given twice (hidden=(4096, 4096)) is one branch, not a dead copy
            for combo in itertools.product(*(tuple(dict.fromkeys(exact[d])) for d in wl.dims if d in exact)):
                if combos is not None and combo not in combos[name]:
                    continue
                fixed = dict(zip([d for d in wl.dims if d in exact], combo, strict=True))
                shape = tuple(fixed.get(d, ranges.get(d, (1, 1))[0]) for d in wl.dims)
                template = workloads.context_for(name, shape, dtype, dev)
                counter = [0]
                node = _tree(name, template, ranged, intervals, notes, counter, (order or {}).get(name))
                cells += counter[0]
                conds = [f"dt is _{str(dtype).removeprefix('torch.')}"]
                for d, value in fixed.items():
                    var = code.names[d]
                    conds.append(("" if value else "not ") + var if d == "causal" else f"{var} == {value}")
                w.emit(depth, f"{'if' if first else 'elif'} {' and '.join(conds)}:")
                first = False
                _emit_tree(w, code, ranged, node, depth + 1)
        args = ", ".join(p.name for p in params)
        w.emit(1, f"return _dynamic_{name}({args})")
        bodies.append(w.lines[start:])
        del w.lines[start:]
    here = current_signature(dev.type, dev.index or 0)
    specs = {kid: runtime.registry.kernel(kid) for kid in w.kernels}
    used_backends = sorted({s.backend for s in specs.values() if s.id in modules})
    versions = {b: runtime.registry.backend(b).availability[1] for b in used_backends}
    text = _module_text(names, ops, dtype_list, dev, here.as_dict(), versions, modules, specs, w, bodies)
    return text, ({v: k for k, v in w.kernels.items()}, cells, w.branches, tuple(dict.fromkeys(notes)))


def _module_text(
    names: list[str],
    ops: Mapping[str, Mapping[str, Any]],
    dtypes: list[torch.dtype],
    dev: torch.device,
    signature: dict[str, Any],
    versions: dict[str, str | None],
    modules: dict[str, str],
    specs: dict[str, KernelSpec],
    w: _Writer,
    bodies: list[list[str]],
) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    solved = "\n".join(f"    {n}: {dict(ops[n])}" for n in names)
    out = [
        f'"""Generated by layerzero.solve on {stamp}; do not edit (solve again instead).',
        "",
        f"Solved for {dev.type} {signature['device']!r}, dtypes "
        f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)}:",
        solved,
        "Each function dispatches by flat bucket bounds straight to a kernel; other calls, and every call",
        "on a machine whose signature differs from SIGNATURE, go to LayerZero's dynamic selection.",
        '"""',
        "",
        "import importlib",
        "import warnings",
        "",
        "import torch",
        "",
        f"SIGNATURE = {signature!r}",
        f"BACKEND_VERSIONS = {versions!r}",
        f"KERNEL_IDS = {{{', '.join(f'{v!r}: {k!r}' for k, v in w.kernels.items())}}}",
        "",
        "",
        "def _kernel(module, kernel_id):",
        "    for spec in importlib.import_module(module).BACKEND.kernels:",
        "        if spec.id == kernel_id:",
        "            return spec.impl",
        "    raise ImportError(f'{module} no longer defines kernel {kernel_id}; solve again')",
        "",
        "",
        "def _attr(module, qualname):",
        "    obj = importlib.import_module(module)",
        "    for part in qualname.split('.'):",
        "        obj = getattr(obj, part)",
        "    return obj",
        "",
        "",
        "def signature_problems():",
        '    """How this machine differs from the one the module was solved on (empty: it matches)."""',
        "    from layerzero.perf.perfdb import current_signature",
        "",
        f"    here = current_signature({dev.type!r}, 0).as_dict()",
        "    out = [f'{k}: solved for {v!r}, here {here.get(k)!r}' for k, v in SIGNATURE.items() if here.get(k) != v]",
        "    for backend, version in BACKEND_VERSIONS.items():",
        "        now = importlib.import_module(_BACKEND_MODULES[backend]).BACKEND.availability[1]",
        "        if now != version:",
        "            out.append(f'{backend}: solved for {version!r}, here {now!r}')",
        "    return out",
        "",
        "",
        f"_BACKEND_MODULES = { ({b: modules[b] for b in versions})!r}",
        "# torch's C functions behind its grad, determinism and stream-capture queries: the same answers",
        "# without a Python frame per call",
        "_grad_enabled = torch._C.is_grad_enabled",
        "# dynamo folds this call to True while it traces (torch.compile, strict export); in eager it only",
        "# returns False (half the cost of torch.compiler.is_compiling, which also asks TorchScript)",
        "_compiling = getattr(torch.compiler, 'is_dynamo_compiling', torch.compiler.is_compiling)",
        "_deterministic = getattr(torch._C, '_get_deterministic_algorithms', torch.are_deterministic_algorithms_enabled)",
    ]
    if dev.type == "cuda":
        out.append(
            "_capturing = getattr(torch._C, '_cuda_isCurrentStreamCapturing', torch.cuda.is_current_stream_capturing)"
        )
    for d in dtypes:
        name = str(d).removeprefix("torch.")
        out.append(f"_{name} = torch.{name}")
    for kid, spec in specs.items():
        out.append(f"{w.kernels[kid]} = {_kernel_source(spec, modules)}  # {kid}")
    out.append("")
    for n in names:
        out.append(f"from layerzero import {n} as _dynamic_{n}  # noqa: E402")
    out += ["", ""]
    for body in bodies:
        out += body + ["", ""]
    out += [
        "PROBLEMS = signature_problems()",
        "if PROBLEMS:",
        "    warnings.warn(f'{__name__} was solved on another machine or software ({\"; \".join(PROBLEMS)}); '",
        "                  'using dynamic selection', RuntimeWarning, stacklevel=2)",
    ]
    out += [f"    {n} = _dynamic_{n}  # noqa: F811" for n in names]
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One shape of `lz.compile`: its power-of-two bucket and the kernel solved for it ("" when none
    can run it: the solved module sends such calls to dynamic selection)."""

    shape: tuple[int, ...]
    dtype: str
    bucket: str
    kernel: str


@dataclass(frozen=True, slots=True)
class CompiledPlans:
    """What `lz.compile` returns: per shape the bucket and kernel, and the solved module covering the
    shapes' ranges (flat bucket bounds calling the kernels directly, as `lz.solve` writes it).

    `save(path)` writes the module (import it to dispatch with no selection engine); `load()` builds
    it in memory; `source` is its text.
    """

    operation: str
    family: str
    dims: dict[str, Any]
    plans: tuple[PlanEntry, ...]
    source: str
    kernels: dict[str, str]  # variable in the module -> kernel id
    buckets: int
    branches: int
    notes: tuple[str, ...] = ()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.source)
        return path

    def load(self, name: str | None = None) -> ModuleType:
        """The solved module, built in memory: `compiled.load().attention(q, k, v, is_causal=True)`."""
        module = ModuleType(name or f"layerzero_compiled_{self.family}")
        exec(builtins.compile(self.source, f"<lz.compile {self.operation}>", "exec"), module.__dict__)  # noqa: S102
        return module

    def __str__(self) -> str:
        lines = [
            f"compiled {self.operation} ({self.family}): {len(self.plans)} shape(s), {self.buckets} buckets -> "
            f"{self.branches} branches; kernels: {', '.join(sorted(set(self.kernels.values()))) or 'none'}"
        ]
        for p in self.plans:
            lines.append(f"  {'x'.join(map(str, p.shape)):<24} {p.dtype:<9} {p.kernel:<28} {p.bucket}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def compile(
    operation: str,
    shapes: Sequence[Any],
    *,
    dtypes: Sequence[torch.dtype] = (),  # noqa: A001
    device: str | torch.device | None = None,
    kernels: Sequence[str] | None = None,
) -> CompiledPlans:
    """Offline plans for `shapes` of `operation` (an op id or family name): each shape's bucket and
    kernel, and a solved module over the shapes' ranges (lz.solve), ready to save.

    shapes: as for lz.tune / lz.warmup (for an attention op id also (batch, seq, heads, head_dim)).
    Ranged dims (batch, sequence lengths, rows) are solved over [smallest, largest] of the shapes,
    the exact ones (heads, head_dim, ...) for the combinations the shapes have. kernels: only these
    kernel ids, the first that can run a bucket winning (else the engine's choice).
    """
    resolved = [workloads.op_shape(operation, s) for s in shapes]
    if not resolved:
        raise InvalidInputError("shapes", f"at least one shape for {operation}", shapes)
    name = resolved[0][0]
    wl = workloads.workload(name)
    full = [shape for _, shape in resolved]
    dims: dict[str, Any] = {}
    for i, d in enumerate(wl.dims):
        values = [shape[i] for shape in full]
        dims[d] = (max(1, min(values)), max(1, max(values))) if d in wl.ranged else sorted(set(values))
    exact = [i for i, d in enumerate(wl.dims) if d not in wl.ranged]
    combos = {name: {tuple(shape[i] for i in exact) for shape in full}}
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_list = list(dtypes) or [torch.bfloat16 if dev.type == "cuda" else torch.float32]
    order = None if kernels is None else {name: list(kernels)}
    text, (variables, cells, branches, notes) = _generate({name: dims}, dtype_list, dev, {}, combos, order)
    plans = []
    for dtype in dtype_list:
        for shape in full:
            ctx = workloads.context_for(name, shape, dtype, dev)
            ranked = _rankings(name, [ctx], {}, kernels)[0]
            plans.append(PlanEntry(shape, ctx.dtype_name, Bucket.of(ctx).label(), ranked[0] if ranked else ""))
    return CompiledPlans(operation, name, dims, tuple(plans), text, variables, cells, branches, notes)
