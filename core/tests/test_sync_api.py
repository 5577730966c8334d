"""SyncFormatAccess: every method, outside and inside a running event loop, and misuse."""

from __future__ import annotations

import array
import asyncio
import mmap
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import imago
from imago import (
    FormatAccess,
    Mapping,
    PermissiveImplicitOpenGate,
    PreallocateMode,
    ShallowMapping,
    StorageOpenOptions,
    SyncFormatAccess,
)
from imago_file import File
from imago_null import Null
from imago_raw import Raw

SIZE = 64 * 1024


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    p = tmp_path / "disk.img"
    p.write_bytes(_pattern(SIZE))
    return p


@pytest.fixture
def image(path: pathlib.Path) -> Iterator[SyncFormatAccess]:
    access = SyncFormatAccess(Raw.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate()))
    yield access
    access.close()


@pytest.fixture
def ro_image(path: pathlib.Path) -> Iterator[SyncFormatAccess]:
    access = SyncFormatAccess(Raw.builder_path(path).open_sync(PermissiveImplicitOpenGate()))
    yield access
    access.close()


# --- construction -----------------------------------------------------------------------------


def test_from_format_driver(path: pathlib.Path) -> None:
    driver = Raw.builder_path(path).open_sync(PermissiveImplicitOpenGate())
    image = SyncFormatAccess(driver)
    assert image.driver is driver
    assert isinstance(image.access, FormatAccess)
    assert image.access.driver is driver
    image.close()


def test_from_format_access(path: pathlib.Path) -> None:
    access = FormatAccess(Raw.builder_path(path).open_sync(PermissiveImplicitOpenGate()))
    image = SyncFormatAccess(access)
    assert image.access is access
    assert access.as_sync().access is access
    image.close()
    assert access.closed


@pytest.mark.parametrize("wrong", [None, "disk.img", 42, Raw, Null(10)])
def test_from_wrong_type(wrong: object) -> None:
    with pytest.raises(imago.ImagoError) as info:
        SyncFormatAccess(wrong)  # type: ignore[arg-type]
    assert type(wrong).__name__ in str(info.value)


def test_facts(image: SyncFormatAccess, path: pathlib.Path) -> None:
    assert image.size == SIZE
    assert image.writable is True
    assert image.closed is False
    assert image.format_name == "raw"
    assert image.filename == str(path)
    assert image.mem_align == 1
    assert image.req_align == 1
    assert "raw" in repr(image)
    assert str(SIZE) in repr(image)


def test_facts_read_only(ro_image: SyncFormatAccess) -> None:
    assert ro_image.writable is False


# --- reads and writes -------------------------------------------------------------------------


def test_read(image: SyncFormatAccess) -> None:
    data = _pattern(SIZE)
    buf = bytearray(1000)
    image.read(buf, 1234)
    assert buf == data[1234:2234]
    image.read(buf, SIZE - 1000)
    assert buf == data[-1000:]
    whole = bytearray(SIZE)
    image.read(whole, 0)
    assert whole == data


def test_read_repeatedly_uses_current_data(image: SyncFormatAccess, path: pathlib.Path) -> None:
    buf = bytearray(16)
    image.read(buf, 100)  # primes the cached extent
    image.write(b"N" * 16, 100)
    image.read(buf, 100)
    assert buf == b"N" * 16
    image.read(buf, 200)
    assert buf == _pattern(SIZE)[200:216]
    image.write_zeroes(200, 16)
    image.read(buf, 200)
    assert buf == bytes(16)


def test_readv(image: SyncFormatAccess) -> None:
    data = _pattern(SIZE)
    a, b, c = bytearray(3), bytearray(0), bytearray(4000)
    image.readv([a, b, memoryview(c)], 10)
    assert a == data[10:13]
    assert c == data[13:4013]
    image.readv((bytearray(1),), 0)
    image.readv([], 5)


