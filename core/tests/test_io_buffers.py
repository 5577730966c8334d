"""imago.io_buffers: buffer normalisation, I/O vectors and aligned allocation."""

from __future__ import annotations

import array
import ctypes
import itertools
import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

import imago
from imago.io_buffers import (
    aligned_buffer,
    buffer_address,
    byte_view,
    byte_views,
    iovec_length,
    is_aligned,
    slice_iovec,
    zero_fill,
)

# --- byte_view ------------------------------------------------------------------------------


def test_byte_view_bytearray_shares_memory() -> None:
    data = bytearray(b"hello")
    view = byte_view(data, writable=True)
    assert view.format == "B"
    assert view.ndim == 1
    assert view.nbytes == 5
    view[0] = ord("j")
    assert data == b"jello"


def test_byte_view_bytes_for_reading_only() -> None:
    view = byte_view(b"abc", writable=False)
    assert bytes(view) == b"abc"
    with pytest.raises(imago.InvalidBufferError) as info:
        byte_view(b"abc", writable=True)
    assert isinstance(info.value, TypeError)
    assert "read-only" in str(info.value)


def test_byte_view_read_only_memoryview_rejected_for_writing() -> None:
    view = memoryview(bytearray(8)).toreadonly()
    with pytest.raises(imago.InvalidBufferError):
        byte_view(view, writable=True)
    assert byte_view(view, writable=False).nbytes == 8


def test_byte_view_casts_typed_arrays() -> None:
    data = array.array("I", [0x01020304, 0x05060708])
    view = byte_view(data, writable=True)
    assert view.format == "B"
    assert view.nbytes == 2 * data.itemsize
    assert bytes(view) == data.tobytes()
    view[:4] = b"\0\0\0\0"
    assert data[0] == 0
    assert data[1] == 0x05060708


def test_byte_view_flattens_multidimensional() -> None:
    data = bytearray(range(12))
    shaped = memoryview(data).cast("B", (3, 4))
    view = byte_view(shaped, writable=True)
    assert view.ndim == 1
    assert bytes(view) == bytes(range(12))


def test_byte_view_mmap() -> None:
    area = mmap.mmap(-1, 4096)
    view = byte_view(area, writable=True)
    view[:3] = b"xyz"
    assert area[:3] == b"xyz"
    view.release()
    area.close()


@pytest.mark.parametrize("obj", [None, 42, 1.5, "text", [1, 2], object()])
def test_byte_view_rejects_non_buffers(obj: object) -> None:
    with pytest.raises(imago.InvalidBufferError) as info:
        byte_view(obj, writable=False)
    assert isinstance(info.value, TypeError)
    assert type(obj).__name__ in str(info.value)


@pytest.mark.parametrize("writable", [True, False])
def test_byte_view_rejects_non_contiguous(writable: bool) -> None:
    data = bytearray(range(16))
    with pytest.raises(imago.InvalidBufferError, match="contiguous"):
        byte_view(memoryview(data)[::2], writable=writable)
    typed = memoryview(array.array("I", range(8)))[::2]
    with pytest.raises(imago.InvalidBufferError, match="contiguous"):
        byte_view(typed, writable=writable)


def test_byte_view_empty() -> None:
    assert byte_view(bytearray(), writable=True).nbytes == 0
    assert byte_view(b"", writable=False).nbytes == 0


# --- byte_views -----------------------------------------------------------------------------


def test_byte_views_list_and_tuple() -> None:
    a, b = bytearray(b"ab"), bytearray(b"cde")
    views = byte_views([a, b], writable=True)
    assert [bytes(v) for v in views] == [b"ab", b"cde"]
    assert [bytes(v) for v in byte_views((b"x", memoryview(b"yz")), writable=False)] == [b"x", b"yz"]
    assert byte_views(iter([b"q"]), writable=False)[0] == b"q"
    assert byte_views([], writable=True) == []


@pytest.mark.parametrize("single", [b"abc", bytearray(b"abc"), memoryview(b"abc")])
def test_byte_views_rejects_single_buffer(single: object) -> None:
    with pytest.raises(imago.InvalidBufferError, match="single buffer"):
        byte_views(single, writable=False)  # type: ignore[arg-type]


def test_byte_views_rejects_single_mmap() -> None:
    area = mmap.mmap(-1, 4096)
    with pytest.raises(imago.InvalidBufferError):
        byte_views(area, writable=True)  # type: ignore[arg-type]
    area.close()


def test_byte_views_rejects_non_iterables_and_bad_members() -> None:
    with pytest.raises(imago.InvalidBufferError):
        byte_views(5, writable=False)  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidBufferError):
        byte_views(None, writable=False)  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidBufferError):
        byte_views([b"ok", 5], writable=False)
    with pytest.raises(imago.InvalidBufferError, match="read-only"):
        byte_views([bytearray(1), b"ro"], writable=True)


# --- vectors --------------------------------------------------------------------------------


