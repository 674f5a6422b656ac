"""Capabilities descriptors: schema errors, lazy parsing, the digest invalidating plans, and the
canary catching a descriptor that claims a head_dim the kernel rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.capabilities import canary, clear_descriptors, load_descriptors
from layerzero.cli import main
from layerzero.descriptors import DescriptorError, export_descriptor, parse_descriptor
from layerzero.kernel import Backend, KernelSpec
from layerzero.reasons import Reason
from layerzero.state import runtime


def _doc(**kernels: dict) -> dict:
    return {"schema_version": 1, "backend": "torch", "kernels": kernels}


@pytest.mark.parametrize(("doc", "message"), [
    ({"schema_version": 2, "backend": "torch", "kernels": {}},
     r"schema_version: expected 1 \(the only version this LayerZero reads; upgrade LayerZero or rewrite the "
     r"descriptor\), got 2"),
    ({"backend": "torch", "kernels": {}}, "schema_version: expected 1 .*got None"),
    (_doc(**{"torch.sdpa_math": {"max_head_dim": "big"}}),
     r"kernels\['torch.sdpa_math'\].max_head_dim: expected an integer >= 1, got 'big'"),
    (_doc(**{"torch.sdpa_math": {"dtypes": ["float17"]}}), r"dtypes: expected dtype names from .*float17"),
    (_doc(**{"torch.sdpa_math": {"suports_gqa": True}}), r"did you mean supports_gqa"),
    (_doc(**{"flash_attn.fwd": {}}), r"expected a kernel id of backend 'torch'"),
    ({"schema_version": 1, "backend": "torch", "kernels": {}, "extra": 1}, r"document: expected keys"),
])
def test_schema_validation_errors_name_field_expected_and_actual(doc: dict, message: str) -> None:
    with pytest.raises(DescriptorError, match=message):
        parse_descriptor(json.dumps(doc), "test.json")
    with pytest.raises(DescriptorError, match="descriptor test.json: document: expected valid JSON"):
        parse_descriptor(b"{not json", "test.json")


def test_descriptor_dtypes_take_the_names_policy_conditions_take() -> None:
    desc = parse_descriptor(json.dumps(_doc(**{"torch.sdpa_math": {"dtypes": ["fp32", "bf16", "torch.float16"]}})))
    assert desc.kernels["torch.sdpa_math"]["dtypes"] == {torch.float32, torch.bfloat16, torch.float16}


def test_export_round_trips_through_the_parser() -> None:
    runtime.ensure_loaded()
    specs = [s for s in runtime.registry.kernels.values() if s.backend == "torch"]
    desc = parse_descriptor(json.dumps(export_descriptor(specs, "torch")))
    for spec in specs:
        for name, value in desc.kernels[spec.id].items():
            assert getattr(spec, name) == value, (spec.id, name)


def test_descriptor_is_parsed_lazily_when_its_backend_is_first_considered(tmp_path: Path) -> None:
    (tmp_path / "torch.json").write_text(json.dumps(_doc(**{"torch.rms_norm": {"priority": 7}})))
    (tmp_path / "xformers.json").write_text("{ this is not JSON: never parsed unless attention runs")
    code = (
        "import layerzero as lz, torch\n"
        "from layerzero.state import runtime as rt\n"
        "print(rt.descriptors.parse_count, rt._loaded)\n"  # after import: nothing read or parsed
        "lz.rms_norm(torch.randn(2, 8))\n"
        "print(rt.descriptors.parse_count, sorted(rt.descriptors.pending),"
        " rt.registry.kernel('torch.rms_norm').priority)\n"
    )
    env = dict(os.environ, LAYERZERO_DESCRIPTORS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["0 False", "1 ['xformers'] 7"]


def test_descriptor_digest_change_invalidates_plans_and_same_bytes_do_not(tmp_path: Path) -> None:
    x = torch.randn(2, 4, 16, 64)  # BSHD, head_dim 64
    assert lz.which("attention", x, x, x) == "torch.sdpa_flash_cpu"
    lz.attention(x, x, x)
    generation = runtime.generation
    narrow = tmp_path / "torch.json"
    narrow.write_text(json.dumps(_doc(**{"torch.sdpa_flash_cpu": {"max_head_dim": 32}})))
    assert load_descriptors(narrow) == ["torch"]
    assert runtime.generation > generation and not runtime.plans.data  # the digest changed: plans dropped
    report = lz.explain("attention", x, x, x)
    assert report.rejection_reasons["torch.sdpa_flash_cpu"] == [Reason.HEAD_DIM_TOO_LARGE]
    assert report.selected_kernel != "torch.sdpa_flash_cpu"
    lz.attention(x, x, x)
    generation = runtime.generation
    load_descriptors(narrow)  # the same bytes again: same digest, cached plans kept
    assert runtime.generation == generation and runtime.plans.data
    clear_descriptors()  # back to the code's declarations
    assert runtime.generation > generation and lz.which("attention", x, x, x) == "torch.sdpa_flash_cpu"


def test_descriptor_for_an_unknown_kernel_or_other_version_of_the_library(tmp_path: Path) -> None:
    load_descriptors(_doc(**{"torch.sdpa_nonexistent": {"priority": 1}}))
    with pytest.raises(DescriptorError, match=r"a registered kernel of 'torch' \(.*torch.sdpa_math"):
        lz.rms_norm(torch.randn(2, 8))
    clear_descriptors()
    doc = _doc(**{"torch.rms_norm": {"priority": 1}})
    doc["versions"] = "<1.0"  # describes an old torch: not applied here
    load_descriptors(doc)
    lz.rms_norm(torch.randn(2, 8))
    assert runtime.registry.kernel("torch.rms_norm").priority == 50


def _picky_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, window=None, softcap=0.0, alibi=None):
    """A CPU kernel whose compiled code handles head_dim <= 64 only (like a real library's limit)."""
    if q.shape[-1] > 64:
        raise RuntimeError(f"picky: head_dim {q.shape[-1]} not compiled")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _wrong_norm(x, weight, eps):
    """Right for float32, wrong (no normalization) for bfloat16: a lie the canary must find."""
    if x.dtype == torch.bfloat16:
        return x * weight
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def test_canary_catches_a_descriptor_claiming_a_head_dim_the_kernel_rejects(tmp_path: Path) -> None:
    lz.register_backend(Backend("picky", kernels=(
        KernelSpec(id="picky.attn", ops=("attention.causal", "attention.full"), impl=_picky_attention,
                   platforms=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), max_head_dim=64),
        KernelSpec(id="picky.rms", ops=("norm.rms",), impl=_wrong_norm, platforms=frozenset({"cpu"}),
                   dtypes=frozenset({torch.float32}), max_hidden_size=4096),
    )))
    assert canary("picky", "cpu").ok  # as declared in code, every claim holds
    # "after a library upgrade" someone widens the descriptor: head_dim up to 256 and bfloat16 norms
    (tmp_path / "picky.json").write_text(json.dumps({"schema_version": 1, "backend": "picky", "kernels": {
        "picky.attn": {"max_head_dim": 256}, "picky.rms": {"dtypes": ["float32", "bfloat16"]}}}))
    load_descriptors(tmp_path / "picky.json")
    report = canary("picky", "cpu")
    lies = {(c.kernel_id, dict(c.params).get("head_dim"), dict(c.params)["dtype"]) for c in report.lies}
    assert {("picky.attn", d, "float32") for d in (80, 96, 128, 160, 192, 256)} <= lies
    assert not any(k == "picky.attn" and d is not None and d <= 64 for k, d, _ in lies)
    assert ("picky.rms", None, "bfloat16") in lies and ("picky.rms", None, "float32") not in lies
    text = str(report)
    assert "LIE picky.attn attention.causal dtype=float32 head_dim=128" in text and "not compiled" in text
    # the CLI: exit 1 with the lies, JSON on request
    assert main(["canary", "picky", "--device", "cpu", "--descriptors", str(tmp_path / "picky.json")]) == 1
    assert main(["canary", "torch", "--device", "cpu", "--json"]) == 0