def test_write(image: SyncFormatAccess, path: pathlib.Path) -> None:
    image.write(b"hello", 0)
    image.write(bytearray(b"world"), SIZE - 5)
    image.write(memoryview(b"--middle--")[2:8], 30000)
    image.flush()
    data = path.read_bytes()
    assert data[:5] == b"hello"
    assert data[-5:] == b"world"
    assert data[30000:30006] == b"middle"
    assert data[5:30000] == _pattern(SIZE)[5:30000]
    assert len(data) == SIZE


def test_writev(image: SyncFormatAccess, path: pathlib.Path) -> None:
    image.writev([b"ab", bytearray(b"cd"), memoryview(b"ef"), array.array("B", b"gh")], 1000)
    image.writev([], 0)
    buf = bytearray(8)
    image.read(buf, 1000)
    assert buf == b"abcdefgh"
    image.flush()
    assert path.read_bytes()[1000:1008] == b"abcdefgh"


def test_write_zeroes(image: SyncFormatAccess, path: pathlib.Path) -> None:
    image.write_zeroes(4096, 8192)
    image.write_zeroes(0, 0)
    image.write_zeroes(SIZE, 0)
    image.flush()
    data = path.read_bytes()
    assert data[4096:12288] == bytes(8192)
    assert data[:4096] == _pattern(SIZE)[:4096]
    assert data[12288:] == _pattern(SIZE)[12288:]


def test_discard_to_zero(image: SyncFormatAccess, path: pathlib.Path) -> None:
    image.discard_to_zero(8192, 4096)
    buf = bytearray(4096 + 2)
    image.read(buf, 8191)
    assert buf[1:-1] == bytes(4096)
    assert buf[0] == _pattern(SIZE)[8191]
    assert buf[-1] == _pattern(SIZE)[8192 + 4096]
    assert path.stat().st_size == SIZE


def test_discard_to_any(image: SyncFormatAccess) -> None:
    image.discard_to_any(0, 4096)  # content undefined, but the call must succeed
    image.discard_to_any(SIZE - 1, 1)
    assert image.size == SIZE
    buf = bytearray(10)
    image.read(buf, 5000)
    assert buf == _pattern(SIZE)[5000:5010]


def test_discard_to_backing_without_backing_zeroes(image: SyncFormatAccess) -> None:
    image.discard_to_backing(100, 50)
    buf = bytearray(52)
    image.read(buf, 99)
    assert buf[1:51] == bytes(50)
    assert buf[0] == _pattern(SIZE)[99]
    assert buf[51] == _pattern(SIZE)[150]


def test_flush_and_sync(image: SyncFormatAccess, path: pathlib.Path) -> None:
    image.write(b"durable", 0)
    image.flush()
    image.sync()
    assert path.read_bytes()[:7] == b"durable"


def test_read_only_flush_and_sync(ro_image: SyncFormatAccess) -> None:
    ro_image.flush()
    ro_image.sync()


def test_get_mapping(image: SyncFormatAccess) -> None:
    mapping, length = image.get_mapping(100, 1000)
    assert isinstance(mapping, Mapping.Raw)
    assert mapping.offset == 100
    assert mapping.writable is True
    assert mapping.storage is image.driver.storage
    assert length == 1000
    mapping, length = image.get_mapping(100, 1 << 40)
    assert length == SIZE - 100
    mapping, length = image.get_mapping(SIZE, 10)
    assert isinstance(mapping, Mapping.Eof)
    match image.get_mapping(0, 10)[0]:
        case Mapping.Raw(offset=offset):
            assert offset == 0
        case _:
            pytest.fail("expected a raw mapping")


def test_get_mapping_read_only(ro_image: SyncFormatAccess) -> None:
    mapping, _ = ro_image.get_mapping(0, 10)
    assert isinstance(mapping, Mapping.Raw)
    assert mapping.writable is False


