"""The ``file`` storage: opening, creating, plain reads and writes, flush, paths, closing."""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import mmap
import os
import random
from pathlib import Path

import pytest

import imago
from imago import PreallocateMode, StorageCreateOptions, StorageOpenOptions, runtime
from imago.io_buffers import byte_view, slice_iovec
from imago_file import File


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def read(storage: File, offset: int, length: int, *, fill: int = 0xA5) -> bytes:
    """Read through ``readv``; the buffer starts non-zero so that zero-filling is visible."""
    buf = bytearray([fill]) * length
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def write(storage: File, data: bytes, offset: int) -> None:
    runtime.run_sync(storage.writev([memoryview(data)], offset))


def close(storage: File) -> None:
    runtime.run_sync(storage.close())


# --- opening --------------------------------------------------------------------------------------


def test_open_read_only(make_image, open_file):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path)
    assert isinstance(storage, imago.Storage)
    assert storage.writable is False
    assert storage.direct is False
    assert storage.block_device is False
    assert storage.filename == str(path)
    assert storage.size == len(data)
    assert storage.mem_align == 1
    assert storage.req_align == 1
    assert read(storage, 0, len(data)) == data
    assert read(storage, 1234, 77) == data[1234:1311]


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s: s.writev([memoryview(b"xyz")], 0), id="writev"),
        pytest.param(lambda s: s.writev([memoryview(b"xyz")], 1 << 20), id="writev-past-eof"),
        pytest.param(lambda s: s.write_zeroes(0, 100), id="write_zeroes"),
        pytest.param(lambda s: s.write_zeroes(0, 4096, unmap=True), id="write_zeroes-unmap"),
        pytest.param(lambda s: s.discard(0, 4096), id="discard"),
        pytest.param(lambda s: s.resize(100), id="resize-shrink"),
        pytest.param(lambda s: s.resize(1 << 20), id="resize-grow"),
    ],
)
def test_read_only_refuses_changes(make_image, open_file, operation):
    data = pattern(8192)
    path = make_image(data)
    storage = open_file(path)
    with pytest.raises(imago.ReadOnlyError) as info:
        runtime.run_sync(operation(storage))
    assert isinstance(info.value, PermissionError)
    assert str(path) in str(info.value)
    assert path.read_bytes() == data
    assert storage.size == len(data)


