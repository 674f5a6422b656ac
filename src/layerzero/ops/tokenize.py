"""Tokenization: one adapter over HF `tokenizers` / transformers fast tokenizers, `tiktoken` and
`sentencepiece`, registered from local files or objects (nothing is downloaded).

    lz.register_tokenizer("llama", "/models/llama/tokenizer.json")
    ids = lz.tokenize("Hello", tokenizer_id="llama")
    batch = lz.tokenize_batch(["a", "bc"], tokenizer_id="llama")     # padded (B, L) tensors + offsets
    text = lz.detokenize(ids, tokenizer_id="llama")

There is nothing to select between here: a tokenizer's own library is the only one that runs it,
so this module is an adapter rather than an op family with kernels.

`Tokenizer.content_hash` covers everything that decides the ids: vocabulary, merges, normalizer,
pre-tokenizer, post-processor, decoder and special tokens (HF: the canonical JSON; tiktoken: ranks,
pattern and special tokens; sentencepiece: pieces, normalizer specs and the trainer settings that
change encoding). Formatting, key order, file paths and names do not enter it. For files it is
computed once and cached on disk by (path, size, mtime), so startup does not rehash a large
vocabulary; `LAYERZERO_CACHE_DIR` moves the cache (default ~/.cache/layerzero).

Prefix cache, for a long system prompt that starts many texts:

    lz.register_prefix(system, tokenizer_id="llama")     # texts starting with it reuse its ids
    ids = lz.tokenize(system + user, tokenizer_id="llama")
    ids = lz.tokenize(system + user, tokenizer_id="llama", prefix=system)   # or name it per call

The ids (and offsets) are exactly those of encoding the whole text. Tokens can merge across the
end of the prefix, so only the prefix's tokens before its last *safe boundary* are reused: a
single space between two non-space characters (inside the prefix, not inside a possible special
token), where every pre-tokenizer we support (byte-level / tiktoken regexes, Metaspace,
sentencepiece's whitespace split, BERT's whitespace split) starts a new piece whatever follows.
The rest is encoded from the boundary before that one and its tokens before the safe boundary are
dropped, so that start-of-text effects (a dummy prefix "▁", add_prefix_space) never reach the
result. A prefix without such a boundary (e.g. a text with no spaces) is encoded whole, every time.
Entries are keyed by (tokenizer content hash, prefix text), so a changed tokenizer never reuses
old ids; the cache is an LRU of `PREFIX_CACHE_ENTRIES` prefixes with hit/miss counters
(`lz.prefix_cache().stats()`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, UnknownNameError
from ..state import runtime

KINDS = ("hf", "tiktoken", "sentencepiece")
PREFIX_CACHE_ENTRIES = 64
_CACHE_LOCK = threading.Lock()
Offsets = list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class BatchEncoding:
    """A padded batch: input_ids and attention_mask (B, L) int64; offsets[b][i] = (start, end)
    character span of token i of text b in that text (special and padding tokens: (0, 0))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]] = field(repr=False)


