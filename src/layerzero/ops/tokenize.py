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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, UnknownNameError
from ..state import runtime

KINDS = ("hf", "tiktoken", "sentencepiece")
_CACHE_LOCK = threading.Lock()


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
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in the text become their ids."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character (start, end) of each token in text; (0, 0) for added special tokens)."""
        if not isinstance(text, str):
            raise InvalidInputError("text", "a str", type(text).__name__)
        if self.kind == "hf":
            enc = self.obj.encode(text, add_special_tokens=add_special_tokens)
            specials = enc.special_tokens_mask
            offsets = [(0, 0) if s else (int(a), int(b)) for (a, b), s in zip(enc.offsets, specials, strict=True)]
            return list(enc.ids), offsets
        if self.kind == "tiktoken":
            ids = self.obj.encode(text, allowed_special="all")
            return ids, _offsets_from_pieces(text, [self.obj.decode_single_token_bytes(i) for i in ids])
        sp = self.obj
        add_bos = add_special_tokens and sp.bos_id() >= 0
        try:  # sentencepiece >= 0.2.1: character offsets directly
            res = sp.encode(text, return_type="offset_mapping", add_bos=add_bos)
            return list(res["ids"]), [(int(a), int(b)) for a, b in res["offsets"]]
        except (TypeError, ValueError):
            pass
        proto = sp.encode(text, out_type="immutable_proto", add_bos=add_bos)  # byte offsets
        encoded = text.encode("utf-8")
        chars = lambda n: len(encoded[:n].decode("utf-8", "ignore"))  # noqa: E731
        return [p.id for p in proto.pieces], [(chars(p.begin), chars(p.end)) for p in proto.pieces]

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

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, padding: str = "longest",
                     max_length: int | None = None, truncation: bool = False, pad_id: int | None = None,
                     padding_side: str = "right") -> BatchEncoding:
        """Encode and pad texts into (B, L) tensors. padding "longest" or "max_length";
        truncation cuts to max_length (from the right); without it a longer text raises."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError("texts", "a list of str", type(texts).__name__)
        if padding not in ("longest", "max_length"):
            raise InvalidInputError("padding", "'longest' or 'max_length'", padding)
        if padding_side not in ("right", "left"):
            raise InvalidInputError("padding_side", "'right' or 'left'", padding_side)
        if (padding == "max_length" or truncation) and (not isinstance(max_length, int) or max_length < 1):
            raise InvalidInputError("max_length", "an int >= 1 with padding='max_length' or truncation", max_length)
        if self.kind == "hf":
            encs = self.obj.encode_batch(texts, add_special_tokens=add_special_tokens)
            rows = [(list(e.ids), [(0, 0) if s else (int(a), int(b)) for (a, b), s in zip(e.offsets, e.special_tokens_mask, strict=True)])
                    for e in encs]
        else:
            rows = [self.encode_with_offsets(t, add_special_tokens) for t in texts]
        if truncation:
            rows = [(ids[:max_length], offs[:max_length]) for ids, offs in rows]
        longest = max((len(ids) for ids, _ in rows), default=0)
        if max_length is not None and longest > max_length:
            raise InvalidInputError("texts", f"at most max_length={max_length} tokens (or truncation=True)",
                                    f"{longest} tokens")
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


def _offsets_from_pieces(text: str, pieces: list[bytes]) -> list[tuple[int, int]]:
    """Character spans of consecutive byte pieces of text (a character split across tokens
    belongs to the token where it ends)."""
    out, pos_bytes = [], 0
    encoded = text.encode("utf-8")
    for piece in pieces:
        start = len(encoded[:pos_bytes].decode("utf-8", "ignore"))
        pos_bytes += len(piece)
        out.append((start, len(encoded[:pos_bytes].decode("utf-8", "ignore"))))
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
    raise InvalidInputError("source", "a tokenizer file path or a tokenizers/transformers/tiktoken/sentencepiece "
                            "tokenizer object", type(source).__name__)


def _registry() -> dict[str, Tokenizer]:
    # Registered tokenizers live on the runtime object; lz.reset() swaps in a new plan cache,
    # which is how a registry from before a reset is recognised and dropped.
    state = getattr(runtime, "_tokenizer_registry", None)
    if state is None or state[0] is not runtime.plans:
        state = (runtime.plans, {})
        runtime._tokenizer_registry = state  # type: ignore[attr-defined]
    return state[1]


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


def tokenize(text: str, tokenizer_id: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of text with a registered tokenizer."""
    return get_tokenizer(tokenizer_id).encode(text, add_special_tokens)


def tokenize_batch(texts: list[str], tokenizer_id: str, **kwargs: Any) -> BatchEncoding:
    """Padded batch encoding (see Tokenizer.encode_batch for padding/truncation options)."""
    return get_tokenizer(tokenizer_id).encode_batch(texts, **kwargs)


def detokenize(ids: list[int] | torch.Tensor, tokenizer_id: str, skip_special_tokens: bool = False) -> str:
    """Text of token ids with a registered tokenizer."""
    return get_tokenizer(tokenizer_id).decode(ids, skip_special_tokens)
