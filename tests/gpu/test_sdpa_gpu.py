"""torch's four SDPA kernels on the GPU: correctness against float64, and our declared constraints
against torch's own `can_use_*_attention` checks.

    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu/test_sdpa_gpu.py -q -s

Prints a summary table per test; with $OUT set, writes them to $OUT/sdpa_correctness.md and
$OUT/sdpa_constraints.md. Tolerance: see tests/test_attention.py `attention_tolerance` (reference
in float64 from the same half-precision inputs; rtol 1e-3 fp16 / 1e-2 bf16, atol 2 * eps).
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch

import layerzero as lz
from layerzero.ops.attention import ATTENTION
from layerzero.selection.engine import bind_kernel
from layerzero.state import runtime
from tests.test_attention import attention_tolerance, reference_attention

pytestmark = pytest.mark.gpu

SDPA_KERNELS = ["torch.sdpa_flash", "torch.sdpa_efficient", "torch.sdpa_cudnn", "torch.sdpa_math"]


def emit(name: str, title: str, header: list[str], rows: list[list[object]], show: bool = True) -> None:
    """Print a markdown table (when `show`), and write it under $OUT when that is set."""
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    if show:
        print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        props = torch.cuda.get_device_properties(0)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(f"# {title}\n\n{props.name} (sm {props.major}{props.minor}), torch {torch.__version__}, "
                    f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}\n\n{text}\n")


def _inputs(b, sq, sk, hq, hk, d, dtype, mask_kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, device="cuda", generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(b, 1, sq, sk, device="cuda", generator=g).to(dtype)
    return q, k, v, mask


def _bound(kernel_id, q, k, v, mask, is_causal, layout="BSHD"):
    """The callable a plan runs for this kernel (the prepared aten call where it has one)."""
    args = (q, k, v, mask, is_causal, 0.0, None, layout, None, 0.0, None)
    run, _ = bind_kernel(runtime.registry.kernel(kernel_id), ATTENTION.context(*args), ATTENTION.bind,
                         ATTENTION.transforms)
    return run


def _run(kernel_id, q, k, v, mask, is_causal, layout="BSHD"):
    return _bound(kernel_id, q, k, v, mask, is_causal, layout)(q, k, v, mask, is_causal, 0.0, None, None, 0.0, None)


def test_sdpa_kernels_match_float64_reference():
    """Every SDPA kernel, on every case it validates for, matches the float64 reference."""
    runtime.ensure_loaded()
    rows, failures, counts = [], [], {kid: [0, 0, 0] for kid in SDPA_KERNELS}  # ok, failed, not validated
    cases = itertools.product([torch.bfloat16, torch.float16], [64, 128, 256], [1, 4, 8],
                              [(False, 128, 128), (True, 128, 128), (True, 64, 192), (False, 77, 131)],
                              ["none", "bool", "float"])
    for seed, (dtype, d, gqa, (causal, sq, sk), mask_kind) in enumerate(cases):
        if causal and mask_kind != "none":
            continue  # attn_mask with is_causal is an input error
        q, k, v, mask = _inputs(2, sq, sk, 8, 8 // gqa, d, dtype, mask_kind, seed)
        ref = reference_attention(q, k, v, is_causal=causal, attn_mask=mask)
        tol = attention_tolerance(dtype)
        chosen = lz.which("attention", q, k, v, attn_mask=mask, is_causal=causal)
        for kid in SDPA_KERNELS:
            ok, reasons = lz.validate(kid, "attention", q, k, v, attn_mask=mask, is_causal=causal)
            if not ok:
                counts[kid][2] += 1
                continue
            label = f"{kid} {str(dtype)[6:]} d{d} gqa{gqa} {'causal' if causal else 'full'} {sq}x{sk} mask={mask_kind}"
            try:
                out = _run(kid, q, k, v, mask, causal)
                err = (out.double() - ref).abs().max().item()
                bad = not torch.allclose(out.double(), ref, **tol) or not torch.isfinite(out).all()
                verdict = "MISMATCH" if bad else "ok"
            except Exception as e:  # a kernel that validates must run: our constraints are too loose
                err, verdict, bad = float("nan"), f"RAISED {type(e).__name__}: {str(e)[:80]}", True
            counts[kid][1 if bad else 0] += 1
            if bad:
                failures.append(label)
            rows.append([kid, str(dtype)[6:], d, gqa, "causal" if causal else "full", f"{sq}x{sk}", mask_kind,
                         f"{err:.2e}", verdict, "*" if kid == chosen else ""])
    emit("sdpa_correctness", "SDPA kernels vs float64 reference (* = LayerZero's pick)",
         ["kernel", "dtype", "head_dim", "gqa", "causal", "Sq x Sk", "mask", "max abs err", "result", "pick"], rows,
         show=False)  # hundreds of rows: the file has them all, the terminal the summary and the failures
    bad_rows = [r for r in rows if r[8] != "ok"]
    if bad_rows:
        emit("sdpa_correctness_failures", "SDPA correctness failures",
             ["kernel", "dtype", "head_dim", "gqa", "causal", "Sq x Sk", "mask", "max abs err", "result", "pick"],
             bad_rows)
    emit("sdpa_correctness_summary", "SDPA correctness summary", ["kernel", "ok", "failed", "not validated (skipped)"],
         [[kid, *c] for kid, c in counts.items()])
    assert all(c[0] > 0 for kid, c in counts.items()), f"a kernel never ran: {counts}"
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


_CAN_USE = {
    "torch.sdpa_flash": "can_use_flash_attention",
    "torch.sdpa_efficient": "can_use_efficient_attention",
    "torch.sdpa_cudnn": "can_use_cudnn_attention",
}


def _torch_verdict(kid, q, k, v, mask, causal):
    """torch's answer for the call our kernel actually makes (BHSD; bottom-right causal when
    Sq != Sk becomes a materialized bool mask), and torch's debug reason when it says no."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq != sk:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        causal = False
    params = torch.backends.cuda.SDPAParams(qt, kt, vt, mask, 0.0, causal, qt.shape[1] != kt.shape[1])
    check = getattr(torch.backends.cuda, _CAN_USE[kid])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = bool(check(params, True))
    why = "; ".join(str(w.message).split(" (Triggered")[0] for w in caught)[:160]
    return ok, why