def test_open_writable(make_image, open_file):
    data = pattern(5000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    assert storage.writable is True
    assert storage.size == 5000
    write(storage, b"hello", 100)
    expected = data[:100] + b"hello" + data[105:]
    assert path.read_bytes() == expected
    assert read(storage, 0, 5000) == expected
    assert storage.size == 5000


def test_open_accepts_path_objects(make_image):
    path = make_image(b"abc")
    storage = File.open_sync(StorageOpenOptions(filename=Path(path)))
    try:
        assert storage.filename == str(path)
        assert read(storage, 0, 3) == b"abc"
    finally:
        close(storage)


@pytest.mark.parametrize("writable", [False, True])
def test_open_missing_file(tmp_path, writable):
    path = tmp_path / "missing.img"
    with pytest.raises(FileNotFoundError) as info:
        File.open_sync(StorageOpenOptions(filename=path, writable=writable))
    assert info.value.errno == errno.ENOENT
    assert not isinstance(info.value, imago.ImagoError)  # OS errors pass through unchanged
    assert not path.exists()  # opening never creates


def test_open_in_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        File.open_sync(StorageOpenOptions(filename=tmp_path / "nodir" / "x.img", writable=True))


@pytest.mark.parametrize("writable", [False, True])
def test_open_directory(tmp_path, writable):
    with pytest.raises(IsADirectoryError) as info:
        File.open_sync(StorageOpenOptions(filename=tmp_path, writable=writable))
    assert info.value.errno == errno.EISDIR


def test_open_directory_direct(tmp_path):
    # The kernel may refuse O_DIRECT on a directory before we can look at it: any OSError will do.
    with pytest.raises(OSError):  # noqa: PT011
        File.open_sync(StorageOpenOptions(filename=tmp_path, direct=True))


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
@pytest.mark.parametrize("writable", [False, True])
def test_open_character_device(device, writable):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist")
    with pytest.raises(imago.ImagoError, match="not a regular file or block device") as info:
        File.open_sync(StorageOpenOptions(filename=device, writable=writable))
    assert device in str(info.value)


def test_open_fifo_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # O_RDWR on a FIFO does not block, so the driver gets to look at it and refuse it.
    with pytest.raises(imago.ImagoError):
        File.open_sync(StorageOpenOptions(filename=fifo, writable=True))


@pytest.mark.parametrize("filename", [None, ""])
def test_open_without_filename(filename):
    with pytest.raises(imago.InvalidOptionError) as info:
        File.open_sync(StorageOpenOptions(filename=filename))
    assert info.value.option == "filename"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("filename", [None, ""])
def test_create_without_filename(filename):
    with pytest.raises(imago.InvalidOptionError) as info:
        File.create_sync(StorageCreateOptions(filename=filename, size=4096))
    assert info.value.option == "filename"


def test_open_async(make_image):
    data = pattern(3000)
    path = make_image(data)

    async def main():
        storage = await File.open(StorageOpenOptions(filename=path, writable=True))
        try:
            assert storage.size == 3000
            buf = bytearray(3000)
            await storage.readv([memoryview(buf)], 0)
            assert bytes(buf) == data
            await storage.writev([memoryview(b"async")], 10)
        finally:
            await storage.close()

    asyncio.run(main())
    assert path.read_bytes() == data[:10] + b"async" + data[15:]


def test_registered_as_file_driver():
    assert imago.storage_driver("file") is File
    assert File.name == "file"


def test_fileno(make_image, open_file):
    path = make_image(b"x" * 100)
    storage = open_file(path)
    fd = storage.fileno()
    assert isinstance(fd, int)
    assert os.fstat(fd).st_ino == path.stat().st_ino
    close(storage)
    with pytest.raises(imago.ClosedError):
        storage.fileno()


def test_repr(make_image, open_file):
    path = make_image(b"x")
    assert str(path) in repr(open_file(path))
    assert "ro" in repr(open_file(path))
    # Another file: a writer cannot open what this process still holds read-only (image locks).
    assert "rw" in repr(open_file(make_image(b"x", "rw.bin"), writable=True))


# --- closing ----------------------------------------------------------------------------------------


def test_close_twice(make_image):
    storage = File.open_sync(StorageOpenOptions(filename=make_image(b"abc")))
    close(storage)
    close(storage)


def test_close_releases_the_descriptor(make_image):
    storage = File.open_sync(StorageOpenOptions(filename=make_image(b"abc")))
    fd = storage.fileno()
    close(storage)
    with pytest.raises(OSError) as info:  # noqa: PT011
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def test_dropping_an_open_storage_closes_the_descriptor(make_image):
    storage = File.open_sync(StorageOpenOptions(filename=make_image(b"abc")))
    fd = storage.fileno()
    del storage
    gc.collect()
    with pytest.raises(OSError) as info:  # noqa: PT011
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s: s.readv([memoryview(bytearray(10))], 0), id="readv"),
        pytest.param(lambda s: s.writev([memoryview(b"abc")], 0), id="writev"),
        pytest.param(lambda s: s.write_zeroes(0, 10), id="write_zeroes"),
        pytest.param(lambda s: s.write_zeroes(0, 10, unmap=True), id="write_zeroes-unmap"),
        pytest.param(lambda s: s.discard(0, 10), id="discard"),
        pytest.param(lambda s: s.flush(), id="flush"),
        pytest.param(lambda s: s.sync(), id="sync"),
        pytest.param(lambda s: s.resize(10), id="resize"),
    ],
)
@pytest.mark.parametrize("writable", [False, True])
def test_io_after_close(make_image, operation, writable):
    path = make_image(b"0123456789" * 100)
    storage = File.open_sync(StorageOpenOptions(filename=path, writable=writable))
    close(storage)
    with pytest.raises(imago.ClosedError) as info:
        runtime.run_sync(operation(storage))
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == b"0123456789" * 100


