"""A preallocated ring buffer of tensor frames for streaming (audio frames, KV chunks).

    buf = RingBuffer(capacity=4096, frame_shape=(80,), dtype=torch.float32)
    buf.write(chunk)                  # chunk: (n, 80); wraps around the end of the storage
    n = buf.read_into(out)            # out: (m, 80) preallocated; returns frames read (<= m)

Storage is allocated once, aligned to `alignment` bytes. Writes and reads copy at most two
contiguous slices (before and after the wrap point) into or out of it: no tensor storage is
allocated on the hot path (`read`/`peek` without `_into` allocate their result by design).
Overruns (a write that does not fit) and underruns (a read of more frames than buffered) are
counted; an overrun raises unless `overwrite=True`, which drops the oldest frames instead.
The buffer is not thread-safe: one producer and one consumer per buffer, or a lock around it.
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError, LayerZeroError


class RingBufferOverrun(LayerZeroError):
    """A write did not fit the free space and overwrite was off; nothing was written."""


class RingBuffer:
    """Fixed-capacity FIFO of frames of `frame_shape` and `dtype` on `device`."""

    __slots__ = (
        "capacity",
        "frame_shape",
        "dtype",
        "device",
        "storage",
        "_start",
        "_size",
        "overruns",
        "underruns",
        "dropped",
    )

    def __init__(
        self,
        capacity: int,
        frame_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        alignment: int = 64,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidInputError("capacity", "an int >= 1 (frames)", capacity)
        if alignment < 1 or alignment & (alignment - 1):
            raise InvalidInputError("alignment", "a power of two (bytes)", alignment)
        self.capacity = capacity
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        item = torch.empty((), dtype=dtype).element_size()
        numel = capacity
        for s in self.frame_shape:
            numel *= s
        raw = torch.empty(numel * item + alignment, dtype=torch.uint8, device=self.device)
        offset = (-raw.data_ptr()) % alignment
        # a uint8 view at an aligned offset, reinterpreted: `storage` keeps `raw` alive
        self.storage = raw[offset : offset + numel * item].view(dtype).view(capacity, *self.frame_shape)
        self._start = 0  # index of the oldest frame
        self._size = 0
        self.overruns = 0  # writes that did not fit
        self.underruns = 0  # reads that asked for more than was buffered
        self.dropped = 0  # frames overwritten by overwrite=True

    def __len__(self) -> int:
        return self._size

    @property
    def free(self) -> int:
        return self.capacity - self._size

    def write(self, frames: torch.Tensor, overwrite: bool = False) -> int:
        """Append `frames` (n, *frame_shape); returns n. Raises RingBufferOverrun when n > free and not overwrite."""
        if tuple(frames.shape[1:]) != self.frame_shape or frames.dim() != len(self.frame_shape) + 1:
            raise InvalidInputError(
                "frames", f"shape (n, {', '.join(map(str, self.frame_shape))})", tuple(frames.shape)
            )
        n = frames.shape[0]
        if n > self.free:
            self.overruns += 1
            if not overwrite:
                raise RingBufferOverrun(
                    f"frames: expected at most {self.free} frames (free space of "
                    f"{self.capacity}), got {n}; read first or write with overwrite=True"
                )
            if n >= self.capacity:  # only the newest `capacity` frames survive
                frames = frames[n - self.capacity :]
                self.dropped += self._size + n - self.capacity
                self._start, self._size, n = 0, 0, self.capacity
            else:
                drop = n - self.free
                self.dropped += drop
                self._start = (self._start + drop) % self.capacity
                self._size -= drop
        end = (self._start + self._size) % self.capacity
        first = min(n, self.capacity - end)
        self.storage[end : end + first].copy_(frames[:first])
        if first < n:
            self.storage[: n - first].copy_(frames[first:n])
        self._size += n
        return n

    def peek_into(self, out: torch.Tensor, offset: int = 0) -> int:
        """Copy up to len(out) frames starting `offset` frames after the oldest, without consuming them."""
        if offset < 0:
            raise InvalidInputError("offset", "frames >= 0 after the oldest", offset)
        n = max(0, min(out.shape[0], self._size - offset))
        start = (self._start + offset) % self.capacity
        first = min(n, self.capacity - start)
        out[:first].copy_(self.storage[start : start + first])
        if first < n:
            out[first:n].copy_(self.storage[: n - first])
        return n

    def read_into(self, out: torch.Tensor) -> int:
        """Move up to len(out) oldest frames into `out`; returns how many (fewer counts an underrun)."""
        if out.shape[0] > self._size:
            self.underruns += 1
        n = self.peek_into(out)
        self._start = (self._start + n) % self.capacity
        self._size -= n
        return n

    def read(self, n: int) -> torch.Tensor:
        """The `n` oldest frames, consumed (fewer if fewer are buffered: an underrun). Allocates the result."""
        out = torch.empty((n, *self.frame_shape), dtype=self.dtype, device=self.device)
        return out[: self.read_into(out)]

    def peek(self, n: int, offset: int = 0) -> torch.Tensor:
        """Like read, without consuming."""
        out = torch.empty((n, *self.frame_shape), dtype=self.dtype, device=self.device)
        return out[: self.peek_into(out, offset)]

    def skip(self, n: int) -> int:
        """Drop up to n oldest frames; returns how many."""
        n = max(0, min(n, self._size))
        self._start = (self._start + n) % self.capacity
        self._size -= n
        return n

    def clear(self) -> None:
        self._start = self._size = 0