class Tokenizer:
    """A tokenizer of one of the supported libraries behind one interface."""

    def __init__(self, obj: Any, kind: str, path: str | None = None) -> None:
        self.obj = obj
        self.kind = kind
        self.path = path
        self._hash: str | None = None

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, prefix: str | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in the text become their ids. `prefix`: a
        start of text whose encoding is cached and reused (module docstring); registered prefixes
        (lz.register_prefix) are found without it."""
        if prefix is None and not _state().prefixes.registered and isinstance(text, str):
            if self.kind == "hf":  # no offsets to compute: the library's ids directly
                return list(self.obj.encode(text, add_special_tokens=add_special_tokens).ids)
            if self.kind == "tiktoken":
                return list(self.obj.encode(text, allowed_special="all"))
        return self.encode_with_offsets(text, add_special_tokens, prefix)[0]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True, prefix: str | None = None
    ) -> tuple[list[int], Offsets]:
        """(ids, character (start, end) of each token in text; (0, 0) for added special tokens)."""
        if not isinstance(text, str):
            raise InvalidInputError("text", "a str", type(text).__name__)
        cache = _state().prefixes
        if prefix is None and cache.registered:
            prefix = cache.match(self, text)
        if prefix is not None:
            return cache.encode(self, text, prefix, add_special_tokens)
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], Offsets]:
        ids, offsets, special = self._encode_raw(text, add_special_tokens)
        return ids, _public(offsets, special)

    def _encode_raw(self, text: str, add_special_tokens: bool) -> tuple[list[int], Offsets, list[bool]]:
        """(ids, character spans, which tokens are added special tokens: HF reports (0, 0) for them)."""
        if self.kind == "hf":
            enc = self.obj.encode(text, add_special_tokens=add_special_tokens)
            return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets], [bool(s) for s in enc.special_tokens_mask]
        if self.kind == "tiktoken":
            ids = self.obj.encode(text, allowed_special="all")
            return (
                ids,
                _offsets_from_pieces(text, [self.obj.decode_single_token_bytes(i) for i in ids]),
                [False] * len(ids),
            )
        sp = self.obj
        try:  # sentencepiece >= 0.2.1: character offsets directly
            res = sp.encode(text, return_type="offset_mapping")
            ids, offsets = list(res["ids"]), [(int(a), int(b)) for a, b in res["offsets"]]
        except (TypeError, ValueError):
            proto = sp.encode(text, out_type="immutable_proto")  # byte offsets
            ends = _char_ends(text)
            ids = [p.id for p in proto.pieces]
            offsets = [(bisect.bisect_right(ends, p.begin), bisect.bisect_right(ends, p.end)) for p in proto.pieces]
        if add_special_tokens and sp.bos_id() >= 0:  # the offset and proto APIs refuse add_bos
            return [sp.bos_id()] + ids, [(0, 0)] + offsets, [True] + [False] * len(ids)
        return ids, offsets, [False] * len(ids)

    @property
    def literal_tokens(self) -> list[str]:
        """Strings matched as one token before pre-tokenization: added tokens (HF), special tokens
        (tiktoken), user-defined symbols (sentencepiece). A prefix is never split inside one."""
        if self.kind == "hf":
            return [t.content for t in self.obj.get_added_tokens_decoder().values()]
        if self.kind == "tiktoken":
            return list(self.obj._special_tokens)
        return _sentencepiece_user_symbols(self.obj.serialized_model_proto())

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list or 1-D tensor); padding must be removed first."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InvalidInputError("ids", "a list of ints or a 1-D tensor", f"{ids.dim()}-D tensor")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInputError("ids", f"token ids in [0, {self.vocab_size})", bad[:5])
        if self.kind == "hf":
            return self.obj.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.kind == "tiktoken":
            if skip_special_tokens:
                special = set(self.special_tokens.values())
                ids = [i for i in ids if i not in special]
            return self.obj.decode(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self.obj.is_control(i)]
        return self.obj.decode(ids)

    def encode_batch(
        self,
        texts: list[str],
        add_special_tokens: bool = True,
        padding: str = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        pad_id: int | None = None,
        padding_side: str = "right",
        prefix: str | None = None,
    ) -> BatchEncoding:
        """Encode and pad texts into (B, L) tensors. padding "longest" or "max_length";
        truncation cuts to max_length (from the right); without it a longer text raises.
        `prefix`: a start shared by every text, encoded once (see encode)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError("texts", "a list of str", type(texts).__name__)
        if padding not in ("longest", "max_length"):
            raise InvalidInputError("padding", "'longest' or 'max_length'", padding)
        if padding_side not in ("right", "left"):
            raise InvalidInputError("padding_side", "'right' or 'left'", padding_side)
        if (padding == "max_length" or truncation) and (not isinstance(max_length, int) or max_length < 1):
            raise InvalidInputError("max_length", "an int >= 1 with padding='max_length' or truncation", max_length)
        if self.kind == "hf" and prefix is None and not _state().prefixes.registered:
            encs = self.obj.encode_batch(texts, add_special_tokens=add_special_tokens)
            rows = [
                (list(e.ids), _public([(int(a), int(b)) for a, b in e.offsets], e.special_tokens_mask)) for e in encs
            ]
        else:
            rows = [self.encode_with_offsets(t, add_special_tokens, prefix) for t in texts]
        if truncation:
            rows = [(ids[:max_length], offs[:max_length]) for ids, offs in rows]
        longest = max((len(ids) for ids, _ in rows), default=0)
        if max_length is not None and longest > max_length:
            raise InvalidInputError(
                "texts", f"at most max_length={max_length} tokens (or truncation=True)", f"{longest} tokens"
            )
        width = max_length if padding == "max_length" else longest
        pad = self.pad_id if pad_id is None else pad_id
        ids_out = torch.full((len(rows), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        offsets: list[list[tuple[int, int]]] = []
        for b, (ids, offs) in enumerate(rows):
            n = len(ids)
            cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
            ids_out[b, cols] = torch.tensor(ids, dtype=torch.int64)
            mask[b, cols] = 1
            padded = [(0, 0)] * (width - n)
            offsets.append(offs + padded if padding_side == "right" else padded + offs)
        return BatchEncoding(ids_out, mask, offsets)

    # -- facts ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return int(self.obj.get_vocab_size(with_added_tokens=True))
        if self.kind == "tiktoken":
            return int(self.obj.n_vocab)
        return int(self.obj.get_piece_size())

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token strings and their ids."""
        if self.kind == "hf":
            return {t.content: i for i, t in self.obj.get_added_tokens_decoder().items() if t.special}
        if self.kind == "tiktoken":
            return dict(self.obj._special_tokens)
        sp = self.obj
        return {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}

    @property
    def pad_id(self) -> int:
        """The padding id: the tokenizer's pad token if it has one, else 0."""
        if self.kind == "sentencepiece" and self.obj.pad_id() >= 0:
            return int(self.obj.pad_id())
        for name in ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"):
            if name in self.special_tokens:
                return self.special_tokens[name]
        return 0

    @property
    def content_hash(self) -> str:
        """sha256 over what decides the ids (module docstring); cached per file and per object."""
        if self._hash is None:
            self._hash = cached_file_hash(self.path, self.kind) if self.path else _hash_object(self.obj, self.kind)
        return self._hash


def _public(offsets: Offsets, special: Any, shift: int = 0) -> Offsets:
    """Offsets as the API reports them: (0, 0) for added special tokens, spans moved by `shift`."""
    return [(0, 0) if s else (a + shift, b + shift) for (a, b), s in zip(offsets, special, strict=True)]


def _char_ends(text: str) -> list[int]:
    """ends[i]: the UTF-8 byte offset where character i of text ends."""
    ends, total = [], 0
    for ch in text:
        total += 1 if ch < "\x80" else len(ch.encode("utf-8"))
        ends.append(total)
    return ends


def _offsets_from_pieces(text: str, pieces: list[bytes]) -> Offsets:
    """Character spans of consecutive byte pieces of text (a character split across tokens
    belongs to the token where it ends)."""
    ends = _char_ends(text)
    out, pos, chars = [], 0, 0
    for piece in pieces:
        start = chars
        pos += len(piece)
        chars = bisect.bisect_right(ends, pos, lo=chars)  # characters complete within the first pos bytes
        out.append((start, chars))
    return out


# -- hashing --------------------------------------------------------------------------------------


def _canonical_json(text: str) -> bytes:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, bytes]]:
    """Top-level (field number, raw field bytes) of a protobuf message, in order."""
    out, i = [], 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise InvalidInputError("sentencepiece model", "a ModelProto", f"wire type {wire} at byte {start}")
        out.append((key >> 3, buf[start:i]))
    return out


