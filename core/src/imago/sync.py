"""SyncFormatAccess: the synchronous API, without an event loop.

Each call drives the asynchronous engine by hand (:func:`imago.aio.run_sync`), so it costs
no event-loop round trip and works both outside and inside a running event loop (it blocks
the loop's thread while it runs, like any synchronous I/O). Reads that fall inside a mapping
the engine already resolved go straight to the storage's inline read.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Sequence
from typing import Any

from . import aio
from .errors import ClosedError, InvalidRequestError
from .format.access import FormatAccess
from .format.driver import FormatDriver
from .format.mapping import Mapping, ShallowMapping
from .io_buffers import byte_view
from .storage import PreallocateMode

__all__ = ["ImageFile", "SyncFormatAccess"]


class SyncFormatAccess:
    """Synchronous I/O on an image: the methods of :class:`FormatAccess`, blocking.

    Takes an opened format driver or a :class:`FormatAccess`. A context manager: leaving
    it (or :meth:`close`) flushes and closes the image.
    """

    def __init__(self, image: FormatDriver | FormatAccess) -> None:
        if isinstance(image, FormatAccess):
            self._access = image
        elif isinstance(image, FormatDriver):
            self._access = FormatAccess(image)
        else:
            raise InvalidRequestError(
                f"SyncFormatAccess needs a FormatDriver or FormatAccess, got {type(image).__name__}"
            )

    @property
    def access(self) -> FormatAccess:
        """The asynchronous access underneath."""
        return self._access

    @property
    def driver(self) -> FormatDriver:
        """The format driver underneath."""
        return self._access.driver

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self._access.size

    @property
    def writable(self) -> bool:
        """Whether the image is open for writing."""
        return self._access.writable

    @property
    def closed(self) -> bool:
        """Whether the image has been closed."""
        return self._access.closed

    @property
    def format_name(self) -> str:
        """The format's name."""
        return self._access.format_name

    @property
    def filename(self) -> str | None:
        """The image's file name, if any."""
        return self._access.filename

    @property
    def mem_align(self) -> int:
        """See :attr:`FormatAccess.mem_align`."""
        return self._access.mem_align

    @property
    def req_align(self) -> int:
        """See :attr:`FormatAccess.req_align`."""
        return self._access.req_align

    def read(self, buf: Any, offset: int) -> None:
        """Fill *buf* with the disk's bytes at *offset*."""
        access = self._access
        cache = access._cache
        if cache.epoch == access._driver.mapping_epoch and type(offset) is int:
            view = memoryview(buf) if type(buf) is bytearray else byte_view(buf, writable=True)
            extent = cache.find(offset, view.nbytes)
            if extent is not None:
                extent.storage.readv_inline([view], offset + extent.delta)
                return
        aio.run_sync(access.read(buf, offset))

    def readv(self, bufs: Sequence[Any], offset: int) -> None:
        """Fill the buffers of *bufs* with the disk's bytes at *offset*."""
        aio.run_sync(self._access.readv(bufs, offset))

    def write(self, buf: Any, offset: int) -> None:
        """Write *buf* at *offset*."""
        aio.run_sync(self._access.write(buf, offset))

    def writev(self, bufs: Sequence[Any], offset: int) -> None:
        """Write the buffers of *bufs* at *offset*."""
        aio.run_sync(self._access.writev(bufs, offset))

    def write_compressed(self, buf: Any, offset: int) -> None:
        """See :meth:`FormatAccess.write_compressed`."""
        aio.run_sync(self._access.write_compressed(buf, offset))

    def write_zeroes(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.write_zeroes`."""
        aio.run_sync(self._access.write_zeroes(offset, length))

    def discard_to_zero(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_zero`."""
        aio.run_sync(self._access.discard_to_zero(offset, length))

    def discard_to_any(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_any`."""
        aio.run_sync(self._access.discard_to_any(offset, length))

    def discard_to_backing(self, offset: int, length: int) -> None:
        """See :meth:`FormatAccess.discard_to_backing`."""
        aio.run_sync(self._access.discard_to_backing(offset, length))

    def get_mapping(self, offset: int, max_length: int) -> tuple[Mapping, int]:
        """See :meth:`FormatAccess.get_mapping`."""
        return aio.run_sync(self._access.get_mapping(offset, max_length))

    def get_shallow_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """See :meth:`FormatAccess.get_shallow_mapping`."""
        return aio.run_sync(self._access.get_shallow_mapping(offset, max_length))

    def flush(self) -> None:
        """See :meth:`FormatAccess.flush`."""
        aio.run_sync(self._access.flush())

    def sync(self) -> None:
        """See :meth:`FormatAccess.sync`."""
        aio.run_sync(self._access.sync())

    def resize(self, new_size: int, prealloc: PreallocateMode | str = PreallocateMode.NONE) -> None:
        """See :meth:`FormatAccess.resize`."""
        aio.run_sync(self._access.resize(new_size, prealloc))

    def close(self) -> None:
        """Flush (if writable) and close the image. Closing twice does nothing."""
        aio.run_sync(self._access.close())

    def as_file(self) -> ImageFile:
        """A seekable binary file object (:class:`io.RawIOBase`) over the disk.

        Closing the file object does not close the image. Writes cannot grow the disk.
        """
        return ImageFile(self)

    def __enter__(self) -> SyncFormatAccess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncFormatAccess {self.format_name} {self.filename!r} size={self.size}>"


class ImageFile(io.RawIOBase):
    """A seekable binary file over a disk image, for code that reads files."""

    def __init__(self, image: SyncFormatAccess) -> None:
        super().__init__()
        self._image = image
        self._position = 0

    def _live(self) -> SyncFormatAccess:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._image.closed:
            raise ClosedError("the image under this file object is closed")
        return self._image

    def readable(self) -> bool:
        """Always true."""
        self._live()
        return True

    def writable(self) -> bool:
        """Whether the image is open for writing."""
        return self._live().writable

    def seekable(self) -> bool:
        """Always true."""
        self._live()
        return True

    def readinto(self, buffer: Any) -> int:
        """Read up to ``len(buffer)`` bytes at the current position; 0 at the end of the disk."""
        image = self._live()
        view = byte_view(buffer, writable=True)
        count = max(0, min(view.nbytes, image.size - self._position))
        if count:
            image.read(view[:count], self._position)
            self._position += count
        return count

    def write(self, data: Any) -> int:
        """Write *data* at the current position; writing past the end of the disk is an error."""
        image = self._live()
        view = byte_view(data, writable=False)
        image.write(view, self._position)
        self._position += view.nbytes
        return view.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position, as :meth:`io.IOBase.seek`."""
        image = self._live()
        offset = operator.index(offset)  # TypeError for floats and strings, as real files raise
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = image.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        """The current position."""
        self._live()
        return self._position

    def truncate(self, size: int | None = None) -> int:
        """Not supported: a disk's size changes only through ``resize``."""
        raise io.UnsupportedOperation("cannot truncate a disk image file object; use resize()")

    def flush(self) -> None:
        """Flush the image's caches (nothing is buffered here)."""
        if not self.closed and not self._image.closed and self._image.writable:
            self._image.flush()
