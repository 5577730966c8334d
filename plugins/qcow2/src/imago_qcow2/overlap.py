"""Overlap checks: no write, free or allocation ever destroys the image's metadata.

Which host clusters hold metadata is kept in a :class:`MetadataMap` (kinds per cluster, and
the clusters in order for range queries). It holds QEMU's default ("cached") overlap-check set
(the header, the active L1 and L2 tables, the refcount table and blocks, the snapshot table,
the inactive L1 tables) and the inactive L2 tables. It is built when an image is opened for
writing (without the inactive L2 tables: opening reads no snapshot L1 table; they join before
the first check, read as the union of the snapshots' L1 tables' file ranges, each byte once),
updated where metadata is placed or retired, and rebuilt from the header and tables after the
header switched to other tables (resizing, snapshots, a moved refcount table).

:class:`MetadataGuard` asks it:

* before every metadata write (header, L1, L2, refcount table and blocks, snapshot table):
  the target must hold nothing but its own kind;
* before a data write, before clusters are handed out by allocation, before an L2 entry's
  clusters are released, and when a refcount drops to zero: none of it may be metadata.

On an overlap the image is marked corrupt on disk (incompatible feature bit 1, as QEMU does),
:class:`~imago.CorruptImageError` names the structures, nothing else is written, and every
later write through the open image is refused. Whatever a damaged table claims, metadata is
never freed, punched out of the file, handed out again or written over.
"""

from __future__ import annotations

import enum
from bisect import bisect_left, insort
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from imago import CorruptImageError

from .layout import INCOMPAT_CORRUPT, write_header_fields
from .snapshot_table import Snapshot, snapshot_table_length
from .tables import (
    L1_OFFSET_MASK,
    L1_RESERVED,
    OFLAG_COMPRESSED,
    L2Table,
    decode_words,
    entry_clusters,
    parse_l1,
    table_clusters,
)

if TYPE_CHECKING:
    from .state import Qcow2State

__all__ = ["L2_TABLES", "Metadata", "MetadataGuard", "MetadataMap", "collect_metadata", "describe"]


class Metadata(enum.IntFlag):
    """The kinds of metadata a host cluster can hold (one cluster may, wrongly, hold several)."""

    HEADER = 1
    ACTIVE_L1 = 2
    ACTIVE_L2 = 4
    REFCOUNT_TABLE = 8
    REFCOUNT_BLOCK = 16
    SNAPSHOT_TABLE = 32
    INACTIVE_L1 = 64
    INACTIVE_L2 = 128


#: An L2 table may be the active image's and a snapshot's at once: no overlap.
L2_TABLES = Metadata.ACTIVE_L2 | Metadata.INACTIVE_L2
# Everything but L2 tables, as a plain int (enum arithmetic is slow on the write path).
_NOT_L2 = ~int(L2_TABLES)

_NAMES = {
    Metadata.HEADER: "qcow2 header",
    Metadata.ACTIVE_L1: "active L1 table",
    Metadata.ACTIVE_L2: "active L2 table",
    Metadata.REFCOUNT_TABLE: "refcount table",
    Metadata.REFCOUNT_BLOCK: "refcount block",
    Metadata.SNAPSHOT_TABLE: "snapshot table",
    Metadata.INACTIVE_L1: "inactive L1 table",
    Metadata.INACTIVE_L2: "inactive L2 table",
}


def describe(kinds: int) -> str:
    """The structures of *kinds* in words (``"refcount table and active L2 table"``)."""
    return " and ".join(name for kind, name in _NAMES.items() if kinds & kind) or "no metadata"


