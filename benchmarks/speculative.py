"""Speculative decoding on the paged KV cache (layerzero.serve.speculative_generate) vs plain target
generate(), batch 1, greedy, with acceptance forced by construction.

    PYTHONPATH=src python3 benchmarks/speculative.py [--out results/speculative-h100.md]   # GPU, bf16
    PYTHONPATH=src python3 benchmarks/speculative.py --smoke                              # CPU, tiny, float32

Models (random weights): a ~0.86B Llama-style target (hidden 2048, 12 layers, GQA 32/8, head_dim 64, FFN
8192, vocab 32000) and a 2-layer draft of the same width. Both share the embedding, the final norm and the
lm_head, and every layer of both has zero o_proj and down_proj weights: the residual stream stays the
token's embedding, so both models compute the same logits (they depend on the last token only) and every
draft token is accepted, while each layer still runs its full GEMMs, RoPE, attention over the cache and
MLP. The speed-up is then the best speculative decoding can give with this draft/target cost ratio on
this machine (acceptance 1: k + 1 tokens per target pass).

Method: prompt of --prompt random tokens, --new new tokens; tokens/s = new tokens / wall time of the whole
call (prefills included), CUDA-synchronized, median of --repeats timed runs after one warm-up run per
variant (plan selection, allocator, JIT of backends that compile on first use). The acceptance rate and
the tokens per target pass come from the call's SpeculativeStats; "same tokens" says whether the
speculative output equals generate()'s token for token (bf16 GEMMs of different row counts may round a
near-tie differently; it is informational here, tests/gpu/test_speculative_gpu.py checks equality).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Callable

import torch

from layerzero.serve import Model, ModelConfig, SpeculativeGeneration, generate, speculative_generate

TARGET = ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=12, num_heads=32, num_kv_heads=8, head_dim=64,
                     intermediate_size=8192, rope_theta=500000.0, rms_eps=1e-5, max_positions=4096)
SMOKE = ModelConfig(vocab_size=512, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=128, max_positions=512)
DRAFT_LAYERS = 2


def forced_acceptance_pair(config: ModelConfig, draft_layers: int, dtype: torch.dtype, device: torch.device
                           ) -> tuple[Model, Model]:
    """(target, draft) computing identical logits: shared embedding / final norm / lm_head, zero o_proj and
    down_proj in every layer (the layers still run in full)."""
    target = Model.random(config, dtype=dtype, device=device, seed=0)
    draft = Model.random(dataclasses.replace(config, num_layers=draft_layers), dtype=dtype, device=device, seed=1)
    draft = dataclasses.replace(draft, embed=target.embed, norm=target.norm, lm_head=target.lm_head)
    for layer in target.layers + draft.layers:
        layer.wo.zero_()
        layer.w_down.zero_()
    return target, draft


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """(median wall seconds, last result) of `repeats` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny float32 models on the CPU (checks the script)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--ks", default="2,4,8", help="draft tokens per round, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if args.smoke:
        device, dtype, config = torch.device("cpu"), torch.float32, SMOKE
        args.prompt, args.new, args.repeats = min(args.prompt, 20), min(args.new, 24), 1
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke for a tiny CPU run)")
        return 1
    else:
        device, dtype, config = torch.device("cuda"), torch.bfloat16, TARGET
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    target, draft = forced_acceptance_pair(config, DRAFT_LAYERS, dtype, device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (args.prompt,), generator=gen).tolist()
    print(f"target {target.num_params() / 1e6:.1f}M params ({config.num_layers} layers), draft "
          f"{draft.num_params() / 1e6:.1f}M ({DRAFT_LAYERS} layers, embedding and head shared), {dtype}, "
          f"{device_name}; prompt {args.prompt}, {args.new} new tokens", flush=True)

    base_s, base = median_time(lambda: generate(target, prompt, args.new), args.repeats, device)
    base_tokens = base.tokens  # type: ignore[attr-defined]
    print(f"generate        : {args.new / base_s:9.1f} tokens/s", flush=True)
    rows = []
    last: SpeculativeGeneration | None = None
    for k in ks:
        spec_s, out = median_time(lambda k=k: speculative_generate(target, draft, prompt, args.new, num_speculative=k),
                                  args.repeats, device)
        assert isinstance(out, SpeculativeGeneration)
        last = out
        rows.append((k, args.new / spec_s, base_s / spec_s, out.stats.acceptance_rate, out.stats.tokens_per_step,
                     out.tokens == base_tokens))
        print(f"speculative k={k:<2}: {rows[-1][1]:9.1f} tokens/s, x{rows[-1][2]:.2f}, {out.stats}", flush=True)

    date = datetime.date.today().isoformat()
    lines = [f"# Speculative decoding on the paged KV cache ({device_name}, torch {torch.__version__}, {date})", "",
             f"Batch 1, greedy, {dtype}; target {target.num_params() / 1e6:.1f}M params ({config.num_layers} layers), "
             f"draft {DRAFT_LAYERS} layers of the same width sharing its embedding and lm_head; acceptance forced by "
             f"construction (zero o_proj/down_proj: identical logits). Prompt {args.prompt} tokens, {args.new} new "
             f"tokens, tokens/s over the whole call, median of {args.repeats}.", "",
             "| variant | k | tokens/s | speed-up | acceptance | tokens / target pass | same tokens |",
             "|---|---:|---:|---:|---:|---:|:-:|",
             f"| generate (target) | - | {args.new / base_s:.1f} | 1.00 | - | 1.00 | - |"]
    for k, tps, speedup, acc, per_pass, same in rows:
        lines.append(f"| speculative | {k} | {tps:.1f} | {speedup:.2f} | {acc:.3f} | {per_pass:.2f} | "
                     f"{'yes' if same else 'no'} |")
    if last is not None:
        for name, kernels in (("target", last.target_kernels), ("draft", last.draft_kernels)):
            lines += ["", f"{name} kernels: " + "; ".join(f"{op}: {', '.join(ids)}" for op, ids in kernels.items())]
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