def test_get_shallow_mapping(image: SyncFormatAccess) -> None:
    mapping, length = image.get_shallow_mapping(10, 20)
    assert isinstance(mapping, ShallowMapping.Raw)
    assert (mapping.offset, length) == (10, 20)
    mapping, length = image.get_shallow_mapping(SIZE + 5, 20)
    assert isinstance(mapping, ShallowMapping.Eof)
    mapping, length = image.get_shallow_mapping(0, 0)
    assert isinstance(mapping, ShallowMapping.Eof)
    assert length == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None])
def test_mapping_bad_arguments(image: SyncFormatAccess, bad: Any) -> None:
    with pytest.raises(imago.InvalidRequestError):
        image.get_mapping(bad, 10)
    with pytest.raises(imago.InvalidRequestError):
        image.get_mapping(0, bad)
    with pytest.raises(imago.InvalidRequestError):
        image.get_shallow_mapping(bad, 10)


def test_resize_grow_reads_zero(image: SyncFormatAccess, path: pathlib.Path) -> None:
    buf = bytearray(100)
    image.read(buf, SIZE - 100)  # primes the cached extent up to the old end
    image.resize(SIZE * 2)
    assert image.size == SIZE * 2
    assert path.stat().st_size == SIZE * 2
    big = bytearray(SIZE + 100)
    image.read(big, SIZE - 100)
    assert big[:100] == _pattern(SIZE)[-100:]
    assert big[100:] == bytes(SIZE)
    image.write(b"new end", SIZE * 2 - 7)
    tail = bytearray(7)
    image.read(tail, SIZE * 2 - 7)
    assert tail == b"new end"


@pytest.mark.parametrize("mode", [*PreallocateMode, "full", "falloc"])
def test_resize_with_preallocation(image: SyncFormatAccess, mode: Any) -> None:
    image.resize(SIZE + 8192, mode)
    buf = bytearray(8192)
    image.read(buf, SIZE)
    assert buf == bytes(8192)


def test_resize_shrink_then_reads_past_end_fail(image: SyncFormatAccess, path: pathlib.Path) -> None:
    buf = bytearray(512)
    image.read(buf, SIZE - 512)  # primes the cached extent [.., SIZE)
    image.read(buf, 0)
    with pytest.raises(imago.InvalidRequestError, match="shrink=True"):
        image.resize(4096)
    assert image.size == SIZE
    image.resize(4096, shrink=True)
    assert image.size == 4096
    assert path.stat().st_size == 4096
    with pytest.raises(imago.InvalidRequestError):
        image.read(buf, SIZE - 512)
    with pytest.raises(imago.InvalidRequestError):
        image.read(buf, 4096 - 511)
    with pytest.raises(imago.InvalidRequestError):
        image.readv([buf], 4000)
    with pytest.raises(imago.InvalidRequestError):
        image.write(buf, 4000)
    image.read(buf, 4096 - 512)
    assert buf == _pattern(SIZE)[4096 - 512 : 4096]
    # Growing again: the area that was cut off reads as zero, not as the old data.
    image.resize(SIZE)
    image.read(buf, SIZE - 512)
    assert buf == bytes(512)


def test_resize_to_zero(image: SyncFormatAccess) -> None:
    image.resize(0, shrink=True)
    assert image.size == 0
    image.read(bytearray(), 0)
    with pytest.raises(imago.InvalidRequestError):
        image.read(bytearray(1), 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "10", None])
def test_resize_bad_size(image: SyncFormatAccess, bad: Any) -> None:
    with pytest.raises(imago.InvalidRequestError):
        image.resize(bad)
    assert image.size == SIZE


def test_resize_bad_mode(image: SyncFormatAccess) -> None:
    with pytest.raises(imago.InvalidOptionError):
        image.resize(SIZE * 2, "bogus")
    assert image.size == SIZE


