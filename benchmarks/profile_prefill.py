"""Where layerzero-serve's batch-32 prefill spends its time vs transformers+Liger (torch.profiler, GPU).

    source .gpu/activate.sh && PYTHONPATH=src:$PYTHONPATH python3 benchmarks/profile_prefill.py

Written for the one row of benchmarks/results/e2e_generate-h100.md that LayerZero does not win
(prefill, 32 x 512 tokens); not run yet: the session's device time ran out. Prints, per variant,
the median wall time of a 1-token generate, the GPU kernel time, and the top kernels by GPU time,
so that the gap splits into kernel time (which kernels) and host time (wall minus GPU).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PROMPT", "512")

import e2e_generate  # noqa: E402  (the same model and settings as the end-to-end benchmark)

from layerzero.serve import Model, generate  # noqa: E402

BATCH, PROMPT = 32, int(os.environ["PROMPT"])


def report(name: str, fn: Callable[[], object]) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"\n=== {name}: wall median {statistics.median(walls):.1f} ms; GPU kernel time {gpu_ms:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    hf = e2e_generate.hf_model()
    served = Model.from_transformers(hf)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, 32000, (BATCH, PROMPT), device="cuda", generator=gen)
    report("layerzero-serve", lambda: generate(served, ids, max_new_tokens=1, max_batch=BATCH))
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=hf)

    def liger() -> object:
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                               do_sample=False, pad_token_id=0)

    report("transformers+sdpa+liger", liger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
