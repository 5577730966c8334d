"""Probed disks keep their format: writes that would make a probed disk look like another format.

A raw disk holds whatever its guest writes, another format's header included. Opened again with
its format probed, the disk would then be read as that format, and the header could name host
files (a backing file) or change what the disk shows. QEMU refuses such writes to the first
sector of a probed raw disk; imago does the same, for any format driver that probing chooses as
its fallback: a write, zeroing or discard that touches the first :data:`PROBE_BYTES` bytes is
refused when, afterwards, those bytes would probe as another installed format. Naming the format
(``imago.open(path, "raw")``) lifts the rule, as ``format=raw`` does for QEMU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ..io_buffers import slice_iovec
from ..storage import Storage, StorageOpenOptions

if TYPE_CHECKING:
    from .access import FormatAccess

__all__ = ["PROBE_BYTES", "ProbeGuard"]

#: The bytes of a probed disk whose content decides its format (QEMU's first sector).
PROBE_BYTES = 512


class ProbeGuard:
    """Refuses the writes that would make the probed disk of an access probe as another format."""

    __slots__ = ("_chosen",)

    def __init__(self, chosen: str) -> None:
        self._chosen = chosen  # the name of the format probing chose

    async def check(self, access: FormatAccess, offset: int, length: int, iov: Sequence[memoryview] | None) -> None:
        """Refuse writing *iov* (``None``: zeroes) to ``[offset, offset + length)`` if the disk's format would change.

        Raises :class:`~imago.InvalidRequestError` naming the format the first sector would
        then have; nothing is written.
        """
        if offset >= PROBE_BYTES or length <= 0:
            return
        head = bytearray(min(PROBE_BYTES, access.size))
        await access.read(head, 0)
        end = min(offset + length, len(head))
        if iov is None:
            head[offset:end] = bytes(end - offset)
        else:
            pos = offset
            for view in slice_iovec(iov, 0, end - offset):
                head[pos : pos + view.nbytes] = view
                pos += view.nbytes
        from ..plugin.manager import format_drivers  # only writes to the first sector pay for it

        sector = _Sector(bytes(head))
        for cls in sorted(format_drivers().values(), key=lambda cls: cls.name):
            if cls.probe_fallback or cls.name == self._chosen:
                continue
            if await cls.probe(sector):
                raise InvalidRequestError(
                    f"{access.driver.storage.filename or 'the disk'}: writing {length} bytes at offset {offset}"
                    f" would make this disk, whose format was probed as {self._chosen!r}, look like a"
                    f" {cls.name!r} image; open it with its format named ({self._chosen!r}) to write that"
                )


class _Sector(Storage):
    """The first sector of a disk as it would be after a write: what the probes look at."""

    name = "probe-sector"

    def __init__(self, data: bytes) -> None:
        self._data = data

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> _Sector:
        raise NotImplementedError("only made by ProbeGuard")

    @property
    def size(self) -> int:
        return len(self._data)

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        for buf in bufs:
            chunk = self._data[offset : offset + buf.nbytes]
            buf[: len(chunk)] = chunk
            buf[len(chunk) :] = bytes(buf.nbytes - len(chunk))
            offset += buf.nbytes

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        raise NotImplementedError("read-only")

    async def resize(self, new_size: int, prealloc: Any = None) -> None:
        raise NotImplementedError("read-only")
