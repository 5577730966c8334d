"""ImageFile: a seekable binary file object over a disk image, for code that reads files."""

from __future__ import annotations

import io
import operator
from typing import TYPE_CHECKING, Any

from .errors import ClosedError
from .io_buffers import byte_view

if TYPE_CHECKING:
    from .format.access import SyncFormatAccess

__all__ = ["ImageFile"]


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