def test_readv_inline_after_close(make_image):
    storage = File.open_sync(StorageOpenOptions(filename=make_image(b"abc")))
    close(storage)
    with pytest.raises(imago.ClosedError):
        storage.readv_inline([memoryview(bytearray(3))], 0)


def test_io_after_close_under_a_loop(make_image):
    storage = File.open_sync(StorageOpenOptions(filename=make_image(b"abc"), writable=True))

    async def main():
        await storage.close()
        with pytest.raises(imago.ClosedError):
            await storage.readv([memoryview(bytearray(3))], 0)
        with pytest.raises(imago.ClosedError):
            await storage.writev([memoryview(b"x")], 0)

    asyncio.run(main())


# --- creating ---------------------------------------------------------------------------------------


def test_create_new_file(tmp_path, create_file):
    path = tmp_path / "new.img"
    storage = create_file(path)
    assert path.is_file()
    assert storage.writable is True
    assert storage.size == 0
    assert path.stat().st_size == 0
    write(storage, b"data", 0)
    assert path.read_bytes() == b"data"


def test_create_with_size(tmp_path, create_file):
    path = tmp_path / "new.img"
    storage = create_file(path, size=123_457)
    assert storage.size == 123_457
    assert path.stat().st_size == 123_457
    assert read(storage, 0, 123_457) == bytes(123_457)


def test_create_existing_without_overwrite(make_image):
    data = pattern(4096)
    path = make_image(data)
    for size in (0, 100, 1 << 20):
        with pytest.raises(FileExistsError) as info:
            File.create_sync(StorageCreateOptions(filename=path, size=size))
        assert info.value.errno == errno.EEXIST
    assert path.read_bytes() == data


def test_create_overwrite_truncates(make_image, create_file):
    path = make_image(pattern(100_000))
    storage = create_file(path, overwrite=True)
    assert storage.size == 0
    assert path.stat().st_size == 0

    path2 = make_image(pattern(100_000), "other.img")
    storage2 = create_file(path2, overwrite=True, size=50_000)
    assert storage2.size == 50_000
    assert path2.read_bytes() == bytes(50_000)


def test_create_overwrite_new_file(tmp_path, create_file):
    path = tmp_path / "fresh.img"
    storage = create_file(path, overwrite=True, size=512)
    assert storage.size == 512
    assert path.read_bytes() == bytes(512)


def test_create_in_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        File.create_sync(StorageCreateOptions(filename=tmp_path / "nodir" / "x.img", size=10))


def test_create_mode_from_string(tmp_path, create_file):
    storage = create_file(tmp_path / "s.img", size=8192, preallocate="full")
    assert storage.size == 8192
    assert (tmp_path / "s.img").read_bytes() == bytes(8192)


def test_create_async(tmp_path):
    path = tmp_path / "a.img"

    async def main():
        storage = await File.create(StorageCreateOptions(filename=path, size=10_000, preallocate=PreallocateMode.FULL))
        try:
            assert storage.size == 10_000
            await storage.writev([memoryview(b"end")], 9_997)
        finally:
            await storage.close()

    asyncio.run(main())
    assert path.read_bytes() == bytes(9_997) + b"end"


# --- reading and writing ----------------------------------------------------------------------------


def test_scatter_gather(make_image, open_file):
    data = pattern(20_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    sizes = [1, 0, 7, 512, 4096, 3, 1000, 0, 2]
    bufs = [bytearray(b"\xff") * n for n in sizes]
    runtime.run_sync(storage.readv([memoryview(b) for b in bufs], 777))
    assert b"".join(bufs) == data[777 : 777 + sum(sizes)]

    chunks = [pattern(n, seed=i + 1) for i, n in enumerate(sizes)]
    runtime.run_sync(storage.writev([memoryview(c) for c in chunks], 3333))
    joined = b"".join(chunks)
    expected = data[:3333] + joined + data[3333 + len(joined) :]
    assert path.read_bytes() == expected
    assert storage.size == len(data)


def test_empty_requests(make_image, open_file):
    data = pattern(1000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.readv([], 0))
    runtime.run_sync(storage.readv([memoryview(bytearray())], 500))
    storage.readv_inline([], 0)
    runtime.run_sync(storage.writev([], 0))
    runtime.run_sync(storage.writev([memoryview(b"")], 10))
    assert path.read_bytes() == data
    assert storage.size == len(data)


def test_empty_write_past_eof_keeps_size_consistent(make_image, open_file):
    path = make_image(pattern(1000))
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.writev([memoryview(b"")], 5000))
    assert storage.size == path.stat().st_size


