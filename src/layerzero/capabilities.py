"""Capabilities: load descriptors (descriptors.py) into the runtime, and check what a backend claims.

`lz.canary(backend)` runs every declared capability (dtype x head_dim x causal/mask/window, norm
dtypes x sizes) on the real device against the reference and reports each claim that does not
hold ("lying descriptors"); `layerzero canary BACKEND` prints it and exits 1 on a lie.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .context import SelectionContext
from .descriptors import DescriptorError, parse_descriptor
from .errors import BackendNotAvailableError
from .kernel import KernelSpec, check_constraints, runs_on
from .state import runtime


def _reference() -> ModuleType:
    """backends/reference.py, imported when the canary runs: `import layerzero` stays light."""
    from .backends import reference

    return reference


def load_descriptors(path: str | os.PathLike[str] | dict[str, Any]) -> list[str]:
    """Load user descriptor(s): a `<backend>.json` file, a directory of them, or a document dict.

    The documents are validated now (errors raise DescriptorError) and applied when selection next
    considers their backend. Cached plans are dropped when the descriptor digest changes.
    Returns the backends described.
    """

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
        return {
            "backend": self.backend,
            "device": self.device,
            "claims": len(self.claims),
            "lies": [
                {
                    "kernel": c.kernel_id,
                    "op": c.op,
                    "params": dict(c.params),
                    "error": c.error,
                    "max_error": c.max_error,
                }
                for c in self.lies
            ],
            "not_covered": self.not_covered,
        }

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
    return sorted(
        d
        for d in dims
        if spec.min_head_dim <= d <= min(spec.max_head_dim, 512)
        and d % spec.head_dim_multiple == 0
        and (spec.head_dims is None or d in spec.head_dims)
    )


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
                op = (
                    "attention.sliding_window"
                    if "window" in case
                    else "attention.causal"
                    if case["is_causal"]
                    else "attention.masked"
                    if case["mask"] != "none"
                    else "attention.full"
                )
                yield op, {"dtype": dtype, "head_dim": d, **case}


def _run_attention(spec: KernelSpec, device: torch.device, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:

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
    ref = _reference().attention(
        q.double(), k.double(), v.double(), ref_mask, p["is_causal"], 0.0, None, window, softcap
    )
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

    g = torch.Generator(device="cpu").manual_seed(p["hidden"])
    x = torch.randn(4, p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    w = torch.randn(p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    bias = torch.randn(p["hidden"], generator=g).to(device=device, dtype=p["dtype"])
    if op == "norm.rms":
        return spec.impl(x, w, 1e-6), _reference().rms_norm(x.double(), w.double(), 1e-6)
    if op == "norm.layer":
        return spec.impl(x, w, bias, 1e-5), _reference().layer_norm(x.double(), w.double(), bias.double(), 1e-5)
    return (spec.impl(x, 4, w, bias, 1e-5), _reference().group_norm(x.double(), 4, w.double(), bias.double(), 1e-5))


def _claim_context(spec: KernelSpec, op: str, p: dict[str, Any], device: torch.device) -> Any:

    fields: dict[str, Any] = dict(op=op, dtype=p["dtype"], **SelectionContext.device_fields(device))
    if op.startswith("attention"):
        fields.update(
            batch=1,
            seq_len_q=8,
            seq_len_k=8,
            num_heads=2,
            num_kv_heads=2,
            head_dim=p["head_dim"],
            head_dim_v=p["head_dim"],
            layout=spec.layout,
            is_causal=p["is_causal"],
            mask_kind=p["mask"],
            window=p.get("window"),
            softcap=p.get("softcap", 0.0),
        )
    else:
        fields.update(
            hidden_size=p["hidden"], num_rows=4, has_bias=op != "norm.rms", num_groups=4 if op == "norm.group" else 0
        )
    return SelectionContext(**fields)


def canary(backend: str, device: str | torch.device | None = None) -> CanaryReport:
    """Run every capability `backend` declares (code + descriptors) on `device` against the reference.

    Attention: each dtype x head_dim (sampled from the declared range) x causal / non-causal /
    bool and float masks / window / softcap the spec claims, at B=1, H=2, S=8. Norms: each dtype x
    hidden 64/1000/4096. A claim fails when the kernel raises or differs from the float64
    reference beyond the dtype's tolerance. Kernels of other ops are listed as not covered.
    """

    runtime.ensure_loaded()
    name = runtime.registry.backend_name(backend)
    installed, _, why = runtime.registry.backend(name).availability
    if not installed:
        package = runtime.registry.backend(name).distribution or runtime.registry.backend(name).module
        raise BackendNotAvailableError(
            f"backend {name} is not installed here ({why.detail if why else 'unavailable'}); "
            f"nothing to check: install {package} first"
        )
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
                    claims.append(
                        Claim(
                            spec.id, op, params, False, f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
                        )
                    )
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
