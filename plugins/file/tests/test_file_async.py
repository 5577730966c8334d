"""The ``file`` storage under a running event loop: threads, RWF_NOWAIT, and synchronous use inside a loop."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading

import pytest

from imago import PreallocateMode, StorageCreateOptions, StorageOpenOptions, runtime
from imago.io_buffers import slice_iovec
from imago_file import File


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def has_nowait(flags: tuple[int, ...]) -> bool:
    return bool(flags and flags[0] & os.RWF_NOWAIT)


class IoSpy:
    """Wraps ``os.preadv``/``os.pwritev``: records which thread did what, and can inject NOWAIT outcomes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_preadv = os.preadv
        self.real_pwritev = os.pwritev
        self.calls: list[tuple[str, bool, str]] = []  # (kind, nowait, thread name)
        self.lock = threading.Lock()
        #: What a NOWAIT attempt does: None (the real call), an exception to raise, or an int (bytes to do).
        self.nowait_read: BaseException | int | None = None
        self.nowait_write: BaseException | int | None = None
        monkeypatch.setattr(os, "preadv", self.preadv)
        monkeypatch.setattr(os, "pwritev", self.pwritev)

    def _record(self, kind: str, nowait: bool) -> None:
        with self.lock:
            self.calls.append((kind, nowait, threading.current_thread().name))

    def _call(self, real, outcome, fd, bufs, offset, flags):
        nowait = has_nowait(flags)
        self._record(real.__name__, nowait)
        if nowait and isinstance(outcome, BaseException):
            raise outcome
        if nowait and isinstance(outcome, int):
            bufs = slice_iovec([memoryview(b).cast("B") for b in bufs], 0, outcome)
            return real(fd, bufs, offset) if bufs else 0
        return real(fd, bufs, offset, *flags)

    def preadv(self, fd, bufs, offset, *flags):
        return self._call(self.real_preadv, self.nowait_read, fd, bufs, offset, flags)

    def pwritev(self, fd, bufs, offset, *flags):
        return self._call(self.real_pwritev, self.nowait_write, fd, bufs, offset, flags)

    def count(self, kind: str, *, nowait: bool | None = None, in_pool: bool | None = None) -> int:
        return sum(
            1
            for k, n, thread in self.calls
            if k == kind
            and (nowait is None or n == nowait)
            and (in_pool is None or thread.startswith("imago-io") == in_pool)
        )


@pytest.fixture
def spy(monkeypatch) -> IoSpy:
    return IoSpy(monkeypatch)


@pytest.fixture
def data() -> bytes:
    return pattern(256 * 1024, seed=1)


@pytest.fixture
def image(make_image, data):
    return make_image(data)


def apply(model: bytearray, chunk: bytes, offset: int) -> None:
    end = offset + len(chunk)
    if end > len(model):
        model.extend(bytes(end - len(model)))
    model[offset:end] = chunk


