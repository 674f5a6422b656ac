"""Paged KV cache: allocator properties over random histories, data kept through defragmentation and
layout changes, both page-table forms, and the cache read by lz.paged_attention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import layerzero as lz
from layerzero.backends.flashinfer import paged_indices, paged_metadata
from layerzero.kv_cache import (
    BlockAllocator,
    OutOfPagesError,
    PagedKVCache,
    block_table_to_csr,
    convert_layout,
)

PAGES, PAGE, HKV, D = 12, 4, 2, 3
MAX_PAGES = 6  # per sequence: lengths 0..24


class CacheMachine(RuleBasedStateMachine):
    """Random allocate / extend(+write) / free / defragment / layout changes against a shadow copy of every
    sequence's keys and values."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCache(1, PAGES, PAGE, HKV, D, dtype=torch.float32, max_pages_per_seq=MAX_PAGES)
        self.shadow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.next_id = 0
        self.gen = torch.Generator().manual_seed(0)

    def _pages_used(self) -> int:
        return sum(-(-len(k) // PAGE) for k, _ in self.shadow.values())

    def _write(self, ids: list[int], counts: list[int]) -> None:
        slots, positions = self.cache.append_slots(ids, counts)
        k = torch.randn(len(slots), HKV, D, generator=self.gen)
        v = torch.randn(len(slots), HKV, D, generator=self.gen)
        self.cache.write(0, k, v, slots)
        start = 0
        for s, n in zip(ids, counts, strict=True):
            old_k, old_v = self.shadow[s]
            assert positions[start:start + n].tolist() == list(range(len(old_k), len(old_k) + n))
            self.shadow[s] = (torch.cat([old_k, k[start:start + n]]), torch.cat([old_v, v[start:start + n]]))
            start += n

    @rule(length=st.integers(0, MAX_PAGES * PAGE))
    def allocate(self, length: int) -> None:
        s, self.next_id = self.next_id, self.next_id + 1
        need = -(-length // PAGE)
        free_before = self.cache.allocator.free_pages()
        if need > PAGES - self._pages_used():
            with pytest.raises(OutOfPagesError):
                self.cache.allocate(s, length)
            assert self.cache.allocator.free_pages() == free_before and s not in self.cache.allocator.seq_ids
            return
        pages = self.cache.allocate(s, 0)
        assert pages == []
        self.shadow[s] = (torch.empty(0, HKV, D), torch.empty(0, HKV, D))
        self._write([s], [length])

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.shadow)), min_size=1, max_size=3, unique=True))
        counts = [data.draw(st.integers(0, 9)) for _ in ids]
        lens = {s: len(self.shadow[s][0]) for s in ids}
        if any(lens[s] + n > MAX_PAGES * PAGE for s, n in zip(ids, counts, strict=True)):
            with pytest.raises(lz.InvalidInputError, match="counts"):
                self.cache.append_slots(ids, counts)
            return
        extra = sum(-(-(lens[s] + n) // PAGE) - -(-lens[s] // PAGE) for s, n in zip(ids, counts, strict=True))
        if extra > PAGES - self._pages_used():
            with pytest.raises(OutOfPagesError):
                self.cache.append_slots(ids, counts)
            return  # nothing changed: the invariants below check lengths against the shadow
        self._write(ids, counts)

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        pages = self.cache.free(s)
        del self.shadow[s]
        assert set(pages) <= set(self.cache.allocator.free_pages())
        with pytest.raises(lz.InvalidInputError, match="seq_id"):
            self.cache.free(s)  # double free

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        """Rollback: the first `length` tokens keep their bytes, the pages past them go back to the pool."""
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        k, v = self.shadow[s]
        length = data.draw(st.integers(0, len(k)))
        pages = self.cache.allocator.pages(s)
        freed = self.cache.truncate(s, length)
        assert freed == pages[-(-length // PAGE):]
        assert set(freed) <= set(self.cache.allocator.free_pages())
        self.shadow[s] = (k[:length], v[:length])

    @rule()
    def reuse_all_free_pages(self) -> None:
        """Every free page (freed ones included) can be handed out again, then returned."""
        free = self.cache.allocator.num_free_pages
        assert free == PAGES - self._pages_used()
        if free == 0 or free > MAX_PAGES:
            return
        got = self.cache.allocate("probe", free * PAGE)
        held = {p for s in self.shadow for p in self.cache.allocator.pages(s)}
        assert sorted(got) == sorted(set(range(PAGES)) - held)
        self.cache.free("probe")

    @rule()
    def defragment(self) -> None:
        moved = self.cache.defragment()
        used = self._pages_used()
        assert moved <= used
        assert self.cache.allocator.free_pages() == list(range(used, PAGES))
        nxt = 0
        for s in self.cache.allocator.seq_ids:  # consecutive, in order, from page 0
            pages = self.cache.allocator.pages(s)
            assert pages == list(range(nxt, nxt + len(pages)))
            nxt += len(pages)

    @rule(layout=st.sampled_from(["NHD", "HND"]))
    def to_layout(self, layout: str) -> None:
        self.cache.to_layout(layout)
        inner = (PAGE, HKV) if layout == "NHD" else (HKV, PAGE)
        assert self.cache.k.shape == (1, PAGES, *inner, D) and self.cache.kv_layout == layout

    @invariant()
    def pages_owned_once_and_tables_consistent(self) -> None:
        alloc = self.cache.allocator
        owned = [p for s in alloc.seq_ids for p in alloc.pages(s)]
        assert len(owned) == len(set(owned)), "a page owned twice"
        assert sorted(owned + alloc.free_pages()) == list(range(PAGES))
        assert sorted(alloc.seq_ids) == sorted(self.shadow)
        ids = alloc.seq_ids
        for s in ids:
            assert alloc.length(s) == len(self.shadow[s][0])
            assert len(alloc.pages(s)) == -(-alloc.length(s) // PAGE)
        if not ids:
            return
        table, lens = self.cache.page_table(ids)
        assert table.dtype == lens.dtype == torch.int32 and lens.tolist() == [alloc.length(s) for s in ids]
        for row, s in zip(table.tolist(), ids, strict=True):
            assert row[: len(alloc.pages(s))] == alloc.pages(s)
        indptr, indices, last = self.cache.flashinfer_page_table(ids)
        assert indices.tolist() == owned
        for got, want in zip((indptr, indices, last), block_table_to_csr(table, lens, PAGE), strict=True):
            assert torch.equal(got, want)
        _, fi_indptr, fi_last, total = paged_metadata(lens, PAGE)  # FlashInfer backend's own conversion
        assert torch.equal(indptr, fi_indptr) and torch.equal(last, fi_last)
        assert torch.equal(indices, paged_indices(table, lens, PAGE, total))

    @invariant()
    def every_sequence_keeps_its_bytes(self) -> None:
        for s, (k, v) in self.shadow.items():
            got_k, got_v = self.cache.sequence_kv(0, s)
            assert torch.equal(got_k, k) and torch.equal(got_v, v)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2))
def test_layout_round_trip(pages: int, page_size: int, heads: int, dim: int, lead: int) -> None:
    nhd = torch.randn(*([2] * lead), pages, page_size, heads, dim)
    hnd = convert_layout(nhd, "NHD", "HND")
    assert hnd.shape == (*nhd.shape[:-3], heads, page_size, dim) and hnd.is_contiguous()
    assert torch.equal(hnd[..., -1, :, -1, :], nhd[..., -1, -1, :, :])  # [page, head, offset] == [page, offset, head]
    assert torch.equal(convert_layout(hnd, "HND", "NHD"), nhd)
    assert convert_layout(nhd, "NHD", "NHD") is nhd


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_cache_feeds_paged_attention(kv_layout: str) -> None:
    """Fragmented pages (interleaved growth, a freed sequence): lz.paged_attention over the cache equals
    dense attention over each sequence's own keys, before and after defragmentation."""
    g = torch.Generator().manual_seed(1)
    cache = PagedKVCache(1, 16, 4, 2, 8, kv_layout=kv_layout)
    for s in "abc":
        cache.allocate(s)
    for counts in ([3, 5, 2], [6, 1, 7], [4, 4, 4]):
        slots, _ = cache.append_slots(list("abc"), counts)
        cache.write(0, torch.randn(len(slots), 2, 8, generator=g), torch.randn(len(slots), 2, 8, generator=g), slots)
    cache.free("b")
    ids = ["a", "c"]
    q = torch.randn(2, 1, 4, 8, generator=g, dtype=torch.float32)

    def dense() -> torch.Tensor:
        rows = []
        for i, s in enumerate(ids):
            k, v = cache.sequence_kv(0, s)
            rows.append(lz.attention(q[i:i + 1], k[None], v[None], is_causal=True))
        return torch.cat(rows)

    table, lens = cache.page_table(ids)
    before = lz.paged_attention(q, cache.k[0], cache.v[0], table, lens, kv_layout=kv_layout)
    torch.testing.assert_close(before, dense(), rtol=1e-5, atol=1e-5)
    old_pages = [cache.allocator.pages(s) for s in ids]
    assert cache.defragment() > 0
    assert [cache.allocator.pages(s) for s in ids] != old_pages
    table, lens = cache.page_table(ids)
    after = lz.paged_attention(q, cache.k[0], cache.v[0], table, lens, kv_layout=kv_layout)
    assert torch.equal(after, before)


def test_write_is_one_scatter_for_many_sequences() -> None:
    """append_slots packs tokens sequence by sequence; slots point to page * page_size + offset."""
    cache = PagedKVCache(2, 8, 2, 1, 1)
    cache.allocate("x", 3)  # pages [0, 1]
    cache.allocate("y", 0)
    slots, positions = cache.append_slots(["x", "y"], [2, 3])  # x: positions 3, 4; y: 0, 1, 2
    assert positions.tolist() == [3, 4, 0, 1, 2]
    px, py = cache.allocator.pages("x"), cache.allocator.pages("y")
    assert slots.tolist() == [px[1] * 2 + 1, px[2] * 2 + 0, py[0] * 2, py[0] * 2 + 1, py[1] * 2]
    values = torch.arange(1.0, 6.0).reshape(5, 1, 1)
    cache.write(1, values, -values, slots)
    assert cache.sequence_kv(1, "y")[0].flatten().tolist() == [3.0, 4.0, 5.0]
    assert cache.sequence_kv(1, "x")[1].flatten().tolist()[3:] == [-1.0, -2.0]
    assert cache.k[0].abs().sum() == 0  # the other layer is untouched


def test_errors_name_argument_expected_and_actual() -> None:
    alloc = BlockAllocator(num_pages=4, page_size=4, max_pages_per_seq=2)
    with pytest.raises(lz.InvalidInputError, match=r"length: expected an int in \[0, 8\], got 9"):
        alloc.allocate("a", 9)
    with pytest.raises(lz.InvalidInputError, match=r"length: expected an int in \[0, 8\], got -1"):
        alloc.allocate("a", -1)
    alloc.allocate("a", 5)
    with pytest.raises(lz.InvalidInputError, match="seq_id: expected an id that is not live"):
        alloc.allocate("a", 1)
    with pytest.raises(lz.InvalidInputError, match=r"num_tokens: expected an int in \[0, 3\], got 4"):
        alloc.extend("a", 4)
    alloc.allocate("b", 8)
    with pytest.raises(OutOfPagesError, match="expected 1 free pages, got 0") as err:
        alloc.allocate("c", 1)
    assert isinstance(err.value, lz.LayerZeroError) and "c" not in alloc.seq_ids
    alloc.free("a")
    with pytest.raises(lz.InvalidInputError, match="seq_id: expected a live sequence .* got 'a'"):
        alloc.free("a")
    with pytest.raises(lz.InvalidInputError, match="seq_id"):
        alloc.extend("a", 1)
    with pytest.raises(lz.InvalidInputError, match="num_pages"):
        BlockAllocator(0, 4)
    with pytest.raises(lz.UnknownNameError, match="kv_layout"):
        PagedKVCache(1, 4, 4, 1, 8, kv_layout="BSHD")
    cache = PagedKVCache(1, 4, 4, 2, 8)
    cache.allocate(0)
    slots, _ = cache.append_slots([0], [2])
    with pytest.raises(lz.InvalidInputError, match=r"k: expected shape \(T, Hkv, D\) = \(2, 2, 8\)"):
        cache.write(0, torch.zeros(2, 1, 8), torch.zeros(2, 2, 8), slots)
    with pytest.raises(lz.InvalidInputError, match="seq_ids: expected distinct ids"):
        cache.append_slots([0, 0], [1, 1])
    with pytest.raises(lz.InvalidInputError, match="max_pages"):
        cache.page_table([0], max_pages=0)


def test_truncate_rolls_back_and_frees_pages() -> None:
    """A speculative rollback: append 7 tokens after 5, keep 2 of them; the pages past token 7 are freed and
    the next append writes over the cut tokens' slots."""
    cache = PagedKVCache(1, 6, 4, 1, 1)
    cache.allocate("a")
    slots, _ = cache.append_slots(["a"], [5])
    cache.write(0, torch.ones(5, 1, 1), torch.ones(5, 1, 1), slots)
    slots, _ = cache.append_slots(["a"], [7])  # length 12: pages for tokens 0-3, 4-7, 8-11
    cache.write(0, torch.full((7, 1, 1), 2.0), torch.full((7, 1, 1), 2.0), slots)
    pages = cache.allocator.pages("a")
    free_before = cache.allocator.num_free_pages
    assert cache.truncate("a", 7) == pages[2:]
    assert cache.length("a") == 7 and cache.allocator.pages("a") == pages[:2]
    assert cache.allocator.num_free_pages == free_before + 1
    again, positions = cache.append_slots(["a"], [1])
    assert positions.tolist() == [7] and again.tolist() == [slots[2].item()]  # the cut token's slot, reused
    assert cache.sequence_kv(0, "a")[0].flatten().tolist() == [1.0] * 5 + [2.0] * 3
    assert cache.truncate("a", 8) == [] and cache.length("a") == 8  # no-op at the current length
    assert cache.truncate("a", 0) == pages[:2] and cache.allocator.pages("a") == []
    assert cache.allocator.num_free_pages == 6 and "a" in cache.allocator.seq_ids  # still live, empty


def test_truncate_errors() -> None:
    alloc = BlockAllocator(num_pages=4, page_size=4)
    alloc.allocate("a", 5)
    with pytest.raises(lz.InvalidInputError, match=r"length: expected an int in \[0, 5\], got 6"):
        alloc.truncate("a", 6)
    with pytest.raises(lz.InvalidInputError, match=r"length: expected an int in \[0, 5\], got -1"):
        alloc.truncate("a", -1)
    with pytest.raises(lz.InvalidInputError, match=r"length: expected an int in \[0, 5\], got 2.0"):
        alloc.truncate("a", 2.0)  # type: ignore[arg-type]
    with pytest.raises(lz.InvalidInputError, match="seq_id: expected a live sequence"):
        alloc.truncate("b", 0)
    assert alloc.length("a") == 5 and len(alloc.pages("a")) == 2  # failed calls change nothing
