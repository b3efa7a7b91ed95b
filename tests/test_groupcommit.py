"""Group commit: writes that arrive while one is in flight go together in the next; a lone write
goes at once; a failed group is written again item by item, so only a faulty item's caller fails."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from nurture.service.groupcommit import GroupCommit


class Writes:
    """A write that records each batch, and holds the first one until released."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.fail = fail or set()

    def __call__(self, items: Sequence[int]) -> None:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        if self.fail & set(items):
            raise ConnectionError(f"lost the connection writing {sorted(items)}")


async def first_in_flight(commit: GroupCommit[int], writes: Writes) -> asyncio.Task[None]:
    """Item 0 submitted, its write started and held until ``writes.release`` is set."""
    first = asyncio.create_task(commit.submit(0))
    assert await asyncio.to_thread(writes.first_started.wait, 10)
    return first


async def test_a_lone_write_goes_at_once_with_its_item_alone() -> None:
    writes = Writes()
    writes.release.set()
    commit = GroupCommit(writes)

    await commit.submit(1)
    await commit.submit(2)

    assert writes.batches == [[1], [2]]


async def test_items_submitted_while_a_write_is_in_flight_go_together_in_the_next() -> None:
    writes = Writes()
    commit = GroupCommit(writes)
    first = await first_in_flight(commit, writes)

    waiting = [asyncio.create_task(commit.submit(item)) for item in range(1, 11)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiting)  # none returns before its own write
    writes.release.set()
    await asyncio.gather(first, *waiting)

    assert writes.batches == [[0], list(range(1, 11))]


async def test_a_failed_write_of_several_is_made_again_one_by_one_and_fails_only_its_faulty_item() -> None:
    writes = Writes(fail={3})
    commit = GroupCommit(writes)
    first = await first_in_flight(commit, writes)
    grouped = [asyncio.create_task(commit.submit(item)) for item in (2, 3, 4)]
    await asyncio.sleep(0.01)
    writes.release.set()

    await first
    results = await asyncio.gather(*grouped, return_exceptions=True)
    await commit.submit(5)

    assert [type(result) for result in results] == [type(None), ConnectionError, type(None)]
    assert writes.batches == [[0], [2, 3, 4], [2], [3], [4], [5]]


async def test_a_lone_failed_write_fails_its_caller_and_the_next_write_is_made() -> None:
    writes = Writes(fail={1})
    writes.release.set()
    commit = GroupCommit(writes)

    with pytest.raises(ConnectionError):
        await commit.submit(1)
    await commit.submit(2)

    assert writes.batches == [[1], [2]]


async def test_a_caller_that_gave_up_does_not_stop_the_others() -> None:
    writes = Writes()
    commit = GroupCommit(writes)
    first = await first_in_flight(commit, writes)
    gone, staying = asyncio.create_task(commit.submit(1)), asyncio.create_task(commit.submit(2))
    await asyncio.sleep(0.01)
    gone.cancel()
    writes.release.set()

    await asyncio.gather(first, staying)

    with pytest.raises(asyncio.CancelledError):
        await gone
    assert writes.batches == [[0], [1, 2]]  # its item was written all the same
