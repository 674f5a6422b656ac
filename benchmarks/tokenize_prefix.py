"""Prefix cache gain: a ~4k-token system prompt + a short user turn, whole vs reused prefix (CPU).

Builds three tokenizers in memory (nothing downloaded): a byte-level BPE (HF `tokenizers`, 4,000
entries, trained on generated English), a tiktoken Encoding (256 bytes + the prefixes of the 600
most frequent words as merges) and a sentencepiece BPE (600 pieces: all the small corpus allows). For each it times
  whole    lz.tokenize(system + user) with no prefix registered (and encode_with_offsets)
  cached   the same after lz.register_prefix(system): a hit, only the tail is encoded
and checks that both give the same ids and offsets. Median of `--repeats` calls, 20 user turns.
Usage: python benchmarks/tokenize_prefix.py [--repeats 200] [--out benchmarks/results/tokenize-prefix-cpu.md]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import layerzero as lz

WORDS = ("the system assistant user answer question model kernel attention token prompt safety policy "
         "always never should must please follow instructions carefully context window memory tool call "
         "result format json markdown code python example response helpful honest harmless concise detail "
         "explain reason step first second third finally note important rule guideline language english").split()


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + rng.choice(".!?:;,")
            for _ in range(n)]


def build(kind: str, texts: list[str], tmp: str):
    if kind == "hf":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok
    if kind == "tiktoken":
        import tiktoken

        ranks = {bytes([i]): i for i in range(256)}
        counts = collections.Counter(w for t in texts for w in t.lower().split())
        for word, _ in counts.most_common(600):
            piece = (" " + word).encode()
            for end in range(2, len(piece) + 1):
                ranks.setdefault(piece[:end], len(ranks))
        return tiktoken.Encoding(name="bench", pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+""",
                                 mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=600, model_type="bpe",
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    path = os.path.join(tmp, "sp.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def median_us(fn, texts: list[str], repeats: int) -> float:
    times = []
    for i in range(repeats):
        text = texts[i % len(texts)]
        t0 = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    texts = corpus(3000, seed=0)
    users = corpus(20, seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("hf", "tiktoken", "sentencepiece"):
            lz.reset()
            tok = lz.register_tokenizer("bench", build(kind, texts, tmp))
            system, i = "", 0
            while len(tok.encode(system, add_special_tokens=False)) < 4096:
                system += texts[i] + " "
                i += 1
            system = system.rstrip() + "\n\nUser: "
            n_prefix = len(tok.encode(system, add_special_tokens=False))
            calls = [system + u for u in users]
            whole_ids = [lz.tokenize(t, tokenizer_id="bench") for t in calls]
            whole_offsets = [tok.encode_with_offsets(t) for t in calls]
            ids_fn = lambda t: lz.tokenize(t, tokenizer_id="bench")  # noqa: E731
            t_whole = median_us(ids_fn, calls, args.repeats)
            t_whole_off = median_us(tok.encode_with_offsets, calls, args.repeats)
            reused = lz.register_prefix(system, tokenizer_id="bench")
            assert [lz.tokenize(t, tokenizer_id="bench") for t in calls] == whole_ids, kind
            assert [tok.encode_with_offsets(t) for t in calls] == whole_offsets, kind
            t_hit = median_us(ids_fn, calls, args.repeats)
            t_hit_off = median_us(tok.encode_with_offsets, calls, args.repeats)
            stats = lz.prefix_cache().stats()
            assert stats.misses == 1 and stats.unsplittable == 0, stats
            n_total = statistics.mean(len(ids) for ids in whole_ids)
            rows.append((kind, n_prefix, n_total - n_prefix, reused, t_whole, t_hit, t_whole_off, t_hit_off))
    lines = [
        "# Tokenization prefix cache: ~4k-token system prompt + short user turn (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}",
        "- tokenizers built in the script (byte-level BPE 4k, tiktoken 256 bytes + word merges, sentencepiece BPE 600)",
        f"- each figure: median of {args.repeats} calls cycling over 20 user turns (`python benchmarks/tokenize_prefix.py`)",
        "- ids and offsets with the cache checked equal to encoding the whole text, for every turn",
        "",
        "| tokenizer | prefix tokens | suffix tokens | reused | ids: whole | ids: cached | gain "
        "| ids+offsets: whole | ids+offsets: cached | gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, n_prefix, n_suffix, reused, tw, th, two, tho in rows:
        lines.append(f"| {kind} | {n_prefix} | {n_suffix:.0f} | {reused} | {tw:.0f} us | {th:.0f} us | {tw / th:.1f}x "
                     f"| {two:.0f} us | {tho:.0f} us | {two / tho:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
