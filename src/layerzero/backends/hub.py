"""Hugging Face kernel hub: kernels from `kernels`-style repositories, pinned by a lock file.

A hub kernel repository (as the Hub serves it, or a local checkout) holds one directory per
build variant, `build/<variant>/<package>/__init__.py` with `build/<variant>/metadata.json`;
variants are named `torch<MAJ><MIN>[-cxx11]-<cpu|cuXYZ|rocmXY>-<arch>-<os>` (or `torch-<cpu|cuda|
universal>` for pure-Python builds). LayerZero adds `layerzero.json` at the repository root: a
capabilities descriptor (see capabilities.py) whose kernels name the package `function` to call
and their constraints:

    {"schema_version": 1, "backend": "hub",
     "kernels": {"hub.my_rms": {"function": "rms_norm", "ops": ["norm.rms"], "platforms": ["cpu"]}}}

    lz.register_hub_kernels("org/my-kernels", path="/models/my-kernels", lockfile="kernels.lock")

The lock file (the shape of `kernels lock`'s kernels.lock) pins each repo's revision and the
sha256 of each variant directory; a hash that differs from the files refuses the repository
(HubLockError) before anything is imported. Variant tags are checked against this process (torch
version, CPU/CUDA build, machine, OS, python); when no variant fits, the kernels are registered
and rejected with BACKEND_VERSION_UNSUPPORTED, never imported. The package is imported on the
first call of one of its kernels: through `kernels.get_local_kernel` when the `kernels` package
is installed, else by path (the same layout). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..context import SelectionContext
from ..descriptors import DescriptorError, parse_descriptor, parse_kernel_fields
from ..errors import ConfigurationError
from ..kernel import Backend, KernelSpec
from ..reasons import Reason, Rejection

BACKEND = Backend(name="hub", kernels=(), description="Hugging Face kernel hub repositories (lz.register_hub_kernels)")
DESCRIPTOR = "layerzero.json"


class HubLockError(ConfigurationError):
    """A hub repository does not match its lock file (revision or variant hash)."""


# ---- platform tags ------------------------------------------------------------------------------


def system_tags() -> dict[str, str]:
    """This process's tags, in variant spelling: torch (torch213), compute (cpu, cu128), arch, os, python."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = torch.version.cuda
    compute = (
        "cu" + cuda.replace(".", "")
        if cuda
        else ("rocm" + torch.version.hip.replace(".", "")[:2] if getattr(torch.version, "hip", None) else "cpu")
    )
    machine = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    return {
        "torch": f"torch{major}{minor}",
        "compute": compute,
        "arch": machine,
        "os": platform.system().lower(),
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
    }


def variant_mismatch(variant: str, tags: dict[str, str]) -> str | None:
    """Why `variant` cannot load here (None: it can). CPU variants load under a CUDA torch too."""
    parts = variant.split("-")
    if parts[0] == "torch" and len(parts) == 2:  # noarch: torch-cpu, torch-cuda, torch-universal
        kind = parts[1]
        ok = kind == "universal" or kind == "cpu" or (kind == "cuda" and tags["compute"].startswith("cu"))
        return None if ok else f"{variant}: needs a {kind} build of torch, this one is {tags['compute']}"
    if parts[0] in ("torch", "tvm") or not parts[0].startswith("torch"):
        return f"{variant}: unknown variant format"
    if len(parts) > 1 and parts[1] in ("cxx11", "cxx98"):
        parts = [parts[0]] + parts[2:]
    if len(parts) != 4:
        return f"{variant}: expected torchXY-<compute>-<arch>-<os>"
    torch_tag, compute, arch, os_name = parts
    if torch_tag != tags["torch"]:
        return f"{variant}: built for {torch_tag}, this is {tags['torch']} (torch {torch.__version__})"
    if compute != "cpu" and compute != tags["compute"]:
        return f"{variant}: built for {compute}, torch here is {tags['compute']}"
    if arch != tags["arch"] or os_name != tags["os"]:
        return f"{variant}: built for {arch}-{os_name}, this is {tags['arch']}-{tags['os']}"
    return None


def select_variant(repo: Path, tags: dict[str, str]) -> tuple[str | None, list[str]]:
    """The best variant of `repo/build` for this process (exact compute over cpu over noarch), and why
    each other one was refused."""
    build = repo / "build"
    variants = sorted(p.name for p in build.iterdir() if p.is_dir()) if build.is_dir() else []
    why: list[str] = []
    fitting: list[str] = []
    for v in variants:
        problem = variant_mismatch(v, tags)
        if problem is None:
            python = _metadata(repo / "build" / v).get("python")
            if python is not None and python not in (tags["python"], "abi3"):
                problem = f"{v}: built for python {python}, this is {tags['python']}"
        (why.append(problem) if problem else fitting.append(v))
    if not variants:
        why.append(f"no build/<variant> directories in {repo}")
    # this exact build first, then CPU builds of this torch, then pure-Python (noarch) builds
    fitting.sort(key=lambda v: (tags["compute"] not in v.split("-"), v.startswith("torch-")))
    return (fitting[0] if fitting else None), why


