"""``imago bench``: ``qemu-img bench``, a simple I/O benchmark run through imago's async API.

``imago bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [--no-drain] [-n] [-i AIO]
[-o OFFSET] [--pattern=N] [-q] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] [-U] FILE``
sends COUNT read (or with ``-w`` write) requests of BUFFER_SIZE bytes, DEPTH of them in
flight, from OFFSET on in steps of STEP_SIZE (default: BUFFER_SIZE), wrapping around at the end
of the disk, as qemu-img does. The image is opened with :func:`imago.open_async` and the
requests are coroutines of :class:`imago.FormatAccess` on an asyncio loop. Options, checks,
output and exit statuses are qemu-img 7.2's.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING

import attrs

from ..errors import ImagoError
from .common import (
    CACHE_MODES,
    CliError,
    OperationInterrupted,
    add_cache,
    add_force_share,
    add_format,
    add_gate_options,
    cache_flags,
    check_interrupt,
    describe_error,
    gate_for,
    interruptible,
    parse_size,
)

if TYPE_CHECKING:
    import asyncio

    from ..format.access import FormatAccess

__all__ = ["BenchPlan", "configure", "plan", "run"]

_INT_MAX = (1 << 31) - 1
_AIO_MODES = ("threads", "native", "io_uring")
_C_INTEGER = re.compile(r"\s*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago bench``, qemu-img's."""
    parser.add_argument("-c", dest="count", default="75000", metavar="COUNT", help="requests to send (default: 75000)")
    parser.add_argument(
        "-d", dest="depth", default="64", metavar="DEPTH", help="requests in flight at a time (default: 64)"
    )
    add_format(parser)
    parser.add_argument(
        "--flush-interval",
        dest="flush_interval",
        default="0",
        metavar="N",
        help="with -w: flush after every N requests (at least DEPTH; default: never)",
    )
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        help="flush without waiting for the requests in flight to finish first",
    )
    parser.add_argument(
        "-n",
        dest="native_aio",
        action="store_true",
        help="qemu-img's native AIO: accepted and ignored (imago's file driver chooses its own I/O)",
    )
    parser.add_argument(
        "-i", dest="aio", metavar="AIO", help=f"qemu-img's AIO mode ({', '.join(_AIO_MODES)}): accepted and ignored"
    )
    parser.add_argument(
        "-o", dest="offset", default="0", metavar="OFFSET", help="offset of the first request (default: 0)"
    )
    parser.add_argument(
        "--pattern", default="0", metavar="N", help="the byte (0-255) the write buffer is filled with (default: 0)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="accepted for qemu-img's sake (it prints its report anyway)"
    )
    parser.add_argument(
        "-s", dest="buffer_size", default="4096", metavar="BUFFER_SIZE", help="bytes per request (default: 4096)"
    )
    parser.add_argument(
        "-S",
        dest="step_size",
        default="0",
        metavar="STEP_SIZE",
        help="distance between the offsets of consecutive requests (default: BUFFER_SIZE)",
    )
    add_cache(parser)
    parser.add_argument("-w", dest="write", action="store_true", help="send write requests (default: reads)")
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file")


@attrs.frozen
class BenchPlan:
    """What one ``bench`` run does (qemu-img's parameters, checked)."""

    count: int
    depth: int
    offset: int
    buffer_size: int
    step: int
    write: bool
    pattern: int
    flush_interval: int
    drain: bool

    def describe(self) -> str:
        """The line qemu-img prints before the run (and the flush line, if any)."""
        lines = (
            f"Sending {self.count} {'write' if self.write else 'read'} requests, {self.buffer_size} bytes each, "
            f"{self.depth} in parallel (starting at offset {self.offset}, step size {self.step})\n"
        )
        if self.flush_interval:
            lines += f"Sending flush every {self.flush_interval} requests\n"
        return lines


def _number(text: str, error: str, low: int, high: int) -> int:
    """An integer as C's ``strtoul(text, NULL, 0)`` reads it (decimal, 0x hex, 0 octal) in [low, high]."""
    match = _C_INTEGER.match(text)
    if match is None:
        raise CliError(error)
    digits = match[1]
    base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
    value = int(digits, base)
    if not low <= value <= high:
        raise CliError(error)
    return value


def _size(text: str, what: str) -> int:
    value = parse_size(text, what=what)
    if value > _INT_MAX:
        raise CliError(f"Invalid {what} specified. Must be between 0 and {_INT_MAX}.")
    return value


