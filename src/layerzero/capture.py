"""Graph mode: whether the kernels a call runs may end up in a CUDA graph.

True during CUDA stream capture and inside LayerZero's torch.library ops (ops/library.py).
A compiled graph may be run with CUDA graphs (torch.compile mode="reduce-overhead"), whose warm-up
run already allocates from the graph's memory pool: a kernel that keeps buffers across calls
(FlashInfer's workspace and plans) breaks it there ("tensors in the cudagraph pool not tracked as
outputs", seen on the H100), so those calls select graph-safe kernels only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class _GraphCall(threading.local):
    depth = 0  # LayerZero torch.library ops being run by this thread (see graph_call)


GRAPH_CALL = _GraphCall()
# What torch.cuda.is_current_stream_capturing calls (it raises RuntimeError on a CPU-only torch build).
# The hottest keys (attention) inline graph_mode for CUDA tensors as
#     GRAPH_CALL.depth > 0 or stream_capturing()
stream_capturing = torch._C._cuda_isCurrentStreamCapturing


def graph_mode() -> bool:
    """True while kernels may end up in a CUDA graph (see the module doc). One query of the CUDA
    runtime (the op keys ask it only for CUDA tensors)."""
    if GRAPH_CALL.depth:
        return True
    try:
        return stream_capturing()
    except RuntimeError:  # a CPU-only torch build has no CUDA runtime to ask
        return False


@contextmanager
def graph_call() -> Iterator[None]:
    """Mark the calls inside as possibly captured (see graph_mode)."""
    GRAPH_CALL.depth += 1
    try:
        yield
    finally:
        GRAPH_CALL.depth -= 1