def test_resize_read_only(ro_image: SyncFormatAccess, path: pathlib.Path) -> None:
    with pytest.raises(imago.ReadOnlyError):
        ro_image.resize(SIZE * 2)
    assert path.stat().st_size == SIZE


def test_read_only_rejects_writes(ro_image: SyncFormatAccess, path: pathlib.Path) -> None:
    calls: list[Callable[[], None]] = [
        lambda: ro_image.write(b"x", 0),
        lambda: ro_image.writev([b"x"], 0),
        lambda: ro_image.write_zeroes(0, 10),
        lambda: ro_image.discard_to_zero(0, 10),
        lambda: ro_image.discard_to_any(0, 10),
        lambda: ro_image.discard_to_backing(0, 10),
    ]
    for call in calls:
        with pytest.raises(imago.ReadOnlyError):
            call()
    assert path.read_bytes() == _pattern(SIZE)


# --- buffers --------------------------------------------------------------------------------


def test_read_into_memoryview_slice(image: SyncFormatAccess) -> None:
    backing = bytearray(100)
    image.read(memoryview(backing)[10:20], 50)
    assert backing[10:20] == _pattern(SIZE)[50:60]
    assert backing[:10] == bytes(10)
    assert backing[20:] == bytes(80)


def test_read_into_mmap(image: SyncFormatAccess) -> None:
    area = mmap.mmap(-1, 8192)
    image.read(area, 4096)
    assert area[:] == _pattern(SIZE)[4096 : 4096 + 8192]
    image.write(area, 0)  # and write from it
    area.close()  # no view of it may be left behind
    check = bytearray(8192)
    image.read(check, 0)
    assert check == _pattern(SIZE)[4096 : 4096 + 8192]


def test_read_into_array(image: SyncFormatAccess) -> None:
    words = array.array("I", [0] * 256)
    image.read(words, 0)
    assert words.tobytes() == _pattern(SIZE)[:1024]
    image.write(array.array("I", [0x41424344] * 2), 0)
    buf = bytearray(8)
    image.read(buf, 0)
    assert buf == array.array("I", [0x41424344] * 2).tobytes()


def test_read_into_aligned_buffer(image: SyncFormatAccess) -> None:
    buf = imago.io_buffers.aligned_buffer(4096, 4096)
    image.read(buf, 4096)
    assert bytes(buf) == _pattern(SIZE)[4096:8192]


@pytest.mark.parametrize("read_only", [b"\0" * 16, memoryview(bytearray(16)).toreadonly()])
def test_read_into_read_only_buffer(image: SyncFormatAccess, read_only: Any) -> None:
    with pytest.raises(imago.InvalidBufferError) as info:
        image.read(read_only, 0)
    assert isinstance(info.value, TypeError)
    # also when the cached fast path is primed
    image.read(bytearray(16), 0)
    with pytest.raises(imago.InvalidBufferError):
        image.read(read_only, 0)
    with pytest.raises(imago.InvalidBufferError):
        image.readv([bytearray(4), read_only], 0)


@pytest.mark.parametrize("not_a_buffer", [None, 42, "text", [0] * 16, object()])
def test_non_buffers(image: SyncFormatAccess, not_a_buffer: Any) -> None:
    image.read(bytearray(16), 0)  # prime the fast path
    with pytest.raises(imago.InvalidBufferError):
        image.read(not_a_buffer, 0)
    with pytest.raises(imago.InvalidBufferError):
        image.write(not_a_buffer, 0)
    with pytest.raises(imago.InvalidBufferError):
        image.readv([not_a_buffer], 0)
    with pytest.raises(imago.InvalidBufferError):
        image.writev([not_a_buffer], 0)