def _metadata(variant_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((variant_dir / "metadata.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ---- hashes and the lock file -------------------------------------------------------------------


def hash_variant(variant_dir: Path) -> str:
    """sha256 over the sorted relative paths and contents of a variant directory (bytecode excluded)."""
    h = hashlib.sha256()
    for path in sorted(p for p in variant_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(variant_dir).as_posix()
        if "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256-" + h.hexdigest()


def write_lock(entries: list[tuple[str, str, Path]], lockfile: str | os.PathLike[str]) -> None:
    """Write a lock file pinning (repo_id, revision, local repo path) with every variant's hash."""
    out = []
    for repo_id, revision, repo in entries:
        variants = {
            p.name: {"hash": hash_variant(p), "hash_type": "layerzero-tree-sha256"}
            for p in sorted((Path(repo) / "build").iterdir())
            if p.is_dir()
        }
        out.append({"repo_id": repo_id, "sha": revision, "variants": variants})
    Path(lockfile).write_text(json.dumps(out, indent=2) + "\n")


def _lock_entry(lockfile: Path, repo_id: str) -> dict[str, Any]:
    try:
        data = json.loads(lockfile.read_text())
    except (OSError, ValueError) as e:
        raise HubLockError(
            f"lockfile: expected a readable kernels.lock JSON file, got {lockfile} ({type(e).__name__}: {e})"
        ) from None
    entries = [e for e in data if isinstance(e, dict) and e.get("repo_id") == repo_id] if isinstance(data, list) else []
    if not entries:
        raise HubLockError(f"lockfile {lockfile}: expected an entry for {repo_id!r}, got none")
    return entries[0]


# ---- registration -------------------------------------------------------------------------------


@dataclass
class _HubRepo:
    repo_id: str
    revision: str
    path: Path
    variant: str | None
    refused: str  # why no variant loads here ("" when one does)
    expected_hash: str | None
    _module: ModuleType | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def module(self) -> ModuleType:
        """Import the package of the chosen variant (once), re-checking its hash first."""
        with self._lock:
            if self._module is not None:
                return self._module
            assert self.variant is not None
            variant_dir = self.path / "build" / self.variant
            if self.expected_hash is not None and hash_variant(variant_dir) != self.expected_hash:
                raise HubLockError(
                    f"{self.repo_id}@{self.revision}: {self.variant} changed on disk since "
                    "registration; refusing to import it"
                )
            self._module = _import_variant(self.path, variant_dir)
            return self._module


def _import_variant(repo: Path, variant_dir: Path) -> ModuleType:
    if importlib.util.find_spec("kernels") is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local repository never needs the network
        import kernels

        return kernels.get_local_kernel(repo)
    packages = [p for p in variant_dir.iterdir() if (p / "__init__.py").is_file()]
    if len(packages) != 1:
        raise ConfigurationError(f"{variant_dir}: expected one package directory, got {[p.name for p in packages]}")
    name = f"_layerzero_hub_{hashlib.sha1(str(variant_dir).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(
        name, packages[0] / "__init__.py", submodule_search_locations=[str(packages[0])]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _impl(repo: _HubRepo, function: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return getattr(repo.module(), function)(*args, **kwargs)

    run.__qualname__ = f"hub:{repo.repo_id}:{function}"
    return run


def _refusal(repo: _HubRepo) -> Callable[[SelectionContext], list[Rejection]]:
    def check(ctx: SelectionContext) -> list[Rejection]:
        return [Rejection(Reason.BACKEND_VERSION_UNSUPPORTED, repo.refused)] if repo.refused else []

    return check


def hub_kernel_specs(
    repo_id: str,
    path: str | os.PathLike[str],
    revision: str | None = None,
    lockfile: str | os.PathLike[str] | None = None,
) -> list[KernelSpec]:
    """KernelSpecs of a local hub repository, after the lock and platform checks (nothing imported)."""
    repo_path = Path(path)
    if not (repo_path / DESCRIPTOR).is_file():
        raise ConfigurationError(f"path: expected a kernel repository with {DESCRIPTOR} at its root, got {repo_path}")
    tags = system_tags()
    variant, why = select_variant(repo_path, tags)
    expected = None
    if lockfile is not None:
        entry = _lock_entry(Path(lockfile), repo_id)
        if revision is not None and entry.get("sha") != revision:
            raise HubLockError(f"{repo_id}: revision {revision!r} requested, lock file pins {entry.get('sha')!r}")
        revision = str(entry.get("sha"))
        if variant is not None:
            locked = (entry.get("variants") or {}).get(variant, {}).get("hash")
            actual = hash_variant(repo_path / "build" / variant)
            if locked != actual:
                raise HubLockError(
                    f"{repo_id}@{revision} variant {variant}: expected hash {locked} (lock file "
                    f"{lockfile}), got {actual}; refusing to load it"
                )
            expected = actual
    repo = _HubRepo(
        repo_id,
        revision or "local",
        repo_path,
        variant,
        "" if variant else f"no build variant of {repo_id} fits this process: " + "; ".join(why),
        expected,
    )
    source = str(repo_path / DESCRIPTOR)
    desc_doc = json.loads((repo_path / DESCRIPTOR).read_text())
    kernels = desc_doc.get("kernels") if isinstance(desc_doc, dict) else None
    # validate the document shape with the common parser, then the hub-only "function" key
    stripped = dict(
        desc_doc,
        kernels={
            k: {f: v for f, v in e.items() if f != "function"}
            for k, e in (kernels or {}).items()
            if isinstance(e, dict)
        },
    )
    parse_descriptor(stripped, source)
    specs = []
    for kernel_id, entry in (kernels or {}).items():
        fields = parse_kernel_fields(entry, source, f"kernels[{kernel_id!r}]", extra=("function",))
        function = fields.pop("function", None)
        if not isinstance(function, str):
            raise DescriptorError(source, f"kernels[{kernel_id!r}].function", "the package function to call", function)
        if "ops" not in fields:
            raise DescriptorError(source, f"kernels[{kernel_id!r}].ops", "the op ids it implements", None)
        fields.setdefault("platforms", frozenset({"cpu"}) if tags["compute"] == "cpu" else frozenset({"cuda"}))
        fields.setdefault("description", f"{repo_id}@{repo.revision} ({variant or 'no fitting variant'})")
        specs.append(KernelSpec(id=kernel_id, impl=_impl(repo, function), check=_refusal(repo), **fields))
    return specs