async def read_async(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xa5") * length
    await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


# --- many requests in flight ------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_many_concurrent_requests(image, data, direct):
    rng = random.Random(2)
    pieces = []
    pos = 0
    while pos < 400_000:  # past the end of the 256 KiB file too
        length = rng.randint(1, 3000)
        gap = rng.randint(0, 500)
        pieces.append((pos + gap, pattern(length, seed=pos)))
        pos += gap + length
    rng.shuffle(pieces)
    model = bytearray(data)
    for offset, chunk in pieces:
        apply(model, chunk, offset)
    reads = [(rng.randrange(0, len(model) + 1000), rng.randint(1, 20_000)) for _ in range(200)]

    async def main():
        storage = await File.open(StorageOpenOptions(filename=image, writable=True, direct=direct))
        try:
            await asyncio.gather(*(storage.writev([memoryview(chunk)], offset) for offset, chunk in pieces))
            assert storage.size == len(model)
            return await asyncio.gather(*(read_async(storage, offset, length) for offset, length in reads))
        finally:
            await storage.close()

    results = asyncio.run(main())
    for (offset, length), result in zip(reads, results, strict=True):
        expected = bytes(model[offset : offset + length])
        assert result == expected + bytes(length - len(expected))
    assert image.read_bytes() == model


def test_mixed_operations_concurrently(image, data, open_file):
    storage = open_file(image, writable=True)

    async def main():
        await asyncio.gather(
            storage.writev([memoryview(b"A" * 5000)], 0),
            storage.write_zeroes(10_000, 5000),
            storage.write_zeroes(20_000, 8192, unmap=True),
            storage.discard(65_536, 4096),
            storage.writev([memoryview(b"B" * 100), memoryview(b"C" * 100)], 100_000),
            storage.flush(),
            read_async(storage, 150_000, 1000),
        )
        await storage.sync()

    asyncio.run(main())
    content = image.read_bytes()
    assert content[:5000] == b"A" * 5000
    assert content[5000:10_000] == data[5000:10_000]
    assert content[10_000:15_000] == bytes(5000)
    assert content[20_000:28_192] == bytes(8192)
    assert content[100_000:100_200] == b"B" * 100 + b"C" * 100
    assert content[150_000:] == data[150_000:]


def test_reads_past_eof_under_a_loop(image, data, open_file):
    storage = open_file(image)

    async def main():
        return await asyncio.gather(
            read_async(storage, len(data) - 10, 100),
            read_async(storage, len(data), 100),
            read_async(storage, 10 * len(data), 100),
        )

    assert asyncio.run(main()) == [data[-10:] + bytes(90), bytes(100), bytes(100)]


@pytest.mark.parametrize("count", [1025, 2500])
def test_more_buffers_than_iov_max_under_a_loop(tmp_path, open_file, count):
    path = tmp_path / "iov.img"
    path.write_bytes(b"")
    storage = open_file(path, writable=True)
    chunks = [pattern(1 + i % 17, seed=i) for i in range(count)]
    joined = b"".join(chunks)
    bufs = [bytearray(b"\xcc") * (1 + i % 5) for i in range(count)]

    async def main():
        await storage.writev([memoryview(c) for c in chunks], 3)
        await storage.readv([memoryview(b) for b in bufs], 3)

    asyncio.run(main())
    assert path.read_bytes() == bytes(3) + joined
    total = sum(len(b) for b in bufs)
    assert b"".join(bufs) == (joined + bytes(total))[:total]


def test_open_and_create_under_a_loop(tmp_path):
    path = tmp_path / "new.img"

    async def main():
        created = await File.create(StorageCreateOptions(filename=path, size=10_000, preallocate=PreallocateMode.FULL))
        await created.writev([memoryview(b"xyz")], 9_000)
        await created.close()
        opened = await File.open(StorageOpenOptions(filename=path))
        try:
            return opened.size, await read_async(opened, 8_999, 5)
        finally:
            await opened.close()

    assert asyncio.run(main()) == (10_000, b"\0xyz\0")


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_write_zeroes_past_eof_concurrent_with_appends(make_image, direct):
    """Growing the file for zeroes past its end must not cut off data that other writes put further on."""
    size = 65_536
    data = pattern(size, seed=3)
    appends = [(size + 5000 + i * 1000, pattern(10, seed=i)) for i in range(10)]
    for round_ in range(5):
        path = make_image(data, f"round{round_}.img")
        storage = File.open_sync(StorageOpenOptions(filename=path, writable=True, direct=direct))

        async def main(storage=storage):
            await asyncio.gather(
                storage.write_zeroes(size - 100, 200, unmap=True),
                *(storage.writev([memoryview(chunk)], offset) for offset, chunk in appends),
            )
            await storage.close()

        asyncio.run(main())
        model = bytearray(data)
        apply(model, bytes(200), size - 100)
        for offset, chunk in appends:
            apply(model, chunk, offset)
        assert storage.size == len(model)
        assert path.read_bytes() == model


# --- RWF_NOWAIT and the thread fallback -------------------------------------------------------------


def test_cached_reads_need_no_thread(image, data, open_file, spy):
    storage = open_file(image)
    image.read_bytes()  # in the page cache now

    async def main():
        return await read_async(storage, 1000, 50_000)

    assert asyncio.run(main()) == data[1000:51_000]
    assert spy.count("preadv", nowait=True) >= 1
    assert spy.count("preadv", in_pool=True) == 0


def test_blocking_reads_fall_back_to_threads(image, data, open_file, spy):
    spy.nowait_read = BlockingIOError(errno.EAGAIN, "injected: would block")
    storage = open_file(image)
    reads = [(i * 2000 + 7, 3000) for i in range(50)]

    async def main():
        return await asyncio.gather(*(read_async(storage, offset, length) for offset, length in reads))

    results = asyncio.run(main())
    assert results == [data[offset : offset + length] for offset, length in reads]
    assert spy.count("preadv", nowait=True) == len(reads)  # blocking is no reason to stop trying
    assert spy.count("preadv", nowait=False, in_pool=True) >= len(reads)
    assert spy.count("preadv", nowait=False, in_pool=False) == 0


def test_blocking_writes_fall_back_to_threads(image, data, open_file, spy):
    spy.nowait_write = BlockingIOError(errno.EAGAIN, "injected: would block")
    storage = open_file(image, writable=True)
    writes = [(i * 3001, pattern(1000, seed=i)) for i in range(50)]

    async def main():
        await asyncio.gather(*(storage.writev([memoryview(chunk)], offset) for offset, chunk in writes))

    asyncio.run(main())
    model = bytearray(data)
    for offset, chunk in writes:
        apply(model, chunk, offset)
    assert image.read_bytes() == model
    assert spy.count("pwritev", nowait=True) == len(writes)
    assert spy.count("pwritev", nowait=False, in_pool=True) >= len(writes)


@pytest.mark.parametrize("done", [0, 1, 100, 4096, 9999])
def test_partial_nowait_read_is_completed_in_a_thread(image, data, open_file, spy, done):
    spy.nowait_read = done  # the page cache held only the first *done* bytes
    storage = open_file(image)
    bufs = [bytearray(b"\xee") * n for n in (3000, 1, 7000)]

    async def main():
        await storage.readv([memoryview(b) for b in bufs], 500)

    asyncio.run(main())
    assert b"".join(bufs) == data[500:10_501]
    assert spy.count("preadv", nowait=False, in_pool=True) >= 1


@pytest.mark.parametrize("done", [1, 100, 4096])
def test_partial_nowait_write_is_completed_in_a_thread(image, data, open_file, spy, done):
    spy.nowait_write = done
    storage = open_file(image, writable=True)
    chunks = [pattern(n, seed=n) for n in (3000, 1, 7000)]

    async def main():
        await storage.writev([memoryview(c) for c in chunks], 300_000)  # past the end, too

    asyncio.run(main())
    assert image.read_bytes() == data + bytes(300_000 - len(data)) + b"".join(chunks)
    assert storage.size == 310_001
    assert spy.count("pwritev", nowait=False, in_pool=True) >= 1


def test_nowait_read_disabled(image, data, open_file, spy):
    storage = open_file(image)
    storage._nowait_read = False  # white box: as after the kernel said it cannot do RWF_NOWAIT

    async def main():
        return await asyncio.gather(read_async(storage, 0, 5000), read_async(storage, 100_000, 5000))

    assert asyncio.run(main()) == [data[:5000], data[100_000:105_000]]
    assert spy.count("preadv", nowait=True) == 0
    assert spy.count("preadv", in_pool=True) >= 2


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_unsupported_nowait_read_is_given_up(image, data, open_file, spy, code):
    spy.nowait_read = OSError(code, "injected: not supported")
    storage = open_file(image)

    async def main():
        results = []
        for offset in range(0, 50_000, 5000):
            results.append(await read_async(storage, offset, 5000))
        return results

    assert b"".join(asyncio.run(main())) == data[:50_000]
    assert spy.count("preadv", nowait=True) == 1


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_unsupported_nowait_write_is_given_up(image, data, open_file, spy, code):
    spy.nowait_write = OSError(code, "injected: not supported")
    storage = open_file(image, writable=True)

    async def main():
        for offset in range(0, 50_000, 5000):
            await storage.writev([memoryview(b"w" * 10)], offset)

    asyncio.run(main())
    model = bytearray(data)
    for offset in range(0, 50_000, 5000):
        apply(model, b"w" * 10, offset)
    assert image.read_bytes() == model
    assert spy.count("pwritev", nowait=True) == 1


def test_other_nowait_errors_pass_through(image, open_file, spy):
    spy.nowait_read = OSError(errno.EIO, "injected: I/O error")
    spy.nowait_write = OSError(errno.EIO, "injected: I/O error")
    storage = open_file(image, writable=True)

    async def main():
        with pytest.raises(OSError) as info:  # noqa: PT011
            await read_async(storage, 0, 100)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:  # noqa: PT011
            await storage.writev([memoryview(b"x")], 0)
        assert info.value.errno == errno.EIO

    asyncio.run(main())


# --- synchronous use inside a running loop ----------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_run_sync_inside_a_running_loop(image, data, spy, direct):
    """Synchronous calls from a coroutine do their I/O in place: no thread, no suspension."""

    async def main():
        loop_thread = threading.current_thread().name
        storage = File.open_sync(StorageOpenOptions(filename=image, writable=True, direct=direct))
        try:
            runtime.run_sync(storage.writev([memoryview(b"sync"), memoryview(b"-write")], 1001))
            buf = bytearray(20)
            runtime.run_sync(storage.readv([memoryview(buf)], 1000))
            inline_buf = bytearray(20)
            storage.readv_inline([memoryview(inline_buf)], 1000)
            runtime.run_sync(storage.write_zeroes(5000, 100))
            runtime.run_sync(storage.writev([memoryview(b"end")], len(data) + 5))
            runtime.run_sync(storage.flush())
            runtime.run_sync(storage.resize(len(data) + 100, PreallocateMode.FULL))
            size = storage.size
        finally:
            runtime.run_sync(storage.close())
        return loop_thread, bytes(buf), bytes(inline_buf), size

    loop_thread, buf, inline_buf, size = asyncio.run(main())
    expected = data[1000:1001] + b"sync-write" + data[1011:1020]
    assert buf == expected
    assert inline_buf == expected
    assert size == len(data) + 100
    model = bytearray(data)
    apply(model, b"sync-write", 1001)
    apply(model, bytes(100), 5000)
    apply(model, b"end", len(data) + 5)
    apply(model, bytes(92), len(data) + 8)
    assert image.read_bytes() == model
    threads = {thread for _, _, thread in spy.calls}
    assert threads == {loop_thread}
    # Inline writes never need the non-blocking attempt (reads try it first: a page-cache hit
    # costs the same either way).
    assert spy.count("pwritev", nowait=True) == 0


def test_run_sync_and_async_requests_in_one_loop(image, data, open_file):
    storage = open_file(image, writable=True)

    async def main():
        pending = [asyncio.ensure_future(storage.writev([memoryview(b"async")], i * 1000)) for i in range(20)]
        runtime.run_sync(storage.writev([memoryview(b"sync")], 100_000))
        got = bytearray(4)
        runtime.run_sync(storage.readv([memoryview(got)], 100_000))
        await asyncio.gather(*pending)
        return bytes(got)

    assert asyncio.run(main()) == b"sync"
    model = bytearray(data)
    for i in range(20):
        apply(model, b"async", i * 1000)
    apply(model, b"sync", 100_000)
    assert image.read_bytes() == model


# --- memory file systems -------------------------------------------------------------------------


def mount_type(path: str) -> str:
    """The file system type of the mount holding *path*, from ``/proc/self/mountinfo`` (longest mount point)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fstype
    return kind


@pytest.mark.parametrize("where", ["/dev/shm", "tmp_path"])
def test_memory_file_systems_are_recognised(where, tmp_path):
    from imago_file import syscalls

    directory = str(tmp_path) if where == "tmp_path" else where
    fd = os.open(directory, os.O_RDONLY)
    try:
        found = syscalls.in_memory_file_system(fd)
    finally:
        os.close(fd)
    assert found == (mount_type(directory) in ("tmpfs", "ramfs", "hugetlbfs")), mount_type(directory)


@pytest.fixture
def shm_image():
    assert mount_type("/dev/shm") == "tmpfs", "these tests need /dev/shm on tmpfs"
    path = f"/dev/shm/imago-test-{os.getpid()}-{threading.get_ident()}.img"
    with open(path, "wb") as file:
        file.write(pattern(1 << 20, seed=3))
    yield path
    os.unlink(path)


def test_small_requests_in_memory_need_no_thread(shm_image, spy):
    """tmpfs has no RWF_NOWAIT: small reads and writes there are done in place, never in a thread."""
    storage = File.open_sync(StorageOpenOptions(filename=shm_image, writable=True))
    data = pattern(1 << 20, seed=3)

    async def main():
        reads = await asyncio.gather(*(read_async(storage, i * 4096, 4096) for i in range(32)))
        await asyncio.gather(*(storage.writev([memoryview(b"\x11" * 4096)], i * 8192) for i in range(16)))
        return reads

    try:
        assert asyncio.run(main()) == [data[i * 4096 : (i + 1) * 4096] for i in range(32)]
        assert spy.count("preadv", nowait=True) == spy.count("pwritev", nowait=True) == 0
        assert spy.count("preadv", in_pool=True) == spy.count("pwritev", in_pool=True) == 0
        assert spy.count("preadv") == 32
        assert spy.count("pwritev") == 16
        model = bytearray(data)
        for i in range(16):
            apply(model, b"\x11" * 4096, i * 8192)
        # A 1 MiB read is a copy faster than a thread's round trip: in place too.
        assert asyncio.run(read_async(storage, 0, 1 << 20)) == model
        assert spy.count("preadv", in_pool=True) == 0
        # Larger requests still go to the I/O threads (many of them run on all cores).
        assert asyncio.run(read_async(storage, 0, 5 << 20)) == model + bytes(4 << 20)
        assert spy.count("preadv", in_pool=True) >= 1
        asyncio.run(storage.writev([memoryview(data)], 0))
        assert spy.count("pwritev", in_pool=True) >= 1
    finally:
        runtime.run_sync(storage.close())
    with open(shm_image, "rb") as file:
        assert file.read() == data
