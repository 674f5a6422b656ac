"""Policy calls as statements act for every thread; as `with` blocks, for the block's own thread or
task only (a ContextVar), and their plans never reach another thread or outlive the block."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import torch

import layerzero as lz
from layerzero.state import runtime

Q = torch.randn(1, 8, 2, 16)


def which() -> str:
    return lz.which("attention.causal", Q, Q, Q)


def run() -> str:
    """Run the call (its plan: a hit when cached) and say which kernel the plan runs."""
    lz.attention(Q, Q, Q, is_causal=True)
    return which()


BLOCKS: dict[str, Callable[[], object]] = {
    "prefer": lambda: lz.prefer("torch.sdpa_math"),
    "lock": lambda: lz.lock("attention.causal", "torch.sdpa_math"),
    "disabled": lambda: lz.disabled("torch.sdpa_flash_cpu"),
}


def in_thread(fn: Callable[[], str]) -> str:
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


@pytest.mark.parametrize("kind", ["prefer", "lock", "disabled"])
def test_a_block_changes_its_own_thread_only(kind: str):
    base = run()
    assert base == "torch.sdpa_flash_cpu"
    inside, entered, leave = [], threading.Event(), threading.Event()

    def body() -> None:
        inside.append(run())
        entered.set()
        leave.wait(30)
        inside.append(run())

    def blocked() -> None:
        if kind == "prefer":
            with lz.prefer("torch.sdpa_math"):
                body()
        elif kind == "lock":
            with lz.lock("attention.causal", "torch.sdpa_math"):
                body()
        else:
            with lz.disabled("torch.sdpa_flash_cpu"):
                body()

    thread = threading.Thread(target=blocked)
    thread.start()
    assert entered.wait(30)
    assert run() == base and in_thread(run) == base  # this thread and a third one: untouched
    leave.set()
    thread.join(30)
    assert inside[0] != base and inside[1] == inside[0]
    assert run() == base and runtime.plans.scopes == 0


def test_the_block_form_is_recognised_where_the_object_is_made():
    base = which()
    with lz.disabled("torch.sdpa_flash_cpu"):
        assert which() != base
        assert in_thread(which) == base
    with lz.prefer("torch.sdpa_math") as p, lz.lock("norm.rms", "reference.rms_norm"):
        assert isinstance(p, lz.prefer) and which() == "torch.sdpa_math"
        assert lz.which("norm.rms", torch.randn(2, 8)) == "reference.rms_norm"
        assert in_thread(which) == base
    assert which() == base


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_a_statement_acts_for_every_thread_until_undone(kind: str):
    base = run()
    setting = BLOCKS[kind]()  # a statement: made and not entered
    assert run() != base and in_thread(run) == run()
    setting.undo()  # type: ignore[attr-defined]
    assert run() == base and in_thread(run) == base


def test_enabled_as_a_block_reenables_for_its_thread_only():
    base = which()
    lz.disabled("torch.sdpa_flash_cpu")  # for every thread
    off = which()
    assert off != base
    with lz.enabled("torch.sdpa_flash_cpu"):
        assert which() == base
        assert in_thread(which) == off
    assert which() == off


def test_blocks_in_asyncio_tasks_do_not_leak_into_each_other():
    base = which()
    order: list[str] = []

    async def blocked(started: asyncio.Event, done: asyncio.Event) -> str:
        with lz.disabled("torch.sdpa_flash_cpu"):
            started.set()
            await done.wait()
            order.append("blocked")
            return which()

    async def plain(started: asyncio.Event, done: asyncio.Event) -> str:
        await started.wait()
        picked = which()  # while the other task is inside its block
        order.append("plain")
        done.set()
        return picked

    async def main() -> tuple[str, str]:
        started, done = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(blocked(started, done), plain(started, done))

    inside, outside = asyncio.run(main())
    assert order == ["plain", "blocked"]
    assert outside == base and inside != base


def test_no_plan_of_a_block_is_served_outside_it():
    """While a block is active anywhere the hit path finds nothing (every call takes the miss path,
    where a block's plans are filed under its scope); when none is, the hit path is the plain dict."""
    base = run()
    key = lz.ops.FAMILIES["attention"].key(Q, Q, Q, None, True)
    assert type(runtime.plans.data) is dict and runtime.plans.data[key].kernel_id == base
    with lz.prefer("torch.sdpa_math"):
        assert len(runtime.plans.data) == 0
        assert run() == "torch.sdpa_math"
        assert in_thread(run) == base
    assert type(runtime.plans.data) is dict and runtime.plans.scopes == 0
    assert run() == base and runtime.plans.data[key].kernel_id == base
    assert all(plan.kernel_id == base for k, plan in runtime.plans.data.items() if k == key)


def test_an_object_made_before_its_with_acts_for_every_thread_during_the_block():
    """Whether a call is a block is read where the object is made: one made first (a statement, in
    force for every thread at once) and entered later is undone at the end of its block."""
    base = which()
    setting = lz.disabled("torch.sdpa_flash_cpu")
    with setting:
        assert which() != base and in_thread(which) != base
    assert which() == base and in_thread(which) == base