def test_iovec_length() -> None:
    assert iovec_length([]) == 0
    assert iovec_length([memoryview(b"abc")]) == 3
    assert iovec_length([memoryview(b"abc"), memoryview(b""), memoryview(b"de")]) == 5


def test_slice_iovec_shares_memory() -> None:
    a, b = bytearray(b"0123"), bytearray(b"4567")
    iov = [memoryview(a), memoryview(b)]
    part = slice_iovec(iov, 2, 4)
    assert b"".join(bytes(v) for v in part) == b"2345"
    for view in part:
        view[:] = b"x" * view.nbytes
    assert a == b"01xx"
    assert b == b"xx67"


def test_slice_iovec_whole_single_view_is_same_object() -> None:
    view = memoryview(bytearray(10))
    assert slice_iovec([view], 0, 10)[0] is view
    assert slice_iovec([view], 3, 4)[0].nbytes == 4


def test_slice_iovec_empty_result() -> None:
    iov = [memoryview(b"abc"), memoryview(b"def")]
    assert iovec_length(slice_iovec(iov, 6, 0)) == 0
    assert iovec_length(slice_iovec(iov, 2, 0)) == 0


@st.composite
def split_buffers(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = draw(st.binary(min_size=0, max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, cuts


@given(split_buffers(), st.data())
def test_slice_iovec_matches_reference(split: tuple[bytes, list[int]], data: st.DataObject) -> None:
    raw, cuts = split
    bounds = [0, *cuts, len(raw)]
    backing = bytearray(raw)
    iov = [memoryview(backing)[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    assert iovec_length(iov) == len(raw)
    assert b"".join(bytes(v) for v in iov) == raw
    start = data.draw(st.integers(0, len(raw)), label="start")
    length = data.draw(st.integers(0, len(raw) - start), label="length")
    part = slice_iovec(iov, start, length)
    assert iovec_length(part) == length
    assert b"".join(bytes(v) for v in part) == raw[start : start + length]
    assert all(v.format == "B" for v in part)
    # Views into the same memory: zeroing the slice zeroes exactly that range of the backing.
    zero_fill(part)
    assert bytes(backing) == raw[:start] + bytes(length) + raw[start + length :]


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_byte_views_then_slice_all(chunks: list[bytes]) -> None:
    iov = byte_views(chunks, writable=False)
    total = sum(map(len, chunks))
    assert iovec_length(iov) == total
    assert b"".join(bytes(v) for v in slice_iovec(iov, 0, total)) == b"".join(chunks)


def test_zero_fill_large_and_multiple() -> None:
    big = bytearray(b"\xff" * ((1 << 20) * 2 + 123))
    small = bytearray(b"\xaa" * 7)
    zero_fill([memoryview(big), memoryview(small), memoryview(bytearray())])
    assert big == bytes(len(big))
    assert small == bytes(7)


# --- aligned buffers ------------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [1, 2, 512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("size", [0, 1, 512, 4096, 100_000])
def test_aligned_buffer(alignment: int, size: int) -> None:
    view = aligned_buffer(size, alignment)
    assert view.nbytes == size
    assert not view.readonly
    assert view.format == "B"
    if size:
        assert buffer_address(view) % alignment == 0
        assert bytes(view) == bytes(size)
        view[-1] = 7
        assert view[-1] == 7


def test_aligned_buffer_default_page_alignment() -> None:
    view = aligned_buffer(100)
    assert buffer_address(view) % mmap.PAGESIZE == 0
    assert view.nbytes == 100


@pytest.mark.parametrize("alignment", [0, -4096, 3, 1000, 4097])
def test_aligned_buffer_bad_alignment(alignment: int) -> None:
    with pytest.raises(ValueError, match="alignment"):
        aligned_buffer(4096, alignment)


def test_aligned_buffer_negative_size() -> None:
    with pytest.raises(ValueError, match="negative"):
        aligned_buffer(-1)


def test_buffer_address() -> None:
    data = bytearray(64)
    view = memoryview(data)
    expected = ctypes.addressof((ctypes.c_char * 64).from_buffer(data))
    assert buffer_address(view) == expected
    assert buffer_address(view[10:]) == expected + 10
    assert buffer_address(memoryview(bytearray())) == 0
    with pytest.raises(imago.InvalidBufferError):
        buffer_address(memoryview(b"read-only"))


def test_is_aligned() -> None:
    buf = aligned_buffer(8192, 4096)
    assert is_aligned([buf], 0, 4096, 512)
    assert is_aligned([buf[:512], buf[4096:4608]], 1024, 512, 512)
    assert not is_aligned([buf], 100, 1, 512)  # offset
    assert not is_aligned([buf[:100]], 0, 1, 512)  # length
    assert not is_aligned([buf[512:1024]], 0, 4096, 512)  # address
    assert is_aligned([buf[512:1024]], 0, 512, 512)
    assert is_aligned([buf[1:2]], 7, 1, 1)  # no requirement at all
    read_only = memoryview(bytes(512))
    assert not is_aligned([read_only], 0, 512, 512)  # cannot know its address: not aligned
    assert is_aligned([read_only], 0, 1, 512)
