"""Capabilities descriptors: a backend's kernel constraints as a versioned JSON document.

Code declares each KernelSpec; a descriptor overlays fields of those specs, so a library
upgrade that adds (or breaks) a head_dim or a dtype is a data change, not a release:

    {"schema_version": 1, "backend": "torch", "versions": ">=2.5",
     "kernels": {"torch.sdpa_flash_cpu": {"max_head_dim": 256, "dtypes": ["float32", "bfloat16"]}}}

Descriptors come from `LAYERZERO_DESCRIPTORS=dir` (files `<backend>.json`) or
`lz.load_descriptors(path)` (capabilities.py). Files are read and hashed when the runtime loads,
but a document is parsed and applied only when selection first considers a kernel of its backend
(Registry.candidates). The digest of all descriptor bytes is part of what the plan cache depends
on: a change of digest bumps the generation; reloading identical bytes does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigurationError
from .kernel import LAYOUTS, KernelSpec, dtype_name

if TYPE_CHECKING:
    from .backends import Registry

log = logging.getLogger("layerzero")

SCHEMA_VERSION = 1
ENV_VAR = "LAYERZERO_DESCRIPTORS"


class DescriptorError(ConfigurationError):
    """A capabilities descriptor is unreadable or invalid; names the file, the field, expected and got."""

    def __init__(self, source: str, where: str, expected: str, got: object) -> None:
        self.source, self.where, self.expected, self.got = source, where, expected, got
        super().__init__(f"descriptor {source}: {where}: expected {expected}, got {got!r}")


# ---- the schema: JSON field -> KernelSpec field, with its parser ----------------------------------

_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
        "int8",
        "int32",
        "int64",
        "uint8",
    )
}


def _int(lo: int) -> Callable[[object], object]:
    def parse(v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"an integer >= {lo}")
        return v

    return parse


def _bool(v: object) -> object:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _str_set(
    allowed: tuple[str, ...] | None = None, optional: bool = False, as_tuple: bool = False
) -> Callable[[object], object]:
    def parse(v: object) -> object:
        if v is None and optional:
            return None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or (as_tuple and not v):
            raise ValueError("a list of strings" + (" (or null)" if optional else ""))
        bad = [s for s in v if allowed is not None and s not in allowed]
        if bad:
            raise ValueError(f"names from {list(allowed or ())} (unknown: {bad})")
        return tuple(v) if as_tuple else frozenset(v)

    return parse


def _int_set(optional: bool) -> Callable[[object], object]:
    def parse(v: object) -> object:
        if v is None and optional:
            return None
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v):
            raise ValueError("a list of positive integers" + (" (or null)" if optional else ""))
        return frozenset(v)

    return parse


def _dtypes(v: object) -> object:
    """dtype names as policy conditions take them: float16, fp16, bf16, torch.float32, ..."""
    if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
        raise ValueError(f"a non-empty list of dtype names from {list(_DTYPES)}")
    bad = [s for s in v if dtype_name(s) not in _DTYPES]
    if bad:
        raise ValueError(f"dtype names from {list(_DTYPES)} or their short forms (fp16, bf16, fp32) (unknown: {bad})")
    return frozenset(_DTYPES[dtype_name(s)] for s in v)  # type: ignore[index]


def _choice(options: tuple[str, ...]) -> Callable[[object], object]:
    def parse(v: object) -> object:
        if v not in options:
            raise ValueError(f"one of {list(options)}")
        return v

    return parse


def _text(v: object) -> object:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


FIELDS: dict[str, Callable[[object], object]] = {
    "ops": _str_set(as_tuple=True),
    "priority": _int(0),
    "platforms": _str_set(("cpu", "cuda", "mps", "xpu", "meta")),
    "min_sm": _int(0),
    "max_sm": _int(0),
    "generations": _str_set(optional=True),
    "dtypes": _dtypes,
    "min_head_dim": _int(1),
    "max_head_dim": _int(1),
    "head_dim_multiple": _int(1),
    "head_dims": _int_set(optional=True),
    "mask_kinds": _str_set(("none", "bool", "float")),
    "kv_layouts": _str_set(("NHD", "HND")),
    "page_sizes": _int_set(optional=True),
    "min_page_size": _int(1),
    "layout": _choice(LAYOUTS),
    "max_hidden_size": _int(1),
    "min_seq_len": _int(0),
    "max_seq_len": _int(1),
    "max_batch": _int(1),
    "tp_sizes": _int_set(optional=True),
    "cpu_isa": _str_set(),
    "description": _text,
    **{
        name: _bool
        for name in (
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
    },
}


def parse_kernel_fields(entry: object, source: str, where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One kernel's JSON object -> KernelSpec keyword fields (validated). `extra` keys pass through."""
    if not isinstance(entry, dict):
        raise DescriptorError(source, where, "an object of KernelSpec fields", entry)
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in extra:
            out[key] = value
            continue
        parse = FIELDS.get(key)
        if parse is None:
            close = difflib.get_close_matches(key, list(FIELDS) + list(extra), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise DescriptorError(source, f"{where}.{key}", f"a known constraint field{hint}", key)
        try:
            out[key] = parse(value)
        except ValueError as e:
            raise DescriptorError(source, f"{where}.{key}", str(e), value) from None
    return out


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A validated descriptor document: kernel id -> the KernelSpec fields it sets."""

    backend: str
    kernels: dict[str, dict[str, Any]] = field(hash=False)
    versions: str | None = None  # PEP 440 specifier of the library versions it describes
    source: str = "<memory>"


def parse_descriptor(data: bytes | str | dict[str, Any], source: str = "<memory>") -> Descriptor:
    """Validate a descriptor document (bytes/str of JSON, or the decoded dict)."""
    if isinstance(data, (bytes, str)):
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise DescriptorError(source, "document", "valid JSON", f"{type(e).__name__}: {e}") from None
    else:
        doc = data
    if not isinstance(doc, dict):
        raise DescriptorError(source, "document", "a JSON object", type(doc).__name__)
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise DescriptorError(
            source,
            "schema_version",
            f"{SCHEMA_VERSION} (the only version this LayerZero reads; upgrade LayerZero or rewrite the descriptor)",
            version,
        )
    unknown = set(doc) - {"schema_version", "backend", "versions", "kernels", "comment"}
    if unknown:
        raise DescriptorError(
            source, "document", "keys schema_version, backend, versions, kernels, comment", sorted(unknown)
        )
    backend = doc.get("backend")
    if not isinstance(backend, str) or not backend:
        raise DescriptorError(source, "backend", "a backend name", backend)
    versions = doc.get("versions")
    if versions is not None:
        try:
            from packaging.specifiers import SpecifierSet

            SpecifierSet(versions)
        except Exception:
            raise DescriptorError(source, "versions", "a PEP 440 specifier such as '>=2.5,<3'", versions) from None
    kernels = doc.get("kernels")
    if not isinstance(kernels, dict):
        raise DescriptorError(source, "kernels", "an object mapping kernel ids to fields", kernels)
    parsed = {}
    for kernel_id, entry in kernels.items():
        if not kernel_id.startswith(backend + "."):
            raise DescriptorError(
                source, f"kernels[{kernel_id!r}]", f"a kernel id of backend {backend!r} ('{backend}.name')", kernel_id
            )
        parsed[kernel_id] = parse_kernel_fields(entry, source, f"kernels[{kernel_id!r}]")
    return Descriptor(backend, parsed, versions, source)


def export_descriptor(specs: list[KernelSpec] | tuple[KernelSpec, ...], backend: str) -> dict[str, Any]:
    """The descriptor document of `specs` as declared (every field that differs from the default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(KernelSpec) if f.name in FIELDS}
    dtype_names = {v: k for k, v in _DTYPES.items()}
    kernels: dict[str, dict[str, Any]] = {}
    for spec in specs:
        entry: dict[str, Any] = {}
        for name, default in defaults.items():
            value = getattr(spec, name)
            if name != "ops" and value == default:
                continue
            if name == "dtypes":
                value = sorted(dtype_names[d] for d in value)
            elif isinstance(value, (frozenset, tuple)):
                value = sorted(value) if isinstance(value, frozenset) else list(value)
            entry[name] = value
        kernels[spec.id] = entry
    return {"schema_version": SCHEMA_VERSION, "backend": backend, "kernels": kernels}


# ---- the runtime's descriptor state ---------------------------------------------------------------


@dataclass(slots=True)
class _Source:
    backend: str
    origin: str
    data: bytes
    parsed: Descriptor | None = None


class Descriptors:
    """Descriptor sources of one Runtime: pending ones (read, not parsed) and applied ones.

    `base` keeps each overlaid kernel's spec as code declared it, so a replaced descriptor is
    undone before the new one applies.
    """

    def __init__(self) -> None:
        self.sources: dict[str, _Source] = {}  # backend -> its descriptor (one per backend; last loaded wins)
        self.pending: set[str] = set()  # backends whose descriptor is not applied yet
        self.applied: dict[str, Descriptor] = {}
        self.base: dict[str, KernelSpec] = {}
        self.parse_count = 0  # documents parsed (tests check laziness)
        self._lock = threading.RLock()

    @property
    def digest(self) -> str:
        """sha256 over every descriptor's backend and bytes; part of what cached plans depend on."""
        h = hashlib.sha256()
        for name in sorted(self.sources):
            h.update(name.encode() + b"\0" + self.sources[name].data + b"\0")
        return h.hexdigest()

    def add(self, backend: str, data: bytes, origin: str, parsed: Descriptor | None = None) -> None:
        with self._lock:
            self.sources[backend] = _Source(backend, origin, data, parsed)
            self.pending.add(backend)

    def read_directory(self, directory: str | os.PathLike[str]) -> list[str]:
        """Read (not parse) every `<backend>.json` of `directory`; returns the backends."""
        path = Path(directory)
        if not path.is_dir():
            raise DescriptorError(str(path), ENV_VAR, "a directory of <backend>.json files", str(path))
        names = []
        for file in sorted(path.glob("*.json")):
            self.add(file.stem, file.read_bytes(), str(file))
            names.append(file.stem)
        return names

    def resolve(self, registry: Registry, op: str) -> None:
        """Apply the pending descriptors of backends that have a kernel for `op` (first consideration)."""
        with self._lock:
            wanted = {s.backend for s in registry.by_op.get(op, ())} & self.pending
            for backend in sorted(wanted):
                self._apply(registry, self.sources[backend])
                self.pending.discard(backend)

    def resolve_backend(self, registry: Registry, backend: str) -> None:
        with self._lock:
            if backend in self.pending:
                self._apply(registry, self.sources[backend])
                self.pending.discard(backend)

    def _apply(self, registry: Registry, source: _Source) -> None:
        if source.parsed is None:
            self.parse_count += 1
            source.parsed = parse_descriptor(source.data, source.origin)
        desc = source.parsed
        if desc.backend != source.backend:
            raise DescriptorError(source.origin, "backend", f"{source.backend!r} (the file name)", desc.backend)
        self._undo(registry, source.backend)
        if desc.versions is not None:
            version = registry.backends[desc.backend].availability[1] if desc.backend in registry.backends else None
            if not _version_matches(version, desc.versions):
                log.warning(
                    "descriptor %s describes %s %s, installed %s: not applied",
                    desc.source,
                    desc.backend,
                    desc.versions,
                    version,
                )
                return
        known = [k for k, s in registry.kernels.items() if s.backend == desc.backend]
        for kernel_id in desc.kernels:
            if kernel_id not in registry.kernels:
                raise DescriptorError(
                    desc.source,
                    f"kernels[{kernel_id!r}]",
                    f"a registered kernel of {desc.backend!r} ({', '.join(sorted(known)) or 'none registered'})",
                    kernel_id,
                )
        for kernel_id, fields in desc.kernels.items():
            base = registry.kernels[kernel_id]
            self.base[kernel_id] = base
            registry.add_kernel(dataclasses.replace(base, **fields))
        self.applied[desc.backend] = desc

    def _undo(self, registry: Registry, backend: str) -> None:
        old = self.applied.pop(backend, None)
        if old is None:
            return
        for kernel_id in old.kernels:
            base = self.base.pop(kernel_id, None)
            if base is not None:
                registry.add_kernel(base)


def _version_matches(version: str | None, spec: str) -> bool:
    if version is None:
        return False
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version.split("+")[0], prereleases=True)


def discover_environment(descriptors: Descriptors) -> None:
    """Read the files of LAYERZERO_DESCRIPTORS (called when the runtime loads; nothing is parsed)."""
    directory = os.environ.get(ENV_VAR)
    if directory:
        descriptors.read_directory(directory)
