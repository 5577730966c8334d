"""Refcount structures: the refcount table and refcount blocks of every width (1 to 64 bits).

Reading needs no refcounts; they are parsed on demand (for ``info``-style checks and, with
writing, for allocation). Blocks live in a :class:`~imago.cache.MetadataCache` so that
writes can mark them dirty and have them written back in order.
"""

from __future__ import annotations

import sys
from array import array

from imago import CorruptImageError, Storage
from imago.cache import MetadataCache

from .header import Header

__all__ = ["RefcountBlock", "Refcounts"]

REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFTABLE_RESERVED = 0x1FF
# Refcount blocks kept in memory at most.
_BLOCK_CACHE_BYTES = 4 << 20


class RefcountBlock:
    """One refcount block: ``cluster_size * 8 / refcount_bits`` packed entries.

    Sub-byte entries are packed least significant bits first; wider ones are big-endian.
    """

    __slots__ = ("bits", "data", "offset")

    def __init__(self, data: bytearray, *, offset: int, refcount_order: int) -> None:
        self.data = data
        self.offset = offset
        self.bits = 1 << refcount_order

    def __len__(self) -> int:
        return len(self.data) * 8 // self.bits

    @property
    def max_refcount(self) -> int:
        """The largest refcount an entry can hold."""
        return (1 << self.bits) - 1

    def get(self, index: int) -> int:
        """The refcount of entry *index*."""
        bits = self.bits
        if bits < 8:
            position = index * bits
            return (self.data[position >> 3] >> (position & 7)) & ((1 << bits) - 1)
        width = bits >> 3
        return int.from_bytes(self.data[index * width : (index + 1) * width], "big")

    def set(self, index: int, value: int) -> None:
        """Set the refcount of entry *index* (0 <= value <= :attr:`max_refcount`)."""
        if not 0 <= value <= self.max_refcount:
            raise ValueError(f"refcount {value} does not fit in {self.bits} bits")
        bits = self.bits
        if bits < 8:
            position = index * bits
            mask = ((1 << bits) - 1) << (position & 7)
            byte = self.data[position >> 3]
            self.data[position >> 3] = (byte & ~mask) | (value << (position & 7))
            return
        width = bits >> 3
        self.data[index * width : (index + 1) * width] = value.to_bytes(width, "big")


class Refcounts:
    """Refcount look-ups for the clusters of one image file."""

    def __init__(self, storage: Storage, header: Header) -> None:
        self._storage = storage
        self._header = header
        self._filename = storage.filename
        self._table: array[int] | None = None
        cluster_size = header.cluster_size
        # Entries per block: cluster_size * 8 / refcount_bits, a power of two.
        self._block_bits = header.cluster_bits + 3 - header.refcount_order
        self._blocks: MetadataCache[int, RefcountBlock] = MetadataCache(
            max(_BLOCK_CACHE_BYTES // cluster_size, 4), self._load_block
        )

    @property
    def blocks(self) -> MetadataCache[int, RefcountBlock]:
        """The refcount block cache (keyed by the block's file offset)."""
        return self._blocks

    async def table(self) -> array[int]:
        """The refcount table: each entry a refcount block offset (0: none), validated."""
        if self._table is None:
            header = self._header
            raw = bytearray(header.refcount_table_clusters * header.cluster_size)
            await self._storage.readv([memoryview(raw)], header.refcount_table_offset)
            entries = array("Q")
            entries.frombytes(raw)
            if sys.byteorder == "little":
                entries.byteswap()
            cluster_mask = header.cluster_size - 1
            file_size = self._storage.size
            for index, entry in enumerate(entries):
                if not entry:
                    continue
                where = header.refcount_table_offset + 8 * index
                if entry & REFTABLE_RESERVED:
                    raise CorruptImageError(
                        self._filename, where, f"refcount table entry {index} has reserved bits set"
                    )
                offset = entry & REFTABLE_OFFSET_MASK
                if offset & cluster_mask:
                    raise CorruptImageError(
                        self._filename, where, f"refcount block offset {offset:#x} is not cluster-aligned"
                    )
                if offset + header.cluster_size > file_size:
                    raise CorruptImageError(
                        self._filename, where, f"refcount block at {offset:#x} lies past the end of the file"
                    )
            self._table = entries
        return self._table

    async def _load_block(self, offset: int) -> RefcountBlock:
        raw = bytearray(self._header.cluster_size)
        await self._storage.readv([memoryview(raw)], offset)
        return RefcountBlock(raw, offset=offset, refcount_order=self._header.refcount_order)

    async def get(self, host_offset: int) -> int:
        """The refcount of the host cluster holding *host_offset* (0 where no block exists)."""
        cluster = host_offset >> self._header.cluster_bits
        table = await self.table()
        table_index = cluster >> self._block_bits
        if table_index >= len(table) or not table[table_index]:
            return 0
        block = await self._blocks.get(table[table_index] & REFTABLE_OFFSET_MASK)
        return block.get(cluster & ((1 << self._block_bits) - 1))
