"""Locks for asynchronous code that also runs driven by hand (:func:`imago.runtime.run_sync`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SuspendedInSyncModeError

if TYPE_CHECKING:
    import asyncio

__all__ = ["RangeLock"]


class RangeLock:
    """Serialises requests on overlapping byte ranges; disjoint ranges proceed in parallel.

    Used for read-modify-write cycles, where two writes touching the same aligned block must not
    interleave. Without contention it never suspends, so it works under :func:`run_sync` too.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, asyncio.Event]] = {}
        self._next_id = 0

    def _overlapping(self, start: int, end: int) -> asyncio.Event | None:
        for held_start, held_end, released in self._held.values():
            if held_start < end and start < held_end:
                return released
        return None

    async def acquire(self, start: int, end: int) -> int:
        """Wait until no held range overlaps ``[start, end)``, then hold it; returns a token."""
        import asyncio  # here, not at the top: a synchronous program need not import asyncio

        while (released := self._overlapping(start, end)) is not None:
            if asyncio._get_running_loop() is None:  # the C accelerated look-up, no exception on "none"
                # Without a loop there is nothing to wait with (asyncio.Event would fail obscurely).
                raise SuspendedInSyncModeError(f"byte range [{start}, {end}) is held by another request")
            await released.wait()
        token = self._next_id
        self._next_id += 1
        self._held[token] = (start, end, asyncio.Event())
        return token

    def release(self, token: int) -> None:
        """Release the range held under *token*, waking whoever waits for it."""
        _, _, released = self._held.pop(token)
        released.set()
