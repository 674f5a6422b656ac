"""The README's demo: what this machine has, what LayerZero picks, and why.

python -m layerzero.demo
"""

from __future__ import annotations

import time

import torch

import layerzero as lz
from layerzero.device import device_info


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def main() -> None:
    device = _device()
    info = device_info(device)
    print(f"LayerZero {lz.__version__} with torch {torch.__version__}")
    sm = f", SM {info.sm // 10}.{info.sm % 10} ({info.generation})" if info.type == "cuda" else ""
    isa = f", ISA {' '.join(sorted(info.isa))}" if info.isa else ""
    print(f"device: {info.type} {info.name}{sm}{isa}\n")

    print("backends:")
    for b in lz.list_backends():
        state = f"available, version {b.version}" if b.available else f"unavailable ({b.reason})"
        print(f"  {b.name:<12} {state}")

    print("\nkernels per op:")
    by_op: dict[str, list[str]] = {}
    for k in lz.list_kernels():
        for op in k.ops:
            by_op.setdefault(op, []).append(k.id + ("" if k.available else " (unavailable)"))
    for op in sorted(by_op):
        print(f"  {op:<18} {', '.join(by_op[op])}")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nattention ({dtype}, BSHD):")
    shapes = [  # (batch, seq_q, seq_k, heads_q, heads_kv, head_dim, causal)
        (1, 128, 128, 8, 8, 64, True),
        (4, 256, 256, 16, 4, 128, True),
        (2, 1, 512, 32, 8, 128, True),
        (2, 200, 200, 8, 8, 80, False),
        (1, 64, 64, 4, 4, 256, False),
    ]
    gen = torch.Generator(device=device).manual_seed(0)
    for b, sq, sk, hq, hkv, d, causal in shapes:
        q = torch.randn(b, sq, hq, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype, generator=gen)
        out = lz.attention(q, k, v, is_causal=causal)
        kernel = lz.which("attention", q, k, v, is_causal=causal)
        print(
            f"  B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} causal={causal!s:<5} -> {kernel:<22} out {tuple(out.shape)}"
        )

    print(f"\nrms_norm ({dtype}):")
    for rows, hidden in [(1, 4096), (64, 4096), (8192, 2048)]:
        x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
        w = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
        lz.rms_norm(x, w)
        t0 = time.perf_counter()
        for _ in range(10):
            lz.rms_norm(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / 10 * 1e6
        print(f"  rows={rows:<5} hidden={hidden:<5} -> {lz.which('rms_norm', x, w):<22} {us:8.1f} us/call")

    q = torch.randn(2, 300, 8, 64, device=device, dtype=dtype, generator=gen)
    kv = torch.randn(2, 300, 2, 64, device=device, dtype=dtype, generator=gen)
    print("\nexplain: lz.attention(q, k, v, is_causal=True) with GQA 8:2, head_dim 64")
    print(lz.explain("attention", q, kv, kv, is_causal=True))
    _generation(device, dtype)


CORPUS = [
    "layer zero picks the fastest kernel for every op and says why",
    "a paged cache holds the keys and values of every sequence",
    "the model generates text one token at a time",
] * 8


def _generation(device: torch.device, dtype: torch.dtype) -> None:
    """A small random Llama-style model generates for two prompts over the paged KV cache (serve.py)."""
    from layerzero.serve import Model, ModelConfig, generate

    try:  # a word-level tokenizer trained here on the corpus above; plain bytes without the tokenizers package
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>"], show_progress=False))
        lz.register_tokenizer("demo", tok)
        encode, decode = (lambda t: lz.tokenize(t, "demo")), (lambda i: lz.detokenize(i, "demo"))
        vocab = tok.get_vocab_size()
    except ImportError:
        encode, decode, vocab = (lambda t: list(t.encode())), (lambda i: bytes(i).decode("utf-8", "replace")), 256
    config = ModelConfig(
        vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=512
    )
    model = Model.random(config, dtype=dtype, device=device, seed=0)
    prompts = ["layer zero picks", "a paged cache holds the keys"]
    out = generate(model, [encode(p) for p in prompts], max_new_tokens=24)
    print(
        f"\ngeneration: random-init Llama-style model ({model.num_params() / 1e6:.1f}M params, {dtype}), "
        "paged KV cache, continuous batching"
    )
    for p, toks in zip(prompts, out.tokens, strict=True):
        print(f"  {p!r} -> {decode(toks)!r}")
    for op, ids in out.kernels.items():
        print(f"  {op:<18} {', '.join(ids)}")
    print(
        f"  {out.new_tokens} new tokens: {out.tokens_per_s:.0f} tokens/s overall, "
        f"{out.decode_tokens_per_s:.0f} tokens/s decode (prefill {out.prefill_s * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