def test_buffer_types(make_image, open_file):
    data = pattern(64 * 1024)
    path = make_image(data)
    storage = open_file(path, writable=True)

    # Reads into every kind of writable buffer, as flat byte views.
    into_bytearray = bytearray(100)
    into_memoryview = memoryview(bytearray(300))[50:250]
    into_mmap = mmap.mmap(-1, 4096)
    into_array = array.array("I", [0xFFFFFFFF] * 64)
    views = [byte_view(b, writable=True) for b in (into_bytearray, into_memoryview, into_mmap, into_array)]
    runtime.run_sync(storage.readv(views, 10))
    total = 100 + 200 + 4096 + 256
    got = bytes(into_bytearray) + bytes(into_memoryview) + bytes(into_mmap) + into_array.tobytes()
    assert got == data[10 : 10 + total]

    # Writes from every kind of buffer, read-only ones included.
    source_array = array.array("I", range(1000, 1064))
    source_mmap = mmap.mmap(-1, 1000)
    source_mmap[:] = pattern(1000, seed=9)
    sources = [b"bytes!", bytearray(b"bytearray"), memoryview(b"--memoryview--")[2:-2], source_mmap, source_array]
    runtime.run_sync(storage.writev([byte_view(b, writable=False) for b in sources], 20_001))
    joined = b"bytes!bytearraymemoryview" + source_mmap[:] + source_array.tobytes()
    expected = data[:20_001] + joined + data[20_001 + len(joined) :]
    assert path.read_bytes() == expected


def test_multidimensional_buffer(make_image, open_file):
    data = pattern(4096)
    storage = open_file(make_image(data))
    matrix = memoryview(bytearray(64)).cast("B", (8, 8))
    runtime.run_sync(storage.readv([byte_view(matrix, writable=True)], 8))
    assert matrix.tobytes() == data[8:72]


def test_read_past_eof_zero_fills(make_image, open_file):
    data = pattern(1000)
    storage = open_file(make_image(data))
    assert read(storage, 900, 200) == data[900:] + bytes(100)
    assert read(storage, 1000, 50) == bytes(50)
    assert read(storage, 1 << 30, 4096) == bytes(4096)
    # Straddling the end with several buffers: those entirely past it are zeroed too.
    bufs = [bytearray(b"\xee") * n for n in (50, 60, 70, 80)]
    runtime.run_sync(storage.readv([memoryview(b) for b in bufs], 940))
    assert b"".join(bufs) == data[940:] + bytes(200)
    assert storage.size == 1000


def test_read_of_empty_file(make_image, open_file):
    storage = open_file(make_image(b""))
    assert storage.size == 0
    assert read(storage, 0, 10_000) == bytes(10_000)


def test_write_past_eof_grows(make_image, open_file):
    data = pattern(100)
    path = make_image(data)
    storage = open_file(path, writable=True)
    write(storage, b"tail", 10_000)
    assert storage.size == 10_004
    assert path.read_bytes() == data + bytes(9_900) + b"tail"
    # Straddling the end.
    write(storage, b"0123456789", 10_000)
    assert storage.size == 10_010
    assert path.stat().st_size == 10_010
    # Writing inside keeps the size.
    write(storage, b"in", 5)
    assert storage.size == 10_010


def test_large_write_and_read(tmp_path, create_file):
    data = pattern(9 << 20)
    path = tmp_path / "large.img"
    storage = create_file(path)
    write(storage, data, 3)
    assert storage.size == len(data) + 3
    assert path.read_bytes() == b"\0\0\0" + data
    assert read(storage, 3, len(data)) == data


