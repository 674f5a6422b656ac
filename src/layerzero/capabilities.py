"""Capabilities descriptors: a backend's kernel constraints as a versioned JSON document.

Code declares each KernelSpec; a descriptor overlays fields of those specs, so a library
upgrade that adds (or breaks) a head_dim or a dtype is a data change, not a release:

    {"schema_version": 1, "backend": "torch", "versions": ">=2.5",
     "kernels": {"torch.sdpa_flash_cpu": {"max_head_dim": 256, "dtypes": ["float32", "bfloat16"]}}}

Descriptors come from `LAYERZERO_DESCRIPTORS=dir` (files `<backend>.json`) or
`lz.load_descriptors(path)`. Files are read and hashed when the runtime loads, but a document
is parsed and applied only when selection first considers a kernel of its backend (Registry
.candidates). The digest of all descriptor bytes is part of what the plan cache depends on: a
change of digest bumps the generation; reloading identical bytes does not.

`lz.canary(backend)` runs every declared capability (dtype x head_dim x causal/mask/window, norm
dtypes x sizes) on the real device against the reference and reports each claim that does not
hold ("lying descriptors"); `layerzero canary BACKEND` prints it and exits 1 on a lie.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import BackendNotAvailableError, ConfigurationError
from .kernel import LAYOUTS, KernelSpec, check_constraints, runs_on

if TYPE_CHECKING:
    from .state import Registry

log = logging.getLogger("layerzero")

SCHEMA_VERSION = 1
ENV_VAR = "LAYERZERO_DESCRIPTORS"


class DescriptorError(ConfigurationError):
    """A capabilities descriptor is unreadable or invalid; names the file, the field, expected and got."""

    def __init__(self, source: str, where: str, expected: str, got: object) -> None:
        self.source, self.where, self.expected, self.got = source, where, expected, got
        super().__init__(f"descriptor {source}: {where}: expected {expected}, got {got!r}")


# ---- the schema: JSON field -> KernelSpec field, with its parser ----------------------------------

_DTYPES = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "int32", "int64", "uint8")}


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


def _str_set(allowed: tuple[str, ...] | None = None, optional: bool = False,
             as_tuple: bool = False) -> Callable[[object], object]:
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
    from .policy.conditions import dtype_name

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
    "min_sm": _int(0), "max_sm": _int(0),
    "generations": _str_set(optional=True),
    "dtypes": _dtypes,
    "min_head_dim": _int(1), "max_head_dim": _int(1), "head_dim_multiple": _int(1),
    "head_dims": _int_set(optional=True),
    "mask_kinds": _str_set(("none", "bool", "float")),
    "kv_layouts": _str_set(("NHD", "HND")),
    "page_sizes": _int_set(optional=True), "min_page_size": _int(1),
    "layout": _choice(LAYOUTS),
    "max_hidden_size": _int(1), "min_seq_len": _int(0), "max_seq_len": _int(1), "max_batch": _int(1),
    "tp_sizes": _int_set(optional=True),
    "cpu_isa": _str_set(),
    "description": _text,
    **{name: _bool for name in (
        "same_head_dim_v", "supports_gqa", "supports_causal", "supports_non_causal", "causal_non_square",
        "supports_dropout", "supports_window", "supports_softcap", "supports_alibi", "supports_backward",
        "requires_contiguous", "graph_safe", "deterministic", "needs_jit")},
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
        raise DescriptorError(source, "schema_version",
                              f"{SCHEMA_VERSION} (the only version this LayerZero reads; upgrade LayerZero or "
                              "rewrite the descriptor)", version)
    unknown = set(doc) - {"schema_version", "backend", "versions", "kernels", "comment"}
    if unknown:
        raise DescriptorError(source, "document", "keys schema_version, backend, versions, kernels, comment",
                              sorted(unknown))
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
            raise DescriptorError(source, f"kernels[{kernel_id!r}]", f"a kernel id of backend {backend!r} "
                                  f"('{backend}.name')", kernel_id)
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
                log.warning("descriptor %s describes %s %s, installed %s: not applied", desc.source, desc.backend,
                            desc.versions, version)
                return
        known = [k for k, s in registry.kernels.items() if s.backend == desc.backend]
        for kernel_id in desc.kernels:
            if kernel_id not in registry.kernels:
                raise DescriptorError(desc.source, f"kernels[{kernel_id!r}]", f"a registered kernel of "
                                      f"{desc.backend!r} ({', '.join(sorted(known)) or 'none registered'})", kernel_id)
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


def load_descriptors(path: str | os.PathLike[str] | dict[str, Any]) -> list[str]:
    """Load user descriptor(s): a `<backend>.json` file, a directory of them, or a document dict.

    The documents are validated now (errors raise DescriptorError) and applied when selection next
    considers their backend. Cached plans are dropped when the descriptor digest changes.
    Returns the backends described.
    """
    from .state import runtime

    runtime.ensure_loaded()
    descriptors = runtime.descriptors
    before = descriptors.digest
    if isinstance(path, dict):
        data = json.dumps(path, sort_keys=True).encode()
        docs = [(parse_descriptor(data, "<dict>"), data, "<dict>")]
    else:
        p = Path(path)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not p.exists():
            raise DescriptorError(str(p), "path", "an existing descriptor file or directory", str(p))
        docs = []
        for file in files:
            data = file.read_bytes()
            desc = parse_descriptor(data, str(file))
            if p.is_dir() and desc.backend != file.stem:
                raise DescriptorError(str(file), "backend", f"{file.stem!r} (the file name)", desc.backend)
            docs.append((desc, data, str(file)))
    with runtime._lock:
        for desc, data, origin in docs:
            old = descriptors.sources.get(desc.backend)
            if old is not None and old.data == data:
                continue
            if desc.backend in descriptors.applied:
                descriptors._undo(runtime.registry, desc.backend)
            descriptors.add(desc.backend, data, origin, desc)
        if descriptors.digest != before:
            runtime.bump()
    return [d.backend for d, _, _ in docs]


def clear_descriptors() -> None:
    """Remove every descriptor; kernels return to their declarations in code (plans dropped if any was loaded)."""
    from .state import runtime

    runtime.ensure_loaded()
    d = runtime.descriptors
    with runtime._lock:
        had = bool(d.sources)
        for backend in list(d.applied):
            d._undo(runtime.registry, backend)
        d.sources.clear()
        d.pending.clear()
        if had:
            runtime.bump()


# ---- the canary ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Claim:
    """One declared capability, run once: what was claimed and whether it held."""

    kernel_id: str
    op: str
    params: tuple[tuple[str, object], ...]
    ok: bool
    error: str = ""
    max_error: float = 0.0

    def describe(self) -> str:
        return f"{self.kernel_id} {self.op} " + " ".join(f"{k}={v}" for k, v in self.params)


@dataclass(slots=True)
class CanaryReport:
    """Every claim a backend's effective specs make on this device, and the ones that do not hold."""

    backend: str
    device: str
    claims: list[Claim]
    not_covered: list[str]  # kernel ids (or "id: op") the canary has no runner for

    @property
    def lies(self) -> list[Claim]:
        return [c for c in self.claims if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.lies

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "claims": len(self.claims),
                "lies": [{"kernel": c.kernel_id, "op": c.op, "params": dict(c.params), "error": c.error,
                          "max_error": c.max_error} for c in self.lies],
                "not_covered": self.not_covered}

    def __str__(self) -> str:
        lines = [f"canary {self.backend} on {self.device}: {len(self.claims)} claims, {len(self.lies)} do not hold"]
        lines += [f"  LIE {c.describe()}: {c.error}" for c in self.lies]
        if self.not_covered:
            lines.append(f"  not covered: {', '.join(self.not_covered)}")
        return "\n".join(lines)


