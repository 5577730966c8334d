"""The ``file`` storage on block devices (loop devices over temporary files)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import stat
import subprocess

import pytest

import imago
from imago import PreallocateMode, StorageCreateOptions, StorageOpenOptions, runtime
from imago_file import File

DEVICE_SIZE = 4 << 20


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def read(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xa5") * length
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def write(storage: File, data: bytes, offset: int) -> None:
    runtime.run_sync(storage.writev([memoryview(data)], offset))


class LoopDevice:
    def __init__(self, path: str, backing, sector_size: int, data: bytes) -> None:
        self.path = path
        self.backing = backing
        self.sector_size = sector_size
        self.data = data

    def backing_content(self) -> bytes:
        """What the device holds, read through the backing file (flush the storage first)."""
        return self.backing.read_bytes()


@pytest.fixture(params=[512, 4096], ids=lambda size: f"sector{size}")
def loop(request, tmp_path):
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    data = pattern(DEVICE_SIZE, seed=request.param)
    backing = tmp_path / "backing.img"
    backing.write_bytes(data)
    result = subprocess.run(
        ["losetup", "-f", "--show", "-b", str(request.param), str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {result.stderr.strip() or result.returncode}")
    device = result.stdout.strip()
    yield LoopDevice(device, backing, request.param, data)
    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def test_open_read_only(loop, open_file):
    storage = open_file(loop.path)
    assert stat.S_ISBLK(os.stat(loop.path).st_mode)
    assert storage.block_device is True
    assert storage.size == DEVICE_SIZE
    assert storage.writable is False
    assert read(storage, 0, DEVICE_SIZE) == loop.data
    assert read(storage, 12_345, 100) == loop.data[12_345:12_445]
    with pytest.raises(imago.ReadOnlyError):
        write(storage, b"x", 0)


def test_size_matches_the_kernel(loop, open_file):
    storage = open_file(loop.path)
    result = subprocess.run(["blockdev", "--getsize64", loop.path], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        assert storage.size == int(result.stdout)
    fd = os.open(loop.path, os.O_RDONLY)
    try:
        assert storage.size == os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_read_write(loop, open_file):
    storage = open_file(loop.path, writable=True)
    new = pattern(10_000, seed=1)
    write(storage, new, 1001)
    runtime.run_sync(storage.writev([memoryview(b"ab"), memoryview(b"cd")], DEVICE_SIZE - 4))
    assert read(storage, 1001, 10_000) == new
    runtime.run_sync(storage.flush())
    runtime.run_sync(storage.sync())
    model = bytearray(loop.data)
    model[1001:11_001] = new
    model[-4:] = b"abcd"
    assert loop.backing_content() == model
    assert storage.size == DEVICE_SIZE


def test_read_past_the_end_zero_fills(loop, open_file):
    storage = open_file(loop.path)
    assert read(storage, DEVICE_SIZE - 10, 30) == loop.data[-10:] + bytes(20)
    assert read(storage, DEVICE_SIZE + 4096, 100) == bytes(100)


def test_write_past_the_end_fails(loop, open_file):
    storage = open_file(loop.path, writable=True)
    with pytest.raises(OSError) as info:  # noqa: PT011
        write(storage, b"x" * 100, DEVICE_SIZE - 10)
    assert info.value.errno in (errno.ENOSPC, errno.EFBIG, errno.EINVAL)
    assert storage.size == DEVICE_SIZE
    with pytest.raises(OSError):  # noqa: PT011
        write(storage, b"x", DEVICE_SIZE + 4096)
    assert storage.size == DEVICE_SIZE


@pytest.mark.parametrize("mode", list(PreallocateMode), ids=lambda m: m.name)
def test_resize(loop, open_file, mode):
    storage = open_file(loop.path, writable=True)
    for new_size in (DEVICE_SIZE // 2, DEVICE_SIZE * 2, 0):
        with pytest.raises(imago.UnsupportedFeatureError) as info:
            runtime.run_sync(storage.resize(new_size, mode))
        assert isinstance(info.value, NotImplementedError)
        assert storage.size == DEVICE_SIZE
    runtime.run_sync(storage.resize(DEVICE_SIZE, mode))
    assert storage.size == DEVICE_SIZE
    assert read(storage, 0, DEVICE_SIZE) == loop.data


def test_resize_read_only(loop, open_file):
    storage = open_file(loop.path)
    with pytest.raises(imago.ReadOnlyError):
        runtime.run_sync(storage.resize(DEVICE_SIZE))


def test_direct_alignment_is_the_sector_size(loop, open_file):
    storage = open_file(loop.path, direct=True)
    assert storage.direct is True
    assert storage.req_align == loop.sector_size
    assert storage.mem_align == max(loop.sector_size, 512)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (1, 1), (511, 2), (4095, 4098), (100_001, 70_000), (DEVICE_SIZE - 3, 3), (DEVICE_SIZE - 5, 50)],
)
def test_direct_misaligned_reads(loop, open_file, offset, length):
    storage = open_file(loop.path, direct=True)
    expected = loop.data[offset : offset + length]
    expected += bytes(length - len(expected))
    assert read(storage, offset, length) == expected
    buf = bytearray(length)
    storage.readv_inline([memoryview(buf)], offset)
    assert buf == expected


def test_direct_writes(loop, open_file):
    storage = open_file(loop.path, writable=True, direct=True)
    rng = random.Random(3)
    model = bytearray(loop.data)
    for step in range(40):
        length = rng.choice([1, 3, 511, 512, 4096, 4097, rng.randrange(1, 40_000)])
        offset = rng.choice([rng.randrange(0, DEVICE_SIZE - length), rng.randrange(0, 100) * 4096])
        data = pattern(length, seed=step)
        write(storage, data, offset)
        model[offset : offset + length] = data
    write(storage, b"end", DEVICE_SIZE - 3)  # read-modify-write of the last sector
    model[-3:] = b"end"
    assert storage.size == DEVICE_SIZE
    assert read(storage, 0, DEVICE_SIZE) == model
    runtime.run_sync(storage.flush())
    assert loop.backing_content() == model


def test_direct_concurrent_writes(loop, open_file):
    storage = open_file(loop.path, writable=True, direct=True)
    rng = random.Random(5)
    pieces = []
    pos = 300
    while pos < 20_000:
        length = rng.randint(1, 300)
        pieces.append((pos, pattern(length, seed=pos)))
        pos += length
    rng.shuffle(pieces)

    async def main():
        await asyncio.gather(*(storage.writev([memoryview(chunk)], offset) for offset, chunk in pieces))

    asyncio.run(main())
    model = bytearray(loop.data)
    for offset, chunk in pieces:
        model[offset : offset + len(chunk)] = chunk
    assert read(storage, 0, DEVICE_SIZE) == model


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize(("offset", "length"), [(0, 65_536), (4096, 8192), (1001, 3000), (DEVICE_SIZE - 100, 100)])
def test_write_zeroes(loop, open_file, direct, unmap, offset, length):
    storage = open_file(loop.path, writable=True, direct=direct)
    runtime.run_sync(storage.write_zeroes(offset, length, unmap=unmap))
    model = bytearray(loop.data)
    model[offset : offset + length] = bytes(length)
    assert read(storage, 0, DEVICE_SIZE) == model
    assert storage.size == DEVICE_SIZE
    runtime.run_sync(storage.flush())
    assert loop.backing_content() == model


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_past_the_end_fails(loop, open_file, unmap):
    storage = open_file(loop.path, writable=True)
    with pytest.raises((OSError, imago.ImagoError)):
        runtime.run_sync(storage.write_zeroes(DEVICE_SIZE - 4096, 8192, unmap=unmap))
    assert storage.size == DEVICE_SIZE


def test_discard(loop, open_file):
    storage = open_file(loop.path, writable=True)
    runtime.run_sync(storage.discard(65_536, 65_536))
    runtime.run_sync(storage.discard(DEVICE_SIZE - 4096, 1 << 20))  # clipped at the end
    assert storage.size == DEVICE_SIZE
    content = read(storage, 0, DEVICE_SIZE)
    assert content[:65_536] == loop.data[:65_536]
    assert content[131_072 : DEVICE_SIZE - 4096] == loop.data[131_072 : DEVICE_SIZE - 4096]


def test_flush_and_sync_read_only(loop, open_file):
    storage = open_file(loop.path)
    runtime.run_sync(storage.flush())
    runtime.run_sync(storage.sync())


@pytest.mark.parametrize("overwrite", [False, True])
def test_create_on_a_block_device(loop, overwrite):
    options = StorageCreateOptions(filename=loop.path, size=4096, overwrite=overwrite)
    expected = FileExistsError if not overwrite else imago.UnsupportedFeatureError
    with pytest.raises(expected):
        File.create_sync(options)
    storage = File.open_sync(StorageOpenOptions(filename=loop.path))
    try:
        assert storage.size == DEVICE_SIZE
        assert read(storage, 0, DEVICE_SIZE) == loop.data
    finally:
        runtime.run_sync(storage.close())


def test_async_io(loop, open_file):
    storage = open_file(loop.path, writable=True)
    pieces = [(i * 10_007, pattern(1000, seed=i)) for i in range(100)]

    async def main():
        await asyncio.gather(*(storage.writev([memoryview(chunk)], offset) for offset, chunk in pieces))
        bufs = [bytearray(1000) for _ in pieces]
        await asyncio.gather(
            *(storage.readv([memoryview(buf)], offset) for buf, (offset, _) in zip(bufs, pieces, strict=True))
        )
        return bufs

    bufs = asyncio.run(main())
    assert [bytes(b) for b in bufs] == [chunk for _, chunk in pieces]
