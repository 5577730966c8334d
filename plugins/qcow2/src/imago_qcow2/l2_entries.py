"""The two widths of L2 entries, each one strategy object chosen when the image is opened.

:class:`StandardL2` (64-bit entries, one per cluster) and :class:`ExtendedL2` (128-bit entries:
a cluster descriptor and a bitmap of 32 subclusters) answer the same questions for their
width: the mapping at a guest offset, how much can be written in place, which clusters a write
binds and what it leaves to copy, how zeroing changes entries, and where the descriptors are
(for reference walks and COPIED updates). Code above them never asks which width it has.

Extended L2 entries are written as QEMU does: a whole host cluster is allocated per L2 entry,
but only the subclusters written become allocated; copy-on-write, zeroing and discards work
per subcluster.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from typing import ClassVar

from imago import FormatAccess, ShallowIndirect, ShallowMapping, ShallowRaw, ShallowSpecial, ShallowZero, Storage

from .header import Header
from .tables import (
    ALL_SUBCLUSTERS,
    COMPRESSED,
    DATA,
    L2_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    UNALLOCATED,
    ZERO,
    L2Table,
)

__all__ = ["ExtendedL2", "Fill", "L2Entries", "Release", "StandardL2", "Update", "ZeroMode"]

#: Schedules the host clusters of a descriptor that an entry stops using for release.
Release = Callable[[int], None]
#: A guest range ``[start, end)`` a write must copy, as it reads now, into its new host clusters.
Fill = tuple[int, int]
#: An entry update: ``(index in the table, descriptor, subcluster bitmap)``.
Update = tuple[int, int, int]


#: The subcluster bitmap of a cluster whose subclusters are all of one kind (not COMPRESSED).
_UNIFORM = {DATA: ALL_SUBCLUSTERS, ZERO: ALL_SUBCLUSTERS << SUBCLUSTERS, UNALLOCATED: 0}

# Mappings that carry no offset are immutable values: one instance each serves every request.
_EXPLICIT_ZERO = ShallowZero(True)
_UNALLOCATED_ZERO = ShallowZero(False)


class ZeroMode(enum.Enum):
    """How zeroing operations treat each cluster."""

    #: write_zeroes: zero flag, keeping an allocation that is ours.
    KEEP = "keep"
    #: discard_to_zero: zero flag, releasing the allocation.
    ZERO = "zero"
    #: discard_to_backing / discard_to_any: unallocated.
    UNMAP = "unmap"


class L2Entries(abc.ABC):
    """What an L2 entry of one width means, and how to change it (no I/O).

    The facts it needs are fixed when the image is opened: the geometry, whether data lies in
    an external file (where host offset 0 is valid), the data storage, writability, backing.
    """

    #: Whether tables of this width hold 128-bit entries (the L2 table codec's flag).
    extended: ClassVar[bool]
    #: Whether an entry can hold a host cluster whose data still reads as before (preallocation
    #: binds host clusters without allocating data).
    reserves_hosts: ClassVar[bool]

    def __init__(
        self,
        *,
        header: Header,
        data_storage: Storage,
        writable: bool,
        backing: FormatAccess | None,
        filename: str | None,
    ) -> None:
        self.cluster_bits = header.cluster_bits
        self._cluster_mask = header.cluster_size - 1
        self._l2_mask = header.l2_entries - 1
        self._zero_flag = header.version >= 3
        self._external = header.has_data_file
        self._data_storage = data_storage
        self._writable = writable
        self._backing = backing
        self._filename = filename

    @property
    @abc.abstractmethod
    def zero_bits(self) -> int:
        """log2 of the granularity zeroing works in (a cluster or a subcluster)."""

    def table(self, raw: bytes | bytearray | memoryview, offset: int, *, image_size: int, data_size: int) -> L2Table:
        """An L2 table of this width from its stored bytes, validated against the given sizes."""
        return L2Table(
            raw,
            offset=offset,
            cluster_bits=self.cluster_bits,
            extended=self.extended,
            zero_flag=self._zero_flag,
            external_data=self._external,
            image_size=image_size,
            data_size=data_size,
            filename=self._filename,
        )

    def not_data(self, kind: int, offset: int, host: int | None = None) -> ShallowMapping:
        """The mapping at guest *offset* where this layer holds no plain data (*kind* is not DATA).

        Unallocated: the backing layer's data, or zeroes; zero; compressed (read specially).
        *host*: where the range keeps a host cluster of its own all the same (zeroed clusters
        that stay allocated, unallocated subclusters of an allocated cluster), as ``qemu-img
        map`` reports it; a backing layer's data hides it.
        """
        if kind == UNALLOCATED:
            backing = self._backing
            if backing is not None:
                return ShallowIndirect(backing, offset)
            return _UNALLOCATED_ZERO if host is None else ShallowZero(False, self._data_storage, host)
        if kind == ZERO:
            return _EXPLICIT_ZERO if host is None else ShallowZero(True, self._data_storage, host)
        return ShallowSpecial(offset)

    @abc.abstractmethod
    def lookup(self, table: L2Table, offset: int, end: int, max_length: int) -> tuple[ShallowMapping, int]:
        """The mapping at guest *offset* and its run's length (up to *end*, the table's or disk's end)."""

    @abc.abstractmethod
    def compressed_descriptor(self, table: L2Table, index: int) -> int:
        """The compressed-cluster descriptor of entry *index*, or 0 when it is not compressed."""

    @abc.abstractmethod
    def descriptor(self, table: L2Table, index: int) -> int:
        """The cluster descriptor of entry *index* (the whole entry, for standard tables)."""

    @abc.abstractmethod
    def descriptors(self, table: L2Table) -> Sequence[int]:
        """Every cluster descriptor of *table*, by entry index (a copy, or the live entries)."""

    @abc.abstractmethod
    def update(self, table: L2Table, index: int) -> Update:
        """Entry *index* as it is, as the update that would restore it (see :meth:`apply_updates`)."""

    @abc.abstractmethod
    def set(self, table: L2Table, index: int, descriptor: int, bitmap: int | None = None) -> None:
        """Replace entry *index*: its descriptor and (extended entries) bitmap; ``None`` keeps the bitmap."""

    @abc.abstractmethod
    def in_place(self, table: L2Table, offset: int, length: int) -> tuple[int, int]:
        """Host offset of guest *offset*, and how many bytes from it (at most *length*) can be written in place.

        0 bytes: none (the write must allocate).
        """

    @abc.abstractmethod
    def write_run(self, table: L2Table, index: int, last: int) -> tuple[int | None, int]:
        """The clusters from *index* (up to *last*) that one write binds to contiguous host clusters.

        Returns the host offset of the first when they are ours already (``None``: new host
        clusters are needed), and how many.
        """

    @abc.abstractmethod
    def write_updates(
        self, table: L2Table, index: int, count: int, host: int, offset: int, write_end: int, owned: bool
    ) -> tuple[list[Fill], list[Update]]:
        """What a write of guest ``[offset, write_end)`` into the *count* clusters from *index* does.

        They are bound to the host clusters from *host* (*owned*: they were ours already):
        the guest ranges to copy as they read now, and the entry updates to make afterwards.
        """

    def apply_updates(self, table: L2Table, updates: Sequence[Update], release: Release | None) -> None:
        """Make the entry updates of :meth:`write_updates`; with *release*, the descriptors replaced are released."""
        for slot, descriptor, bitmap in updates:
            if release is not None:
                release(self.descriptor(table, slot))
            self.set(table, slot, descriptor, bitmap)

    @abc.abstractmethod
    def zero_entries(self, table: L2Table, start: int, stop: int, mode: ZeroMode, release: Release) -> None:
        """Apply *mode* to the entries for guest ``[start, stop)`` (whole units of :attr:`zero_bits`)."""


