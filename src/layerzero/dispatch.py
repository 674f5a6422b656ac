"""The spec's dispatch modes, as thin layers over what LayerZero already has (no second engine):

- static: `StaticDispatcherBuilder` -> a solved module (`lz.compile` / `lz.solve`): flat bucket
  bounds that call the kernels directly, restricted to the kernels given, in their order.
- dynamic: `create_dynamic_dispatcher` -> the `lz.*` path: one plan-cache lookup per call.
- hot reload / config-driven: `create_hot_reload_dispatcher("dispatch_config.yaml")` -> the policy
  watcher on a dispatch config (`rules:` of operation, conditions (field, operator, value), kernel;
  each rule is a lock, the first matching rule decides), or on a policy file.

    dispatcher = create_dynamic_dispatcher()
    out = dispatcher.dispatch("attention.causal", (q, k, v))

`inputs` is the tuple of positional arguments of the op (`(q, k, v)`), one tensor, or a mapping of
keyword arguments; more keyword arguments may follow. Imported on first use: `import layerzero`
does not load it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Any

from .backends import Registry
from .context import SelectionContext
from .errors import (
    BackendNotAvailableError,
    ConfigurationError,
    InvalidInputError,
    NoKernelFoundError,
    UnknownNameError,
)
from .kernel import Backend, KernelSpec
from .ops import is_op_id, op_matches
from .policy.config import PolicyWatcher, watch_policy
from .policy.loader import parse_dispatch_text
from .policy.model import Policy
from .selection.inspect import resolve_call, which
from .state import runtime

log = logging.getLogger("layerzero")

__all__ = [
    "DynamicDispatcher",
    "HotReloadDispatcher",
    "StaticDispatcher",
    "StaticDispatcherBuilder",
    "create_dynamic_dispatcher",
    "create_hot_reload_dispatcher",
    "kernel_registry",
    "load_dispatch_config",
]


def kernel_registry() -> Registry:
    """The runtime's registry of kernels and backends (what `create_dynamic_dispatcher` selects from)."""
    runtime.ensure_loaded()
    return runtime.registry


def load_dispatch_config(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a dispatch config file; PolicyValidationError names the file, line and text."""
    runtime.ensure_loaded()
    return parse_dispatch_text(Path(path).read_bytes(), runtime.registry, source=os.fspath(path))


def _inputs(inputs: Any, kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), {**inputs, **kwargs}
    if isinstance(inputs, tuple | list):
        return tuple(inputs), kwargs
    return (inputs,), kwargs


class _Resolver:
    """Op id -> family and implied arguments, remembered per (op, argument count, keyword names); the
    op id is checked against the inputs once per call signature (the family's plan-cache key)."""

    def __init__(self) -> None:
        self.families: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}
        self.checked: dict[Any, bool] = {}

    def __call__(
        self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], context: SelectionContext | None = None
    ) -> tuple[Any, dict[str, Any], Any]:
        sig = (operation, len(args), tuple(kwargs))
        found = self.families.get(sig)
        if found is None:
            call = resolve_call(operation, args, kwargs)  # raises for inputs of another op
            implied = {k: v for k, v in call.kwargs.items() if k not in kwargs}
            found = self.families[sig] = (call.family, implied)
        family, implied = found
        kw = {**implied, **kwargs} if implied else kwargs
        key = family.key(*args, **kw)
        if (operation, key, context) not in self.checked:
            ctx = family.context(*args, **kw)
            if is_op_id(operation) and not op_matches(operation, ctx):
                call = resolve_call(operation, args, kwargs)  # another family of the op, or the error saying
                family, kw, key = call.family, call.kwargs, call.family.key(*args, **call.kwargs)  # what they are
                ctx = family.context(*args, **kw)
            if context is not None:
                _check_context(context, ctx)
            if len(self.checked) > 4096:
                self.checked.clear()
            self.checked[(operation, key, context)] = True
        return family, kw, key


