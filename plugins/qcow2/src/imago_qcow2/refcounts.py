"""Refcount structures: the refcount table and refcount blocks of every width (1 to 64 bits).

Reading needs no refcounts; they are parsed on demand (for ``info``-style checks and, with
writing, for allocation). Blocks live in a :class:`~imago.MetadataCache` so that writes can
mark them dirty and have them written back in order. Allocation (of single clusters, and of
contiguous clusters for tables) and applying batches of refcount changes live here too.

With a :class:`~imago_qcow2.overlap.MetadataGuard`, every refcount block and table write is
checked against the other metadata first, clusters are handed out only when they hold no
metadata, and no metadata cluster's refcount drops to zero.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Awaitable, Callable

from imago import AllocationError, CorruptImageError, MemoryBudget, MetadataCache, Storage

from .header import Header
from .overlap import Metadata, MetadataGuard

__all__ = ["REFTABLE_OFFSET_MASK", "RefcountBlock", "Refcounts"]

REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFTABLE_RESERVED = 0x1FF
# What one cached refcount block costs beyond its data (the objects around it).
_BLOCK_OVERHEAD = 200
# Array type codes of the byte-multiple refcount widths (a batch of them is decoded in C).
_WORDS = {array(code).itemsize * 8: code for code in ("L", "Q", "I", "H", "B")}


class RefcountBlock:
    """One refcount block: ``cluster_size * 8 / refcount_bits`` packed entries.

    Sub-byte entries are packed least significant bits first; wider ones are big-endian.
    """

    __slots__ = ("__weakref__", "bits", "data", "offset")

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

    def values(self, index: int, count: int) -> list[int]:
        """The refcounts of the *count* entries from *index*."""
        bits = self.bits
        if bits < 8 or bits not in _WORDS:
            return [self.get(position) for position in range(index, index + count)]
        width = bits >> 3
        words = array(_WORDS[bits])
        words.frombytes(self.data[index * width : (index + count) * width])
        if bits > 8 and sys.byteorder == "little":
            words.byteswap()
        return words.tolist()

    def store(self, index: int, values: list[int]) -> None:
        """Set the refcounts of ``len(values)`` entries from *index* (each within :attr:`max_refcount`)."""
        bits = self.bits
        if bits < 8 or bits not in _WORDS:
            for position, value in enumerate(values, index):
                self.set(position, value)
            return
        width = bits >> 3
        words = array(_WORDS[bits], values)
        if bits > 8 and sys.byteorder == "little":
            words.byteswap()
        self.data[index * width : (index + len(values)) * width] = words.tobytes()

    def free_run(self, index: int, limit: int) -> int:
        """How many entries from *index* (at most *limit*) have refcount 0, in a row."""
        bits = self.bits
        if bits < 8:
            run = 0
            while run < limit and not self.get(index + run):
                run += 1
            return run
        width = bits >> 3
        segment = self.data[index * width : (index + limit) * width]
        return (len(segment) - len(segment.lstrip(b"\0"))) // width

    def next_free(self, index: int, end: int) -> int:
        """The first entry from *index* (before *end*) with refcount 0; *end* if none."""
        bits = self.bits
        if bits < 8 or bits not in _WORDS:
            while index < end and self.get(index):
                index += 1
            return index
        width = bits >> 3
        words = array(_WORDS[bits])  # zero reads as zero in either byte order: no byteswap
        words.frombytes(self.data[index * width : end * width])
        try:
            return index + words.index(0)
        except ValueError:
            return end


class Refcounts:
    """Refcount look-ups for the clusters of one image file."""

    def __init__(
        self,
        storage: Storage,
        header: Header,
        *,
        move_table: Callable[[int, int], Awaitable[None]] | None = None,
        guard: MetadataGuard | None = None,
        after_free: Callable[[list[int]], Awaitable[None]] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._storage = storage
        # The chain's memory: the block cache, and the refcount table (held whole).
        self._budget = budget if budget is not None else MemoryBudget()
        self._table_bytes = 0
        self._header = header
        self._filename = storage.filename
        self._table: array[int] | None = None
        self._table_offset = header.refcount_table_offset
        self._cluster_bits = header.cluster_bits
        cluster_size = header.cluster_size
        # Entries per block: cluster_size * 8 / refcount_bits, a power of two.
        self._block_bits = header.cluster_bits + 3 - header.refcount_order
        # Records a new refcount table in the header: (offset, clusters).
        self._move_table = move_table
        # Overlap checks: metadata writes, clusters handed out, refcounts dropping to zero.
        self._guard = guard
        # Told, once the refcounts are on disk, of the clusters an apply() freed.
        self._after_free = after_free
        self._free_hint = 0
        # From this cluster on no refcount is anybody's: the file ended before it when the image
        # was opened, nothing may refer there (the overlap guard checks that before the file
        # first grows), and this object placed nothing there since. A refcount found there is
        # a leak; allocation hands such clusters out as free, so that no free-cluster search
        # looks at more refcounts than the file has clusters plus what it allocated itself,
        # whatever the refcount table claims.
        self._unclaimed_from = -(-storage.size >> self._cluster_bits)
        self._blocks: MetadataCache[int, RefcountBlock] = MetadataCache(
            None,
            self._load_block,
            self._write_block,
            storage.flush,
            budget=self._budget,
            entry_size=cluster_size + _BLOCK_OVERHEAD,
            name=f"the refcount block cache of {self._filename or 'the image'}",
        )

    @property
    def blocks(self) -> MetadataCache[int, RefcountBlock]:
        """The refcount block cache (keyed by the block's file offset)."""
        return self._blocks

    async def table(self) -> array[int]:
        """The refcount table: each entry a refcount block offset (0: none), validated."""
        if self._table is None:
            header = self._header
            self._hold_table(header.refcount_table_clusters * header.cluster_size)
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

    def _hold_table(self, nbytes: int) -> None:
        """Charge a refcount table of *nbytes* (parsed: as many bytes) to the budget, instead of the one held."""
        if nbytes > self._table_bytes:
            self._budget.hold(self._filename, "its refcount table", nbytes - self._table_bytes)
        else:
            self._budget.release(self._table_bytes - nbytes)
        self._table_bytes = nbytes

    async def block_offsets(self) -> list[int]:
        """Where the refcount blocks lie (the refcount table's non-empty entries)."""
        return [entry & REFTABLE_OFFSET_MASK for entry in await self.table() if entry]

    async def _write_block(self, offset: int, block: RefcountBlock) -> None:
        if self._guard is not None:
            await self._guard.check_write(Metadata.REFCOUNT_BLOCK, offset, len(block.data))
        await self._storage.writev([memoryview(block.data)], offset)

    async def _load_block(self, offset: int) -> RefcountBlock:
        raw = bytearray(self._header.cluster_size)
        await self._storage.readv([memoryview(raw)], offset)
        return RefcountBlock(raw, offset=offset, refcount_order=self._header.refcount_order)

    async def get(self, host_offset: int) -> int:
        """The refcount of the host cluster holding *host_offset* (0 where no block exists)."""
        return await self._get_cluster(host_offset >> self._cluster_bits)

    # --- changing refcounts (writable images) ----------------------------------------------------

    @property
    def entries_per_block(self) -> int:
        """Clusters one refcount block describes."""
        return 1 << self._block_bits

    async def _block_for(self, cluster: int, avoid: range) -> RefcountBlock:
        """The block describing *cluster*, created (outside *avoid*) when missing."""
        table = await self.table()
        index = cluster >> self._block_bits
        if index >= len(table):
            await self._grow_table(index + 1, avoid)
            table = await self.table()
        if not table[index]:
            await self._new_block(index, avoid)
        return await self._blocks.get(table[index] & REFTABLE_OFFSET_MASK)

    async def _new_block(self, index: int, avoid: range) -> None:
        """Create the refcount block for table entry *index*, placed in a cluster it describes."""
        table = await self.table()
        first = index << self._block_bits
        covered = range(first, first + self.entries_per_block)
        place = next((c for c in covered if c not in avoid), None)
        if place is None:
            raise AllocationError(
                self._filename, "a refcount block", "none of the clusters it describes is free (allocation too large)"
            )
        cluster_size = 1 << self._cluster_bits
        block = RefcountBlock(
            bytearray(cluster_size), offset=place << self._cluster_bits, refcount_order=self._header.refcount_order
        )
        block.set(place - first, 1)  # it describes itself
        self._unclaimed_from = max(self._unclaimed_from, place + 1)
        guard = self._guard
        entry_offset = self._table_offset + 8 * index
        if guard is not None:
            # No block counts the clusters there: metadata there would be handed out.
            await guard.check_free(place, 1)
            guard.placed(Metadata.REFCOUNT_BLOCK, (place,))
            await guard.check_write(Metadata.REFCOUNT_BLOCK, block.offset, cluster_size)
            await guard.check_write(Metadata.REFCOUNT_TABLE, entry_offset, 8)
        # The block reaches the disk before the table entry that points to it.
        await self._storage.writev([memoryview(block.data)], block.offset)
        await self._storage.flush()
        table[index] = block.offset
        await self._storage.writev([memoryview(struct.pack(">Q", block.offset))], entry_offset)
        self._blocks.put(block.offset, block)

    async def _grow_table(self, entries: int, avoid: range) -> None:
        """Move the refcount table to a larger place at the end of the file.

        The new table and the refcount blocks that describe it (and themselves) are laid out
        past everything in use, written, made durable, then recorded in the header; the old
        table's clusters are freed last.
        """
        table = await self.table()
        cluster_size = 1 << self._cluster_bits
        per_cluster = cluster_size // 8
        end = max(-(-self._storage.size // cluster_size), avoid.stop)
        clusters = max(-(-entries // per_cluster), 2 * -(-len(table) // per_cluster))
        while True:
            self._hold_table(clusters * cluster_size)
            new_table = array("Q", table)
            new_table.extend([0] * (clusters * per_cluster - len(table)))
            blocks: dict[int, RefcountBlock] = {}
            used = list(range(end, end + clusters))
            position = end + clusters
            pending = list(used)
            while pending:
                cluster = pending.pop()
                index = cluster >> self._block_bits
                if index < len(new_table) and (new_table[index] or index in blocks):
                    continue
                blocks[index] = RefcountBlock(
                    bytearray(cluster_size),
                    offset=position << self._cluster_bits,
                    refcount_order=self._header.refcount_order,
                )
                used.append(position)
                pending.append(position)
                position += 1
            if max(blocks, default=0) < len(new_table):
                break
            clusters *= 2  # the table must also index the blocks placed after it
        guard = self._guard
        if guard is not None:
            # The new table and blocks lie past the end of everything in use, contiguously.
            await guard.check_free(end, position - end)
            guard.placed(Metadata.REFCOUNT_TABLE, range(end, end + clusters))
            guard.placed(Metadata.REFCOUNT_BLOCK, (block.offset >> self._cluster_bits for block in blocks.values()))
        self._unclaimed_from = max(self._unclaimed_from, position)
        for index, block in blocks.items():
            new_table[index] = block.offset
        for cluster in used:
            index = cluster >> self._block_bits
            entry = cluster & (self.entries_per_block - 1)
            if index in blocks:
                blocks[index].set(entry, 1)
            else:
                existing = await self._blocks.get(new_table[index])
                existing.set(entry, 1)
                self._blocks.mark_dirty(existing.offset)
        await self._blocks.flush()
        for block in blocks.values():
            if guard is not None:
                await guard.check_write(Metadata.REFCOUNT_BLOCK, block.offset, cluster_size)
            await self._storage.writev([memoryview(block.data)], block.offset)
        raw = array("Q", new_table)
        if sys.byteorder == "little":
            raw.byteswap()
        new_offset = end << self._cluster_bits
        if guard is not None:
            await guard.check_write(Metadata.REFCOUNT_TABLE, new_offset, clusters * cluster_size)
        await self._storage.writev([memoryview(raw.tobytes())], new_offset)
        await self._storage.flush()
        if self._move_table is None:
            raise AllocationError(self._filename, "a larger refcount table", "the refcount table cannot be moved")
        old_offset, old_clusters = self._table_offset, -(-len(table) * 8 // cluster_size)
        await self._move_table(new_offset, clusters)
        self._table = new_table
        self._table_offset = new_offset
        for block in blocks.values():
            self._blocks.put(block.offset, block)
        if guard is not None:
            guard.retired(
                Metadata.REFCOUNT_TABLE,
                range(old_offset >> self._cluster_bits, (old_offset >> self._cluster_bits) + old_clusters),
            )
        await self.change(old_offset >> self._cluster_bits, old_clusters, -1)

    async def change(self, cluster: int, count: int, delta: int, avoid: range = range(0)) -> list[int]:
        """Add *delta* to the refcounts of *count* clusters from *cluster* (in the cache).

        Returns the clusters whose refcount dropped to zero (now free).
        """
        freed: list[int] = []
        per_block = self.entries_per_block
        current, end = cluster, cluster + count
        if delta > 0:
            self._unclaimed_from = max(self._unclaimed_from, end)
        # One block's share at a time: checked whole, then changed whole.
        while current < end:
            block = await self._block_for(current, avoid)
            index = current & (per_block - 1)
            step = min(end - current, per_block - index)
            values = [value + delta for value in block.values(index, step)]
            if min(values) < 0 or max(values) > block.max_refcount:
                position, value = next(
                    (position, value) for position, value in enumerate(values) if not 0 <= value <= block.max_refcount
                )
                raise CorruptImageError(
                    self._filename, (current + position) << self._cluster_bits, f"refcount would become {value}"
                )
            zeroes = [current + position for position, value in enumerate(values) if not value] if 0 in values else []
            if zeroes and self._guard is not None:
                for zeroed in zeroes:
                    await self._guard.freeing(zeroed)  # (refused, before anything changes, for metadata)
            block.store(index, values)
            self._blocks.mark_dirty(block.offset)
            if zeroes:
                freed += zeroes
                self._free_hint = min(self._free_hint, zeroes[0])
            current += step
        return freed

    async def allocate(self, count: int) -> tuple[int, int]:
        """Take up to *count* contiguous free clusters (refcount 1): ``(host offset, clusters)``."""
        count = max(1, min(count, self.entries_per_block // 2))
        start = self._free_hint
        run = 0
        while run < count:
            free = await self._free_from(start + run, count - run)
            if free:
                run += free
            else:
                start = await self._next_free(start + run)
                run = 0
        if self._guard is not None:
            await self._guard.check_free(start, count)
        if start + count > self._unclaimed_from:
            # Leaked refcounts there are dropped: the clusters become ours with refcount 1.
            await self._drop_leaks(max(start, self._unclaimed_from), start + count)
        await self.change(start, count, +1, avoid=range(start, start + count))
        self._free_hint = start + count
        return start << self._cluster_bits, count

    async def allocate_table(self, length: int) -> int:
        """Contiguous new clusters for a table of *length* bytes (0: no table, offset 0)."""
        if not length:
            return 0
        cluster_bits = self._cluster_bits
        clusters = -(-length >> cluster_bits)
        host, got = await self.allocate(clusters)
        while got < clusters:  # allocations are capped: take the rest right behind
            more, extra = await self.allocate(clusters - got)
            if more != host + (got << cluster_bits):
                raise AllocationError(self._filename, "a table", f"{clusters} contiguous clusters cannot be allocated")
            got += extra
        return host

    async def apply(self, changes: dict[int, int]) -> None:
        """Apply refcount *changes* (cluster: delta) and write them back now.

        Callers make sure that no metadata on disk refers to clusters they decrement. The
        clusters left unused are then reported to the ``after_free`` hook.
        """
        freed: list[int] = []
        for cluster, delta in sorted(changes.items()):
            if delta:
                freed += await self.change(cluster, 1, delta)
        await self.flush()
        if freed and self._after_free is not None:
            await self._after_free(freed)

    async def _drop_leaks(self, first: int, stop: int) -> None:
        """Set the refcounts of the unclaimed clusters ``[first, stop)`` (see ``__init__``) to 0."""
        table = await self.table()
        per_block = self.entries_per_block
        current = first
        while current < stop:
            index = current >> self._block_bits
            within = current & (per_block - 1)
            step = min(stop - current, per_block - within)
            if index < len(table) and table[index]:
                block = await self._blocks.get(table[index] & REFTABLE_OFFSET_MASK)
                if any(block.values(within, step)):
                    block.store(within, [0] * step)
                    self._blocks.mark_dirty(block.offset)
            current += step

    async def _free_from(self, cluster: int, limit: int) -> int:
        """How many clusters from *cluster* (at most *limit*, within one refcount block's range) are free."""
        table = await self.table()
        index = cluster >> self._block_bits
        within = cluster & (self.entries_per_block - 1)
        limit = min(limit, self.entries_per_block - within)
        unclaimed = self._unclaimed_from
        if index >= len(table) or not table[index] or cluster >= unclaimed:
            return limit
        block = await self._blocks.get(table[index] & REFTABLE_OFFSET_MASK)
        # Only the refcounts before the unclaimed clusters count: free up to them is free on through them.
        known = min(limit, unclaimed - cluster)
        run = block.free_run(within, known)
        return limit if run == known else run

    async def _next_free(self, cluster: int) -> int:
        """The first free cluster from *cluster* on (looking at no refcount of the unclaimed clusters)."""
        table = await self.table()
        per_block = self.entries_per_block
        unclaimed = self._unclaimed_from
        while cluster < unclaimed:
            index = cluster >> self._block_bits
            if index >= len(table) or not table[index]:
                return cluster
            block = await self._blocks.get(table[index] & REFTABLE_OFFSET_MASK)
            first = index << self._block_bits
            end = min(per_block, unclaimed - first)
            found = block.next_free(cluster - first, end)
            if found < end:
                return first + found
            cluster = first + end
        return cluster

    async def _get_cluster(self, cluster: int) -> int:
        table = await self.table()
        index = cluster >> self._block_bits
        if index >= len(table) or not table[index]:
            return 0
        block = await self._blocks.get(table[index] & REFTABLE_OFFSET_MASK)
        return block.get(cluster & (self.entries_per_block - 1))

    async def flush(self) -> None:
        """Write dirty refcount blocks back (followed by a storage flush)."""
        await self._blocks.flush()

    def reload(self, header: Header) -> None:
        """Forget every cached table and block: a repair rewrote the structure *header* names."""
        self._header = header
        self._table = None
        self._hold_table(0)  # (charged again when read)
        self._table_offset = header.refcount_table_offset
        self._free_hint = 0
        # (Never lowered: clusters allocated before, whose data may not be written yet, stay claimed.)
        self._unclaimed_from = max(self._unclaimed_from, -(-self._storage.size >> self._cluster_bits))
        self._blocks.clear()
