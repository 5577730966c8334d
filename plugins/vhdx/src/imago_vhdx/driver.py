"""The ``vhdx`` format driver: the facade over the opened image's BAT, sector bitmaps, log replay and parent."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from imago import (
    CorruptImageError,
    DriverContractError,
    FormatAccess,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    InvalidOptionError,
    ShallowMapping,
    Storage,
)

from .bat import (
    BITMAP_PRESENT,
    BLOCK_FULLY_PRESENT,
    BLOCK_NOT_PRESENT,
    BLOCK_PARTIALLY_PRESENT,
    BLOCK_ZERO,
)
from .create import VhdxCreateBuilder
from .layout import SIGNATURE, MiB
from .opening import OpenedImage, open_image
from .writing import BlockWriter

__all__ = ["Vhdx"]

# Sector bitmap slices kept (one per partially present block looked at).
_BITMAP_CACHE = 64


class Vhdx(FormatDriver):
    """A VHDX image: ``Vhdx.builder_path("disk.vhdx").open_sync(gate)``.

    Fixed, dynamic and differencing images (the parent through the gate). A pending log is
    replayed in memory when the image is opened read-only and to disk when it is opened for
    writing. New images are made with :meth:`create_builder`
    (:class:`~imago_vhdx.create.VhdxCreateBuilder`).
    """

    name = "vhdx"
    create_builder_class = VhdxCreateBuilder

    def __init__(self, storage: Storage, image: OpenedImage) -> None:
        self._storage = storage
        self._image = image
        self._bat = image.bat
        self._geometry = image.geometry
        self._block_size = image.metadata.block_size
        self._size = image.metadata.virtual_size
        self._bitmaps: dict[int, bytes] = {}
        self._writer = (
            BlockWriter(storage, image.header, image.bat, image.geometry, image.bat_offset) if image.writable else None
        )

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Vhdx], gate: ImplicitOpenGate) -> Vhdx:
        """Open the image; a differencing image's parent goes through *gate*."""
        return await open_image(cls, builder, gate)

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Vhdx]) -> None:
        """Write a new image as *builder* (a :class:`~imago_vhdx.create.VhdxCreateBuilder`) says."""
        if not isinstance(builder, VhdxCreateBuilder):
            raise InvalidOptionError("builder", f"expected a VhdxCreateBuilder, got {type(builder).__name__}")
        await builder.write_image()

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """The file identifier's ``vhdxfile`` signature (QEMU's rule)."""
        if storage.size < len(SIGNATURE):
            return False
        head = bytearray(len(SIGNATURE))
        await storage.readv([memoryview(head)], 0)
        return bytes(head) == SIGNATURE

    # --- facts ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk size (the metadata's Virtual Disk Size)."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._image.writable

    @property
    def storage(self) -> Storage:
        """The image's file."""
        return self._storage

    @property
    def backing(self) -> FormatAccess | None:
        """The parent of a differencing image, if it was opened."""
        return self._image.backing

    @property
    def block_size(self) -> int:
        """The payload block size."""
        return self._block_size

    @property
    def data_write_guid(self) -> uuid.UUID:
        """The current header's DataWriteGuid (what a child's ``parent_linkage`` names)."""
        if self._writer is not None:
            return self._writer.header.data_write_guid
        return self._image.header.data_write_guid

    @property
    def log_replayed_in_memory(self) -> bool:
        """Whether a pending log is shown over the file (a read-only open of an image with a log)."""
        return self._image.replay is not None

    def info(self) -> dict[str, Any]:
        """Facts under ``qemu-img info --output=json``'s names."""
        info: dict[str, Any] = {
            "format": "vhdx",
            "virtual-size": self._size,
            "cluster-size": self._block_size,
        }
        if self._image.parent_name is not None:
            info["backing-filename"] = self._image.parent_name
            info["backing-filename-format"] = "vhdx"
        return info

    # --- mappings ---------------------------------------------------------------------------------

    def _entry(self, block: int) -> tuple[int, int]:
        entry = self._bat[self._geometry.payload_index(block)]
        return entry & 7, (entry >> 20) * MiB

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """What the BAT (and for partially present blocks the sector bitmap) says lies at *offset*."""
        if offset >= self._size:
            return ShallowMapping.Eof(), max_length
        block_size = self._block_size
        end = min(self._size, offset + max(max_length, 1))
        block, within = divmod(offset, block_size)
        state, host = self._entry(block)
        length = min(end, (block + 1) * block_size) - offset
        if state == BLOCK_PARTIALLY_PRESENT:
            present, length = await self._sector_run(block, within, length)
            state = BLOCK_FULLY_PRESENT if present else BLOCK_NOT_PRESENT
        else:
            # Following blocks of the same kind (and contiguous on disk) join the run.
            position = (block + 1) * block_size
            while position < end:
                next_state, next_host = self._entry(position // block_size)
                if next_state != state or (
                    state == BLOCK_FULLY_PRESENT and next_host != host + position - offset + within
                ):
                    break
                length = min(end, position + block_size) - offset
                position += block_size
        if state == BLOCK_FULLY_PRESENT:
            replay = self._image.replay
            host_offset = host + within
            if replay is not None and replay.touches(host_offset, length):
                return ShallowMapping.Special(offset), length
            return ShallowMapping.Raw(self._storage, host_offset, self.writable), length
        if state == BLOCK_ZERO:
            return ShallowMapping.Zero(True), length
        backing = self._image.backing
        if state == BLOCK_NOT_PRESENT and backing is not None:
            return ShallowMapping.Indirect(backing, offset), length
        return ShallowMapping.Zero(False), length

    async def _sector_run(self, block: int, within: int, length: int) -> tuple[bool, int]:
        """Whether the sector at *within* of *block* is present here, and for how many bytes that holds."""
        bits = await self._bitmap(block)
        sector_size = self._geometry.sector_size
        first = within // sector_size
        last = (within + length - 1) // sector_size
        present = bool(bits[first >> 3] >> (first & 7) & 1)
        sector = first + 1
        while sector <= last and bool(bits[sector >> 3] >> (sector & 7) & 1) == present:
            sector += 1
        return present, min(length, sector * sector_size - within)

    async def _bitmap(self, block: int) -> bytes:
        """The bits of *block*'s sectors, from its chunk's sector bitmap block."""
        bits = self._bitmaps.get(block)
        if bits is not None:
            return bits
        geometry = self._geometry
        entry = self._bat[geometry.bitmap_index(block)]
        if entry & 7 != BITMAP_PRESENT:
            raise CorruptImageError(
                self._storage.filename,
                None,
                f"block {block} is partially present but its chunk has no sector bitmap block",
            )
        nbytes = geometry.block_size // geometry.sector_size // 8
        at = (entry >> 20) * MiB + (block % geometry.chunk_ratio) * nbytes
        buf = bytearray(nbytes)
        await self._read_file(buf, at)
        if len(self._bitmaps) >= _BITMAP_CACHE:
            self._bitmaps.pop(next(iter(self._bitmaps)))
        bits = self._bitmaps[block] = bytes(buf)
        return bits

    async def _read_file(self, buf: bytearray | memoryview, at: int) -> None:
        """Read the file's bytes at *at* as the (replayed) log makes them; zeroes past its end."""
        view = memoryview(buf)
        present = max(0, min(len(view), self._storage.size - at))
        if present:
            await self._storage.readv([view[:present]], at)
        if present < len(view):
            view[present:] = bytes(len(view) - present)
        if self._image.replay is not None:
            self._image.replay.patch(view, at)

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read present data whose file bytes the log (replayed in memory) changes."""
        position = offset
        for buf in bufs:
            done = 0
            while done < buf.nbytes:
                block, within = divmod(position, self._block_size)
                state, host = self._entry(block)
                if state not in (BLOCK_FULLY_PRESENT, BLOCK_PARTIALLY_PRESENT):
                    raise DriverContractError("vhdx", "no present data at this offset", position)
                take = min(buf.nbytes - done, self._block_size - within)
                await self._read_file(buf[done : done + take], host + within)
                done += take
                position += take

    # --- writing ----------------------------------------------------------------------------------

    def _writing(self) -> BlockWriter:
        if self._writer is None:
            raise DriverContractError("vhdx", "a change to an image opened read-only", 0)
        return self._writer

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Present blocks in place; any other block gets a new one at the file's end (it read as zeroes)."""
        writer = self._writing()
        block, within = divmod(offset, self._block_size)
        length = min(length, self._block_size - within, self._size - offset)
        state, host = self._entry(block)
        if state != BLOCK_FULLY_PRESENT:
            host = await writer.allocate(block)
        return ShallowMapping.Raw(self._storage, host + within, True), length

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Whole blocks set to the ZERO state (one log entry); inside blocks reading as zeroes: nothing to do."""
        writer = self._writing()
        block_size = self._block_size
        end = min(offset + length, self._size)
        first = -(-offset // block_size)
        last = end // block_size if end < self._size else -(-end // block_size)
        if last > first and not self._image.metadata.leave_blocks_allocated:
            # (A fixed image, LeaveBlocksAllocated, keeps its blocks: the engine writes its zeroes.)
            await writer.set_zero(first, last)
            start, stop = first * block_size, min(last * block_size, self._size)
            return start, stop - start
        if all(self._entry(b)[0] != BLOCK_FULLY_PRESENT for b in range(offset // block_size, -(-end // block_size))):
            return offset, end - offset
        return offset, 0

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """As :meth:`ensure_zero_mapping` (the space of zeroed blocks is not reused)."""
        return await self.ensure_zero_mapping(offset, length)

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Whole blocks set to the ZERO state."""
        return await self.ensure_zero_mapping(offset, length)

    async def close(self) -> None:
        """Empty the log of a written image (its changes are all in place), then close."""
        if self._writer is not None:
            await self._writer.finish()
        await super().close()
