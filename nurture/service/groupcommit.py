"""Group commit: writes that arrive while one is being made go together in the next.

The event API finishes each routed event with two small writes (its started runs' routes and the
mark that routing finished). Made one event at a time, each costs a trip to a worker thread, a
pooled connection and a round trip per statement, on the API's CPU and the database's. Under load
many calls finish within the same millisecond: :class:`GroupCommit` makes their writes one write,
so that cost is paid once for all of them. A write that arrives while none is in flight starts at
once, so a quiet API waits no longer than before; each caller's ``submit`` returns when its own
items are written, and raises what their write raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """One write in flight at a time (``write``, run on a worker thread with every item submitted
    since the previous write began); the items of a failed write all get its exception."""

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
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await asyncio.to_thread(self._write, [item for item, _ in batch])
            except BaseException as exc:
                for _, done in batch:
                    _settle(done, exc)
                if not isinstance(exc, Exception):  # cancelled (the loop is closing): so are its callers
                    raise
            else:
                for _, done in batch:
                    _settle(done, None)


def _settle(done: asyncio.Future[None], failure: BaseException | None) -> None:
    """``done`` given its outcome, unless its caller has gone (cancelled, or its loop closed)."""
    if done.done() or done.get_loop().is_closed():
        return
    if failure is None:
        done.set_result(None)
    elif isinstance(failure, Exception):
        done.set_exception(failure)
    else:
        done.cancel()