# TrainerSpec fields that record where and how training ran, not how text is encoded:
# input (1), model_prefix (2), input_format (7), num_threads (16).
_SP_TRAINER_SKIP = {1, 2, 7, 16}


def _sentencepiece_digest(model: bytes) -> bytes:
    h = hashlib.sha256(b"sentencepiece\0")
    for number, raw in _proto_fields(model):
        if number == 2:  # trainer_spec: keep the fields that change encoding
            _, body_start = _varint(raw, 0)
            _, body_start = _varint(raw, body_start)
            kept = b"".join(r for n, r in _proto_fields(raw[body_start:]) if n not in _SP_TRAINER_SKIP)
            h.update(b"trainer" + hashlib.sha256(kept).digest())
        elif number != 4:  # self_test_data (4) is not part of the tokenizer
            h.update(raw)
    return h.digest()


def _sentencepiece_user_symbols(model: bytes) -> list[str]:
    """Pieces of type USER_DEFINED (4) of a ModelProto: pieces (1) { piece (1), type (3) }."""
    out = []
    for number, raw in _proto_fields(model):
        if number != 1:
            continue
        _, i = _varint(raw, 0)
        _, i = _varint(raw, i)
        fields = dict(_proto_fields(raw[i:]))
        if 3 in fields and _varint(fields[3], 1)[0] == 4:
            _, j = _varint(fields[1], 1)
            out.append(fields[1][j:].decode("utf-8"))
    return out


