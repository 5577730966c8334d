"""What a repair writes (``qemu-img check -r leaks|all``), and the on-disk refcounts a check reads.

:class:`DiskRefcounts` reads the refcounts as the image stores them, whatever the state of
the refcount table (a check must not trust it), and changes single refcounts for the leak and
refcount repairs. :func:`rebuild_refcount_structure` writes a whole new refcount structure
from a check's in-memory counts: refcount blocks and table go to clusters the counts show
free, and the header is switched over last (after a flush), so a crash at any point leaves
the old structure in charge and the new one leaked. :class:`MetadataGuard` refuses repair
writes onto other metadata, as QEMU's overlap check ("Preventing invalid write on metadata")
does, marking the image corrupt. The state of an open image is reloaded after a repair.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from imago import Storage

from .header import Header, header_cluster_size, parse_header
from .layout import AUTOCLEAR_BITMAPS, EXT_BITMAPS, HEADER_PROBE_BYTES, write_header_fields
from .refcount_array import RefcountArray, decode_refcount_block, encode_refcounts
from .snapshot_table import Snapshot, read_snapshot_table, snapshot_table_length
from .tables import decode_words

__all__ = [
    "REFT_OFFSET_MASK",
    "REFT_RESERVED",
    "DiskRefcounts",
    "MetadataGuard",
    "RefcountBlockError",
    "RepairWriteError",
    "bitmap_directory",
    "read_at",
    "read_header",
    "rebuild_refcount_structure",
    "write_l1_entry",
]

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Decoded refcount blocks kept at most while checking.
_BLOCK_CACHE_BYTES = 16 << 20


class RefcountBlockError(Exception):
    """A refcount cannot be read: its refcount block's offset is unaligned (QEMU: EIO)."""

    def __init__(self, offset: int, index: int) -> None:
        super().__init__(f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})")
        #: QEMU's words for it (C's ``%#x``: no prefix for 0).
        self.problem = f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})".replace(
            "index: 0x0)", "index: 0)"
        )


class RepairWriteError(Exception):
    """A repair write onto metadata was refused: ``what`` was written, ``overlap`` what it hit."""

    def __init__(self, what: str, overlap: str) -> None:
        super().__init__(f"{what}: Preventing invalid write on metadata (overlaps with {overlap})")
        self.what = what
        self.overlap = overlap
        #: What QEMU reports (its overlap check fails with EIO).
        self.strerror = "Input/output error"


async def read_at(storage: Storage, offset: int, length: int) -> bytearray:
    """*length* bytes from *offset* (past the end of the file: zeroes, as QEMU's reads)."""
    data = bytearray(length)
    if length:
        await storage.readv([memoryview(data)], offset)
    return data


def _big_endian(words: Sequence[int]) -> bytes:
    out = array("Q", words)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


async def read_header(storage: Storage) -> tuple[Header, list[Snapshot]]:
    """The header and snapshot table as they are on disk now."""
    head = await read_at(storage, 0, min(HEADER_PROBE_BYTES, storage.size))
    cluster_size = header_cluster_size(bytes(head))
    if cluster_size is not None and cluster_size > len(head):
        head += await read_at(storage, len(head), min(cluster_size, storage.size) - len(head))
    header = parse_header(bytes(head), storage.size, storage.filename)
    # (where the snapshots' L1 tables lie is for the check to report)
    return header, await read_snapshot_table(storage, header, storage.filename, check_l1=False)


def bitmap_directory(header: Header) -> tuple[int, int, int] | None:
    """``(bitmaps, directory offset, directory size)`` when the image's bitmaps are valid."""
    if not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None  # (a writer without bitmap support changed the image: ignored, as QEMU does)
    for extension in header.extensions:
        if extension.type == EXT_BITMAPS and len(extension.data) >= 24:
            count, _, size, offset = struct.unpack_from(">IIQQ", extension.data)
            return count, offset, size
    return None


