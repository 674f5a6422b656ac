"""Tokenization over HF tokenizers, tiktoken and sentencepiece, all built locally in the test:
round trips, offsets, special tokens, batch padding/truncation, content hash and its cache."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

import layerzero as lz
import layerzero.ops.tokenize as tk

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "LayerZero selects kernels for attention, norms and sampling.",
    "Tokenizers split text into pieces; pieces map to ids.",
    "Numbers like 12345 and symbols like #@! appear too.",
    "unicode: café, naïve, Straße, 東京, emoji 🙂",
] * 20
TEXTS = ["Hello world, the fox!", "café 東京 🙂 and 42", "", "a  b   c"]
SPECIAL = "<|endoftext|>"


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERZERO_CACHE_DIR", str(tmp_path / "cache"))


def train_hf(path, vocab_size=400, specials=("<pad>", SPECIAL), lowercase=False) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return str(path)


def make_tiktoken(extra_merges=(b"th", b"he", b"the", b" the", b"ox"), pat=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""",
                  name="test", special=None):
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for m in extra_merges:
        ranks[m] = len(ranks)
    special = special if special is not None else {SPECIAL: len(ranks)}
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def train_sp(path, vocab_size=330, model_type="bpe") -> str:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        character_coverage=1.0, num_threads=1, pad_id=3, user_defined_symbols=[SPECIAL], minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


@pytest.fixture(params=["hf", "tiktoken", "sentencepiece"])
def tokenizer(request, tmp_path) -> lz.Tokenizer:
    if request.param == "hf":
        source = train_hf(tmp_path / "tokenizer.json")
    elif request.param == "tiktoken":
        source = make_tiktoken()
    else:
        source = train_sp(tmp_path / "sp.model")
    tok = lz.register_tokenizer("t", source)
    assert tok.kind == request.param
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = lz.tokenize(text, tokenizer_id="t", add_special_tokens=False)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert lz.detokenize(ids, tokenizer_id="t") == text
    assert lz.detokenize(torch.tensor(ids, dtype=torch.long), tokenizer_id="t") == text


def test_offsets_cover_the_text(tokenizer):
    text = "the fox café 東京 🙂!"
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    assert len(ids) == len(offsets) and len(ids) > 3
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert all(offsets[i][0] <= offsets[i + 1][0] for i in range(len(offsets) - 1))
    # every character is in some token's span (a character split over tokens is in several)
    covered = {i for a, b in offsets for i in range(a, b)}
    assert covered >= {i for i, ch in enumerate(text) if ch != " "}
    # a token that is exactly a word maps back to that word
    for (a, b), i in zip(offsets, ids, strict=True):
        if text[a:b].strip() == "fox":
            assert tokenizer.decode([i]).strip() == "fox"


def test_special_tokens(tokenizer):
    sid = tokenizer.special_tokens.get(SPECIAL) if tokenizer.kind != "sentencepiece" else tokenizer.obj.piece_to_id(SPECIAL)
    assert sid is not None
    ids = tokenizer.encode(f"hello{SPECIAL}world", add_special_tokens=False)
    assert ids.count(sid) == 1
    assert tokenizer.decode(ids) == f"hello{SPECIAL}world" if tokenizer.kind != "sentencepiece" else True
    if tokenizer.kind != "sentencepiece":  # user-defined symbols are ordinary pieces in sentencepiece
        assert tokenizer.decode(ids, skip_special_tokens=True) == "helloworld"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_padding(tokenizer, padding_side):
    texts = ["the fox", "a much longer sentence about the lazy dog", "x"]
    batch = lz.tokenize_batch(texts, tokenizer_id="t", add_special_tokens=False, padding_side=padding_side)
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert batch.input_ids.shape == (3, max(lengths)) and batch.input_ids.dtype == torch.int64
    assert batch.attention_mask.sum(-1).tolist() == lengths
    for b, text in enumerate(texts):
        kept = batch.input_ids[b][batch.attention_mask[b].bool()]
        assert tokenizer.decode(kept) == text
        pads = batch.input_ids[b][~batch.attention_mask[b].bool()]
        assert (pads == tokenizer.pad_id).all()
        assert len(batch.offsets[b]) == batch.input_ids.shape[1]
    first_mask = batch.attention_mask[0]
    assert (first_mask[0] == 1) if padding_side == "right" else (first_mask[-1] == 1)