def test_non_contiguous_buffers(image: SyncFormatAccess, path: pathlib.Path) -> None:
    strided = memoryview(bytearray(32))[::2]
    image.read(bytearray(16), 0)  # prime the fast path
    for call in (
        lambda: image.read(strided, 0),
        lambda: image.write(strided, 0),
        lambda: image.readv([strided], 0),
        lambda: image.writev([b"ok", strided], 0),
    ):
        with pytest.raises(imago.InvalidBufferError, match="contiguous"):
            call()
    assert path.read_bytes() == _pattern(SIZE)


@pytest.mark.parametrize("single", [bytearray(16), memoryview(bytearray(16)), b"\0" * 16])
def test_vectors_given_a_single_buffer(image: SyncFormatAccess, single: Any) -> None:
    with pytest.raises(imago.InvalidBufferError):
        image.readv(single, 0)
    with pytest.raises(imago.InvalidBufferError):
        image.writev(single, 0)


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-1, -4096, SIZE - 15, SIZE, SIZE + 1, 1 << 62])
def test_out_of_bounds(image: SyncFormatAccess, offset: int) -> None:
    buf = bytearray(16)
    image.read(bytearray(16), 0)  # prime the fast path
    with pytest.raises(imago.InvalidRequestError) as info:
        image.read(buf, offset)
    assert isinstance(info.value, ValueError)
    with pytest.raises(imago.InvalidRequestError):
        image.readv([buf], offset)
    with pytest.raises(imago.InvalidRequestError):
        image.write(buf, offset)
    with pytest.raises(imago.InvalidRequestError):
        image.writev([buf], offset)
    with pytest.raises(imago.InvalidRequestError):
        image.write_zeroes(offset, 16)
    with pytest.raises(imago.InvalidRequestError):
        image.discard_to_zero(offset, 16)
    with pytest.raises(imago.InvalidRequestError):
        image.discard_to_any(offset, 16)
    with pytest.raises(imago.InvalidRequestError):
        image.discard_to_backing(offset, 16)


@pytest.mark.parametrize("offset", [1.5, 0.0, "3", None, True, b"\0"])
def test_non_int_offsets(image: SyncFormatAccess, offset: Any) -> None:
    buf = bytearray(4)
    image.read(bytearray(4), 0)  # prime the fast path
    for call in (
        lambda: image.read(buf, offset),
        lambda: image.readv([buf], offset),
        lambda: image.write(buf, offset),
        lambda: image.writev([buf], offset),
        lambda: image.write_zeroes(offset, 4),
        lambda: image.discard_to_zero(offset, 4),
        lambda: image.discard_to_any(offset, 4),
        lambda: image.discard_to_backing(offset, 4),
    ):
        with pytest.raises(imago.InvalidRequestError):
            call()


@pytest.mark.parametrize("length", [-1, 1.5, "4", None])
def test_bad_lengths(image: SyncFormatAccess, length: Any) -> None:
    for call in (
        lambda: image.write_zeroes(0, length),
        lambda: image.discard_to_zero(0, length),
        lambda: image.discard_to_any(0, length),
        lambda: image.discard_to_backing(0, length),
    ):
        with pytest.raises(imago.InvalidRequestError):
            call()
    assert image.size == SIZE


def test_int_subclass_offset(image: SyncFormatAccess) -> None:
    class Offset(int):
        pass

    buf = bytearray(4)
    image.read(buf, Offset(8))
    assert buf == _pattern(SIZE)[8:12]


def test_zero_length_requests_at_the_end(image: SyncFormatAccess) -> None:
    image.read(bytearray(), SIZE)
    image.read(bytearray(4), 0)  # prime the fast path
    image.read(bytearray(), SIZE)
    image.readv([], SIZE)
    image.readv([bytearray()], SIZE)
    image.write(b"", SIZE)
    image.writev([], SIZE)
    image.write_zeroes(SIZE, 0)
    image.discard_to_zero(SIZE, 0)
    assert image.size == SIZE
    with pytest.raises(imago.InvalidRequestError):
        image.read(bytearray(), SIZE + 1)
    with pytest.raises(imago.InvalidRequestError):
        image.write(b"", SIZE + 1)


