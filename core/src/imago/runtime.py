"""The runtime: imago's async code driven with and without an event loop.

Drivers are written once, in ``async``. The synchronous API does not run an event loop:
:func:`run_sync` drives the coroutine by hand (``send(None)`` until ``StopIteration``), and
while it does, :func:`inline` is true, telling storages to perform blocking I/O in place.
Under a running loop :func:`run_blocking` moves blocking calls to a thread pool instead.
A coroutine driven by hand must never suspend; if it does, :class:`SuspendedInSyncModeError`
is raised.
"""

from __future__ import annotations

import _thread  # threading's primitives, without importing threading (start-up time)
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .errors import SuspendedInSyncModeError

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

# asyncio and concurrent.futures cost more to import than the rest of a synchronous command
# line tool: they are imported only where a loop runs or a thread pool is made.

__all__ = ["gather_all", "inline", "run_blocking", "run_parallel", "run_sync"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


def _no_loop_yet() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or ``None``, without importing asyncio when nothing imported it yet.

    A loop runs only once asyncio is imported; from then on asyncio's own (C accelerated,
    exception free) look-up takes this function's place as :data:`_get_running_loop`.
    """
    global _get_running_loop
    look_up = getattr(sys.modules.get("asyncio"), "_get_running_loop", None)
    if look_up is None:
        return None
    _get_running_loop = look_up
    return look_up()  # type: ignore[no-any-return]


_get_running_loop: Callable[[], asyncio.AbstractEventLoop | None] = _no_loop_yet


class _SyncState(_thread._local):
    depth = 0


_state = _SyncState()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = _thread.allocate_lock()

# Enough threads that many requests in flight reach the kernel in parallel.
_POOL_THREADS = 32


def inline() -> bool:
    """Whether blocking I/O should be done in place (no event loop, or driven synchronously)."""
    return _state.depth > 0 or _get_running_loop() is None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* to completion in the calling thread without an event loop.

    While it runs, :func:`inline` is true in this thread, so imago storages perform their I/O
    in place. Raises :class:`SuspendedInSyncModeError` if the coroutine suspends.
    """
    state = _state
    state.depth += 1
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except RuntimeError as error:
        # asyncio primitives (sleep, futures) that need a loop fail this way before suspending.
        if str(error) != "no running event loop" or _get_running_loop() is not None:
            raise
        raise SuspendedInSyncModeError(
            "an imago operation driven synchronously had to wait for an event loop (a driver awaited "
            "something other than imago's I/O helpers)"
        ) from error
    finally:
        state.depth -= 1
    coro.close()
    raise SuspendedInSyncModeError(
        "an imago operation driven synchronously had to wait "
        "(is the same image in use by asynchronous tasks at the same time?)"
    )


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        import concurrent.futures

        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="imago-io")
    return _pool


async def run_blocking(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call the blocking *func*: in place when :func:`inline`, else in imago's I/O thread pool."""
    loop = _get_running_loop()
    if loop is None or _state.depth > 0:
        return func(*args, **kwargs)
    if kwargs:
        return await loop.run_in_executor(_thread_pool(), lambda: func(*args, **kwargs))
    return await loop.run_in_executor(_thread_pool(), func, *args)


async def gather_all(awaitables: list[Awaitable[T]]) -> list[T]:
    """Await all of *awaitables*: concurrently under a loop, one after another when inline."""
    if inline():
        return [await a for a in awaitables]
    import asyncio

    return list(await asyncio.gather(*awaitables))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _cpu_executor
    if _cpu_executor is None:
        import concurrent.futures

        with _pool_lock:
            if _cpu_executor is None:
                _cpu_executor = concurrent.futures.ThreadPoolExecutor(_cpu_count(), thread_name_prefix="imago-cpu")
    return _cpu_executor


_cpu_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _run_chunk(func: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [func(item) for item in chunk]


async def run_parallel(func: Callable[[T], R], items: list[T]) -> list[R]:
    """``[func(item) for item in items]`` on all CPUs, in order.

    For CPU work that releases the GIL (decompression, compression). The items are split into
    one contiguous chunk per CPU, so that cheap items do not drown in per-item hand-offs.
    Used inline (no loop) it blocks, the calling thread taking the first chunk itself; under a
    loop it awaits the chunks, all on the pool. It returns (or raises the first error) only
    once every chunk is done.
    """
    workers = min(len(items), _cpu_count())
    if workers <= 1:
        return [func(item) for item in items]
    size = -(-len(items) // workers)
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    pool = _cpu_pool()
    loop = _get_running_loop()
    if loop is None or _state.depth > 0:
        futures = [pool.submit(_run_chunk, func, chunk) for chunk in chunks[1:]]
        try:
            results = _run_chunk(func, chunks[0])
        finally:
            # Every chunk is done before this returns or raises: the items may be views of
            # memory the caller releases (a memory map of a file it then truncates).
            for future in futures:
                future.exception()
        for future in futures:
            results.extend(future.result())
        return results
    import asyncio

    outcomes = await asyncio.gather(
        *(loop.run_in_executor(pool, _run_chunk, func, chunk) for chunk in chunks), return_exceptions=True
    )
    parts: list[list[R]] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        parts.append(outcome)
    return [result for part in parts for result in part]
