"""FormatAccess under a running event loop (asyncio's and uvloop): many requests in flight.

Concurrent reads and writes on one image against a bytearray model, errors raised in the
request that caused them (and only there), each mapping looked up once per request, and no
stale mapping cached when the driver changed its mappings during a read.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import imago
from imago import (
    ClosedError,
    DenyImplicitOpenGate,
    FormatAccess,
    InvalidRequestError,
    ReadOnlyError,
    Storage,
    SyncFormatAccess,
)
from imago_faults import Fault, FaultyStorage, InjectedError
from imago_raw import Raw

T = TypeVar("T")

SIZE = 4 << 20
LOOPS = ("asyncio", "uvloop")


def run(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* on a new event loop of the kind *loop* (uvloop must be installed: no skip)."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def image(tmp_path: Path, fmt: str, content: bytes | None = None) -> Path:
    """A *fmt* image of SIZE bytes, written with *content* (in 1 MiB pieces) if given."""
    path = tmp_path / f"disk.{fmt}"
    imago.create(path, fmt, SIZE)
    if content is not None:
        with imago.open(path, fmt, write=True) as disk:
            for offset in range(0, SIZE, 1 << 20):
                disk.write(content[offset : offset + (1 << 20)], offset)
    return path


async def read_at(access: FormatAccess, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xa5") * length  # poisoned: a read that leaves it alone cannot pass
    await access.read(buf, offset)
    return bytes(buf)


def disjoint_writes(rng: random.Random, count: int, *, limit: int = SIZE) -> list[tuple[int, bytes]]:
    """*count* writes in disjoint ranges of ``[0, limit)`` (4 KiB gaps), some unaligned, some across clusters."""
    writes = []
    slot = limit // count
    for index in range(count):
        length = rng.choice((4096, 512, rng.randrange(1, slot - 8192), 65536 + 4096))
        length = min(length, slot - 8192)
        offset = index * slot + rng.randrange(0, slot - length - 4096)
        writes.append((offset, rng.randbytes(length)))
    return writes


# --- many requests in flight against a model ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("loop", LOOPS)
def test_concurrent_writes_and_reads_match_a_model(tmp_path: Path, loop: str, fmt: str) -> None:
    rng = random.Random(hash((loop, fmt)) & 0xFFFF)
    half = SIZE // 2
    old = rng.randbytes(half)  # the upper half holds data before the loop runs
    path = image(tmp_path, fmt)
    with imago.open(path, fmt, write=True) as disk:
        disk.write(old, half)
    model = bytearray(bytes(half) + old)
    writes = disjoint_writes(rng, 48, limit=half)
    # Reads in flight together with the writes touch only the half nobody writes.
    side_reads = [(half + rng.randrange(half - 70_000), rng.randrange(1, 70_000)) for _ in range(48)]
    reads = [(rng.randrange(SIZE), 0) for _ in range(4)]
    reads += [(rng.randrange(SIZE - 200_000), rng.randrange(1, 200_000)) for _ in range(150)]
    reads += [(rng.randrange(SIZE // 4096) * 4096, 4096) for _ in range(150)]
    reads += [(0, SIZE), (SIZE - 1, 1)]
    for offset, data in writes:
        model[offset : offset + len(data)] = data

    async def main() -> tuple[list[bytes], list[bytes]]:
        access = await imago.open_async(path, fmt, write=True)
        try:
            during = await asyncio.gather(
                *(access.write(data, offset) for offset, data in writes),
                *(read_at(access, offset, length) for offset, length in side_reads),
            )
            after = await asyncio.gather(*(read_at(access, offset, length) for offset, length in reads))
            # The same reads again: now mostly from the engine's cached extents.
            again = await asyncio.gather(*(read_at(access, offset, length) for offset, length in reads))
            assert again == after
        finally:
            await access.close()
        return list(during[len(writes) :]), after

    during, after = run(loop, main())
    for (offset, length), got in zip(side_reads, during, strict=True):
        assert got == model[offset : offset + length], f"read of {length} at {offset} during the writes"
    for (offset, length), got in zip(reads, after, strict=True):
        assert got == model[offset : offset + length], f"read of {length} at {offset}"
    with imago.open(path, fmt) as disk:
        whole = bytearray(SIZE)
        disk.read(whole, 0)
    assert whole == model


@pytest.mark.parametrize("loop", LOOPS)
def test_many_tasks_each_reading_in_turn(tmp_path: Path, loop: str) -> None:
    """The benchmark's shape: 16 tasks, each awaiting one read after another, one buffer each."""
    content = random.Random(7).randbytes(SIZE)
    path = image(tmp_path, "qcow2", content)
    rng = random.Random(8)
    chunks = [[rng.randrange(SIZE // 4096) * 4096 for _ in range(200)] for _ in range(16)]

    async def worker(access: FormatAccess, offsets: Sequence[int]) -> list[bytes]:
        buf = bytearray(4096)
        seen = []
        for offset in offsets:
            await access.read(buf, offset)
            seen.append(bytes(buf))
        return seen

    async def main() -> list[list[bytes]]:
        async with await imago.open_async(path, "qcow2") as access:
            return list(await asyncio.gather(*(worker(access, chunk) for chunk in chunks)))

    for offsets, seen in zip(chunks, run(loop, main()), strict=True):
        assert seen == [content[offset : offset + 4096] for offset in offsets]


# --- errors in the request that caused them -------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_read_error_reaches_only_the_requests_that_touch_it(tmp_path: Path, loop: str) -> None:
    content = random.Random(9).randbytes(SIZE)
    path = image(tmp_path, "raw", content)
    bad = (1 << 20, (1 << 20) + 4096)
    rng = random.Random(10)
    reads = [(rng.randrange(SIZE - 100_000), rng.randrange(1, 100_000)) for _ in range(200)]
    reads += [(bad[0] - 10, 20), (bad[1] - 1, 1), (bad[0], 4096)]

    async def main() -> list[bytes | BaseException]:
        access = await imago.open_async(path, "raw", storage_driver_name="faults")
        try:
            storage = access.driver.storage
            assert isinstance(storage, FaultyStorage)
            storage.plan.add(Fault(op="read", offset_range=bad, times=None))
            return list(await asyncio.gather(*(read_at(access, o, n) for o, n in reads), return_exceptions=True))
        finally:
            await access.close()

    outcomes = run(loop, main())
    failed = 0
    for (offset, length), outcome in zip(reads, outcomes, strict=True):
        if offset < bad[1] and offset + length > bad[0]:
            assert isinstance(outcome, InjectedError), (offset, length, outcome)
            assert outcome.call.offset <= max(offset, bad[0])
            failed += 1
        else:
            assert outcome == content[offset : offset + length], (offset, length)
    assert failed >= 3


@pytest.mark.parametrize("loop", LOOPS)
def test_misuse_fails_its_own_request_only(tmp_path: Path, loop: str) -> None:
    content = random.Random(11).randbytes(SIZE)
    path = image(tmp_path, "qcow2", content)

    async def main() -> list[Any]:
        access = await imago.open_async(path, "qcow2")
        try:
            await read_at(access, 0, 4096)  # an extent in the cache: the fast path must check too
            outcomes = await asyncio.gather(
                read_at(access, 4096, 4096),
                read_at(access, SIZE - 10, 11),
                access.read(bytearray(10), -1),
                access.read(bytearray(10), 1.5),  # type: ignore[arg-type]
                access.read(bytearray(10), True),
                access.write(b"x", 0),
                read_at(access, SIZE - 10, 10),
                return_exceptions=True,
            )
        finally:
            await access.close()
        try:
            await access.read(bytearray(10), 0)
        except ClosedError as error:
            outcomes.append(error)
        return list(outcomes)

    ok, past_end, negative, fraction, boolean, write, end, closed = run(loop, main())
    assert ok == content[4096:8192]
    assert isinstance(past_end, InvalidRequestError)
    assert "past the end" in str(past_end)
    assert isinstance(negative, InvalidRequestError)
    assert isinstance(fraction, InvalidRequestError)
    assert isinstance(boolean, InvalidRequestError)
    assert isinstance(write, ReadOnlyError)
    assert end == content[-10:]
    assert isinstance(closed, ClosedError)


# --- one look-up per mapping ------------------------------------------------------------------------


def test_each_mapping_is_looked_up_once_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = image(tmp_path, "qcow2")
    with imago.open(path, "qcow2", write=True) as disk:
        disk.write(b"\x01" * 65536, 0)  # cluster 0 allocated, cluster 1 not, cluster 2 allocated
        disk.write(b"\x02" * 65536, 2 * 65536)

    async def main() -> list[tuple[bytes, int]]:
        access = await imago.open_async(path, "qcow2")
        driver = access.driver
        calls = 0
        real = driver.get_mapping

        async def counting(offset: int, max_length: int) -> Any:
            nonlocal calls
            calls += 1
            return await real(offset, max_length)

        monkeypatch.setattr(driver, "get_mapping", counting)
        seen = []
        try:
            for offset, length in [(65536 + 10, 100), (100, 4096), (200, 4096), (65536 - 4, 8), (0, 3 * 65536)]:
                calls = 0
                seen.append((await read_at(access, offset, length), calls))
        finally:
            await access.close()
        return seen

    zero, first, cached, across, whole = asyncio.run(main())
    assert zero == (bytes(100), 1)
    assert first == (b"\x01" * 4096, 1)
    assert cached == (b"\x01" * 4096, 0)
    assert across == (b"\x01" * 4 + bytes(4), 2)
    assert whole[0] == b"\x01" * 65536 + bytes(65536) + b"\x02" * 65536
    assert whole[1] == 3


class GatedStorage(Storage):
    """Bytes in memory; a read waits for :attr:`gate` once it is set (a slow device)."""

    name = "gated-test"

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None

    @classmethod
    async def open(cls, options):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def size(self) -> int:
        return len(self.data)

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        if self.gate is not None:
            assert self.entered is not None
            self.entered.set()
            await self.gate.wait()
        for view in bufs:
            view[:] = self.data[offset : offset + view.nbytes].ljust(view.nbytes, b"\0")
            offset += view.nbytes

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        raise NotImplementedError

    async def resize(self, new_size, prealloc=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_mapping_changed_during_a_read_is_not_cached() -> None:
    """The fast path remembers an extent only if the driver's mappings did not change meanwhile."""
    storage = GatedStorage(bytes(range(256)) * 64)
    driver = Raw.builder(storage).open_sync(DenyImplicitOpenGate())
    looked_up: list[int] = []
    real = driver.get_mapping

    async def counting(offset: int, max_length: int) -> Any:
        looked_up.append(offset)
        return await real(offset, max_length)

    driver.get_mapping = counting  # type: ignore[method-assign]

    async def main() -> tuple[bytes, bytes]:
        access = FormatAccess(driver)
        storage.gate, storage.entered = asyncio.Event(), asyncio.Event()
        pending = asyncio.ensure_future(read_at(access, 100, 50))
        await storage.entered.wait()
        driver.mappings_changed()  # while the read is in flight
        storage.gate.set()
        first = await pending
        storage.gate = None
        second = await read_at(access, 100, 50)
        third = await read_at(access, 120, 10)
        await access.close()
        return first, second + third

    first, rest = asyncio.run(main())
    assert first == bytes(range(100, 150))
    assert rest == bytes(range(100, 150)) + bytes(range(120, 130))
    # The first mapping was not kept; the second one was (the third read is a hit).
    assert looked_up == [100, 100]


def test_sync_reads_inside_a_loop_agree_with_async_ones(tmp_path: Path) -> None:
    content = random.Random(12).randbytes(SIZE)
    path = image(tmp_path, "qcow2", content)

    async def main() -> tuple[bytes, bytes]:
        access = await imago.open_async(path, "qcow2")
        try:
            disk: SyncFormatAccess = access.as_sync()
            tasks = [asyncio.ensure_future(read_at(access, i * 65536 + 3, 70_000)) for i in range(40)]
            buf = bytearray(70_000)
            disk.read(buf, 5 * 65536 + 3)  # in place, while the tasks are pending
            results = await asyncio.gather(*tasks)
            return bytes(buf), results[5]
        finally:
            await access.close()

    synchronous, asynchronous = asyncio.run(main())
    assert synchronous == asynchronous == content[5 * 65536 + 3 : 5 * 65536 + 70_003]