@pytest.mark.parametrize("count", [1025, 3000])
def test_more_buffers_than_iov_max(tmp_path, create_file, count):
    path = tmp_path / "iov.img"
    storage = create_file(path)
    chunks = [pattern(1 + i % 13, seed=i) for i in range(count)]
    joined = b"".join(chunks)
    runtime.run_sync(storage.writev([memoryview(c) for c in chunks], 5))
    assert path.read_bytes() == bytes(5) + joined
    assert storage.size == 5 + len(joined)

    # Read back, with the last buffers past the end of the file.
    sizes = [1 + i % 11 for i in range(count)]
    bufs = [bytearray(b"\xcc") * n for n in sizes]
    runtime.run_sync(storage.readv([memoryview(b) for b in bufs], 5))
    expected = (joined + bytes(sum(sizes)))[: sum(sizes)]
    assert b"".join(bufs) == expected

    bufs = [bytearray(b"\xcc") * n for n in sizes]
    storage.readv_inline([memoryview(b) for b in bufs], 5)
    assert b"".join(bufs) == expected


@pytest.mark.parametrize(
    ("offset", "sizes"),
    [
        (0, [4096]),
        (17, [1, 2, 3]),
        (9_990, [5, 20]),  # straddles the end
        (20_000, [100]),  # entirely past it
        (123, [0, 4000, 0, 1]),
    ],
)
def test_readv_inline_equals_readv(make_image, open_file, offset, sizes):
    data = pattern(10_000)
    storage = open_file(make_image(data))
    a = [bytearray(b"\x11") * n for n in sizes]
    b = [bytearray(b"\x22") * n for n in sizes]
    runtime.run_sync(storage.readv([memoryview(x) for x in a], offset))
    storage.readv_inline([memoryview(x) for x in b], offset)
    assert a == b
    assert b"".join(a) == (data + bytes(20_000))[offset : offset + sum(sizes)]


def test_short_reads_and_writes_are_resumed(make_image, open_file, monkeypatch):
    """The kernel may move fewer bytes than asked; the driver must carry on where it stopped."""
    data = pattern(50_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"read": 0, "write": 0}

    def short(bufs):
        return slice_iovec([memoryview(b).cast("B") for b in bufs], 0, 777)

    def preadv(fd, bufs, offset, *flags):
        calls["read"] += 1
        return real_preadv(fd, short(bufs), offset, *flags)

    def pwritev(fd, bufs, offset, *flags):
        calls["write"] += 1
        return real_pwritev(fd, short(bufs), offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)

    bufs = [bytearray(n) for n in (1000, 3, 2500, 10)]
    runtime.run_sync(storage.readv([memoryview(b) for b in bufs], 100))
    assert b"".join(bufs) == data[100:3613]
    bufs = [bytearray(n) for n in (1000, 3, 2500, 10)]
    storage.readv_inline([memoryview(b) for b in bufs], 49_000)
    assert b"".join(bufs) == data[49_000:] + bytes(2513)

    chunks = [pattern(n, seed=n) for n in (2000, 1, 900)]
    runtime.run_sync(storage.writev([memoryview(c) for c in chunks], 300))
    monkeypatch.undo()
    assert path.read_bytes() == data[:300] + b"".join(chunks) + data[3201:]
    assert calls["read"] > 2
    assert calls["write"] > 2


def test_write_without_progress_raises(make_image, open_file, monkeypatch):
    path = make_image(b"x" * 100)
    storage = open_file(path, writable=True)
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset, *flags: 0)
    with pytest.raises(OSError) as info:  # noqa: PT011
        write(storage, b"abc", 0)
    assert info.value.errno == errno.EIO


def test_os_errors_pass_through(make_image, open_file, monkeypatch):
    storage = open_file(make_image(b"x" * 100), writable=True)

    def fail(*args):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "preadv", fail)
    monkeypatch.setattr(os, "pwritev", fail)
    for operation in (
        lambda: read(storage, 0, 10),
        lambda: storage.readv_inline([memoryview(bytearray(10))], 0),
        lambda: write(storage, b"abc", 0),
    ):
        with pytest.raises(OSError) as info:  # noqa: PT011
            operation()
        assert info.value.errno == errno.EIO
        assert not isinstance(info.value, imago.ImagoError)


