"""Writing qcow2 images: allocation, copy-on-write, zeroing and discards, in crash-safe order.

Update order (what reaches the disk first):

* a new cluster's refcount before any L2 entry that points to it (the L2 cache depends on the
  refcount cache, and each write-back ends with a storage flush);
* a new L2 table before the L1 entry that points to it (the L1 entry is written only after the
  L2 cache was flushed);
* an L2 entry that stops pointing to a cluster before that cluster's refcount is decremented
  (decrements wait in ``_frees`` until the next :meth:`flush` has written the L2 tables).

A crash at any point leaves at worst leaked clusters.

With lazy refcounts (compatible feature bit 0) the first rule is relaxed: L2 tables may reach
the disk before the refcounts they rely on, and the image is marked dirty on disk before the
first such write. :meth:`flush` writes the refcounts and marks it clean again. A dirty image
(left by a crash) is refused for writing until repaired (``qemu-img check -r all``).

Extended L2 entries (32 subclusters per cluster) are written as QEMU does: a whole host cluster
is allocated per L2 entry, but only the subclusters written become allocated; copy-on-write,
zeroing and discards work per subcluster.
"""

from __future__ import annotations

import abc
import asyncio
import struct
from array import array
from collections import OrderedDict

import attrs

from imago import (
    CorruptImageError,
    FormatAccess,
    FormatDriver,
    ImagoError,
    InvalidRequestError,
    MetadataCache,
    PreallocateMode,
    ShallowMapping,
    ShallowRaw,
    Storage,
    UnsupportedFeatureError,
)
from imago.runtime import run_parallel

from .compression import compress_cluster
from .header import INCOMPAT_DIRTY, MAX_L1_BYTES, Header
from .refcounts import REFTABLE_OFFSET_MASK, Refcounts
from .snapshots import Snapshot, snapshot_table_length
from .tables import (
    DATA,
    L2_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    ZERO,
    L2Table,
    encode_l1,
    entry_clusters,
    parse_l1,
    table_clusters,
)

__all__ = ["Qcow2Writing"]

_NO_LIMIT = 1 << 63

# How zeroing operations treat each cluster.
_KEEP = "keep"  # write_zeroes: zero flag, keeping an allocation that is ours
_ZERO = "zero"  # discard_to_zero: zero flag, releasing the allocation
_UNMAP = "unmap"  # discard_to_backing / discard_to_any: unallocated

# The allocation bits of a subcluster bitmap (the zero bits are these shifted by SUBCLUSTERS).
_ALL = (1 << SUBCLUSTERS) - 1