# --- closing --------------------------------------------------------------------------------


def test_context_manager_flushes_and_closes(path: pathlib.Path) -> None:
    flushed: list[bool] = []
    driver = Raw.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    storage = driver.storage
    original = storage.flush

    async def flush() -> None:
        flushed.append(True)
        await original()

    storage.flush = flush  # type: ignore[method-assign]
    with SyncFormatAccess(driver) as image:
        assert image.__enter__() is image
        image.write(b"ctx", 0)
        assert not flushed
    assert flushed
    assert image.closed
    assert path.read_bytes()[:3] == b"ctx"
    with pytest.raises(imago.ClosedError):
        storage.fileno()  # type: ignore[attr-defined]


def test_context_manager_closes_on_error(path: pathlib.Path) -> None:
    image = SyncFormatAccess(Raw.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate()))

    def fail_inside() -> None:
        with image:
            image.write(b"err", 0)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_inside()
    assert image.closed
    assert path.read_bytes()[:3] == b"err"


def test_close_twice(image: SyncFormatAccess) -> None:
    image.close()
    image.close()
    assert image.closed


def test_close_read_only_does_not_flush(ro_image: SyncFormatAccess) -> None:
    ro_image.close()
    assert ro_image.closed


def test_operations_after_close(image: SyncFormatAccess) -> None:
    buf = bytearray(16)
    image.read(buf, 0)  # prime the fast path
    image.close()
    calls: list[Callable[[], object]] = [
        lambda: image.read(buf, 0),
        lambda: image.readv([buf], 0),
        lambda: image.write(buf, 0),
        lambda: image.writev([buf], 0),
        lambda: image.write_zeroes(0, 16),
        lambda: image.discard_to_zero(0, 16),
        lambda: image.discard_to_any(0, 16),
        lambda: image.discard_to_backing(0, 16),
        lambda: image.get_mapping(0, 16),
        lambda: image.get_shallow_mapping(0, 16),
        lambda: image.flush(),
        lambda: image.sync(),
        lambda: image.resize(SIZE * 2),
    ]
    for call in calls:
        with pytest.raises(imago.ClosedError):
            call()
    assert "closed" in repr(image.access)


def test_closing_closes_the_storage(path: pathlib.Path) -> None:
    storage = File.open_sync(StorageOpenOptions(filename=path))
    image = SyncFormatAccess(Raw.builder(storage).open_sync(PermissiveImplicitOpenGate()))
    image.close()
    with pytest.raises(imago.ClosedError):
        storage.fileno()
    with pytest.raises(imago.ClosedError):
        storage.readv_inline([memoryview(bytearray(1))], 0)


# --- null storage ---------------------------------------------------------------------------


def test_raw_on_null() -> None:
    with SyncFormatAccess(Raw.builder(Null(1 << 30)).write(True).open_sync(PermissiveImplicitOpenGate())) as image:
        assert image.size == 1 << 30
        image.write(b"dropped", 1 << 29)
        buf = bytearray(b"\xff" * 7)
        image.read(buf, 1 << 29)
        assert buf == bytes(7)
        image.read(buf, (1 << 30) - 7)
        assert buf == bytes(7)


# --- inside a running event loop ------------------------------------------------------------