def _check_context(given: SelectionContext, actual: SelectionContext) -> None:
    """Every field the given context sets (differs from its default) must be what the inputs have."""
    if not isinstance(given, SelectionContext):
        raise InvalidInputError("context", "a layerzero.SelectionContext", type(given).__name__)
    if given.op != actual.op and not op_matches(given.op, actual):
        raise InvalidInputError("context", f"a context of the inputs' op {actual.op}", f"op {given.op}")
    for f in fields(given):
        value = getattr(given, f.name)
        if f.name not in ("op", "isa") and value != f.default and value != getattr(actual, f.name):
            raise InvalidInputError(
                "context", f"{f.name}={getattr(actual, f.name)} (as the inputs have)", f"{f.name}={value}"
            )


# ---- dynamic


class DynamicDispatcher:
    """Dispatch by op id through LayerZero's selection: a plan-cache lookup per call, a selection per
    new call signature, policy, PerfDB and health all in force (the same as calling `lz.<op>`)."""

    def __init__(self) -> None:
        self._resolve = _Resolver()

    def dispatch(self, operation: str, inputs: Any, context: SelectionContext | None = None, **kwargs: Any) -> Any:
        """Run `operation` on `inputs`. `context`: the SelectionContext the caller expects; each field
        it sets is checked against the inputs (once per call signature)."""
        args, kwargs = _inputs(inputs, kwargs)
        family, kw, _ = self._resolve(operation, args, kwargs, context)
        return family.function(*args, **kw)

    def which(self, operation: str, inputs: Any, **kwargs: Any) -> str:
        """The kernel id `dispatch` runs for these inputs."""
        args, kwargs = _inputs(inputs, kwargs)

        return which(operation, *args, **kwargs)


def create_dynamic_dispatcher(
    kernel_registry: Registry | Iterable[KernelSpec] | None = None,
    backend_registry: Registry | Iterable[Backend] | None = None,
) -> DynamicDispatcher:
    """A dispatcher that selects at run time from the runtime's registry.

    kernel_registry / backend_registry: the runtime's registry (`layerzero.dispatch.kernel_registry()`),
    or KernelSpecs / Backends to register into it first (they then compete in every `lz.*` call too).
    """
    for given, kind in ((backend_registry, Backend), (kernel_registry, KernelSpec)):
        if given is None:
            continue
        if isinstance(given, Registry):
            if given is not runtime.registry:
                raise ConfigurationError(
                    "registry: expected the runtime's registry (layerzero.dispatch."
                    "kernel_registry()) or items to register, got another Registry"
                )
            continue
        items = list(given.values()) if isinstance(given, Mapping) else list(given)
        for item in items:
            if not isinstance(item, kind):
                raise InvalidInputError(
                    "kernel_registry" if kind is KernelSpec else "backend_registry",
                    f"{kind.__name__} objects or the runtime's registry",
                    type(item).__name__,
                )
            runtime.register(item)
    runtime.ensure_loaded()
    return DynamicDispatcher()


# ---- hot reload / config-driven


def _parse_config(content: bytes, path: str) -> Policy:
    return parse_dispatch_text(content, runtime.registry, source=path)


class HotReloadDispatcher(DynamicDispatcher):
    """A dynamic dispatcher whose rules come from a watched file (dispatch config or policy file).

    The file is the policy's file source (process-wide, as `lz.configure(path, watch=True)`): an
    invalid new version is logged and the previous rules stay. `reload()` polls now; `stop()` ends it.
    """

    def __init__(self, watcher: PolicyWatcher) -> None:
        super().__init__()
        self.watcher = watcher

    @property
    def config_path(self) -> str:
        return self.watcher.path

    def reload(self) -> bool:
        """Poll the file now: True when a new valid version was installed."""
        return self.watcher.check()

    def stop(self) -> None:
        self.watcher.stop()

    def __enter__(self) -> HotReloadDispatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def create_hot_reload_dispatcher(
    config_path: str | os.PathLike[str] = "dispatch_config.yaml", watch_interval_seconds: float = 1.0
) -> HotReloadDispatcher:
    """Load `config_path` now (PolicyValidationError if invalid), then poll it every
    `watch_interval_seconds`; a changed valid file takes effect for the next call, without restart."""
    watcher = watch_policy(config_path, watch_interval_seconds, parse=_parse_config)
    return HotReloadDispatcher(watcher)