class StandardL2(L2Entries):
    """Standard (64-bit) L2 entries: per cluster, classified into runs when a table is loaded."""

    extended = False
    reserves_hosts = False

    @property
    def zero_bits(self) -> int:
        """Zeroing works on whole clusters."""
        return self.cluster_bits

    def lookup(self, table: L2Table, offset: int, end: int, max_length: int) -> tuple[ShallowMapping, int]:
        """The mapping at guest *offset*: the run's kind from the table's classification."""
        cluster_bits = self.cluster_bits
        index = (offset >> cluster_bits) & self._l2_mask
        within = offset & self._cluster_mask
        wanted = ((min(end, offset + max_length) - offset + within - 1) >> cluster_bits) + 1
        length = (table.run_length(index, wanted) << cluster_bits) - within
        if offset + length > end:
            length = end - offset
        kind = table.kinds[index]
        if kind == DATA:
            in_place = self._writable and bool(table.entries[index] & OFLAG_COPIED)
            return ShallowRaw(self._data_storage, table.hosts[index] + within, in_place), length
        if kind == ZERO:
            host = table.hosts[index]  # a zeroed cluster that keeps its host cluster
            return self.not_data(kind, offset, host + within if host else None), length
        return self.not_data(kind, offset), length

    def compressed_descriptor(self, table: L2Table, index: int) -> int:
        """The entry itself, when it is a compressed one."""
        return table.hosts[index] if table.kinds[index] == COMPRESSED else 0

    def descriptor(self, table: L2Table, index: int) -> int:
        """The entry."""
        return table.entries[index]

    def descriptors(self, table: L2Table) -> Sequence[int]:
        """The live entries."""
        return table.entries

    def update(self, table: L2Table, index: int) -> Update:
        """The entry (standard entries have no bitmap: 0)."""
        return index, table.entries[index], 0

    def set(self, table: L2Table, index: int, descriptor: int, bitmap: int | None = None) -> None:
        """Replace the entry (its classification follows; runs are recomputed lazily)."""
        table.set_entry(index, descriptor)

    def _in_place_run(self, table: L2Table, index: int, clusters: int) -> int:
        """How many clusters from *index* (at most *clusters*) can be written where they are."""
        kinds, hosts, entries = table.kinds, table.hosts, table.entries
        step = 1 << self.cluster_bits
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

    def in_place(self, table: L2Table, offset: int, length: int) -> tuple[int, int]:
        """Our own data clusters from *offset*, contiguous in the host file."""
        cluster_bits = self.cluster_bits
        within = offset & self._cluster_mask
        index = (offset >> cluster_bits) & self._l2_mask
        count = self._in_place_run(table, index, ((length + within - 1) >> cluster_bits) + 1)
        if not count:
            return 0, 0
        return table.hosts[index] + within, min(length, (count << cluster_bits) - within)

    def write_run(self, table: L2Table, index: int, last: int) -> tuple[int | None, int]:
        """The clusters from *index* that are not ours: each gets a new host cluster."""
        kinds, entries = table.kinds, table.entries
        position = index + 1
        while True:
            # Ours: data entries with the COPIED flag; the kinds are searched in C.
            found = kinds.find(DATA, position, last + 1)
            if found < 0:
                return None, last + 1 - index
            if entries[found] & OFLAG_COPIED:
                return None, found - index
            position = found + 1

    def apply_updates(self, table: L2Table, updates: Sequence[Update], release: Release | None) -> None:
        """Make the updates in one pass; entries that held something are released first (with *release*)."""
        entries, kinds, hosts = table.entries, table.kinds, table.hosts
        if release is not None:
            for slot, _, _ in updates:
                if entries[slot]:
                    release(entries[slot])
        kind_of = table.kind_of
        for slot, descriptor, _ in updates:
            entries[slot] = descriptor
            kinds[slot], hosts[slot] = kind_of(descriptor)
        table.runs_valid = False

    def write_updates(
        self, table: L2Table, index: int, count: int, host: int, offset: int, write_end: int, owned: bool
    ) -> tuple[list[Fill], list[Update]]:
        """Copy what the write leaves unwritten in the first and last cluster; map the new clusters."""
        cluster_bits = self.cluster_bits
        cluster_size = 1 << cluster_bits
        fills: list[Fill] = []
        within = offset & (cluster_size - 1)
        if within:
            fills.append((offset - within, offset))
        tail = write_end & (cluster_size - 1)
        if tail:
            fills.append((write_end, write_end - tail + cluster_size))
        updates = [(index + step, (host + (step << cluster_bits)) | OFLAG_COPIED, 0) for step in range(count)]
        return fills, updates

    def zero_entries(self, table: L2Table, start: int, stop: int, mode: ZeroMode, release: Release) -> None:
        """Zero flag (keeping our allocation for KEEP) or unallocated, cluster by cluster."""
        cluster_bits = self.cluster_bits
        for cluster in range(start >> cluster_bits, stop >> cluster_bits):
            slot = cluster & self._l2_mask
            old = table.entries[slot]
            if mode is ZeroMode.UNMAP:
                new = 0
            elif mode is ZeroMode.KEEP and table.kinds[slot] in (DATA, ZERO) and old & OFLAG_COPIED:
                new = old | OFLAG_ZERO  # keep our allocation, read as zero
            else:
                new = OFLAG_ZERO
            if new != old:
                keeps_space = new & L2_OFFSET_MASK and new & L2_OFFSET_MASK == old & L2_OFFSET_MASK
                if not keeps_space:
                    release(old)
                table.set_entry(slot, new)