def test_declared_constraints_agree_with_torch():
    """Our KernelSpec verdict vs torch's can_use_* over a grid; every disagreement is printed.

    Fails only where we accept and torch refuses (the call would raise); where we refuse and torch
    accepts, we are stricter than needed: printed, not failed.
    """
    runtime.ensure_loaded()
    rows, unsafe, total = [], [], 0
    grid = itertools.product([torch.float16, torch.bfloat16, torch.float32], [32, 64, 80, 96, 128, 160, 192, 256, 288],
                             [1, 4, 8], ["none", "bool", "float"], [(False, 64, 64), (True, 64, 64), (True, 32, 96),
                                                                     (False, 33, 70)])
    for dtype, d, gqa, mask_kind, (causal, sq, sk) in grid:
        if causal and mask_kind != "none":
            continue
        q, k, v, mask = _inputs(1, sq, sk, 8, 8 // gqa, d, dtype, mask_kind, 0)
        for kid in _CAN_USE:
            total += 1
            ours, reasons = lz.validate(kid, "attention", q, k, v, attn_mask=mask, is_causal=causal)
            theirs, why = _torch_verdict(kid, q, k, v, mask, causal)
            if ours == theirs:
                continue
            row = [kid, str(dtype)[6:], d, gqa, mask_kind, "causal" if causal else "full", f"{sq}x{sk}",
                   "accept" if ours else "reject", "accept" if theirs else "reject",
                   ",".join(r.value for r in reasons) or "-", why or "-"]
            rows.append(row)
            if ours and not theirs:
                unsafe.append(row)
    emit("sdpa_constraints", f"Declared constraints vs torch can_use_* ({len(rows)} disagreements of {total} checks)",
         ["kernel", "dtype", "head_dim", "gqa", "mask", "causal", "Sq x Sk", "LayerZero", "torch", "our reasons",
          "torch's reason"], rows)
    assert not unsafe, f"{len(unsafe)} cases where we accept and torch refuses (see the table)"


PREPARED = ["torch.sdpa_flash", "torch.sdpa_efficient", "torch.sdpa_cudnn"]


def test_prepared_aten_calls_match_reference_in_both_layouts_decode_strided_and_backward():
    """The plans of the fused kernels call torch's aten entry points directly (KernelSpec.prepare):
    both layouts, decode rows (Sq = 1, causal), GQA, inputs whose last dim has stride 2, and the
    gradients through the aten ops, each against float64."""
    runtime.ensure_loaded()
    rows, failures, prepared = [], [], {kid: 0 for kid in PREPARED}
    shapes = [(2, 1, 4096, 32, 8, 128), (2, 1, 333, 8, 8, 64), (2, 128, 128, 8, 2, 64), (1, 77, 77, 4, 4, 128)]
    for seed, (kid, dtype, layout, shape, strided) in enumerate(itertools.product(
            PREPARED, [torch.bfloat16, torch.float16], ["BSHD", "BHSD"], shapes, [False, True])):
        b, sq, sk, hq, hk, d = shape
        q, k, v, _ = _inputs(b, sq, sk, hq, hk, 2 * d if strided else d, dtype, "none", seed)
        if strided:
            q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
        if layout == "BHSD":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ok, _ = lz.validate(kid, "attention", q, k, v, is_causal=True, layout=layout)
        if not ok:
            continue
        run = _bound(kid, q, k, v, None, True, layout)
        prepared[kid] += run.__qualname__.startswith("aten_sdpa")
        ref = reference_attention(q, k, v, layout=layout, is_causal=True)
        label = f"{kid} {str(dtype)[6:]} {layout} {'x'.join(map(str, shape))}{' strided' if strided else ''}"
        try:
            out = run(q, k, v, None, True, 0.0, None, None, 0.0, None)
            err = (out.double() - ref).abs().max().item()
            verdict = "ok" if torch.allclose(out.double(), ref, **attention_tolerance(dtype)) else "MISMATCH"
        except Exception as e:
            err, verdict = float("nan"), f"RAISED {type(e).__name__}: {str(e)[:80]}"
        if verdict != "ok":
            failures.append(f"{label}: {verdict} {err:.3g}")
        rows.append([label, run.__qualname__, f"{err:.2e}", verdict])
    # backward through the prepared aten call (compute_log_sumexp set when an input needs grad)
    for kid in PREPARED:
        q, k, v, _ = _inputs(2, 64, 64, 8, 8, 64, torch.float16, "none", 7)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.no_grad():
            if not lz.validate(kid, "attention", q, k, v, is_causal=True)[0]:
                continue
        out = _run(kid, q, k, v, None, True)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(reference_attention(qd, kd, vd, is_causal=True), (qd, kd, vd), grad.double())
        # gradients sum over rows in half precision: compared relative to their largest entry
        errs = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)]
        verdict = "ok" if max(errs) < 1e-2 else "MISMATCH"
        rows.append([f"{kid} backward fp16 2x64x64x8x64", "grad", f"{max(errs):.2e}", verdict])
        if verdict != "ok":
            failures.append(f"{kid} backward: {errs}")
    emit("sdpa_prepared", "Prepared aten SDPA calls vs float64 reference", ["case", "run", "max abs err", "result"],
         rows)
    assert all(n > 0 for n in prepared.values()), f"a fused kernel never ran through its prepared call: {prepared}"
    assert not failures, "\n".join(failures)
