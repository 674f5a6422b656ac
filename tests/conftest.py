"""Shared fixtures: a fresh LayerZero runtime per test, and GPU tests skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch):
    """Every test starts from a clean registry, policy and plan cache; backend probe verdicts are not
    cached on disk (tests that check the probe cache point LAYERZERO_PROBE_CACHE at a temporary file)."""
    monkeypatch.setenv("LAYERZERO_PROBE_CACHE", "off")
    lz.reset()
    yield
    lz.reset()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances per dtype for comparing a kernel with a float64 reference."""
    return {
        torch.float16: {"rtol": 1e-3, "atol": 1e-3},
        torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
        torch.float32: {"rtol": 1e-4, "atol": 1e-5},
        torch.float64: {"rtol": 1e-7, "atol": 1e-9},
    }[dtype]


# Relative tolerance of each dtype when a result is compared with a float64 reference.
REFERENCE_RTOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-7}


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """`out` (computed in `dtype`, default its own) against a float64 reference `ref`.

    The dtype's relative tolerance applies element by element and, as the absolute part, to the
    reference's largest magnitude: a sum (GEMM, attention) loses relative precision where it
    cancels. Two code paths are each compared with the reference this way, never with each other
    bit for bit: which kernel a path picks, and whether its intermediates are contiguous, may
    differ and changes the last bits.
    """
    tol = REFERENCE_RTOL[dtype or out.dtype]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol * max(scale, 1.0))