def test_sync_api_inside_running_loop(path: pathlib.Path) -> None:
    async def main() -> bytes:
        assert not imago.runtime.inline()
        driver = Raw.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
        with SyncFormatAccess(driver) as image:
            buf = bytearray(10)
            image.read(buf, 0)
            assert buf == _pattern(SIZE)[:10]
            image.read(buf, 10)  # the cached fast path
            assert buf == _pattern(SIZE)[10:20]
            image.write(b"in-loop", 100)
            image.writev([b"a", b"b"], 200)
            image.readv([buf], 100)
            assert buf[:7] == b"in-loop"
            image.write_zeroes(300, 4096)
            image.discard_to_zero(5000, 100)
            image.discard_to_any(6000, 100)
            image.discard_to_backing(7000, 100)
            image.get_mapping(0, 10)
            image.get_shallow_mapping(0, 10)
            image.flush()
            image.sync()
            image.resize(SIZE + 4096, "full")
            image.read(buf, SIZE)
            assert buf == bytes(10)
            image.resize(SIZE, shrink=True)
            with pytest.raises(imago.InvalidRequestError):
                image.read(buf, SIZE)
            with image.as_file() as file:
                file.seek(100)
                text = file.read(7)
            # Other tasks still run on this loop afterwards.
            await asyncio.sleep(0)
            return text

    assert asyncio.run(main()) == b"in-loop"
    data = path.read_bytes()
    assert data[100:107] == b"in-loop"
    assert data[200:202] == b"ab"
    assert data[300 : 300 + 4096] == bytes(4096)
    assert len(data) == SIZE


def test_sync_api_on_image_opened_async_inside_loop(path: pathlib.Path) -> None:
    async def main() -> bytes:
        access = await imago.open_async(path, "raw", write=True)
        image = access.as_sync()
        image.write(b"mixed", 0)
        buf = bytearray(5)
        await access.read(buf, 0)  # async after sync on the same image
        image.read(buf, 0)
        await access.close()
        return bytes(buf)

    assert asyncio.run(main()) == b"mixed"


def test_sync_api_in_loop_errors_are_not_suspensions(path: pathlib.Path) -> None:
    async def main() -> None:
        image = imago.open(path, "raw")
        with pytest.raises(imago.InvalidRequestError):
            image.read(bytearray(1), SIZE)
        with pytest.raises(imago.ReadOnlyError):
            image.write(b"x", 0)
        image.close()
        with pytest.raises(imago.ClosedError):
            image.read(bytearray(1), 0)

    asyncio.run(main())


def test_sync_api_in_worker_threads(path: pathlib.Path) -> None:
    import concurrent.futures

    image = SyncFormatAccess(Raw.builder_path(path).open_sync(PermissiveImplicitOpenGate()))

    def read(offset: int) -> bytes:
        buf = bytearray(256)
        image.read(buf, offset)
        return bytes(buf)

    offsets = list(range(0, SIZE, 4096))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read, offsets))
    data = _pattern(SIZE)
    assert results == [data[o : o + 256] for o in offsets]
    image.close()


# --- the fast path with a driver that reports mappings longer than asked ------------------------


class _GenerousRaw(Raw):
    """A raw-like driver whose disk is shorter than its file, reporting mappings to the file's end.

    Drivers may report more than asked "if it costs nothing" (a whole cluster); the engine must
    still keep requests inside the disk.
    """

    name = "generous-raw-test"

    @property
    def size(self) -> int:
        return 1000

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        return ShallowMapping.Raw(self.storage, offset, self.writable), self.storage.size - offset


def test_fast_path_respects_disk_end_with_generous_driver(path: pathlib.Path) -> None:
    driver = _GenerousRaw.builder_path(path).open_sync(PermissiveImplicitOpenGate())
    with SyncFormatAccess(driver) as image:
        buf = bytearray(16)
        image.read(buf, 0)  # caches a mapping that reaches the file's end (past the disk's)
        assert buf == _pattern(SIZE)[:16]
        with pytest.raises(imago.InvalidRequestError):
            image.read(buf, 1000)
        with pytest.raises(imago.InvalidRequestError):
            image.read(buf, 990)
        image.read(buf, 984)
        assert buf == _pattern(SIZE)[984:1000]

        async def read_async() -> None:
            await image.access.read(buf, 1000)

        with pytest.raises(imago.InvalidRequestError):
            imago.runtime.run_sync(read_async())


# --- a random workload against a bytearray model ------------------------------------------------