# --- flush, sync ------------------------------------------------------------------------------------


@pytest.mark.parametrize("writable", [False, True])
def test_flush_and_sync(make_image, open_file, writable):
    path = make_image(b"abc")
    storage = open_file(path, writable=writable)
    if writable:
        write(storage, b"XY", 1)
    assert runtime.run_sync(storage.flush()) is None
    assert runtime.run_sync(storage.sync()) is None
    assert path.read_bytes() == (b"aXY" if writable else b"abc")


def test_flush_and_sync_under_a_loop(make_image, open_file):
    storage = open_file(make_image(b"abc"), writable=True)

    async def main():
        await storage.writev([memoryview(b"Z")], 0)
        await storage.flush()
        await storage.sync()

    asyncio.run(main())
    assert read(storage, 0, 3) == b"Zbc"


@pytest.mark.parametrize("no_flush", [False, True])
def test_no_flush_skips_fdatasync_but_not_fsync(make_image, monkeypatch, no_flush):
    calls: list[str] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    path = make_image(b"abc")
    storage = File.open_sync(StorageOpenOptions(filename=path, writable=True, no_flush=no_flush))
    try:
        write(storage, b"XY", 1)
        runtime.run_sync(storage.flush())
        assert calls == ([] if no_flush else ["fdatasync"])
        runtime.run_sync(storage.sync())  # an explicit request for durability is always honoured
        assert calls[-1] == "fsync"
    finally:
        close(storage)
    assert path.read_bytes() == b"aXY"


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_no_flush_must_be_a_bool(value):
    with pytest.raises(imago.InvalidOptionError, match="no_flush"):
        StorageOpenOptions(filename="x", no_flush=value)


def test_imago_open_passes_no_flush_on(make_image, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    path = make_image(bytes(4096))
    with imago.open(path, "raw", write=True, no_flush=True) as image:
        image.write(b"x" * 512, 0)
        image.flush()
    assert calls == []
    with imago.open(path, "raw", write=True) as image:
        image.write(b"y" * 512, 0)
        image.flush()
    assert calls
    assert path.read_bytes()[:512] == b"y" * 512


# --- relative paths ---------------------------------------------------------------------------------


def test_resolve_relative_path(tmp_path, open_file):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "image.img").write_bytes(b"image")
    (sub / "backing.img").write_bytes(b"backing")
    (tmp_path / "up.img").write_bytes(b"up")
    storage = open_file(sub / "image.img")

    resolved = storage.resolve_relative_path("backing.img")
    assert os.path.samefile(resolved, sub / "backing.img")
    assert Path(resolved).read_bytes() == b"backing"
    assert os.path.samefile(storage.resolve_relative_path("../up.img"), tmp_path / "up.img")
    assert os.path.samefile(storage.resolve_relative_path("./backing.img"), sub / "backing.img")

    absolute = str(tmp_path / "up.img")
    assert storage.resolve_relative_path(absolute) == absolute
    assert storage.resolve_relative_path("/nonexistent/x.img") == "/nonexistent/x.img"


def test_resolve_relative_path_of_relatively_opened_image(tmp_path, monkeypatch, open_file):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "image.img").write_bytes(b"image")
    (sub / "backing.img").write_bytes(b"backing")
    (tmp_path / "top.img").write_bytes(b"top")
    monkeypatch.chdir(tmp_path)

    nested = open_file("sub/image.img")
    assert Path(nested.resolve_relative_path("backing.img")).read_bytes() == b"backing"
    assert not os.path.isabs(nested.resolve_relative_path("backing.img"))

    here = open_file("top.img")
    assert here.resolve_relative_path("sub/backing.img") == "sub/backing.img"
    assert Path(here.resolve_relative_path("sub/backing.img")).read_bytes() == b"backing"
