"""The ``file`` storage: write_zeroes, discard, resize and preallocation."""

from __future__ import annotations

import errno
import random

import pytest

import imago
from imago import PreallocateMode, runtime
from imago_file import File, syscalls

MiB = 1 << 20
SPARSE_MODES = [PreallocateMode.NONE, PreallocateMode.ZERO, PreallocateMode.METADATA]
ALL_MODES = list(PreallocateMode)


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def allocated(path) -> int:
    """Bytes the file system has allocated for the file."""
    return path.stat().st_blocks * 512


def read(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(b"\x5a") * length
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def zero(model: bytearray, offset: int, length: int) -> None:
    end = offset + length
    if end > len(model):
        model.extend(bytes(end - len(model)))
    model[offset:end] = bytes(length)


@pytest.fixture
def unsupported_fallocate(monkeypatch):
    """Make every ``fallocate`` call fail as on a file system without it; counts the attempts."""
    calls = []

    def fallocate(fd, mode, offset, length):
        calls.append((mode, offset, length))
        raise OSError(errno.EOPNOTSUPP, "injected: not supported")

    monkeypatch.setattr(syscalls, "fallocate", fallocate)
    return calls


# --- write_zeroes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 4096),
        (4096 + 100, 10_000),  # misaligned both ends
        (1, 1),
        (65_536, 262_144),
        (0, MiB),  # everything
    ],
)
def test_write_zeroes_inside(make_image, open_file, unmap, offset, length):
    data = pattern(MiB)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.write_zeroes(offset, length, unmap=unmap))
    model = bytearray(data)
    zero(model, offset, length)
    assert path.read_bytes() == model
    assert read(storage, 0, MiB) == model
    assert storage.size == MiB


def test_write_zeroes_unmap_releases_space(make_image, open_file):
    path = make_image(pattern(2 * MiB))
    storage = open_file(path, writable=True)
    before = allocated(path)
    assert before >= 2 * MiB
    runtime.run_sync(storage.write_zeroes(256 * 1024, MiB, unmap=True))
    assert allocated(path) <= before - MiB + 64 * 1024
    assert read(storage, 256 * 1024, MiB) == bytes(MiB)
    assert path.stat().st_size == 2 * MiB


def test_write_zeroes_without_unmap_keeps_space(make_image, open_file):
    path = make_image(pattern(2 * MiB))
    storage = open_file(path, writable=True)
    before = allocated(path)
    runtime.run_sync(storage.write_zeroes(256 * 1024, MiB, unmap=False))
    # Zeroing without unmap may use unwritten extents but must not give the space back.
    assert allocated(path) >= before - 64 * 1024
    assert read(storage, 256 * 1024, MiB) == bytes(MiB)


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (8_000, 10_000),  # straddles the end
        (10_000, 5_000),  # starts at the end
        (50_001, 7),  # leaves a gap
    ],
)
def test_write_zeroes_past_eof_grows(make_image, open_file, unmap, offset, length):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.write_zeroes(offset, length, unmap=unmap))
    model = bytearray(data)
    zero(model, offset, length)
    assert storage.size == offset + length
    assert path.stat().st_size == offset + length
    assert path.read_bytes() == model


def test_write_zeroes_unmap_past_eof_stays_sparse(make_image, open_file):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.write_zeroes(5000, 10 * MiB, unmap=True))
    assert storage.size == 5000 + 10 * MiB
    assert path.stat().st_size == 5000 + 10 * MiB
    assert allocated(path) < 64 * 1024
    assert read(storage, 0, 20_000) == data[:5000] + bytes(15_000)
    assert read(storage, 10 * MiB - 4096, 9096) == bytes(9096)


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize("length", [0, -5])
def test_write_zeroes_empty(make_image, open_file, unmap, length):
    data = pattern(1000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.write_zeroes(500, length, unmap=unmap))
    runtime.run_sync(storage.write_zeroes(5000, length, unmap=unmap))
    assert path.read_bytes() == data
    assert storage.size == 1000


@pytest.mark.parametrize("unmap", [False, True])
@pytest.mark.parametrize(("offset", "length"), [(100, 3_000), (9_000, 3_000), (20_000, 100), (0, 3 * MiB)])
def test_write_zeroes_fallback_without_fallocate(make_image, open_file, unsupported_fallocate, unmap, offset, length):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.write_zeroes(offset, length, unmap=unmap))
    assert unsupported_fallocate, "fallocate was not even tried"
    model = bytearray(data)
    zero(model, offset, length)
    assert path.read_bytes() == model
    assert storage.size == len(model)


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY])
def test_write_zeroes_fallback_errnos(make_image, open_file, monkeypatch, code):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)

    def fallocate(*args):
        raise OSError(code, "injected")

    monkeypatch.setattr(syscalls, "fallocate", fallocate)
    runtime.run_sync(storage.write_zeroes(10, 20))
    assert path.read_bytes() == data[:10] + bytes(20) + data[30:]


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_other_errors_pass_through(make_image, open_file, monkeypatch, unmap):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)

    def fallocate(*args):
        raise OSError(errno.ENOSPC, "injected: no space")

    monkeypatch.setattr(syscalls, "fallocate", fallocate)
    with pytest.raises(OSError) as info:  # noqa: PT011
        runtime.run_sync(storage.write_zeroes(0, 100, unmap=unmap))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == data


def test_write_zeroes_under_a_loop(make_image, open_file):
    import asyncio

    data = pattern(100_000)
    path = make_image(data)
    storage = open_file(path, writable=True)

    async def main():
        await asyncio.gather(
            storage.write_zeroes(0, 1000),
            storage.write_zeroes(50_000, 1000, unmap=True),
            storage.write_zeroes(99_000, 5000, unmap=True),
        )

    asyncio.run(main())
    model = bytearray(data)
    for offset, length in ((0, 1000), (50_000, 1000), (99_000, 5000)):
        zero(model, offset, length)
    assert path.read_bytes() == model
    assert storage.size == 104_000