def _hash_object(obj: Any, kind: str) -> str:
    if kind == "hf":
        return hashlib.sha256(b"hf\0" + _canonical_json(obj.to_str())).hexdigest()
    if kind == "tiktoken":
        h = hashlib.sha256(b"tiktoken\0")
        h.update(obj._pat_str.encode())
        for token, rank in sorted(obj._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(8, "little") + len(token).to_bytes(4, "little") + token)
        h.update(json.dumps(sorted(obj._special_tokens.items())).encode())
        return h.hexdigest()
    return _sentencepiece_digest(obj.serialized_model_proto()).hex()


def _hash_file(path: str, kind: str) -> str:
    data = Path(path).read_bytes()
    if kind == "hf":
        return hashlib.sha256(b"hf\0" + _canonical_json(data.decode("utf-8"))).hexdigest()
    return _sentencepiece_digest(data).hex()


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERZERO_CACHE_DIR") or Path.home() / ".cache" / "layerzero")


def cached_file_hash(path: str, kind: str) -> str:
    """content hash of a tokenizer file, from the on-disk cache when (path, size, mtime) match."""
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = [kind, st.st_size, st.st_mtime_ns]
    cache_file = cache_dir() / "tokenizer-hashes.json"
    try:
        entries = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        entries = {}
    hit = entries.get(path)
    if isinstance(hit, list) and hit[:3] == stamp:
        return str(hit[3])
    digest = _hash_file(path, kind)
    with _CACHE_LOCK:
        try:
            entries = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[path] = stamp + [digest]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs a rehash next time
    return digest


# -- loading and the registry -------------------------------------------------------------------


def load_tokenizer(source: Any, kind: str | None = None) -> Tokenizer:
    """A Tokenizer from a local file (tokenizer.json, a .model) or an object: tokenizers.Tokenizer,
    a transformers fast tokenizer, tiktoken.Encoding, sentencepiece.SentencePieceProcessor."""
    if kind is not None and kind not in KINDS:
        raise UnknownNameError("tokenizer kind", str(kind), KINDS)
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not os.path.isfile(path):
            raise InvalidInputError("source", "an existing tokenizer file (tokenizer.json or a .model)", path)
        kind = kind or ("hf" if path.endswith(".json") else "sentencepiece" if path.endswith(".model") else None)
        if kind == "hf":
            from tokenizers import Tokenizer as HFTokenizer

            return Tokenizer(HFTokenizer.from_file(path), "hf", path)
        if kind == "sentencepiece":
            import sentencepiece

            return Tokenizer(sentencepiece.SentencePieceProcessor(model_file=path), "sentencepiece", path)
        raise InvalidInputError("kind", "'hf' or 'sentencepiece' for this file (tiktoken: pass an Encoding)", kind)
    module = type(source).__module__.split(".")[0]
    if hasattr(source, "backend_tokenizer"):  # transformers PreTrainedTokenizerFast
        return Tokenizer(source.backend_tokenizer, "hf")
    if module == "tokenizers":
        return Tokenizer(source, "hf")
    if module == "tiktoken":
        return Tokenizer(source, "tiktoken")
    if module == "sentencepiece":
        return Tokenizer(source, "sentencepiece")
    raise InvalidInputError(
        "source",
        "a tokenizer file path or a tokenizers/transformers/tiktoken/sentencepiece tokenizer object",
        type(source).__name__,
    )


