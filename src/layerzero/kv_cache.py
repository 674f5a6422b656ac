"""Paged KV cache: a block allocator and the K/V pages of every layer, in the forms paged kernels read.

    cache = PagedKVCache(num_layers=2, num_pages=64, page_size=16, num_kv_heads=2, head_dim=64)
    cache.allocate("a", 0)
    slots, positions = cache.append_slots(["a"], [5])      # room for 5 new tokens of "a"
    cache.write(layer, k, v, slots)                         # k, v: (5, Hkv, D), one vectorised scatter
    page_table, seq_lens = cache.page_table(["a"])          # what lz.paged_attention takes
    out = lz.paged_attention(q, cache.k[layer], cache.v[layer], page_table, seq_lens, kv_layout=cache.kv_layout)

Pages hold `page_size` consecutive tokens of one sequence. A sequence of length n owns exactly
ceil(n / page_size) pages; token i sits in page `pages[i // page_size]` at offset `i % page_size`
(its *slot* is page * page_size + offset). Two page-table forms:
- vLLM block table: page_table (B, max_pages) int32 + seq_lens (B,) int32 (lz.paged_attention, our Triton
  kernel); entries past a sequence's pages are padding (page 0) and never read.
- FlashInfer CSR: kv_indptr (B + 1,), kv_indices (total pages,), kv_last_page_len (B,), all int32.

Storage: `k`, `v` are (num_layers, num_pages, page_size, Hkv, D) for kv_layout "NHD" or
(num_layers, num_pages, Hkv, page_size, D) for "HND"; `k[layer]` is the cache tensor of one layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

import torch

from .errors import InvalidInputError, LayerZeroError, UnknownNameError

KV_LAYOUTS = ("NHD", "HND")
_SLOTS_ON_DEVICE = 2048  # new tokens from which append_slots computes slots on the device


class OutOfPagesError(LayerZeroError):
    """The allocator has fewer free pages than a request needs (free or defragment sequences first)."""

    def __init__(self, seq_id: object, needed: int, free: int) -> None:
        self.needed, self.free = needed, free
        super().__init__(
            f"seq_id {seq_id!r}: expected {needed} free pages, got {free}; free finished sequences "
            "or build the cache with more pages"
        )


def _pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def _check_count(name: str, value: object, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise InvalidInputError(name, f"an int in [0, {upper}]", value)
    return value


class BlockAllocator:
    """Pages of a paged KV cache handed to sequences: allocate, extend, free, compact. Bookkeeping only.

    Free pages are handed out lowest id first. A sequence may hold at most `max_pages_per_seq` pages
    (default: all of them), so lengths range over [0, max_pages_per_seq * page_size].
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int | None = None) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise InvalidInputError("num_pages", "an int >= 1", num_pages)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise InvalidInputError("page_size", "an int >= 1", page_size)
        if max_pages_per_seq is None:
            max_pages_per_seq = num_pages
        _check_count("max_pages_per_seq", max_pages_per_seq, num_pages)
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        self.max_seq_len = max_pages_per_seq * page_size
        self._free = list(range(num_pages))  # a min-heap
        self._pages: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # -- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list[Hashable]:
        """Live sequences, in allocation order."""
        return list(self._pages)

    def pages(self, seq_id: Hashable) -> list[int]:
        """Page ids of a sequence, in token order (a copy)."""
        return list(self._pages[self._live(seq_id)])

    def length(self, seq_id: Hashable) -> int:
        return self._lens[self._live(seq_id)]

    def free_pages(self) -> list[int]:
        return sorted(self._free)

    def pages_needed(self, length: int) -> int:
        """Pages a sequence of `length` tokens owns."""
        return _pages_for(_check_count("length", length, self.max_seq_len), self.page_size)

    def _live(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._pages:
            raise InvalidInputError(
                "seq_id", "a live sequence (allocated and not yet freed)", repr(seq_id), f"live: {self.seq_ids[:8]}"
            )
        return seq_id

    # -- changes
    def _take(self, seq_id: Hashable, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(seq_id, n, len(self._free))
        return [heapq.heappop(self._free) for _ in range(n)]

    def allocate(self, seq_id: Hashable, length: int = 0) -> list[int]:
        """Start a sequence of `length` tokens; returns its pages."""
        if seq_id in self._pages:
            raise InvalidInputError("seq_id", "an id that is not live (allocate once, then extend)", repr(seq_id))
        length = _check_count("length", length, self.max_seq_len)
        pages = self._take(seq_id, _pages_for(length, self.page_size))
        self._pages[seq_id], self._lens[seq_id] = pages, length
        return list(pages)

    def extend(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow a sequence by `num_tokens`; returns the pages added (maybe none)."""
        old = self._lens[self._live(seq_id)]
        num_tokens = _check_count("num_tokens", num_tokens, self.max_seq_len - old)
        new = self._take(seq_id, _pages_for(old + num_tokens, self.page_size) - len(self._pages[seq_id]))
        self._pages[seq_id].extend(new)
        self._lens[seq_id] = old + num_tokens
        return new

    def truncate(self, seq_id: Hashable, length: int) -> list[int]:
        """Shorten a sequence to its first `length` tokens (a rollback, e.g. of rejected speculative tokens);
        returns the pages freed, those past ceil(length / page_size), in token order. The kept tokens'
        slots do not move; the next append writes over the cut ones."""
        pages = self._pages[self._live(seq_id)]
        length = _check_count("length", length, self._lens[seq_id])
        keep = _pages_for(length, self.page_size)
        freed = pages[keep:]
        del pages[keep:]
        self._lens[seq_id] = length
        for p in freed:
            heapq.heappush(self._free, p)
        return freed

    def free(self, seq_id: Hashable) -> list[int]:
        """End a sequence; its pages go back to the free pool. Freeing twice is an error."""
        pages = self._pages.pop(self._live(seq_id))
        del self._lens[seq_id]
        for p in pages:
            heapq.heappush(self._free, p)
        return pages

    def compact(self) -> tuple[list[int], list[int]]:
        """Renumber used pages to 0..used-1, each sequence's pages consecutive and in token order.

        Returns (src, dst): the page moves (only pages whose id changes) that the caller must apply
        to its page data *at once* (data[dst] = data[src]); PagedKVCache.defragment does.
        """
        src: list[int] = []
        dst: list[int] = []
        nxt = 0
        for seq_id, pages in self._pages.items():
            renumbered = list(range(nxt, nxt + len(pages)))
            for old, new in zip(pages, renumbered, strict=True):
                if old != new:
                    src.append(old)
                    dst.append(new)
            self._pages[seq_id] = renumbered
            nxt += len(pages)
        self._free = list(range(nxt, self.num_pages))
        return src, dst

    # -- page tables
    def page_table(
        self, seq_ids: Sequence[Hashable], max_pages: int | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM block table (B, max_pages) int32 (padding: page 0) and seq_lens (B,) int32."""
        rows = [self._pages[self._live(s)] for s in seq_ids]
        width = max((len(r) for r in rows), default=0)
        if max_pages is None:
            max_pages = max(width, 1)
        elif max_pages < width:
            raise InvalidInputError("max_pages", f">= {width} (the longest sequence's pages)", max_pages)
        padded = [r + [0] * (max_pages - len(r)) for r in rows]  # one tensor build, not one per row
        table = torch.tensor(padded, dtype=torch.int32).reshape(len(rows), max_pages)
        lens = torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32)
        return table.to(device), lens.to(device)

    def flashinfer_page_table(
        self, seq_ids: Sequence[Hashable], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer CSR form: (kv_indptr (B + 1,), kv_indices (total pages,), kv_last_page_len (B,)), int32."""
        rows = [self._pages[self._live(s)] for s in seq_ids]
        indptr = torch.zeros(len(rows) + 1, dtype=torch.int32)
        indptr[1:] = torch.tensor([len(r) for r in rows], dtype=torch.int32).cumsum(0)
        indices = torch.tensor([p for r in rows for p in r], dtype=torch.int32)
        lens = torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32)
        return indptr.to(device), indices.to(device), _last_page_len(lens, self.page_size).to(device)


def _last_page_len(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Tokens in each sequence's last page: page_size for a full one, 0 for an empty sequence."""
    return torch.where(seq_lens > 0, (seq_lens - 1) % page_size + 1, 0).to(torch.int32)


def block_table_to_csr(
    page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM block table (B, max_pages) + seq_lens (B,) -> FlashInfer (kv_indptr, kv_indices, kv_last_page_len).

    Vectorised; kv_indices stays on page_table's device (one host sync for its length).
    """
    if page_table.dim() != 2 or seq_lens.shape != (page_table.shape[0],):
        raise InvalidInputError(
            "seq_lens",
            f"shape ({page_table.shape[0]},) for a 2-D page_table",
            (tuple(page_table.shape), tuple(seq_lens.shape)),
        )
    pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    if bool((pages > page_table.shape[1]).any()) or bool((seq_lens < 0).any()):
        raise InvalidInputError("seq_lens", f"values in [0, {page_table.shape[1] * page_size}]", seq_lens.tolist())
    indptr = torch.zeros(pages.numel() + 1, dtype=torch.int32, device=page_table.device)
    indptr[1:] = pages.cumsum(0)
    used = torch.arange(page_table.shape[1], device=page_table.device)[None, :] < pages[:, None]
    return indptr, page_table[used].to(torch.int32), _last_page_len(seq_lens, page_size)


def convert_layout(cache: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """A paged cache (..., num_pages, page_size, Hkv, D) in NHD <-> (..., num_pages, Hkv, page_size, D) in HND.

    Returns a new contiguous tensor (or `cache` itself when src == dst).
    """
    for layout in (src, dst):
        if layout not in KV_LAYOUTS:
            raise UnknownNameError("kv_layout", str(layout), KV_LAYOUTS)
    if cache.dim() < 4:
        raise InvalidInputError(
            "cache", "a tensor of >= 4 dims (..., num_pages, page_size or Hkv, Hkv or page_size, D)", tuple(cache.shape)
        )
    return cache if src == dst else cache.transpose(-3, -2).contiguous()


class PagedKVCache:
    """K and V pages of `num_layers` layers with their BlockAllocator.

    k, v: (num_layers, num_pages, page_size, Hkv, D) in NHD or (num_layers, num_pages, Hkv, page_size, D)
    in HND. Sequence bookkeeping (allocate / extend / free, lengths) goes through `allocator`.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_layout: str = "NHD",
        max_pages_per_seq: int | None = None,
    ) -> None:
        if kv_layout not in KV_LAYOUTS:
            raise UnknownNameError("kv_layout", str(kv_layout), KV_LAYOUTS)
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(name, "an int >= 1", value)
        self.allocator = BlockAllocator(num_pages, page_size, max_pages_per_seq)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.kv_layout = page_size, kv_layout
        inner = (page_size, num_kv_heads) if kv_layout == "NHD" else (num_kv_heads, page_size)
        shape = (num_layers, num_pages, *inner, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    # -- sequences (the allocator's, with the cache's device for tables)
    def allocate(self, seq_id: Hashable, length: int = 0) -> list[int]:
        return self.allocator.allocate(seq_id, length)

    def free(self, seq_id: Hashable) -> list[int]:
        return self.allocator.free(seq_id)

    def truncate(self, seq_id: Hashable, length: int) -> list[int]:
        """Keep the first `length` tokens of a sequence, freeing the pages past them (BlockAllocator.truncate)."""
        return self.allocator.truncate(seq_id, length)

    def length(self, seq_id: Hashable) -> int:
        return self.allocator.length(seq_id)

    def page_table(
        self, seq_ids: Sequence[Hashable], max_pages: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(page_table (B, max_pages), seq_lens (B,)) int32 on the cache's device, for lz.paged_attention."""
        return self.allocator.page_table(seq_ids, max_pages, self.device)

    def flashinfer_page_table(self, seq_ids: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_indptr, kv_indices, kv_last_page_len) int32 on the cache's device."""
        return self.allocator.flashinfer_page_table(seq_ids, self.device)

    def append_slots(self, seq_ids: Sequence[Hashable], counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend sequence i by counts[i] tokens; (slots, positions), each (sum(counts),) int64 on the device.

        New tokens are packed sequence by sequence; slot = page * page_size + offset is where `write`
        puts a token, position its index in its sequence (what RoPE needs).
        """
        if len(counts) != len(seq_ids):
            raise InvalidInputError("counts", f"{len(seq_ids)} entries (one per seq_id)", len(counts))
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidInputError("seq_ids", "distinct ids", list(seq_ids))
        alloc, needed = self.allocator, 0
        for s, n in zip(seq_ids, counts, strict=True):  # validate everything before changing anything
            old = alloc.length(s)
            _check_count("counts", n, alloc.max_seq_len - old)
            needed += alloc.pages_needed(old + n) - len(alloc.pages(s))
        if needed > alloc.num_free_pages:
            raise OutOfPagesError(list(seq_ids), needed, alloc.num_free_pages)
        for s, n in zip(seq_ids, counts, strict=True):
            alloc.extend(s, n)
        table, lens = self.allocator.page_table(seq_ids)
        return self._slots(table, lens, torch.tensor(counts, dtype=torch.int64))

    def _slots(
        self, table: torch.Tensor, lens: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = int(counts.sum())
        # A prefill of many tokens computes on the cache's device (16k tokens: about 1 ms of host time
        # on the H100 machine's CPU otherwise); a decode step's few rows stay on the host.
        dev = self.device if total >= _SLOTS_ON_DEVICE else torch.device("cpu")
        table, counts = table.to(dev), counts.to(dev)
        row = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts  # index of each sequence's first new token in the pack
        pos = torch.arange(total, device=dev) - first[row] + (lens.to(dev, torch.int64) - counts)[row]
        slots = table[row, pos // self.page_size].to(torch.int64) * self.page_size + pos % self.page_size
        return slots.to(self.device), pos.to(self.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new tokens' keys and values: k, v (T, Hkv, D) go to `slots` (T,) of layer `layer`."""
        expected = (slots.shape[0], self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise InvalidInputError(name, f"shape (T, Hkv, D) = {expected}", tuple(t.shape))
        if self.kv_layout == "NHD":
            flat = (-1, self.num_kv_heads, self.head_dim)
            self.k[layer].view(flat).index_copy_(0, slots, k.to(self.k.dtype))
            self.v[layer].view(flat).index_copy_(0, slots, v.to(self.v.dtype))
        else:  # (pages, Hkv, page_size, D): advanced indices around a slice put T first, matching (T, Hkv, D)
            page, offset = slots // self.page_size, slots % self.page_size
            self.k[layer][page, :, offset] = k.to(self.k.dtype)
            self.v[layer][page, :, offset] = v.to(self.v.dtype)

    def sequence_kv(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one sequence, each (length, Hkv, D), gathered from its pages (a copy)."""
        pages = torch.tensor(self.allocator.pages(seq_id), dtype=torch.int64, device=self.device)
        n = self.allocator.length(seq_id)
        out = []
        for cache in (self.k[layer], self.v[layer]):
            blocks = cache[pages] if self.kv_layout == "NHD" else cache[pages].transpose(1, 2)
            out.append(blocks.reshape(-1, self.num_kv_heads, self.head_dim)[:n])
        return out[0], out[1]

    def defragment(self) -> int:
        """Move the used pages to ids 0..used-1 (each sequence's pages consecutive, in order), rewriting the
        page tables; returns the number of pages moved. Every sequence's K/V bytes stay the same."""
        src, dst = self.allocator.compact()
        if src:
            s = torch.tensor(src, dtype=torch.int64, device=self.device)
            d = torch.tensor(dst, dtype=torch.int64, device=self.device)
            self.k[:, d] = self.k[:, s]  # the right side is gathered first, so overlapping moves are safe
            self.v[:, d] = self.v[:, s]
        return len(src)

    def to_layout(self, kv_layout: str) -> None:
        """Convert the stored pages to `kv_layout` ("NHD" or "HND") in place of the old tensors."""
        self.k = convert_layout(self.k, self.kv_layout, kv_layout)
        self.v = convert_layout(self.v, self.kv_layout, kv_layout)
        self.kv_layout = kv_layout
