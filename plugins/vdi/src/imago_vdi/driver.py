"""The ``vdi`` format driver: the header, the block map held whole, mappings, writes, the check."""

from __future__ import annotations

from typing import Any

from imago import (
    Capability,
    CheckResult,
    CorruptImageError,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    InvalidOptionError,
    MemoryBudget,
    ReadOnlyError,
    RepairMode,
    ShallowMapping,
    ShallowRaw,
    Storage,
    UnsupportedFeatureError,
)

from .allocation import BlockAllocator
from .blockmap import DISCARDED, BlockMap
from .check import check_image
from .create import VdiCreateBuilder
from .header import HEADER_SIZE, SIGNATURE, VdiHeader, parse_header

__all__ = ["Vdi"]


async def _read(storage: Storage, offset: int, length: int) -> bytes:
    buf = bytearray(max(0, min(length, storage.size - offset)))
    if buf:
        await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


class Vdi(FormatDriver):
    """A VirtualBox VDI image (version 1.1, static or dynamic, 1 MiB blocks).

    ``Vdi.builder_path("disk.vdi").open_sync(gate)``; new images through :meth:`create_builder`
    (:class:`~imago_vdi.create.VdiCreateBuilder`, option ``static``). Unmapped and discarded
    blocks read as zeroes; writes into unmapped blocks of a dynamic image allocate blocks at
    the end of the file. Images whose block map is damaged (entries past the block count or
    the file, a block named twice) open only with ``for_check`` and are then read-only.
    """

    name = "vdi"
    create_builder_class = VdiCreateBuilder
    capabilities = frozenset({Capability.CHECK})

    def __init__(
        self, storage: Storage, header: VdiHeader, block_map: BlockMap, *, writable: bool, budget: MemoryBudget
    ) -> None:
        self._storage = storage
        self._budget: MemoryBudget | None = budget
        self._header = header
        self._map = block_map
        self._writable = writable
        self._block = header.block_size
        self._allocator = BlockAllocator(header, block_map, storage) if writable else None

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Vdi], gate: ImplicitOpenGate) -> Vdi:
        """Open the image: header and block map checked (see :mod:`imago_vdi.header`, :mod:`imago_vdi.blockmap`)."""
        storage = await builder.open_storage(gate)
        try:
            filename = storage.filename
            file_size = storage.size
            header = parse_header(await _read(storage, 0, HEADER_SIZE), file_size, filename)
            map_bytes = 4 * header.blocks_in_image
            builder.budget.hold(filename, "its block map", map_bytes)
            try:
                block_map = BlockMap(header, await _read(storage, header.offset_bmap, map_bytes), file_size, filename)
                damaged: CorruptImageError | None = None
                try:
                    block_map.validate()
                except CorruptImageError as error:
                    if not builder.checking:
                        raise
                    damaged = error
                if damaged is not None and builder.writable:
                    raise damaged
            except BaseException:
                builder.budget.release(map_bytes)
                raise
        except BaseException:
            if builder.path is not None:
                await storage.close()
            raise
        return cls(storage, header, block_map, writable=builder.writable, budget=builder.budget)

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Vdi]) -> None:
        """Write a new image as *builder* (a :class:`~imago_vdi.create.VdiCreateBuilder`) says."""
        if not isinstance(builder, VdiCreateBuilder):
            raise InvalidOptionError("builder", f"expected a VdiCreateBuilder, got {type(builder).__name__}")
        await builder.write_image()

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """The VDI signature after the 64-byte text (QEMU's rule), in a file holding a whole header."""
        if storage.size < HEADER_SIZE:
            return False
        head = await _read(storage, 0x40, 4)
        return int.from_bytes(head, "little") == SIGNATURE

    # --- facts ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The disk size (the recorded size rounded up to whole sectors, as QEMU reads it)."""
        return self._header.disk_size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def storage(self) -> Storage:
        """The image's file."""
        return self._storage

    @property
    def header(self) -> VdiHeader:
        """The header as read (``blocks_allocated`` kept up to date by flushes)."""
        return self._header

    @property
    def static(self) -> bool:
        """Whether the image is static (every block preallocated)."""
        return self._header.static

    def holes_read_as_data(self, storage: Storage) -> bool:
        """Static images: holes in the file show as zero data, as ``qemu-img map`` shows them."""
        return self._header.static and storage is self._storage

    def info(self) -> dict[str, Any]:
        """Facts under ``qemu-img info --output=json``'s names (QEMU reports no format-specific data for VDI)."""
        return {"format": "vdi", "virtual-size": self.size, "cluster-size": self._block, "dirty-flag": False}

    # --- mappings ---------------------------------------------------------------------------------

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Runs of blocks contiguous in the file, or of blocks reading as zeroes."""
        size = self.size
        if offset >= size:
            return ShallowMapping.Eof(), max_length
        block_size = self._block
        entries = self._map.entries
        block = offset // block_size
        within = offset - block * block_size
        end = min(size, offset + max(max_length, 1))
        last_block = (end - 1) // block_size
        host_block = self._map.host_block(block)
        next_block = block + 1
        if host_block is None:
            # Unmapped and discarded blocks alike: zeroes, and "present" as qemu-img map shows them.
            while next_block <= last_block and entries[next_block] >= DISCARDED:
                next_block += 1
            length = min(end, next_block * block_size) - offset
            return ShallowMapping.Zero(True), length
        while next_block <= last_block and entries[next_block] == host_block + next_block - block:
            self._map.host_block(next_block)  # (raises for an entry past the file)
            next_block += 1
        length = min(end, next_block * block_size) - offset
        host = self._header.offset_data + host_block * block_size + within
        return ShallowMapping.Raw(self._storage, host, self._writable), length

    # --- writing ----------------------------------------------------------------------------------

    def _writer(self) -> BlockAllocator:
        if self._allocator is None:
            raise ReadOnlyError(self._storage.filename or "vdi image")
        return self._allocator

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Blocks the map names: in place; unmapped ones: new blocks at the end of the file."""
        allocator = self._writer()
        block_size = self._block
        entries = self._map.entries
        block = offset // block_size
        if entries[block] >= DISCARDED:
            end = min(offset + length, self.size)
            last = (end - 1) // block_size
            count = 1
            while block + count <= last and entries[block + count] >= DISCARDED:
                count += 1
            # Whole blocks overwritten need no zeroing (the last one may end the disk).
            whole = overwrite and offset % block_size == 0 and (end % block_size == 0 or end == self.size)
            await allocator.allocate(block, count, whole)
            self.mappings_changed()
        mapping, mapped = await self.get_mapping(offset, length)
        assert isinstance(mapping, ShallowRaw)
        return ShallowRaw(mapping.storage, mapping.offset, True), min(mapped, length)

    def data_write_failed(self, offset: int, length: int) -> None:
        """Take back the blocks given to a write that failed (where nothing else used them)."""
        if self._allocator is not None and length > 0:
            block_size = self._block
            self._allocator.write_failed(offset // block_size, (offset + length - 1) // block_size)
            self.mappings_changed()

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Blocks reading as zero stay so; mapped blocks get zeroes written in place (no block is freed).

        Blocks are never unmapped: QEMU gives new blocks the index ``blocks_allocated`` says,
        which would then name a block still in use.
        """
        self._writer()
        position = offset
        end = offset + length
        while position < end:
            mapping, mapped = await self.get_mapping(position, end - position)
            mapped = min(mapped, end - position)
            if isinstance(mapping, ShallowRaw):
                await self._storage.write_zeroes(mapping.offset, mapped)
            position += mapped
        return offset, length

    async def flush(self) -> None:
        """New blocks' data, then the block map and header, then the file flushed."""
        if self._allocator is not None:
            await self._allocator.flush()
        await self._storage.flush()

    async def close(self) -> None:
        """Flush (if writable) and close the file."""
        try:
            if self._allocator is not None:
                await self._allocator.flush()
        finally:
            if self._budget is not None:
                self._budget.release(4 * self._header.blocks_in_image)
                self._budget = None
            await self._storage.close()

    # --- check ------------------------------------------------------------------------------------

    async def check(self, fix: RepairMode | None = None) -> CheckResult:
        """What ``qemu-img check`` reports for VDI; nothing is repaired (QEMU refuses ``-r`` for VDI).

        Map entries past the block count, image blocks named twice, a wrong allocated-block count.
        """
        if fix is not None:
            raise UnsupportedFeatureError("repairing vdi images (qemu-img check -r)", self._storage.filename)
        if self._allocator is not None:
            await self._allocator.flush()
        return check_image(self._header, self._map, self._storage.filename)
