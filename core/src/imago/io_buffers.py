"""Buffers for I/O: normalisation, scatter-gather vectors and page-aligned allocation.

Callers may pass any object with the buffer protocol (bytearray, memoryview, mmap, array,
bytes for writes). The engine turns them into flat byte views once (:func:`byte_view`), then
cuts the list of views along mapping boundaries (:func:`slice_iovec`) without copying.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import InvalidBufferError

__all__ = [
    "IoVector",
    "aligned_buffer",
    "buffer_address",
    "byte_view",
    "byte_views",
    "iovec_length",
    "is_aligned",
    "slice_iovec",
    "zero_fill",
]

#: A list of flat, byte-formatted memoryviews.
IoVector = list[memoryview]

_ZEROES = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROES)
# From this size on, memset beats slice assignment (whose set-up is cheaper for small views).
_MEMSET_THRESHOLD = 64 << 10


def byte_view(buf: Any, *, writable: bool) -> memoryview:
    """A flat ``'B'`` memoryview of *buf*; ``writable`` demands a buffer that can be filled."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise InvalidBufferError(
            f"expected an object with the buffer protocol (bytearray, memoryview, ...), got {type(buf).__name__}"
        ) from None
    if writable and view.readonly:
        raise InvalidBufferError(f"cannot read into a read-only buffer ({type(buf).__name__})")
    if not view.c_contiguous:
        raise InvalidBufferError("buffers must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def byte_views(bufs: Iterable[Any], *, writable: bool) -> IoVector:
    """:func:`byte_view` for each buffer of a vector; rejects a bare buffer passed as a vector."""
    if isinstance(bufs, (bytes, bytearray, memoryview, mmap.mmap)):
        raise InvalidBufferError("expected a sequence of buffers, got a single buffer")
    try:
        return [byte_view(b, writable=writable) for b in bufs]
    except TypeError as error:
        if isinstance(error, InvalidBufferError):
            raise
        raise InvalidBufferError(f"expected a sequence of buffers, got {type(bufs).__name__}") from None


def iovec_length(iov: Sequence[memoryview]) -> int:
    """Total number of bytes in a vector of byte views."""
    if len(iov) == 1:
        return iov[0].nbytes
    return sum(v.nbytes for v in iov)


def slice_iovec(iov: Sequence[memoryview], start: int, length: int) -> IoVector:
    """The part ``[start, start + length)`` of a vector, as views into the same memory."""
    if len(iov) == 1:
        view = iov[0]
        if start == 0 and length == view.nbytes:
            return [view]
        return [view[start : start + length]]
    out: IoVector = []
    end = start + length
    pos = 0
    for view in iov:
        size = view.nbytes
        if pos + size > start and pos < end:
            lo = max(start - pos, 0)
            hi = min(end - pos, size)
            out.append(view if lo == 0 and hi == size else view[lo:hi])
        pos += size
        if pos >= end:
            break
    return out


def zero_fill(iov: Iterable[memoryview]) -> None:
    """Fill every byte of the vector with zero."""
    for view in iov:
        size = view.nbytes
        if size >= _MEMSET_THRESHOLD and not view.readonly:
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(view)), 0, size)
            continue
        pos = 0
        while pos < size:
            chunk = min(size - pos, len(_ZEROES))
            view[pos : pos + chunk] = _ZERO_VIEW[:chunk]
            pos += chunk


def aligned_buffer(size: int, alignment: int = mmap.PAGESIZE) -> memoryview:
    """A zeroed, writable buffer of *size* bytes whose address is a multiple of *alignment*.

    Anonymous mappings are page-aligned; larger alignments are reached by over-allocating.
    """
    if size < 0:
        raise ValueError(f"buffer size must not be negative, got {size}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    extra = alignment if alignment > mmap.PAGESIZE else 0
    area = mmap.mmap(-1, max(size + extra, 1))
    view = memoryview(area)
    skip = (-buffer_address(view)) % alignment if extra else 0
    return view[skip : skip + size]


def buffer_address(view: memoryview) -> int:
    """Address of the first byte of a writable buffer (0 for an empty one)."""
    if view.nbytes == 0:
        return 0
    if view.readonly:
        raise InvalidBufferError("cannot take the address of a read-only buffer")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def is_aligned(iov: Sequence[memoryview], offset: int, mem_align: int, req_align: int) -> bool:
    """Whether a request meets direct-I/O alignment: offset, every length and every address."""
    if offset % req_align:
        return False
    for view in iov:
        if view.nbytes % req_align:
            return False
        if mem_align > 1 and (view.readonly or buffer_address(view) % mem_align):
            return False
    return True
