"""Tokenizer startup with a 50k-entry vocabulary: content hash cold (computed) vs warm (disk cache).

Builds a byte-level BPE tokenizer.json with a 50,000-token vocabulary and ~49,700 merges in a temp
folder (nothing downloaded), then times, each in a fresh Python process:
  load     tokenizers.Tokenizer.from_file (what any startup pays)
  cold     lz Tokenizer.content_hash with an empty hash cache (canonical JSON + sha256)
  warm     the same with the cache written by the cold run (stat + one small JSON read)
Usage: python benchmarks/tokenizer_hash.py [--repeats 5] [--out benchmarks/results/tokenizer-hash-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

VOCAB = 50_000

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
t1 = time.perf_counter()
import layerzero.ops.tokenize as tk
t2 = time.perf_counter()
h = tk.Tokenizer(tok, "hf", sys.argv[1]).content_hash
t3 = time.perf_counter()
print(t1 - t0, t3 - t2, h)
"""


def build(path: str) -> None:
    """A byte-level BPE with VOCAB entries: 256 bytes, then merges of earlier tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges, tokens, j = [], list(alphabet), 0
    while len(vocab) < VOCAB:  # breadth-first: each token extended by 24 of the bytes
        for c in alphabet[:24]:
            if len(vocab) < VOCAB and tokens[j] + c not in vocab:
                vocab[tokens[j] + c] = len(vocab)
                merges.append(f"{tokens[j]} {c}")
                tokens.append(tokens[j] + c)
        j += 1
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                              "use_regex": True},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    with open(path, "w") as f:
        json.dump(data, f)


def run(path: str, env: dict[str, str]) -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True, env=env)
    load, hash_s, digest = out.stdout.split()
    return float(load), float(hash_s), digest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tokenizer-hash-cpu.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        build(path)
        size = os.path.getsize(path)
        env = dict(os.environ, LAYERZERO_CACHE_DIR=os.path.join(tmp, "cache"))
        cold, warm, loads, digests = [], [], [], set()
        for _ in range(args.repeats):
            cache = os.path.join(tmp, "cache", "tokenizer-hashes.json")
            if os.path.exists(cache):
                os.remove(cache)
            load, t, d = run(path, env)
            cold.append(t)
            loads.append(load)
            digests.add(d)
            load, t, d = run(path, env)
            warm.append(t)
            loads.append(load)
            digests.add(d)
        assert len(digests) == 1, "cold and warm hashes differ"
    med = statistics.median
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Tokenizer content hash at startup: cold vs warm (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}",
        f"- tokenizer: byte-level BPE tokenizer.json, {VOCAB:,} vocabulary entries, {size / 1e6:.1f} MB",
        f"- each figure: median of {args.repeats} fresh processes (`python benchmarks/tokenizer_hash.py`)",
        "",
        "| step | median | min | max |",
        "|---|---|---|---|",
        f"| tokenizers.Tokenizer.from_file (paid by any startup) | {med(loads) * 1e3:.1f} ms | {min(loads) * 1e3:.1f} ms | {max(loads) * 1e3:.1f} ms |",
        f"| content_hash, cold (canonical JSON + sha256) | {med(cold) * 1e3:.1f} ms | {min(cold) * 1e3:.1f} ms | {max(cold) * 1e3:.1f} ms |",
        f"| content_hash, warm (path+size+mtime cache hit) | {med(warm) * 1e3:.2f} ms | {min(warm) * 1e3:.2f} ms | {max(warm) * 1e3:.2f} ms |",
        "",
        f"Warm is {med(cold) / med(warm):.0f}x faster than cold; the hash was identical in every run.",
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