_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-8}
_HEAD_DIMS = (8, 16, 32, 64, 80, 96, 128, 160, 192, 256)


def _head_dims(spec: KernelSpec) -> list[int]:
    dims = set(_HEAD_DIMS) | ({spec.min_head_dim, spec.max_head_dim} if spec.max_head_dim <= 512 else set())
    dims |= spec.head_dims or set()
    return sorted(d for d in dims if spec.min_head_dim <= d <= min(spec.max_head_dim, 512)
                  and d % spec.head_dim_multiple == 0 and (spec.head_dims is None or d in spec.head_dims))


def _attention_claims(spec: KernelSpec, device: torch.device) -> Iterator[tuple[str, dict[str, Any]]]:
    for dtype in sorted(spec.dtypes & set(_TOL), key=str):
        for d in _head_dims(spec):
            cases: list[dict[str, Any]] = []
            if "attention.causal" in spec.ops and spec.supports_causal:
                cases.append({"is_causal": True, "mask": "none"})
            if spec.supports_non_causal:
                if "attention.full" in spec.ops:
                    cases.append({"is_causal": False, "mask": "none"})
                if "attention.masked" in spec.ops:
                    cases += [{"is_causal": False, "mask": m} for m in ("bool", "float") if m in spec.mask_kinds]
                if "attention.sliding_window" in spec.ops and spec.supports_window:
                    cases.append({"is_causal": False, "mask": "none", "window": (3, 3)})
            if spec.supports_softcap and "attention.full" in spec.ops:
                cases.append({"is_causal": False, "mask": "none", "softcap": 30.0})
            for case in cases:
                op = ("attention.sliding_window" if "window" in case else "attention.causal" if case["is_causal"]
                      else "attention.masked" if case["mask"] != "none" else "attention.full")
                yield op, {"dtype": dtype, "head_dim": d, **case}