def test_batch_max_length_and_truncation(tokenizer):
    texts = ["the quick brown fox jumps", "dog"]
    fixed = tokenizer.encode_batch(texts, add_special_tokens=False, padding="max_length", max_length=40)
    assert fixed.input_ids.shape == (2, 40)
    cut = tokenizer.encode_batch(texts, add_special_tokens=False, max_length=3, truncation=True)
    assert cut.input_ids.shape[1] == 3 and cut.attention_mask[0].sum() == 3
    with pytest.raises(lz.InvalidInputError, match="max_length"):
        tokenizer.encode_batch(texts, add_special_tokens=False, padding="max_length", max_length=2)
    with pytest.raises(lz.InvalidInputError, match="padding"):
        tokenizer.encode_batch(texts, padding="sometimes")


def test_errors(tmp_path):
    with pytest.raises(lz.UnknownNameError, match="tokenizer"):
        lz.tokenize("x", tokenizer_id="missing")
    with pytest.raises(lz.InvalidInputError, match="source"):
        lz.register_tokenizer("x", str(tmp_path / "nope.json"))
    with pytest.raises(lz.InvalidInputError, match="source"):
        lz.register_tokenizer("x", 42)
    tok = lz.register_tokenizer("t", make_tiktoken())
    with pytest.raises(lz.InvalidInputError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(lz.InvalidInputError, match="ids"):
        tok.decode([10**9])


def test_registry_is_reset():
    lz.register_tokenizer("t", make_tiktoken())
    lz.reset()
    with pytest.raises(lz.UnknownNameError):
        lz.tokenize("x", tokenizer_id="t")


# --- content hash --------------------------------------------------------------------------------

def hf_hash(path) -> str:
    return tk.load_tokenizer(str(path)).content_hash


def edit_json(src, dst, fn) -> str:
    data = json.loads(open(src).read())
    fn(data)
    with open(dst, "w") as f:
        json.dump(data, f, indent=1)
    return str(dst)


def test_hf_hash_ignores_formatting_and_sees_every_part(tmp_path):
    base = train_hf(tmp_path / "base.json")
    h = hf_hash(base)
    assert len(h) == 64
    # the same content, formatted and ordered differently
    data = json.loads(open(base).read())
    (tmp_path / "pretty.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
    assert hf_hash(tmp_path / "pretty.json") == h
    assert tk.load_tokenizer(tk.load_tokenizer(base).obj).content_hash == h  # object == file
    # every part changes it
    changes = {
        "vocab": lambda d: d["model"]["vocab"].update({"zzqq": len(d["model"]["vocab"])}),
        "merges": lambda d: d["model"]["merges"].pop(),
        "normalizer": lambda d: d.update(normalizer={"type": "Lowercase"}),
        "pre_tokenizer": lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
        "special": lambda d: d["added_tokens"][1].update(content="<|eot|>"),
    }
    hashes = {h}
    for name, fn in changes.items():
        changed = hf_hash(edit_json(base, tmp_path / f"{name}.json", fn))
        assert changed not in hashes, name
        hashes.add(changed)
    assert hf_hash(train_hf(tmp_path / "lower.json", lowercase=True)) != h


def test_tiktoken_hash():
    h = tk.load_tokenizer(make_tiktoken()).content_hash
    assert tk.load_tokenizer(make_tiktoken(name="renamed")).content_hash == h
    assert tk.load_tokenizer(make_tiktoken(extra_merges=(b"th", b"he", b"the"))).content_hash != h
    assert tk.load_tokenizer(make_tiktoken(pat=r"""\w+|\s+|[^\s\w]+""")).content_hash != h
    assert tk.load_tokenizer(make_tiktoken(special={"<|end|>": 261})).content_hash != h


def test_sentencepiece_hash(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    h = tk.load_tokenizer(train_sp(tmp_path / "a" / "sp.model")).content_hash
    assert tk.load_tokenizer(train_sp(tmp_path / "b" / "other.model")).content_hash == h  # retrained, same
    assert tk.load_tokenizer(train_sp(tmp_path / "v.model", vocab_size=320)).content_hash != h
    assert tk.load_tokenizer(train_sp(tmp_path / "u.model", model_type="unigram")).content_hash != h
    import sentencepiece as spm

    obj = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "sp.model"))
    assert tk.load_tokenizer(obj).content_hash == h


def test_file_hash_is_cached_by_path_size_mtime(tmp_path, monkeypatch):
    path = train_hf(tmp_path / "tokenizer.json")
    calls = []
    real = tk._hash_file
    monkeypatch.setattr(tk, "_hash_file", lambda p, k: calls.append(p) or real(p, k))
    h = hf_hash(path)
    assert hf_hash(path) == h and lz.register_tokenizer("t", path).content_hash == h
    assert len(calls) == 1  # fresh Tokenizer objects, one computation: the disk cache served the rest
    assert (tmp_path / "cache" / "tokenizer-hashes.json").exists()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: recomputed, same content
    assert hf_hash(path) == h and len(calls) == 2
    edit_json(path, path, lambda d: d["model"]["vocab"].update({"zzqq": 10**6}))
    assert hf_hash(path) != h and len(calls) == 3


# --- prefix cache --------------------------------------------------------------------------------

SYSTEM = ("You are a helpful assistant. Answer the question about the quick brown fox, café and 東京 🙂; "
          "numbers like 12345 stay numbers. ")
SUFFIX_STARTS = ["", " ", "  ", "x", "Hello", "ness", "'s", ".", "!?", ",", "-", "\n", "\t", "é", "\u0301", "東京",
                 "🙂", "12", "<|", SPECIAL, SPECIAL[:5], "\u00a0", "ß"]
PREFIX_ENDS = ["", " ", "  ", "the", "the ", "fo", "12", ".", "\n", "<|endof", "<", " ca", "é", "東", "🙂"]


def whole_and_cached(tok, text, prefix, add_special_tokens):
    want = tok.encode_with_offsets(text, add_special_tokens)
    got = tok.encode_with_offsets(text, add_special_tokens, prefix=prefix)
    return want, got


def assert_prefix_reuse_exact(tok, prefix, suffix):
    text = prefix + suffix
    for add in (False, True):
        want, got = whole_and_cached(tok, text, prefix, add)
        assert got == want, (prefix[-20:], suffix[:20], add)
    assert tok.encode(text, prefix=prefix) == tok.encode(text)


@pytest.mark.parametrize("end", PREFIX_ENDS)
@pytest.mark.parametrize("start", SUFFIX_STARTS)
def test_prefix_reuse_is_exact_at_hard_boundaries(tokenizer, end, start):
    assert_prefix_reuse_exact(tokenizer, SYSTEM + end, start + " and then the lazy dog.")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz THEQUICK.,;:!?'-_()\n\t0123456789") +
                           ["é", "ß", "東", "京", "🙂", "\u0301", "\u00a0", "ne", "ss", "the", " the", "<|", "|>",
                            SPECIAL, "  "])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