# ---- static


class StaticDispatcherBuilder:
    """Kernels fixed at build time, dispatched by a solved module (`lz.compile`): no policy, PerfDB or
    health is consulted per call, and a call's kernel never changes.

    `with_kernel(spec_or_id, operation=..., default=False)` adds a kernel to an op's table (the
    default first, then in the order added); `with_shapes(operation, shapes)` solves the table over
    those shapes' ranges at build time. Without shapes, each new call signature is solved on its
    first call. Ops: attention op ids, norm.rms, norm.layer (what lz.solve generates code for).
    """

    def __init__(self) -> None:
        self._kernels: dict[str, list[tuple[str, bool]]] = {}
        self._shapes: dict[str, tuple[list[Any], dict[str, Any]]] = {}

    def with_kernel(self, kernel: KernelSpec | str, operation: str, default: bool = False) -> StaticDispatcherBuilder:
        kernel_id = kernel.id if isinstance(kernel, KernelSpec) else kernel
        if not isinstance(kernel_id, str):
            raise InvalidInputError("kernel", "a KernelSpec or a kernel id", type(kernel).__name__)
        runtime.ensure_loaded()
        spec = runtime.registry.kernel(kernel_id)  # UnknownNameError: register it with lz.register_kernel first
        if isinstance(kernel, KernelSpec) and kernel is not spec and kernel != spec:
            raise ConfigurationError(
                f"kernel {kernel_id}: the spec differs from the registered one; register it "
                "with lz.register_kernel first"
            )
        from .perf import solve, workloads

        name, _ = workloads.resolve(operation)
        if name not in solve.FAMILY_CODE:
            raise InvalidInputError(
                "operation", f"an op static dispatch can solve ({', '.join(solve.FAMILY_CODE)})", operation
            )
        if not any(_implements(op, operation) for op in spec.ops):
            raise InvalidInputError(
                "kernel", f"a kernel implementing {operation}", f"{kernel_id} (it implements {', '.join(spec.ops)})"
            )
        table = self._kernels.setdefault(operation, [])
        if default and any(d for _, d in table):
            raise ConfigurationError(f"{operation}: a default kernel is already set ({table[0][0]})")
        entry = (kernel_id, bool(default))
        if default:
            table.insert(0, entry)
        else:
            table.append(entry)
        return self

    def with_shapes(self, operation: str, shapes: Sequence[Any], **options: Any) -> StaticDispatcherBuilder:
        """Solve `operation` over `shapes` at build time (options: dtypes=, device= as lz.compile)."""
        self._shapes[operation] = (list(shapes), options)
        return self

    def build(self) -> StaticDispatcher:
        """The dispatcher. Kernels whose backend is not installed here are dropped (logged, and listed in
        `notes`); an op left with none is a BackendNotAvailableError."""
        if not self._kernels:
            raise ConfigurationError("StaticDispatcherBuilder: no kernels; call with_kernel(...) first")
        unknown = set(self._shapes) - set(self._kernels)
        if unknown:
            raise ConfigurationError(f"with_shapes for {', '.join(sorted(unknown))}: no kernel added for it")
        tables: dict[str, list[str]] = {}
        notes: list[str] = []
        for operation, entries in self._kernels.items():
            kept = []
            for kernel_id, _ in entries:
                backend = runtime.registry.backend(runtime.registry.kernel(kernel_id).backend)
                ok, _, why = backend.availability
                if ok:
                    kept.append(kernel_id)
                else:
                    notes.append(f"{operation}: {kernel_id} dropped ({why})")
                    log.warning("static dispatcher: %s", notes[-1])
            if not kept:
                raise BackendNotAvailableError(
                    f"static dispatcher: no kernel given for {operation} can run here: "
                    + "; ".join(n for n in notes if n.startswith(f"{operation}:"))
                )
            tables[operation] = kept
        dispatcher = StaticDispatcher(tables, tuple(notes))
        for operation, (shapes, options) in self._shapes.items():
            dispatcher._solve(operation, shapes, options, None)
        return dispatcher