class Qcow2Writing(FormatDriver):
    """The write half of the qcow2 driver (the reading half, :class:`~imago_qcow2.Qcow2`, derives from it)."""

    _storage: Storage
    _data_storage: Storage
    _header: Header
    _l1: array[int]
    _l1_copied: bytearray
    _writable: bool
    _lock: asyncio.Lock
    _frees: list[tuple[int, int]]
    _refcounts: Refcounts
    _tables: MetadataCache[int, L2Table]
    _cluster_bits: int
    _l2_mask: int
    _table_shift: int
    _size: int
    _backing: FormatAccess | None
    _filename: str | None
    _snapshots: list[Snapshot]
    _decompressed: OrderedDict[int, bytes]
    #: Lazy refcounts are in use; and the dirty bit is set on disk.
    _lazy: bool
    _dirty_on_disk: bool
    #: Freed clusters are punched out of the file.
    _discard_freed: bool
    #: Host clusters that held metadata when the image was opened for writing (until they are
    #: freed): data is never written there.
    _metadata: set[int]
    #: Where the next compressed cluster goes (0: start a new host cluster).
    _compress_cursor: int = 0

    @abc.abstractmethod
    async def _table(self, offset: int) -> L2Table | None:
        """The L2 table covering guest *offset*, if it exists."""

    # --- helpers ----------------------------------------------------------------------------------

    def _release(self, entry: int) -> None:
        """Schedule the host clusters an L2 entry held for release at the next flush."""
        if entry & OFLAG_COMPRESSED or not self._header.has_data_file:
            clusters = entry_clusters(entry, self._cluster_bits)
            if clusters:
                self._frees.append((clusters.start, len(clusters)))

    async def _writable_table(self, offset: int) -> L2Table:
        """The L2 table for *offset*, made ours: created, or copied when shared with a snapshot."""
        l1_index = offset >> self._table_shift
        current = self._l1[l1_index]
        if current and self._l1_copied[l1_index]:
            return await self._tables.get(current)
        cluster_size = 1 << self._cluster_bits
        host, _ = await self._refcounts.allocate(1)
        if current:
            raw = (await self._tables.get(current)).to_bytes()
            self._frees.append((current >> self._cluster_bits, 1))
        else:
            raw = bytes(cluster_size)
        header = self._header
        table = L2Table(
            raw,
            offset=host,
            cluster_bits=self._cluster_bits,
            extended=header.extended_l2,
            zero_flag=header.version >= 3,
            external_data=header.has_data_file,
            image_size=_NO_LIMIT,
            data_size=_NO_LIMIT,
            filename=self._filename,
        )
        self._tables.put(host, table, dirty=True)
        # The table (and the refcounts allocating it) reach the disk before the L1 entry.
        await self._tables.flush()
        self._l1[l1_index] = host
        self._l1_copied[l1_index] = 1
        entry = struct.pack(">Q", host | OFLAG_COPIED)
        await self._storage.writev([memoryview(entry)], header.l1_table_offset + 8 * l1_index)
        return table

    def _in_place_run(self, table: L2Table, index: int, clusters: int) -> int:
        """How many clusters from *index* (at most *clusters*) can be written where they are."""
        kinds, hosts, entries = table.kinds, table.hosts, table.entries
        step = 1 << self._cluster_bits
        count = 0
        while (
            count < clusters
            and index + count < len(kinds)
            and kinds[index + count] == DATA
            and entries[index + count] & OFLAG_COPIED
            and hosts[index + count] == hosts[index] + count * step
        ):
            count += 1
        return count

    async def _read_current(self, buf: bytearray, offset: int) -> None:
        """Fill *buf* with what this layer reads at guest *offset* now (zero past the disk's end)."""
        inside = max(0, min(len(buf), self._size - offset))
        if inside:
            await FormatAccess(self)._readv_mapped([memoryview(buf)[:inside]], offset, inside)

    async def _snapshot_l1(self, snapshot: Snapshot) -> array[int]:
        """A snapshot's L1 table: its L2 table offsets (0: none), validated."""
        raw = bytearray(snapshot.l1_size * 8)
        if raw:
            await self._storage.readv([memoryview(raw)], snapshot.l1_table_offset)
        l1, _ = parse_l1(
            raw,
            table_offset=snapshot.l1_table_offset,
            cluster_bits=self._cluster_bits,
            file_size=self._storage.size,
            filename=self._filename,
        )
        return l1

    async def _scan_metadata(self) -> None:
        """Before the first write: every cluster metadata occupies must be counted as in use.

        Otherwise allocation could hand metadata out as free space. The clusters are kept in
        :attr:`_metadata`, so that damaged L2 entries mapping data onto them are refused too.
        """
        cluster_bits = self._cluster_bits
        header = self._header
        clusters: set[int] = {0}
        clusters.update(table_clusters(header.l1_table_offset, header.l1_size * 8, cluster_bits))
        clusters.update(
            table_clusters(header.refcount_table_offset, header.refcount_table_clusters << cluster_bits, cluster_bits)
        )
        clusters.update(
            (entry & REFTABLE_OFFSET_MASK) >> cluster_bits for entry in await self._refcounts.table() if entry
        )
        clusters.update(offset >> cluster_bits for offset in self._l1 if offset)
        if self._snapshots:
            length = snapshot_table_length(self._snapshots, header.snapshots_offset)
            clusters.update(table_clusters(header.snapshots_offset, length, cluster_bits))
            for snapshot in self._snapshots:
                clusters.update(table_clusters(snapshot.l1_table_offset, snapshot.l1_size * 8, cluster_bits))
                clusters.update(offset >> cluster_bits for offset in await self._snapshot_l1(snapshot) if offset)
        for cluster in sorted(clusters):
            if not await self._refcounts.get(cluster << cluster_bits):
                raise CorruptImageError(
                    self._filename,
                    cluster << cluster_bits,
                    "metadata lies in a cluster whose refcount is 0; repair the image "
                    "(qemu-img check -r all) before writing to it",
                )
        self._metadata.update(clusters)  # (the set the refcounts report frees to)

    # --- data mappings ----------------------------------------------------------------------------

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """A writable mapping for (a prefix of) the range.

        Clusters of our own are written in place; others are allocated, with copy-on-write of
        the parts of the first and last cluster that the caller does not write. A damaged
        image whose L2 entries map guest data onto its metadata is refused.
        """
        mapping, mapped = await self._data_mapping(offset, length)
        assert isinstance(mapping, ShallowRaw)
        if self._metadata and mapping.storage is self._storage:  # (not in an external data file)
            cluster_bits = self._cluster_bits
            clusters = range(mapping.offset >> cluster_bits, ((mapping.offset + mapped - 1) >> cluster_bits) + 1)
            if not self._metadata.isdisjoint(clusters):
                raise CorruptImageError(
                    self._filename,
                    mapping.offset,
                    f"guest offset {offset:#x} is mapped onto the image's metadata; refusing to write there",
                )
        return mapping, mapped

    async def _data_mapping(self, offset: int, length: int) -> tuple[ShallowMapping, int]:
        table = await self._table(offset)
        if table is not None:
            if table.extended:
                host, count = self._extended_run(table, offset, length)
                if count:
                    return ShallowRaw(self._data_storage, host, True), count
            else:
                cluster_bits = self._cluster_bits
                within = offset & ((1 << cluster_bits) - 1)
                index = (offset >> cluster_bits) & self._l2_mask
                count = self._in_place_run(table, index, ((length + within - 1) >> cluster_bits) + 1)
                if count:
                    return ShallowRaw(self._data_storage, table.hosts[index] + within, True), min(
                        length, (count << cluster_bits) - within
                    )
        async with self._lock:
            if self._header.extended_l2:
                return await self._allocate_extended(offset, length)
            return await self._allocate(offset, length)

    async def _allocate(self, offset: int, length: int) -> tuple[ShallowMapping, int]:
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        within = offset & (cluster_size - 1)
        table = await self._writable_table(offset)
        index = (offset >> cluster_bits) & self._l2_mask
        table_end = ((offset >> self._table_shift) + 1) << self._table_shift
        end = min(offset + length, table_end)
        last = ((end - 1) >> cluster_bits) & self._l2_mask
        if self._in_place_run(table, index, 1):  # allocated meanwhile
            count = self._in_place_run(table, index, last - index + 1)
            return ShallowRaw(self._data_storage, table.hosts[index] + within, True), min(
                length, (count << cluster_bits) - within
            )
        count = 1
        while index + count <= last and not self._in_place_run(table, index + count, 1):
            count += 1
        first_guest = offset - within
        if self._header.has_data_file:
            host = first_guest  # data clusters live at their guest offset in the data file
        else:
            host, count = await self._refcounts.allocate(count)
        write_end = min(end, first_guest + (count << cluster_bits))
        # Copy-on-write of what the caller leaves unwritten in the first and last cluster.
        partial = []
        if within:
            partial.append((first_guest, offset))
        tail = write_end & (cluster_size - 1)
        if tail:
            partial.append((write_end, write_end - tail + cluster_size))
        for start, stop in partial:
            old = bytearray(stop - start)
            await self._read_current(old, start)
            await self._data_storage.writev([memoryview(old)], host + start - first_guest)
        for step in range(count):
            self._release(table.entries[index + step])
            table.set_entry(index + step, (host + (step << cluster_bits)) | OFLAG_COPIED)
        self._tables.mark_dirty(table.offset)
        self.mappings_changed()
        return ShallowRaw(self._data_storage, host + within, True), write_end - offset

    # --- data mappings with extended L2 entries ------------------------------------------------

    def _owned(self, descriptor: int) -> bool:
        """Whether an extended entry's descriptor is a host cluster of our own (written in place)."""
        return descriptor & (OFLAG_COPIED | OFLAG_COMPRESSED) == OFLAG_COPIED and bool(
            descriptor & L2_OFFSET_MASK or self._header.has_data_file
        )

    def _extended_run(self, table: L2Table, offset: int, length: int) -> tuple[int, int]:
        """Host offset of guest *offset*, and how many bytes from it can be written in place.

        That is (at most *length*, 0: none) the allocated subclusters of our own clusters that
        follow, contiguous in the host file.
        """
        cluster_bits = self._cluster_bits
        sub_bits = cluster_bits - 5
        entries = table.entries
        index = (offset >> cluster_bits) & self._l2_mask
        descriptor = entries[2 * index]
        if descriptor & (OFLAG_COPIED | OFLAG_COMPRESSED) != OFLAG_COPIED:
            return 0, 0
        cluster = offset >> cluster_bits << cluster_bits
        delta = (descriptor & L2_OFFSET_MASK) - cluster  # host offset - guest offset
        end = offset + length
        position = offset
        while True:
            first = (position >> sub_bits) & (SUBCLUSTERS - 1)
            run = (entries[2 * index + 1] & _ALL) >> first
            allocated = (run ^ (run + 1)).bit_length() - 1  # trailing allocated subclusters
            position = cluster + ((first + allocated) << sub_bits)
            if first + allocated < SUBCLUSTERS or position >= end or index == self._l2_mask:
                break
            # Allocated subclusters bind a host cluster (checked on load): only contiguity is left.
            index += 1
            cluster = position
            descriptor = entries[2 * index]
            if descriptor & (OFLAG_COPIED | OFLAG_COMPRESSED) != OFLAG_COPIED:
                break
            if (descriptor & L2_OFFSET_MASK) - cluster != delta:
                break
        return offset + delta, max(0, min(position, end) - offset)

    async def _allocate_extended(self, offset: int, length: int) -> tuple[ShallowMapping, int]:
        """:meth:`_allocate` for extended L2 entries: the subclusters written become allocated.

        Clusters of our own keep their host cluster; others (unallocated, shared with a
        snapshot, compressed) get a new one, as QEMU does. What stays allocated but is not
        written is filled with what it reads now: the unwritten head and tail of the first and
        last subcluster written, and in a new host cluster the subclusters allocated before
        (all of them for a compressed cluster). Other subclusters keep their state.
        """
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        sub_bits = cluster_bits - 5
        table = await self._writable_table(offset)
        host, count = self._extended_run(table, offset, length)
        if count:  # allocated meanwhile
            return ShallowRaw(self._data_storage, host, True), count
        index = (offset >> cluster_bits) & self._l2_mask
        table_end = ((offset >> self._table_shift) + 1) << self._table_shift
        end = min(offset + length, table_end)
        last = ((end - 1) >> cluster_bits) & self._l2_mask
        entries = table.entries
        first_guest = offset >> cluster_bits << cluster_bits
        owned = self._owned(entries[2 * index])
        count = 1
        if owned:
            host = entries[2 * index] & L2_OFFSET_MASK
            while (
                index + count <= last
                and self._owned(entries[2 * (index + count)])
                and entries[2 * (index + count)] & L2_OFFSET_MASK == host + (count << cluster_bits)
            ):
                count += 1
        else:
            while index + count <= last and not self._owned(entries[2 * (index + count)]):
                count += 1
            if self._header.has_data_file:
                host = first_guest  # data clusters live at their guest offset in the data file
            else:
                host, count = await self._refcounts.allocate(count)
        write_end = min(end, first_guest + (count << cluster_bits))
        updates: list[tuple[int, int, int]] = []
        fills: list[list[int]] = []  # guest ranges [start, end) to copy as they read now
        for step in range(count):
            slot = index + step
            cluster = first_guest + (step << cluster_bits)
            start, stop = max(offset, cluster), min(write_end, cluster + cluster_size)
            descriptor, bitmap = entries[2 * slot], entries[2 * slot + 1]
            first, last_sub = (start - cluster) >> sub_bits, (stop - 1 - cluster) >> sub_bits
            written = (2 << last_sub) - (1 << first)
            if descriptor & OFLAG_COMPRESSED:
                before, allocated = 0, _ALL  # the whole cluster, decompressed
            else:
                before = bitmap & _ALL
                allocated = before | written
            whole_low = -(-(start - cluster) >> sub_bits)
            whole_high = (stop - cluster) >> sub_bits
            wholly_written = (1 << whole_high) - (1 << whole_low) if whole_high > whole_low else 0
            fill = allocated & ~wholly_written & ~(before if owned else 0)
            while fill:
                low = fill & -fill
                fill ^= low
                sub_start = cluster + ((low.bit_length() - 1) << sub_bits)
                sub_end = sub_start + (1 << sub_bits)
                for a, b in ((sub_start, min(sub_end, start)), (max(sub_start, stop), sub_end)):
                    if a < b:
                        if fills and fills[-1][1] == a:
                            fills[-1][1] = b
                        else:
                            fills.append([a, b])
            zeroes = (bitmap >> SUBCLUSTERS) & ~allocated
            updates.append((slot, (host + (step << cluster_bits)) | OFLAG_COPIED, allocated | zeroes << SUBCLUSTERS))
        for a, b in fills:
            old = bytearray(b - a)
            await self._read_current(old, a)
            await self._data_storage.writev([memoryview(old)], host + a - first_guest)
        for slot, descriptor, bitmap in updates:
            if not owned:
                self._release(entries[2 * slot])
            table.set_extended(slot, descriptor, bitmap)
        self._tables.mark_dirty(table.offset)
        self.mappings_changed()
        return ShallowRaw(self._data_storage, host + offset - first_guest, True), write_end - offset

    # --- zeroes and discards -----------------------------------------------------------------

    async def _zero_clusters(self, offset: int, length: int, how: str) -> tuple[int, int]:
        """Apply *how* to the whole clusters of the range; returns the part handled."""
        if self._header.extended_l2:
            return await self._zero_subclusters(offset, length, how)
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        request_end = offset + length
        start = -(-offset // cluster_size) * cluster_size
        end = request_end // cluster_size * cluster_size
        if request_end == self._size:
            end = -(-request_end // cluster_size) * cluster_size  # the disk's last, partial cluster
        zero_flag = self._header.version >= 3
        if end <= start or (how != _UNMAP and not zero_flag and self._backing is not None):
            return offset, 0
        if how != _UNMAP and not zero_flag:
            how = _UNMAP  # version 2 without a backing file: unallocated reads as zero
        async with self._lock:
            position = start
            while position < end:
                table_end = min(end, ((position >> self._table_shift) + 1) << self._table_shift)
                l1_index = position >> self._table_shift
                if not self._l1[l1_index] and (how == _UNMAP or self._backing is None):
                    position = table_end  # unallocated already reads as asked
                    continue
                table = await self._writable_table(position)
                for cluster in range(position >> cluster_bits, table_end >> cluster_bits):
                    slot = cluster & self._l2_mask
                    old = table.entries[slot]
                    if how == _UNMAP:
                        new = 0
                    elif how == _KEEP and table.kinds[slot] in (DATA, ZERO) and old & OFLAG_COPIED:
                        new = old | OFLAG_ZERO  # keep our allocation, read as zero
                    else:
                        new = OFLAG_ZERO
                    if new != old:
                        keeps_space = new & L2_OFFSET_MASK and new & L2_OFFSET_MASK == old & L2_OFFSET_MASK
                        if not keeps_space:
                            self._release(old)
                        table.set_entry(slot, new)
                self._tables.mark_dirty(table.offset)
                position = table_end
            self.mappings_changed()
        if self._header.has_data_file and (how != _UNMAP or self._header.data_file_raw):
            # Keep the external data file reading as the image does (a raw data file must).
            await self._data_storage.write_zeroes(start, min(end, self._size) - start, unmap=True)
        return start, min(end, request_end) - start

    async def _compressed_at(self, offset: int) -> bool:
        """Extended tables: whether the cluster at guest *offset* is compressed."""
        table = await self._table(offset)
        slot = (offset >> self._cluster_bits) & self._l2_mask
        return table is not None and bool(table.entries[2 * slot] & OFLAG_COMPRESSED)

    async def _zero_subclusters(self, offset: int, length: int, how: str) -> tuple[int, int]:
        """:meth:`_zero_clusters` for extended L2 entries: whole subclusters.

        _KEEP and _ZERO set the zero bits, _UNMAP clears them; both clear the allocation bits.
        A host cluster left without allocated subclusters is released, except by _KEEP where it
        is ours. A compressed cluster the range covers only in part is left to the caller.
        """
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        cluster_mask = cluster_size - 1
        sub_bits = cluster_bits - 5
        sub_size = 1 << sub_bits
        request_end = offset + length
        start = -(-offset // sub_size) * sub_size
        end = request_end // sub_size * sub_size
        if request_end == self._size:
            end = -(-request_end // cluster_size) * cluster_size  # the disk's last cluster, wholly
        async with self._lock:
            first_cluster = start & ~cluster_mask
            partly = start != first_cluster or end < first_cluster + cluster_size
            if start < end and partly and await self._compressed_at(start):
                start = first_cluster + cluster_size
            if start < end and end & cluster_mask and await self._compressed_at(end - 1):
                end &= ~cluster_mask
            if end <= start or start >= request_end:  # (the latter: inside the disk's last subcluster)
                return offset, 0
            position = start
            while position < end:
                table_end = min(end, ((position >> self._table_shift) + 1) << self._table_shift)
                if not self._l1[position >> self._table_shift] and (how == _UNMAP or self._backing is None):
                    position = table_end  # unallocated already reads as asked
                    continue
                table = await self._writable_table(position)
                entries = table.entries
                while position < table_end:
                    cluster = position & ~cluster_mask
                    stop = min(table_end, cluster + cluster_size)
                    range_bits = (1 << ((stop - cluster) >> sub_bits)) - (1 << ((position - cluster) >> sub_bits))
                    slot = (position >> cluster_bits) & self._l2_mask
                    descriptor, bitmap = entries[2 * slot], entries[2 * slot + 1]
                    if descriptor & OFLAG_COMPRESSED:  # wholly covered here
                        new_descriptor, allocated, zeroes = 0, 0, 0
                    else:
                        new_descriptor = descriptor
                        allocated = bitmap & _ALL & ~range_bits
                        zeroes = (bitmap >> SUBCLUSTERS) & ~range_bits
                    if how != _UNMAP:
                        zeroes |= range_bits
                    if not allocated and not (how == _KEEP and self._owned(descriptor)):
                        new_descriptor = 0  # nothing uses the host cluster any more
                    new_bitmap = allocated | zeroes << SUBCLUSTERS
                    if new_descriptor != descriptor or new_bitmap != bitmap:
                        if new_descriptor != descriptor:
                            self._release(descriptor)
                        table.set_extended(slot, new_descriptor, new_bitmap)
                    position = stop
                self._tables.mark_dirty(table.offset)
            self.mappings_changed()
        if self._header.has_data_file and (how != _UNMAP or self._header.data_file_raw):
            # Keep the external data file reading as the image does (a raw data file must).
            await self._data_storage.write_zeroes(start, min(end, self._size) - start, unmap=True)
        return start, min(end, request_end) - start

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, keeping allocations (version 3; version 2 writes zeroes)."""
        if self._header.version < 3:
            return offset, 0
        return await self._zero_clusters(offset, length, _KEEP)

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, releasing their space."""
        return await self._zero_clusters(offset, length, _ZERO)

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate whole clusters (they read from the backing image, or as zero)."""
        return await self._zero_clusters(offset, length, _UNMAP)

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate the range so it reads from the backing image again (whole clusters only)."""
        handled = await self._zero_clusters(offset, length, _UNMAP)
        return handled if handled[1] else (offset, 0)

    # --- compressed writes ------------------------------------------------------------------------

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Write whole clusters compressed, compressing them on all cores.

        *offset* must be cluster-aligned and the data whole clusters (a shorter last cluster is
        allowed at the end of the disk). A cluster that does not shrink is written as is.
        """
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        if offset & (cluster_size - 1) or (data.nbytes & (cluster_size - 1) and offset + data.nbytes != self._size):
            raise InvalidRequestError(
                f"{self._filename}: compressed writes need whole clusters ({cluster_size} bytes), "
                f"got [{offset}, {offset + data.nbytes})"
            )
        if self._header.has_data_file:
            raise UnsupportedFeatureError("compressed clusters in images with an external data file", self._filename)
        clusters = []
        for start in range(0, data.nbytes, cluster_size):
            chunk = data[start : start + cluster_size]
            if chunk.nbytes < cluster_size:
                chunk = memoryview(bytes(chunk) + bytes(cluster_size - chunk.nbytes))
            clusters.append(chunk)
        compression = self._header.compression_type
        packed = await run_parallel(lambda chunk: compress_cluster(chunk, compression), clusters)
        for index, (chunk, blob) in enumerate(zip(clusters, packed, strict=True)):
            guest = offset + (index << cluster_bits)
            if len(blob) >= cluster_size:
                # It does not shrink: an ordinary cluster (as QEMU does).
                await FormatAccess(self).write(chunk[: min(cluster_size, self._size - guest)], guest)
                continue
            async with self._lock:
                host = await self._place_compressed(len(blob))
                await self._storage.writev([memoryview(blob)], host)
                table = await self._writable_table(guest)
                slot = (guest >> cluster_bits) & self._l2_mask
                offset_bits = 62 - (cluster_bits - 8)
                sectors = (host % 512 + len(blob) + 511) // 512 - 1
                descriptor = OFLAG_COMPRESSED | sectors << offset_bits | host
                if table.extended:
                    self._release(table.entries[2 * slot])
                    table.set_extended(slot, descriptor, 0)  # compressed clusters have no bitmap
                else:
                    self._release(table.entries[slot])
                    table.set_entry(slot, descriptor)
                self._tables.mark_dirty(table.offset)
        self.mappings_changed()

    async def _place_compressed(self, length: int) -> int:
        """Host offset for *length* (< cluster size) bytes of compressed data, packed tightly.

        Data goes right after the previous compressed data; it straddles into the next host
        cluster when that one is free (as QEMU packs), else a fresh cluster is taken. Each
        compressed cluster holds one reference to every host cluster its data touches, so a
        host cluster whose refcount is at its maximum (narrow ``refcount_bits``) takes no more.
        """
        cluster_bits = self._cluster_bits
        cursor = self._compress_cursor
        within = cursor & ((1 << cluster_bits) - 1)
        # A host cluster holds as many compressed clusters as its refcount can count.
        full = (1 << self._header.refcount_bits) - 1
        if cursor and within and await self._refcounts.get(cursor) < full:
            current = cursor >> cluster_bits
            fits = within + length <= 1 << cluster_bits
            if not fits and not await self._refcounts.get((current + 1) << cluster_bits):
                # The next cluster is free: the data straddles into it.
                await self._refcounts.change(current + 1, 1, +1, avoid=range(current + 1, current + 2))
                fits = True
            if fits:
                await self._refcounts.change(current, 1, +1)
                self._compress_cursor = cursor + length
                return cursor
        cursor, _ = await self._refcounts.allocate(1)
        self._compress_cursor = cursor + length
        return cursor

    # --- resizing -----------------------------------------------------------------------------------

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow (L1 table first, the size last) or shrink (clusters past the end released).

        Shrinking below the disk size an internal snapshot records is refused. Growing over a
        larger backing file makes the new area read as zero, not as the backing file.
        """
        old_size = self._size
        if new_size < old_size:
            cut = [s.name or s.id for s in self._snapshots if s.disk_size > new_size]
            if cut:
                raise UnsupportedFeatureError(
                    f"shrinking below the size of internal snapshots ({', '.join(cut)})", self._filename
                )
            # Whole clusters past the new end are released, the old last partial one included.
            first_gone = -(-new_size >> self._cluster_bits) << self._cluster_bits
            if first_gone < old_size:
                await self._zero_clusters(first_gone, old_size - first_gone, _UNMAP)
            await self._set_size(new_size)
            return
        if new_size == old_size:
            return
        entries_per_table = 1 << (self._table_shift - self._cluster_bits)
        needed = -(-new_size // (entries_per_table << self._cluster_bits))
        if needed * 8 > MAX_L1_BYTES:
            raise InvalidRequestError(f"{self._filename}: {new_size} bytes is too large for this cluster size")
        async with self._lock:
            if needed > len(self._l1):
                await self._grow_l1(needed)
        # What the old last cluster holds past the old end must not reappear.
        cluster_size = 1 << self._cluster_bits
        tail_end = min(new_size, -(-old_size // cluster_size) * cluster_size)
        await self._set_size(new_size)
        if tail_end > old_size:
            await FormatAccess(self).write_zeroes(old_size, tail_end - old_size)
        backing = self._backing
        if backing is not None and backing.size > old_size:
            await FormatAccess(self).write_zeroes(old_size, min(new_size, backing.size) - old_size)
        if prealloc in (PreallocateMode.METADATA, PreallocateMode.FALLOC, PreallocateMode.FULL):
            await self._preallocate(old_size, new_size, prealloc)

    async def _preallocate(self, start: int, end: int, prealloc: PreallocateMode) -> None:
        """Allocate the clusters of ``[start, end)``.

        FULL writes zeroes into them, FALLOC reserves them, METADATA only maps them; the file
        grows to hold them.
        """
        if self._header.extended_l2:
            await self._preallocate_extended(start, end, prealloc)
            return
        host_end = 0
        position = start
        while position < end:
            mapping, length = await self.ensure_data_mapping(position, end - position, True)
            assert isinstance(mapping, ShallowRaw)
            if prealloc is PreallocateMode.FULL:
                zeroes = memoryview(bytes(min(length, 1 << 20)))
                for done in range(0, length, zeroes.nbytes):
                    step = min(zeroes.nbytes, length - done)
                    await mapping.storage.writev([zeroes[:step]], mapping.offset + done)
            host_end = max(host_end, mapping.offset + length)
            position += length
        storage = self._data_storage
        if host_end > storage.size:
            mode = PreallocateMode.FALLOC if prealloc is PreallocateMode.FALLOC else PreallocateMode.NONE
            await storage.resize(host_end, mode)

    async def _preallocate_extended(self, start: int, end: int, prealloc: PreallocateMode) -> None:
        """:meth:`_preallocate` for extended L2 entries.

        As QEMU does, host clusters are bound to the clusters without one, and their subclusters
        keep their state (unallocated ones still read from the backing file, or as zero).
        """
        cluster_bits = self._cluster_bits
        data_file = self._header.has_data_file
        spans: list[tuple[int, int]] = []  # host [offset, length) bound
        async with self._lock:
            position = start
            while position < end:
                table_end = min(end, ((position >> self._table_shift) + 1) << self._table_shift)
                table = await self._writable_table(position)
                entries = table.entries
                cluster, stop = position >> cluster_bits, -(-table_end >> cluster_bits)
                while cluster < stop:
                    slot = cluster & self._l2_mask
                    count = 0
                    while cluster + count < stop and not entries[2 * (slot + count)]:
                        count += 1
                    if not count:
                        cluster += 1  # already bound (or compressed): left as it is
                        continue
                    if data_file:
                        host = cluster << cluster_bits
                    else:
                        host, count = await self._refcounts.allocate(count)
                    for step in range(count):
                        bitmap = entries[2 * (slot + step) + 1]
                        table.set_extended(slot + step, (host + (step << cluster_bits)) | OFLAG_COPIED, bitmap)
                    spans.append((host, count << cluster_bits))
                    cluster += count
                self._tables.mark_dirty(table.offset)
                position = table_end
            self.mappings_changed()
        storage = self._data_storage
        if prealloc is PreallocateMode.FULL:
            zeroes = memoryview(bytes(min(max((length for _, length in spans), default=0), 1 << 20)))
            for host, length in spans:
                for done in range(0, length, zeroes.nbytes):
                    step = min(zeroes.nbytes, length - done)
                    await storage.writev([zeroes[:step]], host + done)
        host_end = max((host + length for host, length in spans), default=0)
        if host_end > storage.size:
            mode = PreallocateMode.FALLOC if prealloc is PreallocateMode.FALLOC else PreallocateMode.NONE
            await storage.resize(host_end, mode)

    async def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place: written and flushed before the header points to it."""
        host = await self._allocate_table(entries * 8)
        # The new entries are zero: the table is written whole, up to its clusters' end.
        raw = encode_l1(self._l1, self._l1_copied)
        raw += bytes(-(-entries * 8 >> self._cluster_bits << self._cluster_bits) - len(raw))
        await self._refcounts.flush()
        await self._tables.flush()
        await self._storage.writev([memoryview(raw)], host)
        await self._storage.flush()
        old_offset, old_entries = self._header.l1_table_offset, len(self._l1)
        await self._storage.writev([memoryview(struct.pack(">IQ", entries, host))], 36)
        await self._storage.flush()
        self._header = attrs.evolve(self._header, l1_table_offset=host, l1_size=entries)
        self._l1.extend([0] * (entries - len(self._l1)))
        self._l1_copied.extend(bytes(entries - len(self._l1_copied)))
        old_clusters = table_clusters(old_offset, old_entries * 8, self._cluster_bits)
        if old_clusters:
            self._frees.append((old_clusters.start, len(old_clusters)))

    async def _allocate_table(self, length: int) -> int:
        """Contiguous new clusters for a table of *length* bytes (0: no table, offset 0)."""
        if not length:
            return 0
        cluster_bits = self._cluster_bits
        clusters = -(-length >> cluster_bits)
        host, got = await self._refcounts.allocate(clusters)
        while got < clusters:  # allocations are capped: take the rest right behind
            more, extra = await self._refcounts.allocate(clusters - got)
            if more != host + (got << cluster_bits):
                raise ImagoError(f"{self._filename}: cannot allocate {clusters} contiguous clusters for a table")
            got += extra
        return host

    async def _set_size(self, new_size: int) -> None:
        """Record the disk size in the header (after the L1 table can map it)."""
        await self._storage.writev([memoryview(struct.pack(">Q", new_size))], 24)
        await self._storage.flush()
        self._header = attrs.evolve(self._header, size=new_size)
        self._size = new_size
        if self._header.data_file_raw:
            await self._data_storage.resize(new_size)
        self.mappings_changed()

    # --- flushing -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write metadata back in crash-safe order, release freed clusters, flush the storages."""
        if not self._writable:
            return
        async with self._lock:
            await self._write_back()

    async def _write_back(self) -> None:
        """:meth:`flush` with the lock held."""
        await self._refcounts.flush()
        await self._tables.flush()
        if self._frees:
            frees, self._frees = self._frees, []
            changes: dict[int, int] = {}
            for cluster, count in frees:
                for current in range(cluster, cluster + count):
                    changes[current] = changes.get(current, 0) - 1
            await self._change_refcounts(changes)
        if self._data_storage is not self._storage:
            await self._data_storage.flush()
        await self._storage.flush()
        if self._dirty_on_disk:
            await self._set_dirty(False)  # the refcounts on disk are exact again

    async def _set_dirty(self, dirty: bool) -> None:
        """Set or clear the dirty bit on disk (lazy refcounts), and wait until it is there."""
        header = self._header
        features = header.incompatible_features & ~INCOMPAT_DIRTY | (INCOMPAT_DIRTY if dirty else 0)
        await self._storage.writev([memoryview(struct.pack(">Q", features))], 72)
        await self._storage.flush()
        self._header = attrs.evolve(header, incompatible_features=features)
        self._dirty_on_disk = dirty

    async def _change_refcounts(self, changes: dict[int, int]) -> None:
        """Apply refcount *changes* (cluster: delta) now; clusters left unused are punched out.

        Callers make sure that no metadata on disk refers to clusters they decrement.
        """
        freed: list[int] = []
        for cluster, delta in sorted(changes.items()):
            if delta:
                freed += await self._refcounts.change(cluster, 1, delta)
        await self._refcounts.flush()
        if not freed:
            return
        # Freed clusters may be reused: no compressed data is packed into them, and nothing
        # cached from them (L2 tables, decompressed clusters) may be used again.
        self._compress_cursor = 0
        self._decompressed.clear()
        cluster_bits = self._cluster_bits
        for cluster in freed:
            self._tables.discard(cluster << cluster_bits)
            if self._discard_freed:
                await self._storage.discard(cluster << cluster_bits, 1 << cluster_bits)

    async def sync(self) -> None:
        """:meth:`flush`, then make everything durable."""
        await self.flush()
        for storage in self.storages():
            await storage.sync()
