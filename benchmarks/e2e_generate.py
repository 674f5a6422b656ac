"""End-to-end generation on the GPU: a ~1.1B Llama-style model (random bf16 weights), prefill latency and
decode tokens/s at batch 1, 8 and 32, for
  - transformers, attn_implementation="sdpa"                      (hf-sdpa)
  - transformers sdpa + Liger kernels (RMSNorm, RoPE, SwiGLU)     (hf-sdpa+liger, when liger_kernel imports)
  - transformers + layerzero.integrations.transformers.patch       (hf+layerzero)
  - layerzero.serve.generate: the same weights on LayerZero's paged KV cache (layerzero-serve)

    PYTHONPATH=src python3 benchmarks/e2e_generate.py            # OUT=dir also writes e2e_generate.{md,json}
    PROMPT=512 NEW=128 BATCHES=1,8,32 to change the workload; DEVICE=cpu SIZE=tiny for a smoke run

Method, identical for every variant: prompts of PROMPT random tokens (one length for the whole batch,
no padding); prefill latency = the median wall time of generating 1 token (prefill + first sample);
decode tokens/s = batch * (NEW - 1) / (median time of NEW tokens - prefill latency). Greedy, EOS
suppressed (min_new_tokens), REPEATS timed runs after one warm-up run per shape (the warm-up also
pays FlashInfer's JIT compile when its cache is cold: 13-110 s once). transformers uses its default
dynamic cache, eager (no torch.compile, no CUDA graphs) like serve.generate, so the rows compare
kernels and per-step overhead, not compilation. Liger patches `apply_rotary_pos_emb` module-wide, so
its variant runs last.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

PROMPT = int(os.environ.get("PROMPT", "512"))
NEW = int(os.environ.get("NEW", "128"))
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,8,32").split(",")]
REPEATS = int(os.environ.get("REPEATS", "3"))
DEVICE = torch.device(os.environ.get("DEVICE", "cuda"))
TINY = os.environ.get("SIZE") == "tiny"  # a 2-layer toy with the same code path, to smoke-test the script


def hf_model():
    import transformers

    sizes = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64)
    if TINY:
        sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32)
    config = transformers.LlamaConfig(
        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    with DEVICE:
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.bfloat16 if DEVICE.type == "cuda" else torch.float32).eval()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(generate: Callable[[torch.Tensor, int], object], batch: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) for `generate(input_ids (B, PROMPT), new_tokens)`."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    ids = torch.randint(3, 32000, (batch, PROMPT), device=DEVICE, generator=gen)
    generate(ids, NEW)  # warm-up: plan selection, JIT, allocator
    first = statistics.median(timed(lambda: generate(ids, 1)) for _ in range(REPEATS))
    full = statistics.median(timed(lambda: generate(ids, NEW)) for _ in range(REPEATS))
    return first * 1e3, batch * (NEW - 1) / (full - first) if full > first else float("nan")  # nan: too noisy


def hf_generate(model) -> Callable[[torch.Tensor, int], object]:
    def run(ids: torch.Tensor, new: int) -> object:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    return run


def serve_generate(model, kernels: dict) -> Callable[[torch.Tensor, int], object]:
    from layerzero.serve import generate

    def run(ids: torch.Tensor, new: int) -> object:
        out = generate(model, ids, max_new_tokens=new, max_batch=ids.shape[0])
        kernels.update(out.kernels)
        return out
    return run


def main() -> int:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or DEVICE=cpu SIZE=tiny for a smoke run)")
        return 1
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    import layerzero.integrations.transformers as lzt
    from layerzero.serve import Model

    hf = hf_model()
    serve_model = Model.from_transformers(hf)
    print(f"model: {serve_model.num_params() / 1e9:.2f}B params, {serve_model.dtype}, {device_name}; "
          f"prompt {PROMPT}, {NEW} new tokens, batches {BATCHES}", flush=True)
    kernels: dict[str, tuple[str, ...]] = {}

    def lz_patched():
        lzt.patch(hf)
        return hf_generate(hf)

    def liger():
        lzt.unpatch(hf)
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except Exception as exc:  # not installed, or a version that does not import here
            print(f"hf-sdpa+liger skipped: {type(exc).__name__}: {exc}")
            return None
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=hf)
        return hf_generate(hf)

    variants: list[tuple[str, Callable[[], Callable[[torch.Tensor, int], object] | None]]] = [
        ("hf-sdpa", lambda: hf_generate(hf)), ("layerzero-serve", lambda: serve_generate(serve_model, kernels)),
        ("hf+layerzero", lz_patched), ("hf-sdpa+liger", liger)]
    rows: list[dict] = []
    for name, make in variants:
        run = make()
        if run is None:
            continue
        for batch in BATCHES:
            try:
                prefill_ms, tps = measure(run, batch)
            except torch.cuda.OutOfMemoryError as exc:
                print(f"{name} batch {batch}: out of memory ({exc})")
                torch.cuda.empty_cache()
                continue
            rows.append({"variant": name, "batch": batch, "prefill_ms": prefill_ms, "decode_tok_s": tps})
            print(f"{name:<16} batch {batch:>3}: prefill {prefill_ms:8.1f} ms, decode {tps:9.1f} tokens/s", flush=True)

    lines = [f"# End-to-end generation, {serve_model.num_params() / 1e9:.2f}B Llama-style {serve_model.dtype}, "
             f"{device_name}", "",
             f"prompt {PROMPT} tokens, {NEW} new tokens, greedy; median of {REPEATS}; torch {torch.__version__}", "",
             "| batch | variant | prefill ms | decode tokens/s | fastest prefill | fastest decode |",
             "|---:|---|---:|---:|:-:|:-:|"]
    for batch in BATCHES:
        these = [r for r in rows if r["batch"] == batch]
        if not these:
            continue
        best_p = min(r["prefill_ms"] for r in these)
        best_d = max(r["decode_tok_s"] for r in these)
        for r in these:
            lines.append(f"| {batch} | {r['variant']} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                         f"{'x' if r['prefill_ms'] == best_p else ''} | {'x' if r['decode_tok_s'] == best_d else ''} |")
    lines += ["", "layerzero-serve kernels: " + "; ".join(f"{op}: {', '.join(ids)}" for op, ids in kernels.items())]
    table = "\n".join(lines)
    print("\n" + table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "e2e_generate.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out_dir, "e2e_generate.json"), "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "prompt": PROMPT,
                       "new": NEW, "rows": rows, "kernels": kernels}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
