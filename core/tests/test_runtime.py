"""imago.runtime: driving coroutines by hand, inline I/O, the I/O thread pool, range locks."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

import imago
from imago import RangeLock, runtime

# --- run_sync -------------------------------------------------------------------------------


async def _add(a: int, b: int) -> int:
    return a + b


async def _nested() -> int:
    # Awaiting coroutines that complete without suspending is fine.
    return await _add(1, 2) + await _add(3, 4)


def test_run_sync_returns_value() -> None:
    assert runtime.run_sync(_add(2, 3)) == 5
    assert runtime.run_sync(_nested()) == 10


async def _none() -> None:
    return None


def test_run_sync_returns_none() -> None:
    assert runtime.run_sync(_none()) is None


class BoomError(Exception):
    pass


async def _raise() -> None:
    await _add(1, 1)
    raise BoomError("boom")


def test_run_sync_propagates_exceptions() -> None:
    with pytest.raises(BoomError, match="boom"):
        runtime.run_sync(_raise())


def test_run_sync_propagates_stop_iteration_free_errors() -> None:
    async def imago_error() -> None:
        raise imago.InvalidRequestError("bad")

    with pytest.raises(imago.InvalidRequestError, match="bad"):
        runtime.run_sync(imago_error())


def test_run_sync_outside_a_loop_suspending_raises() -> None:
    # asyncio.sleep needs a loop: without one, that is still "had to wait".
    with pytest.raises(imago.SuspendedInSyncModeError):
        runtime.run_sync(asyncio.sleep(0.01))


def test_run_sync_bare_yield_raises_and_closes_coroutine() -> None:
    finalised = []

    @types.coroutine
    def suspend() -> object:
        yield

    async def coro() -> None:
        try:
            await suspend()
        finally:
            finalised.append(True)

    with pytest.raises(imago.SuspendedInSyncModeError):
        runtime.run_sync(coro())
    assert finalised == [True]  # the coroutine was closed, not left dangling


def test_run_sync_inside_a_loop_suspending_raises() -> None:
    async def main() -> None:
        with pytest.raises(imago.SuspendedInSyncModeError):
            runtime.run_sync(asyncio.sleep(0.01))
        # The loop and the sync machinery still work afterwards.
        assert runtime.run_sync(_add(1, 1)) == 2
        await asyncio.sleep(0)

    asyncio.run(main())


def test_run_sync_genuine_runtime_errors_pass_through() -> None:
    async def coro() -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else") as info:
        runtime.run_sync(coro())
    assert not isinstance(info.value, imago.SuspendedInSyncModeError)


def test_run_sync_state_restored_after_errors() -> None:
    with pytest.raises(BoomError):
        runtime.run_sync(_raise())
    with pytest.raises(imago.SuspendedInSyncModeError):
        runtime.run_sync(asyncio.sleep(0))

    async def main() -> bool:
        return runtime.inline()

    assert asyncio.run(main()) is False  # depth went back to zero


# --- inline ----------------------------------------------------------------------------------


async def _inline() -> bool:
    return runtime.inline()


def test_inline_outside_a_loop() -> None:
    assert runtime.inline() is True
    assert runtime.run_sync(_inline()) is True


def test_inline_inside_a_loop() -> None:
    async def main() -> tuple[bool, bool, bool]:
        return runtime.inline(), runtime.run_sync(_inline()), runtime.inline()

    assert asyncio.run(main()) == (False, True, False)


def test_inline_is_per_thread() -> None:
    seen: list[bool] = []

    async def main() -> None:
        def other_thread() -> None:
            seen.append(runtime.inline())  # no loop in this thread

        async def in_sync() -> None:
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()

        runtime.run_sync(in_sync())

    asyncio.run(main())
    assert seen == [True]


# --- run_blocking ---------------------------------------------------------------------------


def _whoami(tag: str, *, suffix: str = "") -> tuple[threading.Thread, str]:
    return threading.current_thread(), tag + suffix


def test_run_blocking_inline_without_loop() -> None:
    thread, value = runtime.run_sync(runtime.run_blocking(_whoami, "a", suffix="b"))
    assert thread is threading.current_thread()
    assert value == "ab"


def test_run_blocking_in_thread_under_loop() -> None:
    async def main() -> list[tuple[threading.Thread, str]]:
        return [await runtime.run_blocking(_whoami, "x"), await runtime.run_blocking(_whoami, "y", suffix="z")]

    results = asyncio.run(main())
    for thread, _ in results:
        assert thread is not threading.main_thread()
        assert thread.name.startswith("imago-io")
    assert [value for _, value in results] == ["x", "yz"]


def test_run_blocking_inline_under_run_sync_in_a_loop() -> None:
    async def main() -> threading.Thread:
        thread, _ = runtime.run_sync(runtime.run_blocking(_whoami, "x"))
        return thread

    assert asyncio.run(main()) is threading.current_thread()


def test_run_blocking_propagates_exceptions() -> None:
    def fail() -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        runtime.run_sync(runtime.run_blocking(fail))

    async def main() -> None:
        await runtime.run_blocking(fail)

    with pytest.raises(OSError, match="I/O error"):
        asyncio.run(main())


# --- gather_all -------------------------------------------------------------------------------


def test_gather_all_inline_in_order() -> None:
    order: list[int] = []

    async def item(i: int) -> int:
        order.append(i)
        return i * 10

    assert runtime.run_sync(runtime.gather_all([item(i) for i in range(5)])) == [0, 10, 20, 30, 40]
    assert order == [0, 1, 2, 3, 4]
    assert runtime.run_sync(runtime.gather_all([])) == []


def test_gather_all_concurrent_under_loop() -> None:
    # Each coroutine waits for the other's event: only a concurrent gather completes.
    async def main() -> list[str]:
        first, second = asyncio.Event(), asyncio.Event()

        async def a() -> str:
            first.set()
            await second.wait()
            return "a"

        async def b() -> str:
            await first.wait()
            second.set()
            return "b"

        return await asyncio.wait_for(runtime.gather_all([a(), b()]), timeout=30)

    assert asyncio.run(main()) == ["a", "b"]


def test_gather_all_propagates_errors() -> None:
    with pytest.raises(BoomError):
        runtime.run_sync(runtime.gather_all([_add(1, 2), _raise()]))


# --- RangeLock --------------------------------------------------------------------------------


def test_range_lock_uncontended_under_run_sync() -> None:
    lock = RangeLock()

    async def use() -> list[int]:
        a = await lock.acquire(0, 4096)
        b = await lock.acquire(4096, 8192)  # adjacent, not overlapping
        lock.release(a)
        c = await lock.acquire(0, 100)
        lock.release(b)
        lock.release(c)
        return [a, b, c]

    tokens = runtime.run_sync(use())
    assert len(set(tokens)) == 3


def test_range_lock_release_unknown_token() -> None:
    lock = RangeLock()
    with pytest.raises(KeyError):
        lock.release(12345)


def test_range_lock_contended_under_run_sync_raises() -> None:
    lock = RangeLock()

    async def hold() -> int:
        return await lock.acquire(0, 10)

    token = runtime.run_sync(hold())
    with pytest.raises(imago.SuspendedInSyncModeError):
        runtime.run_sync(lock.acquire(5, 15))
    lock.release(token)
    lock.release(runtime.run_sync(lock.acquire(5, 15)))


def test_range_lock_serialises_overlaps_and_not_disjoint() -> None:
    async def main() -> list[str]:
        lock = RangeLock()
        events: list[str] = []
        first = await lock.acquire(0, 100)

        async def take(name: str, start: int, end: int) -> None:
            token = await lock.acquire(start, end)
            events.append(f"{name} acquired")
            await asyncio.sleep(0)
            lock.release(token)
            events.append(f"{name} released")

        overlapping = asyncio.create_task(take("overlap", 50, 150))
        disjoint = asyncio.create_task(take("disjoint", 100, 200))
        contained = asyncio.create_task(take("inside", 60, 70))
        for _ in range(10):
            await asyncio.sleep(0)
        # Only the disjoint request got through while [0, 100) is held.
        assert events == ["disjoint acquired", "disjoint released"]
        assert not overlapping.done()
        assert not contained.done()
        events.append("first released")
        lock.release(first)
        await asyncio.wait_for(asyncio.gather(overlapping, contained, disjoint), timeout=30)
        return events

    events = asyncio.run(main())
    assert events[:3] == ["disjoint acquired", "disjoint released", "first released"]
    rest = events[3:]
    assert sorted(rest) == sorted(["overlap acquired", "overlap released", "inside acquired", "inside released"])
    # The two waiters overlap each other too: they never hold their ranges at the same time.
    for name in ("overlap", "inside"):
        other = "inside" if name == "overlap" else "overlap"
        acquired = rest.index(f"{name} acquired")
        released = rest.index(f"{name} released")
        assert f"{other} acquired" not in rest[acquired:released]


def test_range_lock_many_writers_never_overlap() -> None:
    async def main() -> int:
        lock = RangeLock()
        holders: set[int] = set()
        max_concurrent_same_block = 0

        async def worker(i: int) -> None:
            nonlocal max_concurrent_same_block
            block = i % 3
            token = await lock.acquire(block * 512, block * 512 + 512)
            assert block not in holders
            holders.add(block)
            max_concurrent_same_block = max(max_concurrent_same_block, len(holders))
            await asyncio.sleep(0)
            holders.discard(block)
            lock.release(token)

        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(30))), timeout=30)
        return max_concurrent_same_block

    # Three disjoint blocks: up to three holders at once, never two on one block.
    assert asyncio.run(main()) == 3
