"""Which reads the ``file`` storage does in the loop's thread, and which it hands to I/O threads.

Page-cache hits up to 4 MiB are read in place (``RWF_NOWAIT``; plainly in a memory file
system); larger requests, what the page cache lacks, and every ``O_DIRECT`` read go to imago's
I/O threads. Whatever the route, the bytes are the file's (zeroes past its end).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imago import ClosedError, StorageOpenOptions, runtime
from imago_file import File, syscalls

MiB = 1 << 20
LIMIT = 4 * MiB  # the largest read done in place


class ReadSpy:
    """Wraps ``os.preadv``: which thread read, with which flags; NOWAIT attempts can be made to fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = os.preadv
        self.calls: list[tuple[bool, bool, int]] = []  # (nowait, in the pool, bytes asked)
        self.lock = threading.Lock()
        self.nowait: BaseException | int | None = None
        monkeypatch.setattr(os, "preadv", self.preadv)

    def preadv(self, fd: int, bufs: list[memoryview], offset: int, *flags: int) -> int:
        nowait = bool(flags and flags[0] & os.RWF_NOWAIT)
        asked = sum(memoryview(b).nbytes for b in bufs)
        with self.lock:
            self.calls.append((nowait, threading.current_thread().name.startswith("imago-io"), asked))
        if nowait and isinstance(self.nowait, BaseException):
            raise self.nowait
        if nowait and isinstance(self.nowait, int):
            first = memoryview(bufs[0]).cast("B")[: self.nowait]
            return self.real(fd, [first], offset)
        return self.real(fd, bufs, offset, *flags)

    def in_pool(self) -> int:
        return sum(1 for _, pool, _ in self.calls if pool)

    def nowait_calls(self) -> int:
        return sum(1 for nowait, _, _ in self.calls if nowait)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> ReadSpy:
    return ReadSpy(monkeypatch)


def make_file(directory: str, size: int, seed: int) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    path = os.path.join(directory, f"inplace-{os.getpid()}-{threading.get_ident()}-{seed}.img")
    with open(path, "wb") as file:
        file.write(data)
    return path, data


def in_memory(directory: str) -> bool:
    fd = os.open(directory, os.O_RDONLY)
    try:
        return syscalls.in_memory_file_system(fd)
    finally:
        os.close(fd)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[str]:
    """A directory on a disk file system (one with RWF_NOWAIT): the test's, else one in /var/tmp."""
    if not in_memory(str(tmp_path)):
        yield str(tmp_path)
        return
    directory = tempfile.mkdtemp(dir="/var/tmp")
    try:
        assert not in_memory(directory), "these tests need a disk file system (tmp_path and /var/tmp are in memory)"
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture(params=["disk", "memory"])
def cached(request: pytest.FixtureRequest, disk_dir: str) -> Iterator[tuple[File, bytes, bool]]:
    """A 6 MiB file in the page cache, on a disk file system or in /dev/shm ("memory")."""
    directory = disk_dir if request.param == "disk" else "/dev/shm"
    path, data = make_file(directory, 6 * MiB, seed=1)
    storage = File.open_sync(StorageOpenOptions(filename=path))
    memory = syscalls.in_memory_file_system(storage.fileno())
    assert memory == (request.param == "memory"), f"{directory}: not the kind of file system the test needs"
    with open(path, "rb") as file:
        assert file.read() == data  # now in the page cache
    yield storage, data, memory
    runtime.run_sync(storage.close())
    os.unlink(path)


async def read(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xa5") * length
    await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


@pytest.mark.parametrize("length", [4096, MiB, LIMIT])
def test_cached_reads_up_to_the_limit_stay_in_the_loops_thread(cached, spy, length):
    storage, data, in_memory = cached

    async def main() -> list[bytes]:
        return list(await asyncio.gather(*(read(storage, i * 4096 + 3, length) for i in range(4))))

    assert asyncio.run(main()) == [data[i * 4096 + 3 : i * 4096 + 3 + length] for i in range(4)]
    assert spy.in_pool() == 0
    # A memory file system is read plainly (it has no RWF_NOWAIT); elsewhere with RWF_NOWAIT.
    assert spy.nowait_calls() == (0 if in_memory else 4)


def test_reads_past_the_limit_go_to_the_threads(cached, spy):
    storage, data, _ = cached
    assert asyncio.run(read(storage, 100, LIMIT + 1)) == data[100 : 100 + LIMIT + 1]
    assert spy.nowait_calls() == 0
    assert spy.in_pool() >= 1


def test_in_place_reads_past_the_end_read_zeroes(cached, spy):
    storage, data, _ = cached
    size = len(data)

    async def main() -> list[bytes]:
        return list(
            await asyncio.gather(read(storage, size - MiB, 2 * MiB), read(storage, size + 5, 100), read(storage, 0, 0))
        )

    tail, beyond, empty = asyncio.run(main())
    assert tail == data[-MiB:] + bytes(MiB)
    assert beyond == bytes(100)
    assert empty == b""


@pytest.mark.parametrize("done", [0, 4096, MiB - 1])
def test_a_large_read_the_cache_holds_in_part_is_finished_in_a_thread(disk_dir, spy, done):
    path, data = make_file(disk_dir, 3 * MiB, seed=2)
    storage = File.open_sync(StorageOpenOptions(filename=path))
    spy.nowait = done if done else BlockingIOError(errno.EAGAIN, "injected: would block")
    try:
        assert asyncio.run(read(storage, 10, 2 * MiB)) == data[10 : 10 + 2 * MiB]
    finally:
        runtime.run_sync(storage.close())
    assert spy.nowait_calls() == 1
    # The rest, read in a thread, starts where the in-place part ended.
    assert [asked for nowait, pool, asked in spy.calls if pool and not nowait] == [2 * MiB - done]


def test_direct_reads_never_wait_in_the_loops_thread(disk_dir, spy):
    path, data = make_file(disk_dir, 2 * MiB, seed=3)
    storage = File.open_sync(StorageOpenOptions(filename=path, direct=True))

    async def main() -> list[bytes]:
        return list(
            await asyncio.gather(
                read(storage, 0, 4096),  # aligned
                read(storage, 8192, MiB),  # aligned, large
                read(storage, 100, 5000),  # bounced
            )
        )

    try:
        assert asyncio.run(main()) == [data[:4096], data[8192 : 8192 + MiB], data[100:5100]]
    finally:
        runtime.run_sync(storage.close())
    assert spy.nowait_calls() == 0
    assert all(pool for _, pool, _ in spy.calls), spy.calls


def test_a_closed_file_fails_the_read_under_a_loop(cached):
    storage, _, _ = cached
    runtime.run_sync(storage.close())

    async def main() -> None:
        await read(storage, 0, 10)

    with pytest.raises(ClosedError, match="closed"):
        asyncio.run(main())


def test_an_unsupported_nowait_is_given_up_for_large_reads_too(disk_dir, spy):
    path, data = make_file(disk_dir, 3 * MiB, seed=4)
    storage = File.open_sync(StorageOpenOptions(filename=path))
    spy.nowait = OSError(errno.EOPNOTSUPP, "injected: not supported")

    async def main() -> list[bytes]:
        return [await read(storage, offset, MiB) for offset in (0, MiB, 2 * MiB)]

    try:
        assert b"".join(asyncio.run(main())) == data
    finally:
        runtime.run_sync(storage.close())
    assert spy.nowait_calls() == 1
    assert spy.in_pool() == 3
