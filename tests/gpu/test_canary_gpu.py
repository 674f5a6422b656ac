"""The canary on the GPU: every capability the torch (and, when installed, flash_attn / xformers /
flashinfer) backends declare holds on this device. Not run on the CPU machine."""

from __future__ import annotations

import os

import pytest
import torch

import layerzero as lz

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["torch", "flash_attn", "xformers", "liger"])
def test_declared_capabilities_hold_on_the_gpu(backend: str) -> None:
    info = {b.name: b for b in lz.list_backends()}  # probes each backend: one that cannot run is unavailable
    if backend not in info or not info[backend].available:
        pytest.skip(f"{backend} is not available here: {info[backend].reason if backend in info else 'unknown'}")
    report = lz.canary(backend, "cuda")
    if os.environ.get("OUT"):  # the report goes to benchmarks/results/canary-h100.md
        with open(os.path.join(os.environ["OUT"], f"canary_{backend}.txt"), "w") as f:
            f.write(f"{torch.cuda.get_device_name()}\n{report}\n")
    assert report.claims, f"{backend} declares nothing the canary can run on cuda"
    assert report.ok, str(report)


def test_canary_catches_a_widened_head_dim_on_the_gpu() -> None:
    """torch's cuDNN attention declares head_dim <= 128; a descriptor claiming 256 must be caught."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN attention needs sm80+")
    lz.load_descriptors({"schema_version": 1, "backend": "torch",
                         "kernels": {"torch.sdpa_cudnn": {"max_head_dim": 512, "head_dim_multiple": 8}}})
    lies = [c for c in lz.canary("torch", "cuda").lies if c.kernel_id == "torch.sdpa_cudnn"]
    assert lies and all(dict(c.params)["head_dim"] > 128 for c in lies), lies