# -- prefix cache ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Counters of the prefix cache: a hit reuses a cached prefix, a miss encodes one (and caches
    it); `unsplittable` counts prefixes without a safe boundary, encoded whole each time."""

    hits: int
    misses: int
    unsplittable: int
    tokens_reused: int
    entries: int
    max_entries: int


@dataclass(frozen=True, slots=True)
class _Prefix:
    """A prefix's tokens before its safe boundary `split` (plain: no tokens added by
    add_special_tokens); the rest is encoded from `context` and its tokens before `split` dropped.
    `frame`: the tokens add_special_tokens=True puts before and after a text, or None if they are
    not a fixed frame (then add_special_tokens=True texts are encoded whole)."""

    ids: list[int]
    offsets: Offsets  # public spans: (0, 0) for added special tokens
    split: int  # -1: no safe boundary
    context: int
    frame: tuple[list[int], Offsets, list[int], Offsets] | None


def safe_boundaries(text: str, literals: list[str], count: int = 1) -> list[int]:
    """The last `count` positions c of text (descending) where a pre-tokenizer always starts a new
    piece whatever follows the text: text[c] is one space between two non-space characters, the
    next one not a combining mark, and no literal token (added / special / user-defined) can
    cover c, in text or reaching past its end."""
    limit = len(text) - 2  # text[c + 1] must be in text
    covered: list[tuple[int, int]] = []
    for lit in literals:
        for k in range(1, len(lit)):  # a literal that text's end starts could cover positions >= len - k
            if text.endswith(lit[:k]):
                limit = min(limit, len(text) - k - 1)
        if " " in lit:
            at = text.find(lit)
            while at >= 0:
                covered.append((at, at + len(lit)))
                at = text.find(lit, at + 1)
    out: list[int] = []
    c = text.rfind(" ", 0, limit + 1)
    while c > 0 and len(out) < count:
        after = text[c + 1]
        if (
            not text[c - 1].isspace()
            and not after.isspace()
            and not unicodedata.combining(after)
            and not any(a < c < b for a, b in covered)
        ):
            out.append(c)
        c = text.rfind(" ", 0, c)
    return out


class PrefixCache:
    """LRU of encoded prefixes keyed by (tokenizer content hash, prefix text), with counters and
    the prefixes registered per tokenizer (matched against every text that tokenizer encodes)."""

    def __init__(self, max_entries: int = PREFIX_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self.lock = threading.Lock()
        self.entries: OrderedDict[tuple[str, str], _Prefix] = OrderedDict()
        self.registered: dict[str, list[str]] = {}  # content hash -> prefixes, longest first
        self.hits = self.misses = self.unsplittable = self.tokens_reused = 0

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self.hits, self.misses, self.unsplittable, self.tokens_reused, len(self.entries), self.max_entries
        )

    def clear(self) -> None:
        """Drop the cached prefixes and the counters (registered prefixes stay registered)."""
        with self.lock:
            self.entries.clear()
            self.hits = self.misses = self.unsplittable = self.tokens_reused = 0

    def resize(self, max_entries: int) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidInputError("max_entries", "an int >= 1", max_entries)
        with self.lock:
            self.max_entries = max_entries
            while len(self.entries) > max_entries:
                self.entries.popitem(last=False)

    def register(self, tok: Tokenizer, prefix: str) -> _Prefix:
        entry = self._entry(tok, prefix)
        with self.lock:
            texts = self.registered.setdefault(tok.content_hash, [])
            if prefix not in texts:
                texts.append(prefix)
                texts.sort(key=len, reverse=True)
        return entry

    def match(self, tok: Tokenizer, text: str) -> str | None:
        """The longest registered prefix of this tokenizer that text starts with."""
        for prefix in self.registered.get(tok.content_hash, ()):
            if text.startswith(prefix):
                return prefix
        return None

    def _entry(self, tok: Tokenizer, prefix: str) -> _Prefix:
        key = (tok.content_hash, prefix)
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = _make_prefix(tok, prefix)
        with self.lock:
            self.entries[key] = entry
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        return entry

    def encode(self, tok: Tokenizer, text: str, prefix: str, add_special_tokens: bool) -> tuple[list[int], Offsets]:
        """tok's (ids, offsets) of text, reusing the cached tokens of prefix (text must start with it)."""
        if not isinstance(prefix, str):
            raise InvalidInputError("prefix", "a str that the text starts with", type(prefix).__name__)
        if not text.startswith(prefix):
            raise InvalidInputError("prefix", "a start of the text", f"{prefix[:40]!r} vs text {text[:40]!r}")
        entry = self._entry(tok, prefix)
        if entry.split < 0 or (add_special_tokens and entry.frame is None):
            self.unsplittable += 1
            return tok._encode(text, add_special_tokens)
        c0 = entry.context
        ids, offsets, special = tok._encode_raw(text[c0:], False)
        j = next((i for i, (a, _) in enumerate(offsets) if a >= entry.split - c0), len(ids))
        if j > 0 and offsets[j - 1][1] > entry.split - c0:  # a token across the boundary: not a piece start
            self.unsplittable += 1
            return tok._encode(text, add_special_tokens)
        self.tokens_reused += len(entry.ids)
        ids = entry.ids + ids[j:]
        offsets = entry.offsets + _public(offsets[j:], special[j:], c0)
        if add_special_tokens and entry.frame is not None:
            lead_ids, lead_offsets, trail_ids, trail_offsets = entry.frame
            ids = lead_ids + ids + trail_ids
            offsets = lead_offsets + offsets + trail_offsets
        return ids, offsets