_MODEL_SIZE = 8192

_operations = st.one_of(
    st.tuples(st.just("write"), st.integers(0, _MODEL_SIZE), st.binary(min_size=0, max_size=600)),
    st.tuples(st.just("writev"), st.integers(0, _MODEL_SIZE), st.lists(st.binary(max_size=200), max_size=4)),
    st.tuples(st.just("read"), st.integers(0, _MODEL_SIZE), st.integers(0, 700)),
    st.tuples(st.just("readv"), st.integers(0, _MODEL_SIZE), st.lists(st.integers(0, 300), max_size=4)),
    st.tuples(st.just("write_zeroes"), st.integers(0, _MODEL_SIZE), st.integers(0, 3000)),
    st.tuples(st.just("discard_to_zero"), st.integers(0, _MODEL_SIZE), st.integers(0, 3000)),
    st.tuples(st.just("resize"), st.integers(0, _MODEL_SIZE * 2), st.just(None)),
)


def _request_length(kind: str, arg: Any) -> int:
    if kind == "write":
        return len(arg)
    if kind == "writev":
        return sum(map(len, arg))
    if kind == "readv":
        return sum(arg)
    return int(arg)


def _apply(image: SyncFormatAccess, model: bytearray, kind: str, offset: int, arg: Any) -> None:
    """Run one operation on the image and on the model, and compare what reads return."""
    length = _request_length(kind, arg)
    if kind == "write":
        image.write(arg, offset)
        model[offset : offset + length] = arg
    elif kind == "writev":
        image.writev(arg, offset)
        model[offset : offset + length] = b"".join(arg)
    elif kind == "read":
        buf = bytearray(length)
        image.read(buf, offset)
        assert buf == model[offset : offset + length]
    elif kind == "readv":
        bufs = [bytearray(n) for n in arg]
        image.readv(bufs, offset)
        assert b"".join(bufs) == model[offset : offset + length]
    else:
        getattr(image, kind)(offset, length)
        model[offset : offset + length] = bytes(length)


@settings(max_examples=60, deadline=None)
@given(st.lists(_operations, max_size=25))
def test_random_workload_matches_model(operations: list[tuple[str, int, Any]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        file_path = pathlib.Path(directory) / "model.img"
        model = bytearray(_pattern(_MODEL_SIZE))
        file_path.write_bytes(model)
        driver = Raw.builder_path(file_path).write(True).open_sync(PermissiveImplicitOpenGate())
        with SyncFormatAccess(driver) as image:
            for kind, offset, arg in operations:
                if kind == "resize":
                    image.resize(offset, shrink=True)
                    del model[offset:]
                    model.extend(bytes(offset - len(model)))
                elif offset + _request_length(kind, arg) > len(model):
                    before = bytes(model)
                    with pytest.raises(imago.InvalidRequestError):
                        _apply(image, model, kind, offset, arg)
                    model[:] = before
                else:
                    _apply(image, model, kind, offset, arg)
            assert image.size == len(model)
            whole = bytearray(len(model))
            image.read(whole, 0)
            assert whole == model
        assert file_path.read_bytes() == model


def test_shrinking_needs_an_explicit_request(image: SyncFormatAccess, path: pathlib.Path) -> None:
    before = path.read_bytes()
    with pytest.raises(imago.InvalidRequestError, match="shrink=True") as info:
        image.resize(SIZE - 512)
    assert str(path) in str(info.value)
    assert image.size == SIZE
    assert path.read_bytes() == before  # nothing changed
    with pytest.raises(imago.InvalidRequestError, match="shrink must be True or False"):
        image.resize(SIZE - 512, shrink="yes")  # type: ignore[arg-type]
    image.resize(SIZE, shrink=False)  # the same size is no shrink
    image.resize(SIZE + 512)  # growing needs nothing
    image.resize(SIZE - 512, shrink=True)
    assert image.size == SIZE - 512