@pytest.mark.parametrize("kind", ["hf", "tiktoken", "sentencepiece"])
def test_prefix_reuse_property(kind, tmp_path_factory):
    """Random prefix/suffix pairs: reused ids and offsets equal those of encoding the whole text."""
    path = tmp_path_factory.mktemp(kind)
    source = {"hf": lambda: train_hf(path / "t.json"), "tiktoken": make_tiktoken,
              "sentencepiece": lambda: train_sp(path / "sp.model")}[kind]()
    tok = tk.load_tokenizer(source)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(head=TEXT, mid=TEXT, suffix=TEXT)
    def check(head, mid, suffix):
        assert_prefix_reuse_exact(tok, head + mid, suffix)
        assert_prefix_reuse_exact(tok, SYSTEM + head, mid + suffix)

    check()


def test_registered_prefix_is_found_and_counted(tokenizer):
    stats = lz.prefix_cache().stats()
    assert (stats.hits, stats.misses, stats.entries) == (0, 0, 0)
    reused = lz.register_prefix(SYSTEM, tokenizer_id="t")
    assert 0 < reused < len(tokenizer._encode(SYSTEM, False)[0])
    texts = [SYSTEM + "What is a fox?", SYSTEM + "ok", SYSTEM]
    for text in texts:
        assert lz.tokenize(text, tokenizer_id="t") == tokenizer._encode(text, True)[0]
    stats = lz.prefix_cache().stats()
    assert (stats.misses, stats.hits, stats.entries) == (1, 3, 1)
    assert stats.tokens_reused == 3 * reused
    lz.tokenize("unrelated text", tokenizer_id="t")
    assert lz.prefix_cache().stats().hits == 3  # no registered prefix: not looked up
    batch = lz.tokenize_batch(texts, tokenizer_id="t", add_special_tokens=False)
    for b, text in enumerate(texts):
        ids, offsets = tokenizer._encode(text, False)
        assert batch.input_ids[b][batch.attention_mask[b].bool()].tolist() == ids
        assert batch.offsets[b][: len(ids)] == offsets
    assert lz.prefix_cache().stats().hits == 6


