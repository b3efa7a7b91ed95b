"""Group commit: writes that arrive while one is being made go together in the next.

The event API finishes each routed event with two small writes (its started runs' routes and the
mark that routing finished). Made one event at a time, each costs a trip to a worker thread, a
pooled connection and a round trip per statement, on the API's CPU and the database's. Under load
many calls finish within the same millisecond: :class:`GroupCommit` makes their writes one write,
so that cost is paid once for all of them. A write that arrives while none is in flight starts at
once, so a quiet API waits no longer than before; each caller's ``submit`` returns when its own
item is written, and raises what its own item's write raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """One write in flight at a time (``write``, run on a worker thread with every item submitted
    since the previous write began). When a write of several items fails, each is written again
    on its own, so one item's fault (or a moment's outage) fails only the calls it has to: each
    caller gets its own item's outcome. ``write`` must therefore be safe to repeat."""

    def __init__(self, write: Callable[[Sequence[T]], None]) -> None:
        self._write = write
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Return once ``item`` is written (with whatever else came meanwhile)."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await asyncio.to_thread(self._write, [item for item, _ in batch])
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch[0][1], exc)
                        continue
                    for item, done in batch:  # each on its own: only what fails again fails
                        try:
                            await asyncio.to_thread(self._write, [item])
                        except Exception as alone:
                            _settle(done, alone)
                        else:
                            _settle(done, None)
                else:
                    for _, done in batch:
                        _settle(done, None)
        except BaseException:  # cancelled (the loop is closing): so is every call still waiting
            for _, done in [*batch, *self._waiting]:
                if not done.done():
                    done.cancel()
            self._waiting = []
            raise


def _settle(done: asyncio.Future[None], failure: Exception | None) -> None:
    """``done`` given its outcome, unless its caller has gone (cancelled, or its loop closed)."""
    if done.done() or done.get_loop().is_closed():
        return
    if failure is None:
        done.set_result(None)
    else:
        done.set_exception(failure)