def _make_prefix(tok: Tokenizer, prefix: str) -> _Prefix:
    ids, raw, special = tok._encode_raw(prefix, False)
    offsets = _public(raw, special)
    boundaries = safe_boundaries(prefix, tok.literal_tokens)
    # an HF tokenizer set to truncate or pad changes whole-text results: never split those
    fixed = tok.kind != "hf" or (tok.obj.truncation is None and tok.obj.padding is None)
    if not boundaries or not fixed:
        return _Prefix([], [], -1, 0, None)
    split = boundaries[0]
    j = next((i for i, (a, _) in enumerate(raw) if a >= split), len(ids))
    if j > 0 and raw[j - 1][1] > split:
        return _Prefix([], [], -1, 0, None)
    # the tokens add_special_tokens adds around this prefix, if they are plain + a fixed frame
    full_ids, full_offsets = tok._encode(prefix, True)
    frame = None
    for a in range(len(full_ids) - len(ids) + 1):
        if full_ids[a : a + len(ids)] == ids and full_offsets[a : a + len(ids)] == offsets:
            b = a + len(ids)
            frame = (full_ids[:a], full_offsets[:a], full_ids[b:], full_offsets[b:])
            break
    return _Prefix(ids[:j], offsets[:j], split, split - 1, frame)


@dataclass
class _TokenizeState:
    owner: object  # runtime.plans when made: lz.reset() replaces it, which drops this state
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)
    prefixes: PrefixCache = field(default_factory=PrefixCache)


def _state() -> _TokenizeState:
    # Registered tokenizers and the prefix cache live on the runtime object; lz.reset() swaps in a
    # new plan cache, which is how state from before a reset is recognised and dropped.
    state = getattr(runtime, "_tokenize_state", None)
    if state is None or state.owner is not runtime.plans:
        state = runtime._tokenize_state = _TokenizeState(runtime.plans)  # type: ignore[attr-defined]
    return state


def _registry() -> dict[str, Tokenizer]:
    return _state().tokenizers


def register_tokenizer(tokenizer_id: str, source: Any, kind: str | None = None) -> Tokenizer:
    """Make a tokenizer available as `tokenizer_id` (replaces an earlier one of that id)."""
    if not isinstance(tokenizer_id, str) or not tokenizer_id:
        raise InvalidInputError("tokenizer_id", "a non-empty str", tokenizer_id)
    tok = source if isinstance(source, Tokenizer) else load_tokenizer(source, kind)
    _registry()[tokenizer_id] = tok
    return tok


def get_tokenizer(tokenizer_id: str) -> Tokenizer:
    tok = _registry().get(tokenizer_id)
    if tok is None:
        raise UnknownNameError("tokenizer", str(tokenizer_id), _registry())
    return tok


def tokenize(text: str, tokenizer_id: str, add_special_tokens: bool = True, prefix: str | None = None) -> list[int]:
    """Token ids of text with a registered tokenizer; `prefix` (a start of text) is encoded once
    and reused on later calls (module docstring), as are prefixes given to register_prefix."""
    return get_tokenizer(tokenizer_id).encode(text, add_special_tokens, prefix)


def tokenize_batch(texts: list[str], tokenizer_id: str, **kwargs: Any) -> BatchEncoding:
    """Padded batch encoding (see Tokenizer.encode_batch for padding/truncation/prefix options)."""
    return get_tokenizer(tokenizer_id).encode_batch(texts, **kwargs)


def detokenize(ids: list[int] | torch.Tensor, tokenizer_id: str, skip_special_tokens: bool = False) -> str:
    """Text of token ids with a registered tokenizer."""
    return get_tokenizer(tokenizer_id).decode(ids, skip_special_tokens)


def register_prefix(text: str, tokenizer_id: str) -> int:
    """Encode `text` now and reuse its tokens for every later text of this tokenizer that starts
    with it (lz.tokenize, tokenize_batch, Tokenizer.encode). Returns how many tokens are reused
    (0: text has no safe boundary, see the module docstring)."""
    if not isinstance(text, str) or not text:
        raise InvalidInputError("text", "a non-empty str", text if not isinstance(text, str) else "''")
    return len(_state().prefixes.register(get_tokenizer(tokenizer_id), text).ids)


def prefix_cache() -> PrefixCache:
    """The prefix cache: .stats(), .clear(), .resize(max_entries)."""
    return _state().prefixes
