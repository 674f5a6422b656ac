"""lz.warmup on the GPU: FlashInfer decode variants built in parallel worker processes from an empty
JIT cache, then selected and run in the warming process without compiling.

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 -m pytest -m gpu tests/gpu/test_warmup_gpu.py -q -s

Runs in a subprocess with its own empty FLASHINFER_WORKSPACE_BASE (FlashInfer reads it on import), so
it neither uses nor fills the session's JIT cache. Two decode modules (~13 s of nvcc each) keep it short;
benchmarks/cold_start.py measures the five prefill variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer", reason="FlashInfer is not importable (source .gpu/activate.sh first)")

SCRIPT = """
import json, sys, time, torch
import layerzero as lz
t0 = time.perf_counter()
report = lz.warmup("attention", [(4, 1, 1024, 8, 8, 128, 1)], [torch.bfloat16, torch.float16], "cuda",
                   options={"softcap": 30.0})
print(report, file=sys.stderr)
print(json.dumps({"variants": [[v.label, v.ok, v.seconds, v.error, v.pid, v.started, v.finished]
                               for v in report.variants],
                  "processes": report.processes, "compile_seconds": report.compile_seconds,
                  "entries": [[e.kernel, e.first_ms] for e in report.entries], "wall": time.perf_counter() - t0}))
"""


def test_decode_variants_are_built_in_parallel_from_an_empty_jit_cache(tmp_path):
    env = dict(os.environ, FLASHINFER_WORKSPACE_BASE=str(tmp_path), LAYERZERO_PROBE_CACHE="off",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("LAYERZERO_ALLOW_JIT", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    print(out.stderr[-4000:])  # the progress bar and the report
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    variants = {v[0]: v for v in data["variants"]}
    assert sorted(variants) == ["flashinfer decode bf16 d128 softcap (fa2)", "flashinfer decode fp16 d128 softcap (fa2)"]
    assert all(v[1] for v in variants.values()), variants
    assert data["processes"] == 2 and len({v[4] for v in variants.values()}) == 2
    # softcap decode: FlashInfer's decode kernel (torch's SDPA kernels have no softcap), loaded, not compiled here
    assert [e[0] for e in data["entries"]] == ["flashinfer.decode", "flashinfer.decode"]
    assert all(e[1] < 3000 for e in data["entries"]), data["entries"]  # a decode module is ~13 s of nvcc
    (_, _, _, _, _, start_a, end_a), (_, _, _, _, _, start_b, end_b) = variants.values()
    assert max(start_a, start_b) < min(end_a, end_b), "the two builds did not run at the same time"