# --- discard ----------------------------------------------------------------------------------------


def test_discard_punches_a_hole(make_image, open_file):
    path = make_image(pattern(2 * MiB))
    storage = open_file(path, writable=True)
    before = allocated(path)
    runtime.run_sync(storage.discard(MiB // 2, MiB))
    assert allocated(path) <= before - MiB + 64 * 1024
    assert storage.size == 2 * MiB
    assert path.stat().st_size == 2 * MiB
    # Discarded contents are undefined in general; on a local file they are holes.
    assert read(storage, MiB // 2, MiB) == bytes(MiB)


def test_discard_keeps_neighbours(make_image, open_file):
    data = pattern(100_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.discard(10_001, 30_000))
    content = path.read_bytes()
    assert content[:10_001] == data[:10_001]
    assert content[40_001:] == data[40_001:]


@pytest.mark.parametrize(("offset", "length"), [(90_000, 50_000), (100_000, 10), (1 << 30, 4096), (5, 0)])
def test_discard_never_grows(make_image, open_file, offset, length):
    data = pattern(100_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.discard(offset, length))
    assert storage.size == 100_000
    assert path.stat().st_size == 100_000
    assert path.read_bytes()[: min(offset, 100_000)] == data[: min(offset, 100_000)]


def test_discard_unsupported_is_a_no_op(make_image, open_file, unsupported_fallocate):
    data = pattern(100_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.discard(0, 100_000))
    assert unsupported_fallocate
    assert path.read_bytes() == data


def test_discard_other_errors_pass_through(make_image, open_file, monkeypatch):
    storage = open_file(make_image(pattern(10_000)), writable=True)

    def fallocate(*args):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(syscalls, "fallocate", fallocate)
    with pytest.raises(OSError) as info:  # noqa: PT011
        runtime.run_sync(storage.discard(0, 4096))
    assert info.value.errno == errno.EIO


# --- resize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_resize_grow(make_image, open_file, mode):
    data = pattern(10_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    before = allocated(path)
    new_size = 3 * MiB + 123
    runtime.run_sync(storage.resize(new_size, mode))
    assert storage.size == new_size
    assert path.stat().st_size == new_size
    assert path.read_bytes() == data + bytes(new_size - len(data))
    if mode in SPARSE_MODES:
        assert allocated(path) <= before + 64 * 1024
    else:
        assert allocated(path) >= new_size


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_resize_shrink_then_grow(make_image, open_file, mode):
    data = pattern(100_000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.resize(30_001, mode))
    assert storage.size == 30_001
    assert path.read_bytes() == data[:30_001]
    assert read(storage, 0, 40_000) == data[:30_001] + bytes(9_999)
    # The cut-off data must not come back.
    runtime.run_sync(storage.resize(100_000, mode))
    assert path.read_bytes() == data[:30_001] + bytes(69_999)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_resize_to_zero_and_same_size(make_image, open_file, mode):
    data = pattern(5000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.resize(5000, mode))
    assert path.read_bytes() == data
    assert storage.size == 5000
    runtime.run_sync(storage.resize(0, mode))
    assert storage.size == 0
    assert path.read_bytes() == b""


def test_resize_negative(make_image, open_file):
    path = make_image(b"abc")
    storage = open_file(path, writable=True)
    with pytest.raises(imago.InvalidOptionError) as info:
        runtime.run_sync(storage.resize(-1))
    assert info.value.option == "size"
    assert path.read_bytes() == b"abc"
    assert storage.size == 3


def test_resize_falloc_fallback(make_image, open_file, unsupported_fallocate):
    data = pattern(1000)
    path = make_image(data)
    storage = open_file(path, writable=True)
    runtime.run_sync(storage.resize(MiB, PreallocateMode.FALLOC))
    assert unsupported_fallocate
    assert storage.size == MiB
    assert path.read_bytes() == data + bytes(MiB - 1000)
    assert allocated(path) >= MiB - 4096


def test_resize_under_a_loop(make_image, open_file):
    import asyncio

    data = pattern(1000)
    path = make_image(data)
    storage = open_file(path, writable=True)

    async def main():
        await storage.resize(MiB, PreallocateMode.FULL)
        await storage.resize(2 * MiB, PreallocateMode.FALLOC)
        await storage.resize(3 * MiB)
        await storage.resize(500)

    asyncio.run(main())
    assert storage.size == 500
    assert path.read_bytes() == data[:500]


# --- preallocation at creation ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_create_preallocation(tmp_path, create_file, mode):
    path = tmp_path / "new.img"
    size = 4 * MiB + 512
    storage = create_file(path, size=size, preallocate=mode)
    assert storage.size == size
    assert path.stat().st_size == size
    if mode in SPARSE_MODES:
        assert allocated(path) < 64 * 1024
    else:
        assert allocated(path) >= size
    assert path.read_bytes() == bytes(size)
    assert read(storage, size - 10, 20) == bytes(20)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_create_preallocation_overwrites(make_image, create_file, mode):
    path = make_image(pattern(3 * MiB))
    storage = create_file(path, size=MiB, preallocate=mode, overwrite=True)
    assert storage.size == MiB
    assert path.read_bytes() == bytes(MiB)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
def test_create_preallocation_of_empty_file(tmp_path, create_file, mode):
    path = tmp_path / "empty.img"
    storage = create_file(path, size=0, preallocate=mode)
    assert storage.size == 0
    assert path.stat().st_size == 0