class ExtendedL2(L2Entries):
    """Extended (128-bit) L2 entries: a cluster descriptor and 32 subclusters' allocation and zero bits."""

    extended = True
    reserves_hosts = True

    @property
    def zero_bits(self) -> int:
        """Zeroing works on whole subclusters."""
        return self.cluster_bits - 5

    def lookup(self, table: L2Table, offset: int, end: int, max_length: int) -> tuple[ShallowMapping, int]:
        """The mapping at guest *offset*: subclusters of the same kind (and host contiguity) form a run."""
        limit = min(end, offset + max_length)
        cluster_bits = self.cluster_bits
        sub_bits = cluster_bits - 5
        sub_size = 1 << sub_bits
        entries = table.entries
        index = (offset >> cluster_bits) & self._l2_mask
        subcluster = table.subcluster
        kind, host = subcluster(index, (offset >> sub_bits) & 31, cluster_bits)
        # Subclusters of allocated clusters (data or not) have a host offset: a run's must be contiguous.
        host_start = None if host is None else host + (offset & (sub_size - 1))
        copied = entries[2 * index] & OFLAG_COPIED
        step_bits = cluster_bits if kind == COMPRESSED else sub_bits
        position = ((offset >> step_bits) + 1) << step_bits
        while position < limit:
            next_index = (position >> cluster_bits) & self._l2_mask
            next_kind, next_host = subcluster(next_index, (position >> sub_bits) & 31, cluster_bits)
            if next_kind != kind:
                break
            if kind != COMPRESSED:
                if host_start is None:
                    if next_host is not None:
                        break
                elif next_host != host_start + position - offset or (
                    kind == DATA and entries[2 * next_index] & OFLAG_COPIED != copied
                ):
                    break
            # A cluster whose subclusters are all of this kind (and contiguous, as their host
            # offsets follow the first's) joins the run whole.
            if not position & self._cluster_mask and kind != COMPRESSED:
                bitmap = entries[2 * next_index + 1]
                if bitmap == _UNIFORM[kind]:
                    position += 1 << cluster_bits
                    continue
            position += 1 << step_bits
        length = min(position, limit) - offset
        if kind == DATA:
            # Like standard entries: writable in place where the cluster is ours alone.
            assert host_start is not None
            return ShallowRaw(self._data_storage, host_start, self._writable and bool(copied)), length
        return self.not_data(kind, offset, host_start), length

    def compressed_descriptor(self, table: L2Table, index: int) -> int:
        """The descriptor, when it is a compressed one."""
        descriptor = table.entries[2 * index]
        return descriptor if descriptor & OFLAG_COMPRESSED else 0

    def descriptor(self, table: L2Table, index: int) -> int:
        """The first half of the entry."""
        return table.entries[2 * index]

    def descriptors(self, table: L2Table) -> Sequence[int]:
        """The descriptors (a copy: the even words of the table)."""
        return table.entries[::2]

    def update(self, table: L2Table, index: int) -> Update:
        """The descriptor and the bitmap."""
        return index, table.entries[2 * index], table.entries[2 * index + 1]

    def set(self, table: L2Table, index: int, descriptor: int, bitmap: int | None = None) -> None:
        """Replace the descriptor and (unless ``None``) the bitmap."""
        if bitmap is None:
            table.entries[2 * index] = descriptor
        else:
            table.set_extended(index, descriptor, bitmap)

    def _owned(self, descriptor: int) -> bool:
        """Whether a descriptor is a host cluster of our own (written in place)."""
        return descriptor & (OFLAG_COPIED | OFLAG_COMPRESSED) == OFLAG_COPIED and bool(
            descriptor & L2_OFFSET_MASK or self._external
        )

    def in_place(self, table: L2Table, offset: int, length: int) -> tuple[int, int]:
        """The allocated subclusters of our own clusters that follow *offset*, contiguous in the host file."""
        cluster_bits = self.cluster_bits
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
            run = (entries[2 * index + 1] & ALL_SUBCLUSTERS) >> first
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

    def write_run(self, table: L2Table, index: int, last: int) -> tuple[int | None, int]:
        """Clusters of our own keep their host cluster; others (unallocated, shared, compressed) get new ones."""
        entries = table.entries
        count = 1
        if self._owned(entries[2 * index]):
            host = entries[2 * index] & L2_OFFSET_MASK
            while (
                index + count <= last
                and self._owned(entries[2 * (index + count)])
                and entries[2 * (index + count)] & L2_OFFSET_MASK == host + (count << self.cluster_bits)
            ):
                count += 1
            return host, count
        while index + count <= last and not self._owned(entries[2 * (index + count)]):
            count += 1
        return None, count

    def write_updates(
        self, table: L2Table, index: int, count: int, host: int, offset: int, write_end: int, owned: bool
    ) -> tuple[list[Fill], list[Update]]:
        """The subclusters written become allocated; what stays allocated but is not written is filled.

        That is what it reads now: the unwritten head and tail of the first and last subcluster
        written, and in a new host cluster the subclusters allocated before (all of them for a
        compressed cluster). Other subclusters keep their state.
        """
        cluster_bits = self.cluster_bits
        cluster_size = 1 << cluster_bits
        sub_bits = cluster_bits - 5
        entries = table.entries
        first_guest = offset >> cluster_bits << cluster_bits
        updates: list[Update] = []
        fills: list[list[int]] = []
        for step in range(count):
            slot = index + step
            cluster = first_guest + (step << cluster_bits)
            start, stop = max(offset, cluster), min(write_end, cluster + cluster_size)
            descriptor, bitmap = entries[2 * slot], entries[2 * slot + 1]
            first, last_sub = (start - cluster) >> sub_bits, (stop - 1 - cluster) >> sub_bits
            written = (2 << last_sub) - (1 << first)
            if descriptor & OFLAG_COMPRESSED:
                before, allocated = 0, ALL_SUBCLUSTERS  # the whole cluster, decompressed
            else:
                before = bitmap & ALL_SUBCLUSTERS
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
        return [(a, b) for a, b in fills], updates

    def zero_entries(self, table: L2Table, start: int, stop: int, mode: ZeroMode, release: Release) -> None:
        """KEEP and ZERO set the zero bits, UNMAP clears them; all clear the allocation bits.

        A host cluster left without allocated subclusters is released, except by KEEP where it
        is ours. A compressed cluster is only ever zeroed whole (the caller trims the range).
        """
        cluster_bits = self.cluster_bits
        cluster_mask = self._cluster_mask
        sub_bits = cluster_bits - 5
        entries = table.entries
        position = start
        while position < stop:
            cluster = position & ~cluster_mask
            cluster_stop = min(stop, cluster + cluster_mask + 1)
            range_bits = (1 << ((cluster_stop - cluster) >> sub_bits)) - (1 << ((position - cluster) >> sub_bits))
            slot = (position >> cluster_bits) & self._l2_mask
            descriptor, bitmap = entries[2 * slot], entries[2 * slot + 1]
            if descriptor & OFLAG_COMPRESSED:  # wholly covered here
                new_descriptor, allocated, zeroes = 0, 0, 0
            else:
                new_descriptor = descriptor
                allocated = bitmap & ALL_SUBCLUSTERS & ~range_bits
                zeroes = (bitmap >> SUBCLUSTERS) & ~range_bits
            if mode is not ZeroMode.UNMAP:
                zeroes |= range_bits
            if not allocated and not (mode is ZeroMode.KEEP and self._owned(descriptor)):
                new_descriptor = 0  # nothing uses the host cluster any more
            new_bitmap = allocated | zeroes << SUBCLUSTERS
            if new_descriptor != descriptor or new_bitmap != bitmap:
                if new_descriptor != descriptor:
                    release(descriptor)
                table.set_extended(slot, new_descriptor, new_bitmap)
            position = cluster_stop
