"""Hub backend: a local kernel repository built here, locked, loaded, selected and explained;
a lock-file hash mismatch refused; a variant for another torch is a reason, not a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.backends.hub import HubLockError, system_tags, write_lock
from layerzero.descriptors import DescriptorError
from layerzero.reasons import Reason
from layerzero.selection.inspect import register_hub_kernels

_KERNEL = '''
import torch

CALLS = []

def rms_norm(x, weight, eps):
    CALLS.append(tuple(x.shape))
    out = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    return out * weight if weight is not None else out
'''


def make_repo(root: Path, variant: str | None = None, max_hidden: int = 4096) -> Path:
    """A hub-style repository: build/<variant>/<package>/, metadata.json, and LayerZero's descriptor."""
    tags = system_tags()
    variant = variant or f"{tags['torch']}-cxx11-cpu-{tags['arch']}-{tags['os']}"
    pkg = root / "build" / variant / "lz_test_rms"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_KERNEL)
    (pkg.parent / "metadata.json").write_text(json.dumps(
        {"id": "lz_test_rms_0001", "name": "lz_test_rms", "version": 1, "license": "Apache-2.0",
         "python-depends": [], "backend": {"type": "cpu"}}))
    (root / "layerzero.json").write_text(json.dumps({
        "schema_version": 1, "backend": "hub",
        "kernels": {"hub.test_rms": {"function": "rms_norm", "ops": ["norm.rms"], "platforms": ["cpu"],
                                     "dtypes": ["float32", "bfloat16"], "priority": 95,
                                     "max_hidden_size": max_hidden}}}))
    return root


def test_local_repository_is_loaded_selected_and_explained(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    write_lock([("lz-test/rms", "0123abcd", repo)], tmp_path / "kernels.lock")
    ids = register_hub_kernels("lz-test/rms", repo, revision="0123abcd", lockfile=tmp_path / "kernels.lock")
    assert ids == ["hub.test_rms"]

    x, w = torch.randn(3, 256), torch.randn(256)
    out = lz.rms_norm(x, w)
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    assert lz.which("rms_norm", x, w) == "hub.test_rms"
    report = lz.explain("rms_norm", x, w)
    assert report.selected_kernel == "hub.test_rms" and "hub.test_rms" in str(report)
    # the hub kernel competes with its declared constraints: too wide a row goes elsewhere, with the reason
    wide = torch.randn(2, 8192)
    reasons = lz.explain("rms_norm", wide).rejection_reasons["hub.test_rms"]
    assert reasons == [Reason.HIDDEN_SIZE_TOO_LARGE] and lz.which("rms_norm", wide) != "hub.test_rms"
    # float16 is not declared: rejected with DTYPE_UNSUPPORTED
    assert lz.explain("rms_norm", x.half()).rejection_reasons["hub.test_rms"] == [Reason.DTYPE_UNSUPPORTED]


def test_lock_file_hash_mismatch_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    write_lock([("lz-test/rms", "0123abcd", repo)], tmp_path / "kernels.lock")
    init = next((repo / "build").glob("*/lz_test_rms/__init__.py"))
    init.write_text(init.read_text() + "\nimport os  # tampered after locking\n")
    with pytest.raises(HubLockError, match=r"expected hash sha256-\w+ \(lock file .*\), got sha256-\w+"):
        register_hub_kernels("lz-test/rms", repo, lockfile=tmp_path / "kernels.lock")
    lz.rms_norm(torch.randn(2, 8))
    assert not [k for k in lz.list_kernels("hub.*")]  # nothing registered
    with pytest.raises(HubLockError, match="revision 'feedbeef' requested, lock file pins '0123abcd'"):
        register_hub_kernels("lz-test/rms", make_repo(tmp_path / "r2"), revision="feedbeef",
                             lockfile=tmp_path / "kernels.lock")
    with pytest.raises(HubLockError, match="expected an entry for 'other/repo'"):
        register_hub_kernels("other/repo", repo, lockfile=tmp_path / "kernels.lock")


def test_variant_for_another_torch_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    tags = system_tags()
    repo = make_repo(tmp_path / "repo", variant=f"torch19-cxx11-cu118-{tags['arch']}-{tags['os']}")
    register_hub_kernels("lz-test/old", repo)
    x = torch.randn(2, 64)
    report = lz.explain("rms_norm", x)
    [rejection] = [c for c in report.candidates if c.kernel_id == "hub.test_rms"][0].rejections
    assert rejection.reason is Reason.BACKEND_VERSION_UNSUPPORTED
    assert "built for torch19" in rejection.detail and tags["torch"] in rejection.detail
    assert lz.which("rms_norm", x) != "hub.test_rms"
    torch.testing.assert_close(lz.rms_norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_bad_repository_descriptor_names_the_field(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    doc = json.loads((repo / "layerzero.json").read_text())
    doc["kernels"]["hub.test_rms"]["max_hiden_size"] = 10
    (repo / "layerzero.json").write_text(json.dumps(doc))
    with pytest.raises(DescriptorError, match=r"max_hiden_size: expected a known constraint field "
                                              r"\(did you mean max_hidden_size"):
        register_hub_kernels("lz-test/rms", repo)