def _run_attention(spec: KernelSpec, device: torch.device, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from .backends import reference

    g = torch.Generator(device="cpu").manual_seed(p["head_dim"])
    b, h, s, d, dtype = 1, 2, 8, p["head_dim"], p["dtype"]
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    mask = None
    if p["mask"] == "bool":
        mask = (torch.rand(s, s, generator=g) > 0.3) | torch.eye(s, dtype=torch.bool)
        mask = mask.to(device)
    elif p["mask"] == "float":
        mask = torch.randn(s, s, generator=g).to(device=device, dtype=dtype)
    window, softcap = p.get("window"), p.get("softcap", 0.0)
    args = (mask, p["is_causal"], 0.0, None, window, softcap, None)
    if spec.layout == "BSHD":
        out = spec.impl(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *args).transpose(1, 2)
    else:
        out = spec.impl(q, k, v, *args)
    ref_mask = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = reference.attention(q.double(), k.double(), v.double(), ref_mask, p["is_causal"], 0.0, None, window, softcap)
    return out, ref


def _norm_claims(spec: KernelSpec, device: torch.device) -> Iterator[tuple[str, dict[str, Any]]]:
    for op in spec.ops:
        if op not in ("norm.rms", "norm.layer", "norm.group"):
            continue
        for dtype in sorted(spec.dtypes & set(_TOL), key=str):
            for hidden in (64, 1000, 4096):
                if hidden <= spec.max_hidden_size:
                    yield op, {"dtype": dtype, "hidden": hidden}


def _run_norm(spec: KernelSpec, device: torch.device, op: str, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from .backends import reference

    g = torch.Generator(device="cpu").manual_seed(p["hidden"])
    x = torch.randn(4, p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    w = torch.randn(p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    bias = torch.randn(p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    if op == "norm.rms":
        return spec.impl(x, w, 1e-6), reference.rms_norm(x.double(), w.double(), 1e-6)
    if op == "norm.layer":
        return spec.impl(x, w, bias, 1e-5), reference.layer_norm(x.double(), w.double(), bias.double(), 1e-5)
    return (spec.impl(x, 4, w, bias, 1e-5),
            reference.group_norm(x.double(), 4, w.double(), bias.double(), 1e-5))


def _claim_context(spec: KernelSpec, op: str, p: dict[str, Any], device: torch.device) -> Any:
    from .context import SelectionContext

    fields: dict[str, Any] = dict(op=op, dtype=p["dtype"], **SelectionContext.device_fields(device))
    if op.startswith("attention"):
        fields.update(batch=1, seq_len_q=8, seq_len_k=8, num_heads=2, num_kv_heads=2, head_dim=p["head_dim"],
                      head_dim_v=p["head_dim"], layout=spec.layout, is_causal=p["is_causal"], mask_kind=p["mask"],
                      window=p.get("window"), softcap=p.get("softcap", 0.0))
    else:
        fields.update(hidden_size=p["hidden"], num_rows=4, has_bias=op != "norm.rms",
                      num_groups=4 if op == "norm.group" else 0)
    return SelectionContext(**fields)


def canary(backend: str, device: str | torch.device | None = None) -> CanaryReport:
    """Run every capability `backend` declares (code + descriptors) on `device` against the reference.

    Attention: each dtype x head_dim (sampled from the declared range) x causal / non-causal /
    bool and float masks / window / softcap the spec claims, at B=1, H=2, S=8. Norms: each dtype x
    hidden 64/1000/4096. A claim fails when the kernel raises or differs from the float64
    reference beyond the dtype's tolerance. Kernels of other ops are listed as not covered.
    """
    from .state import runtime

    runtime.ensure_loaded()
    name = runtime.registry.backend_name(backend)
    installed, _, why = runtime.registry.backend(name).availability
    if not installed:
        package = runtime.registry.backend(name).distribution or runtime.registry.backend(name).module
        raise BackendNotAvailableError(f"backend {name} is not installed here ({why.detail if why else 'unavailable'}); "
                                       f"nothing to check: install {package} first")
    runtime.descriptors.resolve_backend(runtime.registry, name)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = [s for s in runtime.registry.kernels.values() if s.backend == name and runs_on(s, dev.type)]
    claims: list[Claim] = []
    not_covered: list[str] = []
    for spec in specs:
        todo = list(_attention_claims(spec, dev)) + list(_norm_claims(spec, dev))
        covered = {op for op, _ in todo}
        not_covered += [f"{spec.id}: {op}" for op in spec.ops if op not in covered and not _attention_family(op)]
        for op, p in todo:
            ctx = _claim_context(spec, op, p, dev)
            if check_constraints(spec, ctx):
                continue  # a backend-specific check declines it: not claimed
            params = tuple((k, str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in p.items())
            try:
                if op.startswith("attention"):
                    out, ref = _run_attention(spec, dev, p)
                else:
                    out, ref = _run_norm(spec, dev, op, p)
                if out.shape != ref.shape:
                    claims.append(Claim(spec.id, op, params, False, f"output shape {tuple(out.shape)}, "
                                        f"expected {tuple(ref.shape)}"))
                    continue
                err = float((out.double() - ref).abs().max()) if out.numel() else 0.0
                tol = _TOL[p["dtype"]] * (1.0 + float(ref.abs().max()))
                ok = err <= tol  # NaN compares False: a NaN output is a lie
                claims.append(Claim(spec.id, op, params, ok, "" if ok else f"max error {err:.3g} > {tol:.3g}", err))
            except Exception as e:  # a claim that raises is exactly what the canary exists to find
                claims.append(Claim(spec.id, op, params, False, f"{type(e).__name__}: {str(e)[:200]}"))
    return CanaryReport(name, str(dev), claims, not_covered)


def _attention_family(op: str) -> bool:
    return op in ("attention.causal", "attention.full", "attention.masked", "attention.sliding_window")


def add_canary_command(sub: Any) -> None:
    """`layerzero canary BACKEND [--device D] [--json]`: exit 1 when a declared capability does not hold."""
    from .cli import add_command

    p = add_command(sub, "canary", "run a backend's declared capabilities against the reference; exit 1 on a lie",
                    _canary_command)
    p.add_argument("backend", help="a backend name or alias, e.g. torch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--descriptors", default=None, help="a descriptor file or directory to load first")


def _canary_command(args: Any) -> int:
    from .cli import emit, parse_device
    from .state import runtime

    if args.descriptors:
        load_descriptors(args.descriptors)
    report = canary(args.backend, parse_device(args.device))
    emit(args, report.to_dict(), str(report))
    if not report.claims:  # nothing was checked: not a pass
        runtime.ensure_loaded()
        platforms = sorted({p for s in runtime.registry.kernels.values() if s.backend == report.backend
                            for p in s.platforms})
        print(f"layerzero canary: no claim of {report.backend} can be checked on {report.device} (its kernels run on "
              f"{'/'.join(platforms) or 'no platform'}, or are of ops the canary has no runner for)", file=sys.stderr)
        return 1
    return 0 if report.ok else 1