def test_prefix_argument_caches_on_first_use(tokenizer):
    lz.tokenize(SYSTEM + "one", tokenizer_id="t", prefix=SYSTEM)
    lz.tokenize(SYSTEM + "two", tokenizer_id="t", prefix=SYSTEM)
    batch = lz.tokenize_batch([SYSTEM + "a", SYSTEM + "bb"], tokenizer_id="t", prefix=SYSTEM)
    assert batch.input_ids.shape[0] == 2
    stats = lz.prefix_cache().stats()
    assert (stats.misses, stats.hits) == (1, 3)
    with pytest.raises(lz.InvalidInputError, match="prefix"):
        lz.tokenize("other text", tokenizer_id="t", prefix=SYSTEM)
    with pytest.raises(lz.InvalidInputError, match="text"):
        lz.register_prefix("", tokenizer_id="t")


def test_prefix_without_safe_boundary_is_encoded_whole(tokenizer):
    assert lz.register_prefix("nospaceshere", tokenizer_id="t") == 0
    assert lz.tokenize("nospaceshere at all", tokenizer_id="t") == tokenizer._encode("nospaceshere at all", True)[0]
    assert lz.prefix_cache().stats().unsplittable == 1


def test_prefix_cache_is_lru_bounded():
    tok = lz.register_tokenizer("t", make_tiktoken())
    cache = lz.prefix_cache()
    cache.resize(2)
    for i in range(4):
        tok.encode(f"prefix number {i} of many", prefix=f"prefix number {i} of")
    assert cache.stats().entries == 2 and cache.stats().misses == 4
    tok.encode("prefix number 3 of many", prefix="prefix number 3 of")
    tok.encode("prefix number 0 of many", prefix="prefix number 0 of")  # evicted: encoded again
    assert (cache.stats().hits, cache.stats().misses) == (1, 5)
    with pytest.raises(lz.InvalidInputError, match="max_entries"):
        cache.resize(0)
    cache.clear()
    assert cache.stats().entries == 0 and cache.stats().hits == 0


def test_prefix_cache_is_keyed_by_tokenizer_content():
    """Two tokenizers of other content under one id, one after the other: never the other's ids."""
    lz.register_tokenizer("t", make_tiktoken())
    lz.register_prefix(SYSTEM, tokenizer_id="t")
    first = lz.tokenize(SYSTEM + "the end", tokenizer_id="t")
    other = lz.register_tokenizer("t", make_tiktoken(extra_merges=(b"th", b"he", b" a", b"an")))
    second = lz.tokenize(SYSTEM + "the end", tokenizer_id="t", prefix=SYSTEM)
    assert second == other._encode(SYSTEM + "the end", True)[0] != first
    assert lz.prefix_cache().stats().entries == 2
    lz.reset()
    assert lz.prefix_cache().stats().entries == 0


def test_safe_boundaries():
    assert tk.safe_boundaries("a b  c d", [], count=3) == [6, 1]  # one space between non-spaces
    assert tk.safe_boundaries("ab \u0301x y", [], count=3) == [5]  # not before a combining mark
    assert tk.safe_boundaries("a b <|x y", ["<|x y|>"], count=3) == [3, 1]  # "<|x y" may become the literal
    assert tk.safe_boundaries("a <|x y|> b c", ["<|x y|>"], count=3) == [11, 9, 1]  # not inside one
    assert tk.safe_boundaries("ab c", [], count=3) == [2] and tk.safe_boundaries("ab ", []) == []  # c + 1 inside


def test_tiktoken_offsets_linear_and_unchanged():
    tok = tk.load_tokenizer(make_tiktoken())
    text = "café 東京 🙂 the fox" * 3
    ids, offsets = tok.encode_with_offsets(text)
    encoded = text.encode("utf-8")
    pos, want = 0, []
    for i in ids:  # the definition: characters complete within the bytes so far
        start = len(encoded[:pos].decode("utf-8", "ignore"))
        pos += len(tok.obj.decode_single_token_bytes(i))
        want.append((start, len(encoded[:pos].decode("utf-8", "ignore"))))
    assert offsets == want


def test_prefix_ending_inside_a_literal_with_spaces():
    tok = tk.load_tokenizer(make_tiktoken(special={"<|end of text|>": 261}))
    for cut in range(1, len("<|end of text|>")):
        assert_prefix_reuse_exact(tok, "hello there the fox <|end of text|>"[: 20 + cut], "<|end of text|>"[cut:] + " ok")
    assert_prefix_reuse_exact(tok, "the fox <|end of text|> and the", " dog")
