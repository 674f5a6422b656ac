"""One module per kernel library, each defining `BACKEND` (or `BACKENDS`) and importing its library
lazily; and the Registry that indexes their kernels."""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from ..errors import UnknownNameError
from ..kernel import Backend, KernelSpec


def builtin_backend_modules() -> list[str]:
    """Every module of layerzero.backends; each defines BACKEND or BACKENDS (none imports its library)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def builtin_backends() -> list[Backend]:
    """The backends the built-in modules declare, in module order (imports each module, not its library)."""
    out: list[Backend] = []
    for name in builtin_backend_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        out.extend(b for b in getattr(module, "BACKENDS", None) or (getattr(module, "BACKEND", None),) if b is not None)
    return out


class Registry:
    """Backends and their kernels, indexed by id and by op."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.on_change = on_change  # given to each backend added (Backend.changed): the runtime's bump
        self.backends: dict[str, Backend] = {}
        self.kernels: dict[str, KernelSpec] = {}
        self.by_op: dict[str, list[KernelSpec]] = {}
        self.aliases: dict[str, str] = {}
        self.groups: dict[str, str] = {}  # group name -> kernel-id glob (Backend.groups)
        self.descriptors: Any = None  # capabilities.Descriptors of the runtime: applied when an op is first seen

    def add_backend(self, backend: Backend) -> None:
        """Add (or replace: same name) a backend and register its kernels."""
        backend.on_change = self.on_change
        self.backends[backend.name] = backend
        for alias in backend.aliases:
            self.aliases[alias] = backend.name
        self.groups.update(backend.groups)
        for spec in backend.kernels:
            self.add_kernel(spec)

    def add_kernel(self, spec: KernelSpec) -> None:
        if spec.backend not in self.backends:
            self.backends[spec.backend] = Backend(spec.backend, ())
        old = self.kernels.get(spec.id)
        if old is not None:
            for op in old.ops:
                self.by_op[op] = [s for s in self.by_op[op] if s.id != spec.id]
        self.kernels[spec.id] = spec
        for op in spec.ops:
            self.by_op.setdefault(op, []).append(spec)

    def backend_name(self, name: str) -> str:
        """Canonical backend name for a name or alias (`torch_sdpa` -> `torch`)."""
        if name in self.backends:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise UnknownNameError("backend", name, list(self.backends) + list(self.aliases))

    def group(self, name: str) -> tuple[str, ...] | None:
        """The kernel ids a group name stands for as a policy target (`torch_sdpa`), or None."""
        pattern = self.groups.get(name)
        if pattern is None:
            return None
        return tuple(sorted(k for k in self.kernels if fnmatch.fnmatchcase(k, pattern)))

    def backend(self, name: str) -> Backend:
        return self.backends[self.backend_name(name)]

    def kernel(self, kernel_id: str) -> KernelSpec:
        spec = self.kernels.get(kernel_id)
        if spec is None:
            raise UnknownNameError("kernel", kernel_id, self.kernels)
        return spec

    def candidates(self, op: str) -> list[KernelSpec]:
        if self.descriptors is not None and self.descriptors.pending:
            self.descriptors.resolve(self, op)
        return self.by_op.get(op, [])