class DiskRefcounts:
    """The refcounts as stored: refcount table entries taken as they are, blocks read on demand.

    A table entry whose block offset is unaligned makes its clusters unreadable
    (:class:`RefcountBlockError`); blocks past the end of the file read as zeroes. Changes
    (:meth:`set`) stay in memory until :meth:`flush`.
    """

    def __init__(
        self, storage: Storage, table: Sequence[int], *, table_offset: int, cluster_bits: int, refcount_order: int
    ) -> None:
        self.storage = storage
        #: Raw refcount table entries.
        self.table = array("Q", table)
        self.table_offset = table_offset
        self.cluster_bits = cluster_bits
        self.refcount_order = refcount_order
        self.block_bits = cluster_bits + 3 - refcount_order
        self._blocks: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty: set[int] = set()
        self._capacity = max(16, _BLOCK_CACHE_BYTES // (1 << cluster_bits))

    @classmethod
    async def load(cls, storage: Storage, header: Header) -> DiskRefcounts:
        """The refcount structure the header names."""
        raw = await read_at(
            storage, header.refcount_table_offset, header.refcount_table_clusters << header.cluster_bits
        )
        return cls(
            storage,
            decode_words(raw),
            table_offset=header.refcount_table_offset,
            cluster_bits=header.cluster_bits,
            refcount_order=header.refcount_order,
        )

    def block_offset(self, index: int) -> int:
        """The offset of refcount block *index* (0: none); unaligned ones raise."""
        if index >= len(self.table):
            return 0
        offset = self.table[index] & REFT_OFFSET_MASK
        if offset & ((1 << self.cluster_bits) - 1):
            raise RefcountBlockError(offset, index)
        return offset

    async def block(self, index: int) -> array[int] | None:
        """The refcounts block *index* holds (``None``: no block, all 0)."""
        offset = self.block_offset(index)
        if not offset:
            return None
        values = self._blocks.get(index)
        if values is not None:
            self._blocks.move_to_end(index)
            return values
        raw = await read_at(self.storage, offset, 1 << self.cluster_bits)
        values = decode_refcount_block(raw, self.refcount_order)
        self._blocks[index] = values
        while len(self._blocks) > self._capacity:
            oldest = next(iter(self._blocks))
            if oldest in self._dirty:
                await self._write(oldest)
            del self._blocks[oldest]
        return values

    async def get(self, cluster: int) -> int:
        """The stored refcount of *cluster*."""
        values = await self.block(cluster >> self.block_bits)
        return 0 if values is None else values[cluster & ((1 << self.block_bits) - 1)]

    async def set(self, cluster: int, value: int) -> None:
        """Change the stored refcount of *cluster* (its block must exist)."""
        index = cluster >> self.block_bits
        values = await self.block(index)
        if values is None:
            raise OSError(5, "Input/output error")  # (callers change existing refcounts only)
        values[cluster & ((1 << self.block_bits) - 1)] = value
        self._dirty.add(index)

    async def _write(self, index: int) -> None:
        length = 1 << self.cluster_bits
        data = encode_refcounts(self._blocks[index], self.refcount_order, length)
        await self.storage.writev([memoryview(data)], self.block_offset(index))
        self._dirty.discard(index)

    async def flush(self) -> None:
        """Write changed blocks back, then flush the file."""
        if not self._dirty:
            return
        for index in sorted(self._dirty):
            await self._write(index)
        await self.storage.flush()


class MetadataGuard:
    """QEMU's default ("cached") overlap check, for the writes a repair makes.

    Built from the structures as they are on disk; :meth:`check` raises
    :class:`RepairWriteError` when a write would land on metadata other than what *ignore*
    names.
    """

    HEADER = "qcow2_header"
    ACTIVE_L1 = "active L1 table"
    ACTIVE_L2 = "active L2 table"
    REFCOUNT_TABLE = "refcount table"
    REFCOUNT_BLOCK = "refcount block"
    SNAPSHOT_TABLE = "snapshot table"
    INACTIVE_L1 = "inactive L1 table"
    BITMAP_DIRECTORY = "bitmap directory"

    def __init__(
        self,
        storage: Storage,
        header: Header,
        snapshots: Sequence[Snapshot],
        active_l1: Sequence[int],
        refcount_table: Sequence[int],
    ) -> None:
        self.storage = storage
        self.cluster_bits = header.cluster_bits
        cluster_size = header.cluster_size
        regions: list[tuple[str, int, int]] = []
        if header.l1_size:
            regions.append((self.ACTIVE_L1, header.l1_table_offset, header.l1_size * 8))
        regions.append(
            (self.REFCOUNT_TABLE, header.refcount_table_offset, header.refcount_table_clusters * cluster_size)
        )
        if snapshots:
            length = snapshot_table_length(list(snapshots), header.snapshots_offset)
            regions.append((self.SNAPSHOT_TABLE, header.snapshots_offset, length))
        for snapshot in snapshots:
            if snapshot.l1_size:
                regions.append((self.INACTIVE_L1, snapshot.l1_table_offset, snapshot.l1_size * 8))
        regions += [
            (self.ACTIVE_L2, entry & L1E_OFFSET_MASK, cluster_size) for entry in active_l1 if entry & L1E_OFFSET_MASK
        ]
        regions += [
            (self.REFCOUNT_BLOCK, entry & REFT_OFFSET_MASK, cluster_size)
            for entry in refcount_table
            if entry & REFT_OFFSET_MASK
        ]
        bitmaps = bitmap_directory(header)
        if bitmaps is not None:
            regions.append((self.BITMAP_DIRECTORY, bitmaps[1], bitmaps[2]))
        self.regions = regions

    def overlap(self, offset: int, size: int, ignore: frozenset[str] = frozenset()) -> str | None:
        """The metadata a write of *size* bytes at *offset* would hit, if any."""
        if not size:
            return None
        cluster_size = 1 << self.cluster_bits
        if self.HEADER not in ignore and offset < cluster_size:
            return self.HEADER
        start = offset - offset % cluster_size
        end = -(-(offset + size) // cluster_size) * cluster_size
        for name, region_offset, region_size in self.regions:
            if name in ignore or not region_size:
                continue
            if region_offset < end and start < region_offset + region_size:
                return name
        return None

    async def check(self, offset: int, size: int, what: str, ignore: frozenset[str] = frozenset()) -> None:
        """Refuse a write onto metadata (the caller marks the image corrupt, as QEMU does)."""
        hit = self.overlap(offset, size, ignore)
        if hit is not None:
            raise RepairWriteError(what, hit)


async def rebuild_refcount_structure(
    storage: Storage, counts: RefcountArray, guard: MetadataGuard, *, cluster_bits: int
) -> DiskRefcounts:
    """Write a new refcount structure holding *counts* and switch the header to it.

    Blocks and table take clusters *counts* shows free (and are counted there); the old
    structure is left in place, leaked, for the following leak repair to free. Returns the
    new structure.
    """
    cluster_size = 1 << cluster_bits
    refcount_order = counts.refcount_order
    block_bits = cluster_bits + 3 - refcount_order
    block_entries = 1 << block_bits
    table: list[int] = []

    async def write_blocks(first: int, end: int) -> bool:
        # Every block holding a nonzero count in [first, end) is written (placed first if new).
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            cluster = counts.next_used(cluster)
            if cluster >= end:
                break
            index = cluster >> block_bits
            block_start = index << block_bits
            if index < len(table) and table[index]:
                block_offset = table[index]
            else:
                # Never in a block already written.
                taken, first_free = counts.allocate(1, max(first_free, block_start))
                block_offset = taken << cluster_bits
                if taken >= end:
                    end = taken + 1  # the block holding this block's count must be written too
                if len(table) <= index:
                    entries = -(-((index + 1) * 8) // cluster_size) * cluster_size // 8
                    table.extend([0] * (entries - len(table)))
                    grown = True
                table[index] = block_offset
            await guard.check(block_offset, cluster_size, "ERROR writing refblock")
            data = counts.block(index, block_bits, cluster_size)
            await storage.writev([memoryview(data)], block_offset)
            cluster = block_start + block_entries
        return grown

    await write_blocks(0, len(counts))
    while True:
        table_clusters = -(-(len(table) * 8) // cluster_size)
        table_start, _ = counts.allocate(table_clusters, 0)
        if not await write_blocks(table_start, table_start + table_clusters):
            break
    table_offset = table_start << cluster_bits
    raw = _big_endian(table)
    await guard.check(table_offset, len(raw), "ERROR writing reftable")
    await storage.writev([memoryview(raw)], table_offset)
    # Everything new is on disk before the header points to it.
    await storage.flush()
    await write_header_fields(
        storage, {"refcount_table_offset": table_offset, "refcount_table_clusters": table_clusters}
    )
    return DiskRefcounts(
        storage, table, table_offset=table_offset, cluster_bits=cluster_bits, refcount_order=refcount_order
    )


async def write_l1_entry(storage: Storage, guard: MetadataGuard, l1_offset: int, entry: int, index: int) -> None:
    """Write one entry of the active L1 table (and wait until it is on disk)."""
    where = l1_offset + 8 * index
    await guard.check(where, 8, "ERROR writing L1 entry", frozenset({MetadataGuard.ACTIVE_L1}))
    await storage.writev([memoryview(struct.pack(">Q", entry))], where)
    await storage.flush()