def plan(args: argparse.Namespace) -> BenchPlan:
    """The run the options ask for; raises :class:`CliError` with qemu-img's message for a bad one."""
    count = _number(args.count, "Invalid request count specified", 0, _INT_MAX)
    depth = _number(args.depth, "Invalid queue depth specified", 1, _INT_MAX)
    if args.aio is not None and args.aio not in _AIO_MODES:
        raise CliError(f"Invalid aio option: {args.aio}")
    offset = parse_size(args.offset, what="offset")
    buffer_size = _size(args.buffer_size, "buffer size")
    step = _size(args.step_size, "step_size")
    pattern = _number(args.pattern, "Invalid pattern byte specified", 0, 0xFF)
    flush_interval = _number(args.flush_interval, "Invalid flush interval specified", 0, _INT_MAX)
    if args.cache not in CACHE_MODES:
        raise CliError("Invalid cache mode")
    if flush_interval and not args.write:
        raise CliError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise CliError("Flush interval can't be smaller than depth")
    return BenchPlan(
        count=count,
        depth=depth,
        offset=offset,
        buffer_size=buffer_size,
        step=step or buffer_size,
        write=args.write,
        pattern=pattern,
        flush_interval=flush_interval,
        drain=args.drain,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 otherwise (qemu-img's statuses)."""
    bench = plan(args)
    import asyncio

    return asyncio.run(_main(args, bench))


async def _main(args: argparse.Namespace, bench: BenchPlan) -> int:
    from ..api import open_async

    filename: str = args.filename
    direct, no_flush = cache_flags(args.cache)
    if bench.write and args.force_share:
        raise CliError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    try:
        disk = await open_async(
            filename,
            args.format,
            write=bench.write,
            force_share=args.force_share,
            direct=direct,
            no_flush=no_flush,
            gate=gate_for(args, [filename]),
        )
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with interruptible():
        return await _measure(disk, bench)


async def _measure(disk: FormatAccess, bench: BenchPlan) -> int:
    async with disk:
        sys.stdout.write(bench.describe())
        sys.stdout.flush()
        start = time.perf_counter()
        try:
            await _send(disk, bench)
        except OperationInterrupted:
            raise
        except (ImagoError, OSError) as error:
            raise CliError(f"Failed request: {describe_error(error)}") from None
        elapsed = time.perf_counter() - start
    print(f"Run completed in {elapsed:.3f} seconds.")
    return 0


async def _send(disk: FormatAccess, bench: BenchPlan) -> None:
    """Send the requests of *bench*; raises the first request's error (after the others ended)."""
    import asyncio

    await _Scheduler(disk, bench, asyncio.get_running_loop()).run()


class _Scheduler:
    """The requests, as qemu-img schedules them: at most ``depth`` in flight, flushes between.

    Each completion is handled in a callback, so a completion costs the same whatever the
    depth. After each, when the number of requests not yet sent is a multiple of the flush
    interval, a flush follows: with draining (the default) once nothing is in flight, and
    nothing is sent until it is done; without, at once, alongside the requests.
    """

    def __init__(self, disk: FormatAccess, bench: BenchPlan, loop: asyncio.AbstractEventLoop) -> None:
        self._disk = disk
        self._bench = bench
        self._loop = loop
        self._buffer = memoryview(bytearray([bench.pattern]) * bench.buffer_size)
        self._request = disk.write if bench.write else disk.read
        self._offset = bench.offset
        self._unsent = bench.count
        self._in_flight = 0
        self._flushing = False
        self._side_flushes: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._error: BaseException | None = None
        self._finished: asyncio.Future[None] = loop.create_future()

    async def run(self) -> None:
        import asyncio

        self._send()
        self._maybe_finish()
        try:
            await self._finished
        except BaseException:
            # Cancelled (a second Ctrl-C): the requests in flight end before the image is closed.
            self._error = self._error or OperationInterrupted()
            if self._tasks:
                await asyncio.wait(self._tasks)
            raise
        if self._side_flushes:
            await _gather_all(self._side_flushes)
        if self._error is not None:
            raise self._error

    def _send(self) -> None:
        bench = self._bench
        size = self._disk.size
        create_task, request, buffer, completed = self._loop.create_task, self._request, self._buffer, self._completed
        while self._error is None and self._unsent and self._in_flight < bench.depth:
            task = create_task(request(buffer, self._offset))
            task.add_done_callback(completed)
            self._tasks.add(task)
            self._in_flight += 1
            self._unsent -= 1
            self._offset = (self._offset + bench.step) % size if size else 0

    def _failed(self, future: asyncio.Future[None]) -> bool:
        """Whether the run stops: *future* failed (or was cancelled), an earlier one did, or Ctrl-C."""
        if self._error is None:
            if future.cancelled():
                self._error = OperationInterrupted()
            elif future.exception() is not None:
                self._error = future.exception()
            else:
                try:
                    check_interrupt()
                except OperationInterrupted as error:
                    self._error = error
        return self._error is not None

    def _completed(self, future: asyncio.Future[None]) -> None:
        self._in_flight -= 1
        self._tasks.discard(future)
        bench = self._bench
        if not self._failed(future) and bench.flush_interval and self._unsent % bench.flush_interval == 0:
            if not bench.drain:
                self._side_flushes.add(self._loop.create_task(self._disk.flush()))
            else:
                if not self._in_flight:
                    self._flushing = True
                    self._loop.create_task(self._disk.flush()).add_done_callback(self._flushed)
                return
        self._send()
        self._maybe_finish()

    def _flushed(self, future: asyncio.Future[None]) -> None:
        self._flushing = False
        self._failed(future)
        self._send()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        done = self._error is not None or not self._unsent
        if done and not self._in_flight and not self._flushing and not self._finished.done():
            self._finished.set_result(None)


async def _gather_all(futures: set[asyncio.Future[None]]) -> None:
    """Wait for *futures*; the first error is raised after all ended."""
    import asyncio

    results = await asyncio.gather(*futures, return_exceptions=True)
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        raise error