class MetadataMap:
    """Which host clusters hold metadata, and what: kinds per cluster, and the clusters in order."""

    __slots__ = ("_kinds", "_order")

    def __init__(self, kinds: dict[int, int] | None = None) -> None:
        self._kinds: dict[int, int] = {} if kinds is None else kinds
        # Sorted once here; kept sorted by the (rare) updates after.
        self._order: list[int] = sorted(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def __contains__(self, cluster: object) -> bool:
        return cluster in self._kinds

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def clear(self) -> None:
        """Forget every cluster."""
        self._kinds.clear()
        self._order.clear()

    def kinds(self, cluster: int) -> Metadata:
        """What cluster *cluster* holds (``Metadata(0)``: no metadata)."""
        return Metadata(self._kinds.get(cluster, 0))

    def bits(self, cluster: int) -> int:
        """:meth:`kinds` as a plain int (for the write path)."""
        return self._kinds.get(cluster, 0)

    def add(self, kind: Metadata, clusters: Iterable[int]) -> None:
        """Record that *clusters* hold metadata of *kind*."""
        known = self._kinds
        value = int(kind)  # (plain ints: enum arithmetic is slow)
        for cluster in clusters:
            old = known.get(cluster)
            if old is None:
                known[cluster] = value
                insort(self._order, cluster)
            else:
                known[cluster] = old | value

    def remove(self, kind: Metadata, clusters: Iterable[int]) -> None:
        """Record that *clusters* no longer hold metadata of *kind*."""
        known = self._kinds
        keep = ~int(kind)
        for cluster in clusters:
            old = known.get(cluster)
            if old is None:
                continue
            if old & keep:
                known[cluster] = old & keep
            else:
                del known[cluster]
                order = self._order
                del order[bisect_left(order, cluster)]

    def any_in(self, first: int, last: int) -> bool:
        """Whether any cluster of ``[first, last]`` holds metadata (one bisection: the write path's test)."""
        order = self._order
        index = bisect_left(order, first)
        return index < len(order) and order[index] <= last

    def overlap(self, first: int, count: int, allowed: int = 0) -> tuple[int, Metadata] | None:
        """The first of clusters ``[first, first + count)`` holding metadata other than *allowed*, and what."""
        order = self._order
        index = bisect_left(order, first)
        end = first + count
        known = self._kinds
        others = ~int(allowed)
        while index < len(order):
            cluster = order[index]
            if cluster >= end:
                return None
            kinds = known[cluster] & others
            if kinds:
                return cluster, Metadata(kinds)
            index += 1
        return None


# Bytes of snapshot L1 tables read (and scanned) at a time.
_L1_CHUNK = 1 << 20


async def _snapshot_l2_clusters(state: Qcow2State, snapshots: Sequence[Snapshot]) -> list[int]:
    """The clusters of the L2 tables the snapshots' L1 tables name (read from the file).

    Snapshots may share L1 tables, or name overlapping ones: the union of their file ranges is
    read, each byte once, so the work is bounded by the file's size, not by the number of
    snapshots times their L1 tables' sizes. A damaged entry raises the error naming the first
    snapshot whose table holds it.
    """
    cluster_bits = state.cluster_bits
    cluster_mask = (1 << cluster_bits) - 1
    file_size = state.storage.size
    clusters: set[int] = set()
    for start, end in _l1_ranges(snapshots):
        for chunk_start in range(start, end, _L1_CHUNK):
            raw = bytearray(min(_L1_CHUNK, end - chunk_start))
            await state.storage.readv([memoryview(raw)], chunk_start)
            if raw.count(0) == len(raw):
                continue  # (all zero: nothing to look at, decided in C)
            words = decode_words(raw)
            # Each distinct entry once (the set is built in C): tables are mostly zeroes and repeats.
            for entry in set(words):
                if not entry:
                    continue
                l2_offset = entry & L1_OFFSET_MASK
                if (
                    entry & L1_RESERVED
                    or l2_offset & cluster_mask
                    or (l2_offset and l2_offset + cluster_mask >= file_size)
                ):
                    _snapshot_entry_damaged(state, snapshots, chunk_start + 8 * words.index(entry), entry)
                if l2_offset:
                    clusters.add(l2_offset >> cluster_bits)
    return sorted(clusters)


def _l1_ranges(snapshots: Sequence[Snapshot]) -> list[tuple[int, int]]:
    """The file ranges ``[start, end)`` the snapshots' L1 tables cover, merged: each byte in one range."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(
        (snapshot.l1_table_offset, snapshot.l1_table_offset + 8 * snapshot.l1_size)
        for snapshot in snapshots
        if snapshot.l1_size
    ):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _snapshot_entry_damaged(state: Qcow2State, snapshots: Sequence[Snapshot], where: int, entry: int) -> NoReturn:
    """Raise the error of the damaged snapshot L1 entry at file offset *where*, naming its snapshot."""
    owner = next(s for s in snapshots if s.l1_table_offset <= where < s.l1_table_offset + 8 * s.l1_size)
    index = (where - owner.l1_table_offset) // 8
    # The same checks and words as for any L1 table (parse_l1), on this one entry.
    try:
        parse_l1(
            entry.to_bytes(8, "big"),
            table_offset=where,
            cluster_bits=state.cluster_bits,
            file_size=state.storage.size,
            filename=state.filename,
        )
    except CorruptImageError as error:
        problem = error.problem.replace("L1 entry 0", f"snapshot {owner.id!r} L1 entry {index}", 1)
        raise CorruptImageError(state.filename, where, problem) from None
    raise AssertionError("unreachable: the entry was found damaged")  # pragma: no cover


def _l2_clusters(l1: Iterable[int], cluster_bits: int) -> list[int]:
    """The clusters of the L2 tables an L1 table names (damaged entries, unaligned, left out)."""
    mask = (1 << cluster_bits) - 1
    return [offset >> cluster_bits for offset in l1 if offset and not offset & mask]


async def collect_metadata(state: Qcow2State, *, inactive_l2: bool = True) -> MetadataMap:
    """Every cluster metadata occupies, from the header and the tables it leads to.

    What is read from the file (the snapshots' L1 tables) is read first; what is in memory
    (header, active L1 table, refcount table, snapshot list) is taken at the end, without an
    await in between, so that the map matches one moment of the state. Without *inactive_l2*
    the snapshots' L1 tables are not read, and their L2 tables are left out.
    """
    cluster_bits = state.cluster_bits
    snapshots = state.snapshots
    inactive = await _snapshot_l2_clusters(state, snapshots) if inactive_l2 else []
    blocks = await state.refcounts.block_offsets()
    if state.snapshots is not snapshots:  # changed meanwhile: read again
        return await collect_metadata(state, inactive_l2=inactive_l2)
    header = state.header
    kinds: dict[int, int] = {}

    def mark(kind: Metadata, clusters: Iterable[int]) -> None:
        value = int(kind)
        for cluster in clusters:
            kinds[cluster] = kinds.get(cluster, 0) | value

    mark(Metadata.HEADER, (0,))
    mark(Metadata.ACTIVE_L1, table_clusters(header.l1_table_offset, header.l1_size * 8, cluster_bits))
    mark(Metadata.ACTIVE_L2, _l2_clusters(state.l1, cluster_bits))
    mark(
        Metadata.REFCOUNT_TABLE,
        table_clusters(header.refcount_table_offset, header.refcount_table_clusters << cluster_bits, cluster_bits),
    )
    mark(Metadata.REFCOUNT_BLOCK, (offset >> cluster_bits for offset in blocks))
    if snapshots:
        length = snapshot_table_length(snapshots, header.snapshots_offset)
        mark(Metadata.SNAPSHOT_TABLE, table_clusters(header.snapshots_offset, length, cluster_bits))
        # (Shared or overlapping tables marked once: the work is bounded by the file, not the snapshot count.)
        for start, end in _l1_ranges(snapshots):
            mark(Metadata.INACTIVE_L1, table_clusters(start, end - start, cluster_bits))
        mark(Metadata.INACTIVE_L2, inactive)
    return MetadataMap(kinds)


class MetadataGuard:
    """The overlap checks of one image opened for writing, and its corrupt state.

    Until :meth:`start` (opening for writing) the map is empty and nothing is checked: a
    read-only image writes nothing.
    """

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        #: Clusters holding metadata (replaced when rebuilt: look it up here each time).
        self.map = MetadataMap()
        #: Why the image was marked corrupt (``None``: it was not).
        self.corrupt: str | None = None
        #: Something to do before the next write (:meth:`settle`): the image was marked corrupt,
        #: or the map must be rebuilt. One attribute for the write path to look at.
        self.unsettled = False
        self._stale = False
        self._generation = 0
        self._active = False
        # Whether every L2 table was found to map nothing past the file's end at opening
        # (checked before the file first grows), or the error that showed it does.
        self._references_checked = False
        self._reference_error: CorruptImageError | None = None
        # Opening reads no snapshot L1 table: their L2 tables join the map when it is first
        # asked (the first write or metadata change), and their refcounts are checked then.
        self._inactive_unchecked = False
        # Why the snapshots' tables could not join the map (every later check raises it).
        self._inactive_error: CorruptImageError | None = None

    # --- keeping the map ------------------------------------------------------------------------

    async def start(self) -> MetadataMap:
        """Build the map from the image as it is on disk (opening for writing, or after a repair).

        From now on every write is checked. An image whose corrupt bit is clear again (a
        repair cleared it) is writable again. The tables on disk now are the ones the file's
        present size is checked against.
        """
        state = self._state
        state.open_size = state.storage.size
        state.rewritten_tables.clear()
        self._active = True
        self._stale = False
        self._references_checked = False
        self._reference_error = None
        if not state.header.incompatible_features & INCOMPAT_CORRUPT:
            self.corrupt = None
        self.unsettled = self.corrupt is not None
        self._inactive_error = None
        self.map = await collect_metadata(state, inactive_l2=False)
        if state.snapshots:
            # The snapshots' L2 tables are added by the first rebuild (see current()).
            self._inactive_unchecked = True
            self._stale = True
            self.unsettled = True
        return self.map

    def tables_switched(self) -> None:
        """The header now names other tables: rebuild the map before it is next asked."""
        if self._active:
            self._stale = True
            self._generation += 1
            self.unsettled = True

    async def current(self) -> MetadataMap:
        """The map, rebuilt first if the header switched tables."""
        while self._stale:
            if self._inactive_error is not None:
                raise self._inactive_error
            generation = self._generation
            try:
                rebuilt = await collect_metadata(self._state)
                if self._inactive_unchecked:
                    await self._check_inactive(rebuilt)
            except CorruptImageError as error:
                self._inactive_error = error
                raise
            if generation == self._generation:  # (else the tables switched again meanwhile)
                self.map = rebuilt
                self._stale = False
                self.unsettled = self.corrupt is not None
        return self.map

    async def _check_inactive(self, metadata: MetadataMap) -> None:
        """The snapshots' L2 tables, now in the map, must not lie in clusters counted free.

        (What opening checks for the rest of the metadata: allocation would hand them out.)
        """
        state = self._state
        cluster_bits = state.cluster_bits
        for cluster in metadata:
            kinds = metadata.bits(cluster)
            if kinds & Metadata.INACTIVE_L2 and not await state.refcounts.get(cluster << cluster_bits):
                raise CorruptImageError(
                    state.filename,
                    cluster << cluster_bits,
                    f"the {describe(kinds)} lies in a cluster whose refcount is 0; repair the image "
                    "(qemu-img check -r all) before writing to it",
                )
        self._inactive_unchecked = False

    def placed(self, kind: Metadata, clusters: Iterable[int]) -> None:
        """New metadata of *kind* was placed in *clusters*."""
        if self._active:
            self.map.add(kind, clusters)

    def retired(self, kind: Metadata, clusters: Iterable[int]) -> None:
        """*clusters* no longer hold metadata of *kind* (nothing on disk points to them as such)."""
        if self._active:
            self.map.remove(kind, clusters)

    # --- the checks -----------------------------------------------------------------------------

    async def settle(self) -> None:
        """Before a write: refuse it if the image was marked corrupt; rebuild the map if needed.

        Called before the state's lock is taken; a rebuild takes it, so that no metadata
        changes while the map is built.
        """
        if self.corrupt is not None:
            self.refuse()
        if self._stale:
            async with self._state.lock:
                await self.current()

    def refuse(self) -> NoReturn:
        """Refuse a write (or metadata change) after the image was marked corrupt."""
        raise CorruptImageError(
            self._state.filename,
            None,
            f"the image was marked corrupt ({self.corrupt}); no further writes: repair it (qemu-img check -r all)",
        )

    async def check_write(self, kind: Metadata, offset: int, length: int, what: str | None = None) -> None:
        """Before writing metadata of *kind* to ``[offset, offset + length)``: it must overlap no other metadata."""
        if self.corrupt is not None:
            self.refuse()
        if not self._active or length <= 0:
            return
        metadata = await self.current() if self._stale else self.map
        cluster_bits = self._state.cluster_bits
        first = offset >> cluster_bits
        allowed = L2_TABLES if kind & L2_TABLES else kind
        hit = metadata.overlap(first, ((offset + length - 1) >> cluster_bits) - first + 1, allowed)
        if hit is not None:
            name = what or _NAMES[kind]
            await self.signal(offset, f"{name} at {offset:#x} overlaps {describe(hit[1])}")

    def data_overlap(self, host: int, length: int) -> tuple[int, Metadata] | None:
        """The first image-file cluster of a data write to ``[host, host + length)`` that holds metadata.

        The write path's check, synchronous: callers :meth:`settle` first.
        """
        cluster_bits = self._state.cluster_bits
        first = host >> cluster_bits
        last = (host + length - 1) >> cluster_bits
        metadata = self.map
        # Nearly always nothing: one bisection says so; the rest only runs on a hit.
        if not metadata.any_in(first, last):
            return None
        return metadata.overlap(first, last - first + 1)

    async def refuse_data_write(self, host: int, guest: int, hit: tuple[int, Metadata]) -> NoReturn:
        """Mark the image corrupt: guest data at *guest* was about to be written over metadata."""
        cluster, kinds = hit
        await self.signal(
            host,
            f"guest data at {guest:#x} would overwrite metadata at {host:#x}: the {describe(kinds)} "
            f"at {cluster << self._state.cluster_bits:#x}",
        )

    async def check_free(self, first: int, count: int) -> None:
        """Before clusters ``[first, first + count)`` with refcount 0 are handed out: none may hold metadata.

        Nor may an L2 entry use them: clusters past the end of the file as it was opened are
        only handed out once every L2 table is known to map nothing there.
        """
        if self.corrupt is not None:
            self.refuse()
        if not self._active:
            return
        state = self._state
        if not self._references_checked and (first + count) << state.cluster_bits > state.open_size:
            await self._check_references()
        hit = (await self.current() if self._stale else self.map).overlap(first, count)
        if hit is not None:
            cluster, kinds = hit
            offset = cluster << self._state.cluster_bits
            await self.signal(offset, f"the {describe(kinds)} at {offset:#x} has refcount 0 and would be allocated")

    async def _check_references(self) -> None:
        """Before the file first grows: no L2 table (active or a snapshot's) maps anything past its end.

        A reference past the end of the file is a damaged entry, and the cluster it names
        has refcount 0: allocation would hand it out and the entry would alias new data (QEMU
        does that). Tables loaded since opening were checked when loaded; the others are read
        once now. Nothing is marked corrupt (``qemu-img check -r all`` cannot repair such an
        entry); writes that need the file to grow are refused.
        """
        if self._reference_error is not None:
            raise self._reference_error
        state = self._state
        cluster_bits = state.cluster_bits
        clusters = set(_l2_clusters(state.l1, cluster_bits))
        clusters.update(await _snapshot_l2_clusters(state, state.snapshots))
        for offset in sorted(cluster << cluster_bits for cluster in clusters):
            if offset in state.rewritten_tables or state.tables.peek(offset) is not None:
                continue  # ours, or checked when loaded
            try:
                await state.read_table(offset)
            except CorruptImageError as error:
                self._reference_error = CorruptImageError(
                    error.filename,
                    error.offset,
                    f"{error.problem}; the image file is not grown (the cluster there would be handed out "
                    "while that entry still uses it)",
                )
                raise self._reference_error from error
        self._references_checked = True

    async def freeing(self, cluster: int) -> None:
        """A cluster's refcount dropped to 0: it must not hold metadata (it would be punched and reused)."""
        if not self._active:
            return
        kinds = (await self.current() if self._stale else self.map).bits(cluster)
        if kinds:
            offset = cluster << self._state.cluster_bits
            await self.signal(offset, f"the {describe(kinds)} at {offset:#x} would be freed")

    async def check_entries(self, table: L2Table, first: int, stop: int, guest: int) -> None:
        """Before L2 entries ``[first, stop)`` of *table* are replaced or zeroed: none may use metadata.

        Releasing such an entry would free the metadata cluster (and punch it out of the
        file). *guest* is the guest offset of entry *first*, for the message.
        """
        if self.corrupt is not None:
            self.refuse()
        if not self._active:
            return
        state = self._state
        cluster_bits = state.cluster_bits
        metadata = await self.current() if self._stale else self.map
        kinds = metadata.bits(table.offset >> cluster_bits) & _NOT_L2
        if kinds:  # the "table" is other metadata: its entries are not entries
            await self.signal(table.offset, f"L2 table at {table.offset:#x} overlaps {describe(kinds)}")
        step = 2 if table.extended else 1
        external = state.header.has_data_file
        for index, descriptor in enumerate(table.entries[first * step : stop * step : step]):
            if not descriptor:
                continue
            if external and not descriptor & OFLAG_COMPRESSED:
                continue  # data clusters lie in the data file
            clusters = entry_clusters(descriptor, cluster_bits)
            hit = metadata.overlap(clusters.start, len(clusters)) if clusters else None
            if hit is not None:
                cluster, kinds = hit
                at = table.offset + 8 * step * (first + index)
                await self.signal(
                    at,
                    f"the L2 entry for guest offset {guest + (index << cluster_bits):#x} uses the "
                    f"{describe(kinds)} at {cluster << cluster_bits:#x}; releasing it would free metadata",
                )

    async def check_data_clusters(self, clusters: Collection[int], tree: str) -> None:
        """The data clusters of an L1 tree (*tree* names it) hold no metadata: checked before their refcounts change."""
        if self.corrupt is not None:
            self.refuse()
        if not self._active:
            return
        metadata = await self.current() if self._stale else self.map
        # (Metadata is usually far smaller than the data: look its clusters up among the data's.)
        hit = next((cluster for cluster in metadata if cluster in clusters), None)
        if hit is not None:
            offset = hit << self._state.cluster_bits
            await self.signal(
                offset, f"an L2 entry under {tree} uses the {describe(metadata.bits(hit))} at {offset:#x} as data"
            )

    async def check_l2_table(self, l2_offset: int, l1_index: int, l1_offset: int | None) -> None:
        """Before an L2 table is changed, copied or released: its cluster must hold nothing but L2 tables.

        *l1_index* and *l1_offset*: the L1 entry naming it, and where that L1 table lies (if known).
        """
        if self.corrupt is not None:
            self.refuse()
        if not self._active:
            return
        metadata = await self.current() if self._stale else self.map
        kinds = metadata.bits(l2_offset >> self._state.cluster_bits) & _NOT_L2
        if kinds:
            await self.signal(
                l2_offset if l1_offset is None else l1_offset + 8 * l1_index,
                f"L2 table at {l2_offset:#x} (L1 entry {l1_index}) overlaps {describe(kinds)}",
            )

    # --- corruption -----------------------------------------------------------------------------

    async def signal(self, offset: int | None, problem: str) -> NoReturn:
        """Mark the image corrupt on disk (once) and raise :class:`~imago.CorruptImageError` naming *problem*.

        Only the incompatible features field is written (version 3; version 2 images cannot
        record it, as in QEMU): no other metadata reaches the disk through this open image.
        """
        state = self._state
        first = self.corrupt is None
        if first:
            self.corrupt = problem
            self.unsettled = True
            header = state.header
            if header.version >= 3 and not header.incompatible_features & INCOMPAT_CORRUPT:
                features = header.incompatible_features | INCOMPAT_CORRUPT
                await write_header_fields(state.storage, {"incompatible_features": features})
                state.header = header.__replace__(incompatible_features=features)
        raise CorruptImageError(
            state.filename,
            offset,
            f"{problem}; refused, and the image is marked corrupt (repair it: qemu-img check -r all)"
            if first
            else f"{problem}; refused (the image was marked corrupt: {self.corrupt})",
        )
