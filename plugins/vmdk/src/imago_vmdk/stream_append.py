"""Filling a new stream-optimized VMDK through the driver: compressed grains appended in order.

A stream-optimized extent cannot be written in place: its grains are compressed and follow one
another in increasing LBA order. :class:`StreamAppender` is what the VMDK driver delegates to
when such an image is opened for writing (``imago convert -O vmdk -o subformat=streamOptimized``
writes it through :meth:`~imago.FormatDriver.write_compressed`, as the driver's
``writes_compressed`` tells generic copiers). It only fills images that hold no grain yet (as
:func:`~imago_vmdk.stream.create_stream_image` makes them): grains go where the empty image's
grain directory was, and :meth:`StreamAppender.flush` writes the grain tables, directory, footer
and end-of-stream marker after the last grain (the next write overwrites them).

Wiring in the driver (``Vmdk``), for a stream-optimized image opened for writing::

    appender = await StreamAppender.open(storage)       # when opening writable
    writes_compressed -> True                           # property (FormatDriver's, default False)
    capabilities |= {Capability.COMPRESSED_WRITES}      # cluster_size -> appender.cluster_size
    write_compressed(data, offset) -> await appender.write_compressed(data, offset)
        # call it before any other await: its place in the stream is taken when it starts
    discard_to_zero / ensure_zero_mapping(offset, n) -> appender.zero(offset, n); return (offset, n)
    flush() / close() -> await appender.flush()         # then the storage's flush / close
    get_mapping / reads -> UnsupportedFeatureError or the reader after flush (reopen)

Writes may overlap (the copier starts them in disk order and lets one run alongside the next):
each reserves its place when it starts, compresses on all cores, then appends after the
writes that started before it.
"""

from __future__ import annotations

import asyncio
import struct

from imago import CorruptImageError, InvalidRequestError, Storage, UnsupportedFeatureError, runtime

from .header import parse_kdmv
from .stream_format import SECTOR, StreamEncoder, compress_grain

__all__ = ["StreamAppender"]

_FOOTER_BYTES = 3 * SECTOR


class StreamAppender:
    """Appends compressed grains to an empty stream-optimized image; :meth:`open` makes one."""

    def __init__(self, storage: Storage, encoder: StreamEncoder) -> None:
        self.storage = storage
        self._encoder = encoder
        # Guest bytes below this were written or skipped by a write already started.
        self._reserved = 0
        self._last: asyncio.Event | None = None
        self._dirty = False
        # Set when an append failed: the tables would name grains that were never written.
        self._failed = False

    @classmethod
    async def open(cls, storage: Storage) -> StreamAppender:
        """An appender for the stream-optimized image in *storage*, which must hold no grain yet.

        Raises :class:`~imago.UnsupportedFeatureError` when the image already holds data (it
        cannot be rewritten in place) and :class:`~imago.CorruptImageError` when it is not a
        stream-optimized image.
        """
        name = storage.filename
        size = storage.size
        head = bytearray(SECTOR)
        await storage.readv([memoryview(head)], 0)
        footer = bytearray(_FOOTER_BYTES)
        if size >= _FOOTER_BYTES + SECTOR:
            await storage.readv([memoryview(footer)], size - _FOOTER_BYTES)
        try:
            layout = parse_kdmv(bytes(head), bytes(footer), size, name)
        except LookupError:  # pragma: no cover - the footer is always passed
            raise CorruptImageError(name, 0, "the footer is missing") from None
        if not (layout.compressed and layout.has_markers) or layout.version != 3:
            raise CorruptImageError(name, 0, "not a stream-optimized extent (version 3, compressed, with markers)")
        directory = bytearray(layout.gd_entries * 4)
        if directory:
            await storage.readv([memoryview(directory)], layout.gd_offset)
        if any(struct.unpack(f"<{layout.gd_entries}I", directory)):
            raise UnsupportedFeatureError("writing to a stream-optimized VMDK that already holds data", name)
        encoder = StreamEncoder.after_head(
            layout.capacity, layout.grain_size, layout.descriptor_size // SECTOR, layout.overhead // SECTOR
        )
        return cls(storage, encoder)

    @property
    def cluster_size(self) -> int:
        """The grain size: compressed writes are whole grains."""
        return self._encoder.grain_size

    def _reserve(self, offset: int, length: int) -> None:
        grain = self._encoder.grain_size
        size = self._encoder.size
        if offset % grain or offset < 0 or offset + length > size or (length % grain and offset + length != size):
            raise InvalidRequestError(
                f"{self.storage.filename}: compressed writes must be whole grains of {grain} bytes inside the disk "
                f"({length} bytes at {offset})"
            )
        if offset < self._reserved:
            raise UnsupportedFeatureError(
                f"writing at {offset} after {self._reserved} in a stream-optimized VMDK "
                "(grains go in increasing order)",
                self.storage.filename,
            )
        self._reserved = offset + length

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Append the grains of *data* (guest *offset*, grain-aligned; a short last grain at the disk's end).

        Writes must come in increasing offset order; all-zero grains are skipped (they read as zeros).
        """
        self._check_intact()
        self._reserve(offset, len(data))
        previous, done = self._last, asyncio.Event()
        self._last = done
        try:
            grain = self._encoder.grain_size
            first = offset // grain
            zero = bytes(grain)
            pieces = []
            for n, at in enumerate(range(0, len(data), grain)):
                piece = data[at : at + grain]
                if len(piece) < grain:
                    piece = memoryview(bytes(piece) + bytes(grain - len(piece)))
                if piece != zero:
                    pieces.append((first + n, piece))
            packed = await runtime.run_parallel(compress_grain, [piece for _, piece in pieces])
            if previous is not None:
                await previous.wait()
            self._check_intact()
            if packed:
                position = self._encoder.position
                grains = zip(pieces, packed, strict=True)
                out = b"".join(self._encoder.grain(index, blob) for (index, _), blob in grains)
                try:
                    await self.storage.writev([memoryview(out)], position)
                except BaseException:
                    self._failed = True
                    raise
                self._dirty = True
        finally:
            done.set()

    def _check_intact(self) -> None:
        if self._failed:
            raise UnsupportedFeatureError(
                "writing to a stream-optimized VMDK after an append failed (its tables would be wrong)",
                self.storage.filename,
            )

    def zero(self, offset: int, length: int) -> None:
        """Accept a request to zero a range no write has reached yet (it reads as zeros); refuse others."""
        if offset < self._reserved and length:
            raise UnsupportedFeatureError(
                f"zeroing {length} bytes at {offset} in a stream-optimized VMDK after data was written there",
                self.storage.filename,
            )

    async def flush(self) -> None:
        """Write the tables, directory, footer and end-of-stream marker after the grains written so far."""
        if self._last is not None:
            await self._last.wait()
        if not self._dirty:
            return
        self._check_intact()
        state = self._encoder.snapshot()
        position = self._encoder.position
        trailer = self._encoder.trailer()
        self._encoder.restore(state)
        await self.storage.writev([memoryview(trailer)], position)
        if self.storage.size != position + len(trailer):
            await self.storage.resize(position + len(trailer))
        await self.storage.flush()
        self._dirty = False
