"""RingBuffer: a model-based property test against a deque, wrap-around, overrun/underrun, alignment,
and no allocation per operation in steady state (tracemalloc)."""

from __future__ import annotations

import tracemalloc
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerzero.errors import InvalidInputError, LayerZeroError
from layerzero.ringbuffer import RingBuffer, RingBufferOverrun

_OPS = st.lists(st.tuples(st.sampled_from(["write", "write_over", "read", "peek", "skip"]),
                          st.integers(0, 9), st.integers(0, 4)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 8), ops=_OPS)
def test_matches_a_deque_model(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    buf = RingBuffer(capacity, frame_shape=(2,), dtype=torch.int64)
    model: deque[int] = deque()
    counter = 0
    overruns = underruns = dropped = 0
    for op, n, offset in ops:
        if op in ("write", "write_over"):
            frames = torch.arange(counter, counter + n).repeat_interleave(2).view(n, 2)
            if n > capacity - len(model):
                overruns += 1
                if op == "write":
                    with pytest.raises(RingBufferOverrun):
                        buf.write(frames)
                    continue
            buf.write(frames, overwrite=op == "write_over")
            for i in range(counter, counter + n):
                if len(model) == capacity:
                    model.popleft()
                    dropped += 1
                model.append(i)
            counter += n
        elif op == "read":
            if n > len(model):
                underruns += 1
            got = buf.read(n)
            want = [model.popleft() for _ in range(min(n, len(model)))]
            assert got[:, 0].tolist() == want and got[:, 1].tolist() == want
        elif op == "peek":
            got = buf.peek(n, offset)
            assert got[:, 0].tolist() == list(model)[offset:offset + n]
        else:
            k = buf.skip(n)
            for _ in range(k):
                model.popleft()
        assert len(buf) == len(model) and buf.free == capacity - len(model)
    assert (buf.overruns, buf.underruns, buf.dropped) == (overruns, underruns, dropped)


def test_wrap_around_write_and_read_split_across_the_end() -> None:
    buf = RingBuffer(5, frame_shape=(3,))
    buf.write(torch.zeros(4, 3))
    assert buf.skip(3) == 3
    data = torch.arange(12, dtype=torch.float32).view(4, 3)
    buf.write(data)  # occupies slots 4, 0, 1, 2
    out = torch.empty(5, 3)
    assert buf.storage[4].tolist() == [0.0, 1.0, 2.0]  # the write really wrapped: slot 4, then 0..2
    assert buf.read_into(out) == 5 and buf.underruns == 0  # one zero frame left from before, then data
    assert torch.equal(out[1:], data) and torch.equal(out[0], torch.zeros(3))
    assert buf.read_into(out) == 0 and buf.underruns == 1


def test_overrun_raises_a_layerzero_error_and_keeps_the_data() -> None:
    buf = RingBuffer(4, frame_shape=(1,))
    buf.write(torch.ones(3, 1))
    with pytest.raises(RingBufferOverrun, match="at most 1 frames") as e:
        buf.write(torch.ones(2, 1))
    assert isinstance(e.value, LayerZeroError) and len(buf) == 3 and buf.overruns == 1
    buf.write(torch.full((6, 1), 7.0), overwrite=True)  # longer than the capacity: the newest 4 survive
    assert buf.read(4).flatten().tolist() == [7.0] * 4 and buf.dropped == 5


def test_bad_arguments_name_argument_expected_and_actual() -> None:
    with pytest.raises(InvalidInputError, match="capacity: expected an int >= 1"):
        RingBuffer(0)
    with pytest.raises(InvalidInputError, match="alignment: expected a power of two"):
        RingBuffer(4, alignment=48)
    buf = RingBuffer(4, frame_shape=(80,))
    with pytest.raises(InvalidInputError, match=r"frames: expected shape \(n, 80\), got \(2, 81\)"):
        buf.write(torch.zeros(2, 81))


@pytest.mark.parametrize("alignment", [16, 64, 256])
def test_storage_is_aligned(alignment: int) -> None:
    buf = RingBuffer(7, frame_shape=(3,), dtype=torch.float16, alignment=alignment)
    assert buf.storage.data_ptr() % alignment == 0 and buf.storage.shape == (7, 3)


def test_no_allocation_per_operation_in_steady_state() -> None:
    buf = RingBuffer(64, frame_shape=(80,))
    chunk, out = torch.randn(10, 80), torch.empty(10, 80)
    ptr = buf.storage.data_ptr()

    def steady(rounds: int) -> None:
        for _ in range(rounds):
            buf.write(chunk)
            buf.peek_into(out)
            buf.read_into(out)

    steady(200)  # warm up (first-call caches)
    tracemalloc.start()
    try:
        steady(100)
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        steady(5000)  # 15000 operations, wrapping around the storage many times
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Nothing is retained, and the peak is a few transient view objects, not proportional to the ops.
    assert current - base < 1024, current - base
    assert peak - base < 16 * 1024, peak - base
    assert buf.storage.data_ptr() == ptr and len(buf) == 0