class StaticDispatcher:
    """Built by StaticDispatcherBuilder: per op, kernels in order of preference and the solved
    functions that call them. A call none of them can run is a NoKernelFoundError (never another
    kernel)."""

    def __init__(self, tables: dict[str, list[str]], notes: tuple[str, ...]) -> None:
        self.tables = tables
        self.notes = notes
        self.compiled: dict[str, list[Any]] = {op: [] for op in tables}  # CompiledPlans per op
        self._solved: dict[str, Any] = {}  # op -> the function solved over with_shapes' shapes
        self._by_key: dict[tuple[str, Any], Any] = {}  # (op, call key) -> solved function (lazy)
        self._resolve = _Resolver()

    def dispatch(self, operation: str, inputs: Any, **kwargs: Any) -> Any:
        if operation not in self.tables:
            raise UnknownNameError("operation of this static dispatcher", operation, self.tables)
        args, kwargs = _inputs(inputs, kwargs)
        family, kw, key = self._resolve(operation, args, kwargs)
        run = self._solved.get(operation) or self._by_key.get((operation, key))
        if run is None:
            run = self._solve_call(operation, family, args, kw, key)
        return run(*args, **kw)

    def kernels(self, operation: str) -> list[str]:
        """The op's kernels in order of preference (those installed here)."""
        return list(self.tables[operation])

    def _solve_call(self, operation: str, family: Any, args: tuple[Any, ...], kw: dict[str, Any], key: Any) -> Any:
        from .perf import workloads

        ctx = family.context(*args, **kw)
        shape = workloads.shape_of(family.name, ctx)
        if shape is None:
            raise NoKernelFoundError(
                f"static dispatcher: {operation} with these inputs ({ctx.summary()}) is not a "
                "call lz.solve can solve (masks, dropout, windows, ... go to "
                "create_dynamic_dispatcher)"
            )
        run = self._solve(operation, [shape], {"dtypes": [ctx.dtype], "device": _device(ctx)}, ctx)
        self._by_key[(operation, key)] = run
        return run

    def _solve(self, operation: str, shapes: list[Any], options: dict[str, Any], ctx: SelectionContext | None) -> Any:
        from .perf.solve import compile as compile_plans

        compiled = compile_plans(operation, shapes, kernels=self.tables[operation], **options)
        self.compiled[operation].append(compiled)
        module = compiled.load(f"layerzero_static_{compiled.family}")
        if module.PROBLEMS:  # solved on this machine a moment ago: only a changed environment gets here
            raise ConfigurationError(
                f"static dispatcher: the solved module does not match this machine: {'; '.join(module.PROBLEMS)}"
            )
        tables = self.tables[operation]

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise NoKernelFoundError(
                f"static dispatcher: none of {', '.join(tables)} was solved for this {operation} "
                "call (outside the shapes it was built for, or a kernel of the table cannot "
                "run it)"
            )

        setattr(module, f"_dynamic_{compiled.family}", refuse)  # the solved module's way out: refused here
        run = getattr(module, compiled.family)
        if ctx is None:
            self._solved[operation] = run
        return run


def _implements(kernel_op: str, operation: str) -> bool:
    """A kernel of `kernel_op` can serve `operation` (a dense attention kernel serves decode calls too)."""
    return op_matches(operation, SelectionContext(op=kernel_op, seq_len_q=1))


def _device(ctx: SelectionContext) -> str:
    return f"cuda:{ctx.device_index}" if ctx.device_type == "cuda" else ctx.device_type
