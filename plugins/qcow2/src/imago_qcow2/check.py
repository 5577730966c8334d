"""Checking (and repairing) a qcow2 image as ``qemu-img check [-r leaks|all]`` does.

The check rebuilds every cluster's reference count in memory (:class:`RefcountArray`, one
counter per host cluster of the file) from everything that uses clusters: the header, the
active and every snapshot's L1 and L2 tables (compressed data counted per host cluster it
touches, preallocated zero clusters too), the snapshot table, the refcount table and blocks,
and the bitmap directory and tables. It compares them with the stored refcounts and verifies
the COPIED flags of the active tables, and reports each finding with the line qemu-img prints
for it and the counts qemu-img reports. The order of the passes, the findings and the counts
follow QEMU 7.2 (``qcow2_co_check_locked``): a repair first fixes what its mode allows (leaks;
with ``all`` refcounts too low, COPIED flags, misplaced refcount blocks, or the whole refcount
structure rebuilt), and :func:`check_image` then checks again, as qemu-img does.

Each metadata cluster is read once or twice, so the work is bounded by the file, not by what
its tables claim: L2 tables used by several L1 tables (snapshots) are kept while they are
still needed (within a memory budget), and a snapshot's L2 table is walked once, its further
uses replayed (the same findings) and counted together at the end; an L1 table is read only
as far as the file reaches, and a snapshot whose L1 table overlaps one counted before is
reported and not walked (:func:`overlapping_l1_tables`; a repair with ``all`` discards it).
With ``all``, an active L2 entry naming a cluster past the end of the file (a power loss
with lazy refcounts) is unmapped (:meth:`_Pass.unmap_past_end`), which QEMU 7.2 cannot repair.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterator
from typing import Any

import attrs

from imago import CheckFinding, CheckResult, CorruptImageError, FindingKind, RepairMode, Storage

from .header import Header
from .layout import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, write_header_fields
from .refcount_array import RefcountArray, RefcountArrayTooLargeError
from .refcounts import Refcounts
from .references import References
from .repair import (
    REFT_OFFSET_MASK,
    REFT_RESERVED,
    DiskRefcounts,
    MetadataGuard,
    RefcountBlockError,
    RepairWriteError,
    bitmap_directory,
    read_at,
    read_header,
    rebuild_refcount_structure,
    write_l1_entry,
)
from .snapshot_table import Snapshot, encode_snapshot_table, read_snapshot_table, snapshot_table_length
from .state import Qcow2State
from .tables import decode_words, read_l1, table_clusters

__all__ = [
    "PassResult",
    "Session",
    "check_image",
    "check_pass",
    "overlapping_l1_tables",
    "reload_state",
    "rewrite_snapshot_table",
]

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
BITMAP_ALL_ALLOC = (1 << 32) - 1
BITMAP_ALL_ZEROES = BITMAP_ALL_ALLOC << 32
# QEMU's limits for snapshot L1 tables and bitmaps.
MAX_L1_BYTES = 32 << 20
MAX_BITMAP_DIRECTORY_BYTES = 64 << 20
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_TABLE_ENTRY_RESERVED = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Snapshot L1 tables kept between planning and walking at most.
_L1_KEEP_BYTES = 16 << 20
# Findings listed at most (the counts go on).
_MAX_FINDINGS = 1 << 16
# Raw L2 tables kept for a second use at most.
_L2_KEEP_BYTES = 64 << 20

# Cluster types, as QEMU's qcow2_get_cluster_type names them.
_UNALLOCATED, _NORMAL, _COMPRESSED, _ZERO_PLAIN, _ZERO_ALLOC = range(5)

_EIO = "Input/output error"
_ENOMEM = "Cannot allocate memory"
_INT_MAX = (1 << 31) - 1
_OVERFLOW_HINT = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the "
    "image cannot be opened for writing"
)
_EINVAL = "Invalid argument"


def _alt_hex(value: int) -> str:
    """C's ``%#x``: no prefix for 0."""
    return f"{value:#x}" if value else "0"


@attrs.define
class _Counts:
    """QEMU's BdrvCheckResult."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> _Counts:
        return attrs.evolve(self)

    def add(self, other: _Counts, *, allocation: bool) -> None:
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if allocation:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters


class _CheckFailedError(Exception):
    """The check stopped (QEMU returns an error: qemu-img says "Check failed: <strerror>")."""

    def __init__(self, strerror: str) -> None:
        super().__init__(strerror)
        self.strerror = strerror


#: A repair grows the file to reach a refcount block outside it (as QEMU does) only if the block lies
#: within this many times the file's size; beyond, the refcounts are rebuilt instead.
_GROWTH_LIMIT = 2


def _strerror(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _EIO


@attrs.define
class Session:
    """What lasts from one pass to the next over an open image: QEMU's corruption signalling."""

    #: A corruption was signalled (further ones are suppressed, as QEMU does).
    signaled: bool = False
    #: The image is marked corrupt on disk (``None``: as its header says).
    corrupt: bool | None = None


class _Pass:
    """One check (and repair) pass over the image as it is on disk."""

    def __init__(
        self,
        state: Qcow2State,
        fix: RepairMode | None,
        header: Header,
        snapshots: list[Snapshot],
        session: Session,
        dropped: frozenset[int] = frozenset(),
    ) -> None:
        self.state = state
        self.session = session
        if session.corrupt is None:
            session.corrupt = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        self.storage: Storage = state.storage
        self.fix = fix
        self.fix_leaks = fix is not None
        self.fix_errors = fix is RepairMode.ALL
        self.header = header
        self.snapshots = snapshots
        #: Snapshots whose L1 table overlaps an L1 table counted before theirs (see :func:`overlapping_l1_tables`).
        self.overlapping = overlapping_l1_tables(header, snapshots)
        #: Snapshots this repair discards (their entries are dropped from the table after the pass).
        self.dropped = dropped
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.data_file = header.has_data_file
        self.findings: list[CheckFinding] = []
        self.res = _Counts()
        self.counts = RefcountArray(0, header.refcount_order)
        self.rebuild = False
        self.disk: DiskRefcounts | None = None
        self.active_l1: array[int] = array("Q")
        self.snapshot_l1: dict[int, array[int]] = {}
        self._guard: MetadataGuard | None = None
        # L2 tables kept for later uses: offset -> (entries, uses left).
        self._l2_uses: dict[int, int] = {}
        self._l2_kept: dict[int, array[int]] = {}
        self._l2_kept_bytes = 0
        # Snapshot L2 tables walked once: (the walk's findings, its corruptions), and how many
        # further walks were replayed (see walk_inactive).
        self._walked: dict[int, tuple[list[CheckFinding], int]] = {}
        self._repeats: dict[int, int] = {}
        #: Counters found full so far.
        self.overflows = 0
        offset_bits = 62 - (header.cluster_bits - 8)
        self._compressed_offset_mask = (1 << offset_bits) - 1
        self._csize_shift = offset_bits
        self._csize_mask = (1 << (header.cluster_bits - 8)) - 1

    # --- findings --------------------------------------------------------------------------

    def report(self, kind: FindingKind, message: str, **where: Any) -> None:
        if len(self.findings) >= _MAX_FINDINGS:
            return
        self.findings.append(CheckFinding(kind=kind, message=message, **where))

    def corruption(self, message: str, **where: Any) -> None:
        self.res.corruptions += 1
        self.report(FindingKind.CORRUPTION, message, **where)

    def check_error(self, message: str, **where: Any) -> None:
        self.res.check_errors += 1
        self.report(FindingKind.CHECK_ERROR, message, **where)

    async def signal(self, problem: str) -> None:
        """qcow2_signal_corruption: say it once; when repairing, mark the image corrupt."""
        session = self.session
        fatal = self.fix is not None  # (fatal where the image is writable)
        if session.signaled and (not fatal or session.corrupt):
            return
        session.signaled = True
        if not fatal:
            self.report(
                FindingKind.CORRUPTION,
                f"qcow2: Image is corrupt: {problem}; further non-fatal corruption events will be suppressed",
            )
            return
        self.report(
            FindingKind.CORRUPTION,
            f"qcow2: Marking image as corrupt: {problem}; further corruption events will be suppressed",
        )
        header = self.header
        if header.version >= 3 and not session.corrupt:
            features = header.incompatible_features | INCOMPAT_CORRUPT
            await write_header_fields(self.storage, {"incompatible_features": features})
            self.header = header.__replace__(incompatible_features=features)
        session.corrupt = True

    async def refused(self, error: RepairWriteError) -> None:
        """A repair write onto metadata was refused: signalled as QEMU's overlap check does."""
        await self.signal(f"Preventing invalid write on metadata (overlaps with {error.overlap})")

    async def guard(self) -> MetadataGuard:
        if self._guard is None:
            disk = self.disk
            assert disk is not None
            # (the tables of discarded snapshots are not theirs: what they claim is free)
            snapshots = [s for number, s in enumerate(self.snapshots) if number not in self.dropped]
            self._guard = MetadataGuard(self.storage, self.header, snapshots, self.active_l1, disk.table)
        return self._guard

    # --- counting references -----------------------------------------------------------------

    def inc(self, offset: int, size: int) -> None:
        """Count a reference to every cluster of ``[offset, offset + size)``."""
        if size <= 0:
            return
        cluster_bits = self.cluster_bits
        # The last cluster may be partly past the end of the file, never a whole one.
        if offset + size - self.storage.size >= self.cluster_size:
            self.corruption(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                f"offset {offset:#x} size {size:#x}",
                offset=offset,
            )
            return
        for cluster in range(offset >> cluster_bits, ((offset + size - 1) >> cluster_bits) + 1):
            if not self.increment(cluster):
                self.overflows += 1
                self.corruption(
                    f"ERROR: overflow cluster offset={cluster << cluster_bits:#x}\n{_OVERFLOW_HINT}", cluster=cluster
                )

    def inc_regions(self, regions: list[tuple[int, int]]) -> None:
        """:meth:`inc` for each ``(offset, size)`` of *regions*, at a cost bounded by the file.

        65535 snapshots naming one 32 MiB L1 table would be 33 Mi increments one by one; here
        each region costs O(1) and each cluster of the file they cover O(1) (a difference
        array). Overflows are counted per failed increment, reported once per cluster.
        """
        cluster_bits = self.cluster_bits
        starts: dict[int, int] = {}
        for offset, size in regions:
            if size <= 0:
                continue
            if offset + size - self.storage.size >= self.cluster_size:
                self.inc(offset, size)  # (reports the region past the end, counts nothing)
                continue
            first, end = offset >> cluster_bits, ((offset + size - 1) >> cluster_bits) + 1
            starts[first] = starts.get(first, 0) + 1
            starts[end] = starts.get(end, 0) - 1
        if not starts:
            return
        edges = sorted(starts)
        added: dict[int, int] = {}
        depth = 0
        for edge, following in zip(edges, [*edges[1:], edges[-1]], strict=True):
            depth += starts[edge]
            if depth:
                added.update(dict.fromkeys(range(edge, following), depth))
        if added:
            self.add_counts(added)

    def increment(self, cluster: int) -> bool:
        """Count one reference to *cluster* (``False``: its counter is full)."""
        try:
            return self.counts.increment(cluster)
        except RefcountArrayTooLargeError as error:
            self.res.check_errors += 1
            raise _CheckFailedError(_ENOMEM) from error

    async def read_l1(self, offset: int, entries: int) -> array[int]:
        """The entries of an L1 table that lie in the file (the rest read as zero: nothing to walk)."""
        length = min(entries * 8, max(0, self.storage.size - offset) // 8 * 8)
        try:
            return decode_words(await read_at(self.storage, offset, length))
        except OSError as error:
            self.check_error("ERROR: I/O error in check_refcounts_l1", offset=offset)
            raise _CheckFailedError(_strerror(error)) from error

    async def l2_entries(self, l2_offset: int, error_message: str) -> array[int]:
        """An L2 table's raw words, read once while further uses are expected."""
        kept = self._l2_kept.get(l2_offset)
        uses = self._l2_uses.get(l2_offset, 0) - 1
        self._l2_uses[l2_offset] = uses
        if kept is not None:
            if uses <= 0:
                del self._l2_kept[l2_offset]
                self._l2_kept_bytes -= self.cluster_size
            return kept
        try:
            words = decode_words(await read_at(self.storage, l2_offset, self.cluster_size))
        except OSError as error:
            self.check_error(error_message, offset=l2_offset)
            raise _CheckFailedError(_strerror(error)) from error
        if uses > 0 and self._l2_kept_bytes + self.cluster_size <= _L2_KEEP_BYTES:
            self._l2_kept[l2_offset] = words
            self._l2_kept_bytes += self.cluster_size
        return words

    def cluster_type(self, entry: int) -> int:
        if entry & OFLAG_COMPRESSED:
            return _COMPRESSED
        if entry & OFLAG_ZERO and not self.extended:
            return _ZERO_ALLOC if entry & L2E_OFFSET_MASK else _ZERO_PLAIN
        if not entry & L2E_OFFSET_MASK:
            # Offset 0 is valid in an external data file, where COPIED tells it apart.
            return _NORMAL if self.data_file and entry & OFLAG_COPIED else _UNALLOCATED
        return _NORMAL

    async def check_l1(
        self, l1_offset: int, l1_size: int, l1: array[int], *, frag: bool, fix: bool, active: bool
    ) -> None:
        """check_refcounts_l1: the L1 table (*l1_size* entries, *l1* those in the file), its L2 tables and theirs."""
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        cluster_mask = self.cluster_size - 1
        for entry in l1:
            if not entry:
                continue
            if entry & L1E_RESERVED:
                self.corruption(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc(l2_offset, self.cluster_size)
            if l2_offset & cluster_mask:
                self.corruption(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted",
                    offset=l2_offset,
                )
            if l2_offset >= self.storage.size:
                continue  # (it would read as zeroes: nothing to walk; reading it is work a crafted L1 multiplies)
            if active:
                await self.check_l2(l2_offset, frag=frag, fix=fix, active=active)
            else:
                await self.walk_inactive(l2_offset, fix=fix)

    async def walk_inactive(self, l2_offset: int, *, fix: bool) -> None:
        """check_l2 for a snapshot's L2 table, whose walks after the first are replayed.

        Walking a table again finds what the first walk found: the same findings and, for each
        data cluster, one more reference. So the first walk's findings are kept and replayed
        and the later walks only counted (:meth:`count_repeats`, after the last snapshot):
        each L2 table is read at most twice however many L1 entries name it, and the work is
        bounded by the file (65536 snapshots sharing one table, or a crafted 32 MiB L1 table of
        4 Mi entries naming one cluster, were a read and a walk per entry). A walk that repaired
        something or overflowed a counter is not kept: the next one walks again.
        """
        walk = self._walked.get(l2_offset)
        res = self.res
        if walk is not None:
            for finding in walk[0]:
                if len(self.findings) < _MAX_FINDINGS:
                    self.findings.append(finding)
            res.corruptions += walk[1]
            self._repeats[l2_offset] = self._repeats.get(l2_offset, 0) + 1
            return
        findings, corruptions = len(self.findings), res.corruptions
        fixed, errors, overflows = res.corruptions_fixed, res.check_errors, self.overflows
        await self.check_l2(l2_offset, frag=False, fix=fix, active=False)
        if (res.corruptions_fixed, res.check_errors, self.overflows) == (fixed, errors, overflows):
            self._walked[l2_offset] = (self.findings[findings:], res.corruptions - corruptions)

    async def count_repeats(self) -> None:
        """The references of the L2 tables' later walks (:meth:`walk_inactive`), each read once more."""
        extended, data_file = self.extended, self.data_file
        step = 2 if extended else 1
        cluster_size, cluster_bits = self.cluster_size, self.cluster_bits
        file_size = self.storage.size
        added: dict[int, int] = {}
        for l2_offset, times in self._repeats.items():
            words = await self.l2_entries(l2_offset, "ERROR: I/O error in check_refcounts_l2")
            for position in range(0, len(words), step):
                entry = words[position]
                if not entry or data_file:
                    continue  # (with a data file, check_l2 counts no data cluster)
                kind = self.cluster_type(entry)
                if kind == _COMPRESSED:
                    if extended and words[position + 1]:
                        continue
                    host = entry & self._compressed_offset_mask
                    size = (((entry >> self._csize_shift) & self._csize_mask) + 1) * 512 - (host & 511)
                elif kind in (_NORMAL, _ZERO_ALLOC):
                    host, size = entry & L2E_OFFSET_MASK, cluster_size
                else:
                    continue
                if host + size - file_size >= cluster_size:
                    continue  # (reported by the first walk, counted by none)
                for cluster in range(host >> cluster_bits, ((host + size - 1) >> cluster_bits) + 1):
                    added[cluster] = added.get(cluster, 0) + times
        self._repeats.clear()
        if added:
            self.add_counts(added)

    def add_counts(self, added: dict[int, int]) -> None:
        """Count *added[cluster]* more references to each cluster (saturating, overflows reported)."""
        try:
            self.counts.grow(max(added) + 1)
        except RefcountArrayTooLargeError as error:
            self.res.check_errors += 1
            raise _CheckFailedError(_ENOMEM) from error
        values, maximum = self.counts.values, self.counts.maximum
        for cluster in sorted(added):
            total = values[cluster] + added[cluster]
            values[cluster] = min(total, maximum)
            if total > maximum:
                self.overflows += 1
                self.res.corruptions += total - maximum
                self.report(
                    FindingKind.CORRUPTION,
                    f"ERROR: overflow cluster offset={cluster << self.cluster_bits:#x}\n{_OVERFLOW_HINT}",
                    cluster=cluster,
                )

    async def check_l2(self, l2_offset: int, *, frag: bool, fix: bool, active: bool) -> None:
        """check_refcounts_l2: the references of one L2 table, and its entries' sanity."""
        words = await self.l2_entries(l2_offset, "ERROR: I/O error in check_refcounts_l2")
        extended = self.extended
        step = 2 if extended else 1
        cluster_size = self.cluster_size
        cluster_bits = self.cluster_bits
        cluster_mask = cluster_size - 1
        file_size = self.storage.size
        next_contiguous = 0
        res = self.res
        # The common entry (standard width, data in the image file, aligned, inside the file, no
        # flag but COPIED, counter not full) is counted inline: a 10 GiB preallocated image has
        # 163840 of them. Anything else takes the general path below, as QEMU's check does.
        fast = not extended and not self.data_file
        # Only an aligned active table is one a guest write (and the crash) can have left so.
        repair_past_end = fix and self.fix_errors and active and not l2_offset & cluster_mask
        slow_bits = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED | cluster_mask
        counts = self.counts
        for position in range(0, len(words), step):
            entry = words[position]
            if fast and entry and not entry & slow_bits:
                host = entry & L2E_OFFSET_MASK
                cluster = host >> cluster_bits
                values = counts.values
                if 0 < host < file_size and cluster < len(values) and values[cluster] < counts.maximum:
                    values[cluster] += 1
                    if frag:
                        res.allocated_clusters += 1
                        if next_contiguous and host != next_contiguous:
                            res.fragmented_clusters += 1
                        next_contiguous = host + cluster_size
                    continue
            bitmap = words[position + 1] if extended else 0
            if not entry and not bitmap:
                continue
            kind = self.cluster_type(entry)
            index = position // step
            if kind != _COMPRESSED and entry & L2E_STD_RESERVED:
                self.corruption(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            if kind == _COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.corruption(
                        f"ERROR: coffset={entry & self._compressed_offset_mask:#x}: copied flag must never be set "
                        "for compressed clusters"
                    )
                    entry &= ~OFLAG_COPIED
                if self.data_file:
                    self.corruption(f"ERROR compressed cluster {index} with data file, entry={entry:#x}")
                    continue
                if bitmap:
                    self.corruption(
                        f"ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={entry:#x}"
                    )
                    continue
                host = entry & self._compressed_offset_mask
                sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
                size = sectors * 512 - (host & 511)
                if (
                    repair_past_end
                    and host + size - file_size >= cluster_size
                    and await self.unmap_past_end(l2_offset, words, position, kind, host, active)
                ):
                    continue
                self.inc(host, size)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1  # (compressed clusters are fragmented by nature)
            elif kind in (_NORMAL, _ZERO_ALLOC):
                host = entry & L2E_OFFSET_MASK
                if (
                    repair_past_end
                    and host >= file_size
                    and not host & cluster_mask
                    and not self.data_file
                    and await self.unmap_past_end(l2_offset, words, position, kind, host, active)
                ):
                    continue
                if (bitmap >> 32) & bitmap:
                    self.corruption(
                        f"ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap",
                        offset=host,
                    )
                if host & cluster_mask:
                    res.corruptions += 1
                    contains_data = bool(bitmap & BITMAP_ALL_ALLOC) if extended else not entry & OFLAG_ZERO
                    if not contains_data:
                        repairing = fix and self.fix_errors
                        self.report(
                            FindingKind.CORRUPTION,
                            f"{'Repairing' if repairing else 'ERROR'} offset={host:x}: Preallocated cluster is not "
                            "properly aligned; L2 entry corrupted.",
                            offset=host,
                            fixed=repairing,
                        )
                        if repairing and await self.zero_entry(l2_offset, words, position, active):
                            continue  # (the cluster is not used any more)
                    else:
                        self.report(
                            FindingKind.CORRUPTION,
                            f"ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted.",
                            offset=host,
                        )
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and host != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = host + cluster_size
                if not self.data_file:
                    if host & cluster_mask or host >= file_size:
                        self.inc(host, cluster_size)
                    elif not self.increment(host >> cluster_bits):
                        self.overflows += 1
                        self.corruption(
                            f"ERROR: overflow cluster offset={host:#x}\n{_OVERFLOW_HINT}", cluster=host >> cluster_bits
                        )
            elif kind == _UNALLOCATED and bitmap & BITMAP_ALL_ALLOC:
                self.corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    async def zero_entry(self, l2_offset: int, words: array[int], position: int, active: bool) -> bool:
        """fix_l2_entry_by_zero: make a misaligned preallocated entry a plain zero one."""
        if self.extended:
            bitmap = words[position + 1]
            bitmap = (bitmap | (bitmap << 32)) & BITMAP_ALL_ZEROES
            if not await self.write_entry(l2_offset, words, position, 0, bitmap, active):
                return False
        elif not await self.write_entry(l2_offset, words, position, OFLAG_ZERO, 0, active):
            return False
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    async def unmap_past_end(
        self, l2_offset: int, words: array[int], position: int, kind: int, host: int, active: bool
    ) -> bool:
        """Repair an L2 entry naming a cluster a whole cluster or more past the end of the file.

        A power loss leaves one on an image with lazy refcounts when the L2 table reached the
        disk and the write of the newly allocated cluster (which would have grown the file) did
        not. That write was never flushed, so what the guest reads there is undefined; the
        rule: the entry is unmapped, the cluster then reads as before its first allocation
        (from the backing file, or as zeroes); a preallocated zero cluster stays a zero cluster
        and loses only its host cluster; with extended L2 entries the subclusters marked zero
        stay zero. The file is never grown to cover the cluster: a crafted entry may name
        2^55, and the repair must not cost more than the bytes it reads. Unmapping takes one
        8 (16) byte write. QEMU 7.2 does not repair this ("counting reference for region
        exceeding the end of the file by one cluster or more").

        Only entries of active L2 tables at aligned offsets are repaired so: a guest write
        changes only those; an unaligned table or one lying on other metadata (a corrupted L1
        entry) holds no L2 entries, and a snapshot's tables are never written by a guest, so
        there the entry stays the corruption it is, as QEMU reports it.
        """
        if (await self.guard()).overlap(l2_offset, self.cluster_size, frozenset({MetadataGuard.ACTIVE_L2})):
            return False  # (a table on other metadata is no L2 table: its "entries" are left as they are)
        if kind == _ZERO_ALLOC:
            entry, bitmap, what, action = OFLAG_ZERO, 0, "Preallocated zero cluster", "host cluster dropped"
        elif kind == _COMPRESSED:
            entry, bitmap, what, action = 0, 0, "Compressed cluster", "cluster unmapped"
        else:
            bitmap = words[position + 1] & BITMAP_ALL_ZEROES if self.extended else 0
            entry, what, action = 0, "Data cluster", "cluster unmapped"
        if not await self.write_entry(l2_offset, words, position, entry, bitmap, active):
            return False
        self.res.corruptions_fixed += 1
        self.report(
            FindingKind.CORRUPTION,
            f"Repairing offset={host:x}: {what} exceeds the end of the file by one cluster or more; L2 entry "
            f"corrupted, {action}",
            offset=host,
            fixed=True,
        )
        return True

    async def write_entry(
        self, l2_offset: int, words: array[int], position: int, entry: int, bitmap: int, active: bool
    ) -> bool:
        """Write one L2 entry (and its bitmap with extended entries) in place; whether it was written."""
        words[position] = entry
        raw = entry.to_bytes(8, "big")
        if self.extended:
            words[position + 1] = bitmap
            raw += bitmap.to_bytes(8, "big")
        where = l2_offset + position * 8
        ignore = frozenset({MetadataGuard.ACTIVE_L2 if active else "inactive L2 table"})
        try:
            await (await self.guard()).check(where, len(raw), "ERROR: Overlap check failed", ignore)
        except RepairWriteError as error:
            await self.refused(error)
            self.check_error("ERROR: Overlap check failed", offset=where)
            raise _CheckFailedError(error.strerror) from error
        try:
            await self.storage.writev([memoryview(raw)], where)
            await self.storage.flush()
        except OSError as error:
            self.check_error(f"ERROR: Failed to overwrite L2 table entry: {_strerror(error)}", offset=where)
            return False
        return True

    # --- the other structures ----------------------------------------------------------------

    async def check_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts: the bitmap directory and every bitmap table."""
        found = bitmap_directory(self.header)
        if found is None or not found[0]:
            return
        count, directory_offset, directory_size = found
        self.inc(directory_offset, directory_size)
        tables = await self._bitmap_tables(count, directory_offset, directory_size)
        if tables is None:
            self.res.corruptions += 1
            raise _CheckFailedError(_EINVAL)
        cluster_size = self.cluster_size
        for table_offset, table_size in tables:
            self.inc(table_offset, table_size * 8)
            try:
                entries = decode_words(await read_at(self.storage, table_offset, table_size * 8))
            except OSError as error:
                self.res.corruptions += 1
                raise _CheckFailedError(_strerror(error)) from error
            if any(not _bitmap_entry_valid(entry, cluster_size) for entry in entries):
                self.res.corruptions += 1
                raise _CheckFailedError(_EINVAL)
            for entry in entries:
                offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
                if offset:
                    self.inc(offset, cluster_size)

    async def _bitmap_tables(self, count: int, offset: int, size: int) -> list[tuple[int, int]] | None:
        """The bitmap directory's tables ``(offset, entries)``, or ``None`` if it is invalid."""
        if not size or size > MAX_BITMAP_DIRECTORY_BYTES:
            return None
        try:
            raw = await read_at(self.storage, offset, size)
        except OSError:
            return None
        tables: list[tuple[int, int]] = []
        position = 0
        cluster_size = self.cluster_size
        disk_size = self.header.size
        while position < size:
            if position + 24 > size or len(tables) >= count:
                return None
            table_offset = int.from_bytes(raw[position : position + 8], "big")
            table_size = int.from_bytes(raw[position + 8 : position + 12], "big")
            flags = int.from_bytes(raw[position + 12 : position + 16], "big")
            kind, granularity = raw[position + 16], raw[position + 17]
            name_size = int.from_bytes(raw[position + 18 : position + 20], "big")
            extra_size = int.from_bytes(raw[position + 20 : position + 24], "big")
            entry_size = -(-(24 + name_size + extra_size) // 8) * 8
            if position + entry_size > size or extra_size:
                return None
            physical = table_size * cluster_size
            if (
                not table_size
                or not table_offset
                or table_offset % cluster_size
                or table_size > BME_MAX_TABLE_SIZE
                or not 9 <= granularity <= 31
                or flags & 0xFFFFFFFC
                or name_size > 1023
                or kind != 1
                or physical > BME_MAX_PHYS_SIZE
                or disk_size > (physical * 8) << granularity
            ):
                return None
            tables.append((table_offset, table_size))
            position += entry_size
        return tables if len(tables) == count else None

    async def check_refblocks(self) -> None:
        """check_refblocks: count each refcount block, and check where it lies."""
        disk = self.disk
        assert disk is not None
        cluster_size = self.cluster_size
        for index, entry in enumerate(disk.table):
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & REFT_RESERVED:
                self.corruption(f"ERROR refcount table entry {index} has reserved bits set")
                self.rebuild = True
                continue
            if offset & (cluster_size - 1):
                self.corruption(
                    f"ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted",
                    offset=offset,
                )
                self.rebuild = True
                continue
            if cluster >= len(self.counts):
                if self.fix_errors and offset >= _GROWTH_LIMIT * max(self.storage.size, cluster_size):
                    # QEMU grows the file to reach the block. Far past the end that makes a tiny
                    # crafted file a huge sparse one and the counts in memory as large: the
                    # refcount structure is rebuilt instead, which leaves the block out.
                    self.corruption(
                        f"ERROR refcount block {index} is outside image, too far to grow the image to it",
                        cluster=cluster,
                        offset=offset,
                    )
                    self.rebuild = True
                    continue
                self.res.corruptions += 1
                repairing = self.fix_errors
                self.report(
                    FindingKind.CORRUPTION,
                    f"{'Repairing' if repairing else 'ERROR'} refcount block {index} is outside image",
                    cluster=cluster,
                    offset=offset,
                    fixed=repairing,
                )
                if repairing:
                    try:
                        if self.storage.size < offset + cluster_size:
                            await self.storage.resize(offset + cluster_size)
                    except OSError as error:
                        self.rebuild = True
                        self.report(FindingKind.CORRUPTION, f"ERROR could not resize image: {_strerror(error)}")
                        continue
                    try:
                        self.counts.grow(-(-self.storage.size // cluster_size))
                    except RefcountArrayTooLargeError as error:
                        self.res.check_errors += 1
                        raise _CheckFailedError(_ENOMEM) from error
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(offset, cluster_size)
                continue
            if offset:
                self.inc(offset, cluster_size)
                if self.counts[cluster] != 1:
                    self.corruption(
                        f"ERROR refcount block {index} refcount={self.counts[cluster]}", cluster=cluster, offset=offset
                    )
                    self.rebuild = True

    async def calculate(self, fix: bool) -> None:
        """calculate_refcounts: every reference, counted in memory."""
        header = self.header
        self.inc(0, self.cluster_size)
        await self.check_l1(header.l1_table_offset, header.l1_size, self.active_l1, frag=True, fix=fix, active=True)
        if self.data_file and self.snapshots:
            self.corruption(f"ERROR {len(self.snapshots)} snapshots in image with data file")
        shared: list[tuple[int, int]] = []  # (the overlapping tables, counted together below)
        for number, snapshot in enumerate(self.snapshots):
            if snapshot.l1_table_offset % self.cluster_size:
                self.corruption(
                    f"ERROR snapshot {snapshot.id} ({snapshot.name}) l1_offset={_alt_hex(snapshot.l1_table_offset)}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                continue
            if snapshot.l1_size > MAX_L1_BYTES // 8:
                self.corruption(
                    f"ERROR snapshot {snapshot.id} ({snapshot.name}) l1_size={_alt_hex(snapshot.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                continue
            if number in self.dropped:
                continue  # (reported by check_pass; its entry goes, and so do its references)
            if number in self.overlapping:
                # Not its own table: its clusters count (the refcounts show the overlap), its
                # entries are another table's or garbage, and are not walked.
                self.corruption(
                    f"ERROR snapshot {snapshot.id} ({snapshot.name}) l1_offset={_alt_hex(snapshot.l1_table_offset)}: "
                    "L1 table overlaps another L1 table; snapshot table entry corrupted"
                )
                shared.append((snapshot.l1_table_offset, snapshot.l1_size * 8))
                continue
            l1 = self.snapshot_l1.get(number)
            if l1 is None:
                l1 = await self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)
            await self.check_l1(snapshot.l1_table_offset, snapshot.l1_size, l1, frag=False, fix=fix, active=False)
        await self.count_repeats()
        self._walked.clear()
        self.inc_regions(shared)
        self.inc(header.snapshots_offset, snapshot_table_length(self.snapshots, header.snapshots_offset))
        disk = self.disk
        assert disk is not None
        self.inc(disk.table_offset, len(disk.table) * 8)
        await self.check_bitmaps()
        await self.check_refblocks()

    async def compare(self, fix: RepairMode | None) -> int:
        """compare_refcounts: stored refcounts against the counted ones; the highest cluster in use."""
        disk = self.disk
        assert disk is not None
        counts = self.counts
        total = len(counts)
        block_bits = disk.block_bits
        per_block = 1 << block_bits
        highest = 0
        res = self.res
        changed = False
        # Only blocks the table names or whose clusters are referenced can differ: the others are
        # 0 on both sides. Skipping them keeps the work bounded by the bytes read, however far
        # a crafted table (or the file grown to reach its blocks) makes the array reach.
        named = {index for index, entry in enumerate(disk.table) if entry}
        for index in sorted(named | set(_blocks_in_use(counts, block_bits))):
            if index << block_bits >= total:
                continue
            first = index << block_bits
            last = min(total, first + per_block)
            try:
                stored = await disk.block(index)
            except (RefcountBlockError, OSError) as error:
                reason = _EIO if isinstance(error, RefcountBlockError) else _strerror(error)
                if isinstance(error, RefcountBlockError):
                    await self.signal(error.problem)
                for cluster in range(first, last):
                    self.check_error(f"Can't get refcount for cluster {cluster}: {reason}", cluster=cluster)
                continue
            mine = counts.values[first:last]
            theirs = (
                stored[: last - first] if stored is not None else array(mine.typecode, bytes(len(mine) * mine.itemsize))
            )
            used = max(_last_nonzero(mine), _last_nonzero(theirs))
            if used >= 0:
                highest = max(highest, first + used)
            if theirs == mine:
                continue
            for position in range(last - first):
                refcount, references = theirs[position], mine[position]
                if refcount == references:
                    continue
                cluster = first + position
                fixable = False
                if refcount == 0:
                    self.rebuild = True
                elif refcount > references:
                    fixable = fix is not None
                else:
                    fixable = fix is RepairMode.ALL
                leak = refcount > references
                word = "Repairing" if fixable else ("Leaked" if leak else "ERROR")
                message = f"{word} cluster {cluster} refcount={refcount} reference={references}"
                if fixable:
                    try:
                        await disk.set(cluster, references)
                    except (RefcountBlockError, OSError):
                        fixable = False
                    else:
                        changed = True
                        if leak:
                            res.leaks_fixed += 1
                        else:
                            res.corruptions_fixed += 1
                if not fixable:
                    if leak:
                        res.leaks += 1
                    else:
                        res.corruptions += 1
                self.report(
                    FindingKind.LEAK if leak else FindingKind.CORRUPTION,
                    message,
                    cluster=cluster,
                    offset=cluster << self.cluster_bits,
                    refcount=refcount,
                    references=references,
                    fixed=fixable,
                )
        if changed:
            await disk.flush()
        return highest

    async def check_copied(self, fix: RepairMode | None) -> None:
        """check_oflag_copied: COPIED set exactly where the refcount is 1, in the active tables."""
        disk = self.disk
        assert disk is not None
        res = self.res
        if fix is RepairMode.ALL:
            repair = True
        elif fix is RepairMode.LEAKS:
            # Only when the refcounts are known to be right.
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        cluster_bits = self.cluster_bits
        l1 = self.active_l1
        for index in range(len(l1)):
            l1_entry = l1[index]
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = await disk.get(l2_offset >> cluster_bits)
            except (RefcountBlockError, OSError) as error:
                if isinstance(error, RefcountBlockError):
                    await self.signal(error.problem)
                refcount = -1  # (not counted again)
            if refcount >= 0 and (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                self.report(
                    FindingKind.CORRUPTION,
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={l1_entry:x} refcount={refcount}",
                    offset=l2_offset,
                    refcount=refcount,
                    fixed=repair,
                )
                if repair:
                    fixed_entry = l1_entry | OFLAG_COPIED if refcount == 1 else l1_entry & ~OFLAG_COPIED
                    try:
                        guard = await self.guard()
                        await write_l1_entry(self.storage, guard, self.header.l1_table_offset, fixed_entry, index)
                    except (RepairWriteError, OSError) as error:
                        if isinstance(error, RepairWriteError):
                            await self.refused(error)
                        res.check_errors += 1
                        raise _CheckFailedError(
                            error.strerror if isinstance(error, RepairWriteError) else _strerror(error)
                        ) from error
                    l1[index] = fixed_entry
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if l2_offset >= self.storage.size:
                continue  # (zeroes: no entry to check)
            words = await self.l2_entries(l2_offset, "ERROR: Could not read L2 table")
            step = 2 if self.extended else 1
            dirty = 0
            # The refcount block of the last data cluster looked up: consecutive entries mostly
            # share one (nothing here changes refcounts).
            block_bits = disk.block_bits
            block_mask = (1 << block_bits) - 1
            data_file = self.data_file
            last_block, last_values = -1, None
            for position in range(0, len(words), step):
                entry = words[position]
                if not entry:
                    continue
                if data_file:
                    if self.cluster_type(entry) not in (_NORMAL, _ZERO_ALLOC):
                        continue
                    refcount = 1
                else:
                    # (cluster_type is _NORMAL or _ZERO_ALLOC exactly for these, in the image file)
                    if entry & OFLAG_COMPRESSED or not entry & L2E_OFFSET_MASK:
                        continue
                    cluster = (entry & L2E_OFFSET_MASK) >> cluster_bits
                    if cluster >> block_bits != last_block:
                        try:
                            last_values = await disk.block(cluster >> block_bits)
                        except (RefcountBlockError, OSError) as error:
                            if isinstance(error, RefcountBlockError):
                                await self.signal(error.problem)
                            last_block = -1
                            continue
                        last_block = cluster >> block_bits
                    refcount = 0 if last_values is None else last_values[cluster & block_mask]
                if (refcount == 1) == bool(entry & OFLAG_COPIED):
                    continue
                res.corruptions += 1
                self.report(
                    FindingKind.CORRUPTION,
                    f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}",
                    offset=entry & L2E_OFFSET_MASK,
                    refcount=refcount,
                    fixed=repair,
                )
                if repair:
                    words[position] = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                    dirty += 1
            if dirty:
                try:
                    guard = await self.guard()
                    await guard.check(
                        l2_offset,
                        self.cluster_size,
                        "ERROR: Could not write L2 table; metadata overlap check failed",
                        frozenset({MetadataGuard.ACTIVE_L2}),
                    )
                    await self.storage.writev([memoryview(_encode_words(words))], l2_offset)
                    await self.storage.flush()
                except (RepairWriteError, OSError) as error:
                    if isinstance(error, RepairWriteError):
                        await self.refused(error)
                    strerror = error.strerror if isinstance(error, RepairWriteError) else _strerror(error)
                    what = (
                        "ERROR: Could not write L2 table; metadata overlap check failed"
                        if isinstance(error, RepairWriteError)
                        else "ERROR: Could not write L2 table"
                    )
                    self.check_error(f"{what}: {strerror}", offset=l2_offset)
                    raise _CheckFailedError(strerror) from error
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # --- the whole check -----------------------------------------------------------------------

    def _plan_l2_reads(self, l1_tables: list[array[int]]) -> None:
        """How often each L2 table will be read (to keep it in memory between uses).

        *l1_tables* are the active table, then snapshot tables. A snapshot's L2 table is read at
        most twice (see :meth:`walk_inactive`), however many snapshots name it.
        """
        uses = self._l2_uses
        inactive: dict[int, int] = {}
        for l1 in l1_tables[1:]:
            for entry in l1:
                if entry:
                    offset = entry & L1E_OFFSET_MASK
                    inactive[offset] = min(inactive.get(offset, 0) + 1, 2)
        for entry in l1_tables[0] if l1_tables else ():
            offset = entry & L1E_OFFSET_MASK
            if entry:
                uses[offset] = uses.get(offset, 0) + 1
            if offset:
                uses[offset] = uses.get(offset, 0) + 1  # (the COPIED pass reads it again)
        for offset, count in inactive.items():
            uses[offset] = uses.get(offset, 0) + count

    async def check_refcounts(self) -> None:
        """qcow2_check_refcounts: count, compare, repair what the mode allows, check COPIED."""
        res = self.res
        fix = self.fix
        cluster_size = self.cluster_size
        clusters = -(-self.storage.size // cluster_size)
        if clusters > _INT_MAX:
            self.res.check_errors += 1
            raise _CheckFailedError("File too large")
        try:
            self.counts = RefcountArray(clusters, self.header.refcount_order)
        except RefcountArrayTooLargeError as error:
            self.res.check_errors += 1
            raise _CheckFailedError(_ENOMEM) from error
        res.total_clusters = -(-self.header.size // cluster_size)
        try:
            self.disk = await DiskRefcounts.load(self.storage, self.header)
        except OSError as error:
            self.check_error(f"ERROR: cannot read the refcount table: {_strerror(error)}")
            raise _CheckFailedError(_strerror(error)) from error
        self.active_l1 = await self.read_l1(self.header.l1_table_offset, self.header.l1_size)
        planned: list[array[int]] = [self.active_l1]
        kept = len(self.active_l1) * 8
        for number, snapshot in enumerate(self.snapshots):
            # Snapshot L1 tables are kept (and their L2 tables' uses planned) within a budget;
            # past it they are read when walked.
            if (
                snapshot.l1_table_offset % cluster_size
                or snapshot.l1_size > MAX_L1_BYTES // 8
                or number in self.overlapping
                or number in self.dropped
                or kept + snapshot.l1_size * 8 > _L1_KEEP_BYTES
            ):
                continue
            kept += snapshot.l1_size * 8
            self.snapshot_l1[number] = await self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)
            planned.append(self.snapshot_l1[number])
        self._plan_l2_reads(planned)
        await self.calculate(fix is RepairMode.ALL)
        before_compare = res.copy()
        highest = await self.compare(None)
        if self.rebuild and fix is RepairMode.ALL:
            old = res.copy()
            self.report(FindingKind.CORRUPTION, "Rebuilding refcount structure", fixed=True)
            try:
                self.disk = await rebuild_refcount_structure(
                    self.storage, self.counts, await self.guard(), cluster_bits=self.cluster_bits
                )
            except RepairWriteError as error:
                await self.refused(error)
                self.check_error(f"{error.what}: {error.strerror}")
                raise _CheckFailedError(error.strerror) from error
            except OSError as error:
                self.check_error(f"ERROR writing refcount structure: {_strerror(error)}")
                raise _CheckFailedError(_strerror(error)) from error
            except RefcountArrayTooLargeError as error:
                self.check_error(f"ERROR allocating refblock: {_ENOMEM}")
                raise _CheckFailedError(_ENOMEM) from error
            self.header = self.header.__replace__(
                refcount_table_offset=self.disk.table_offset,
                refcount_table_clusters=-(-(len(self.disk.table) * 8) // cluster_size),
            )
            self._guard = None
            res.corruptions = 0
            res.leaks = 0
            self.rebuild = False
            self.counts.clear()
            self._l2_uses.clear()
            self._plan_l2_reads(planned)
            # (QEMU counts the allocation statistics again into the same result)
            await self.calculate(False)
            saved = res.copy()
            self.res = _Counts()
            highest = await self.compare(RepairMode.LEAKS)
            if self.rebuild:
                self.report(FindingKind.CORRUPTION, "ERROR rebuilt refcount structure is still broken")
            fresh_leaks = self.res.leaks
            self.res = res = saved
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix is not None:
            if self.rebuild:
                self.check_error("ERROR need to rebuild refcount structures")
                raise _CheckFailedError(_EIO)
            if res.leaks or res.corruptions:
                self.res = res = before_compare
                highest = await self.compare(fix)
        await self.check_copied(fix)
        res = self.res
        res.image_end_offset = (highest + 1) * cluster_size


def overlapping_l1_tables(header: Header, snapshots: list[Snapshot]) -> frozenset[int]:
    """The snapshots (by position) whose L1 table shares a cluster with an L1 table before it.

    In a valid image every L1 table has clusters of its own (a snapshot gets a copy of the
    active table). Tables are taken in the check's order (the active one, then the snapshots
    in table order); the first to claim a cluster keeps it, and each later one overlapping it
    is corrupt. Skipping those keeps the check's work bounded by the file: the tables it reads
    do not overlap, and each is read only as far as the file reaches, so together they are no
    larger than the file, whatever the snapshot table claims (65536 snapshots naming one 32 MiB
    table would be 2 TiB). Misaligned, oversized and empty tables are not walked anyway and
    claim nothing here.
    """
    cluster_size = header.cluster_size
    starts: list[int] = []  # the claimed ranges, disjoint, sorted: [starts[i], ends[i])
    ends: list[int] = []

    def claim(offset: int, size: int) -> bool:
        start = offset - offset % cluster_size
        end = -(-(offset + size) // cluster_size) * cluster_size
        before = bisect.bisect_left(starts, end)
        if before and ends[before - 1] > start:
            return False  # (disjoint and sorted: the range starting last before *end* ends last)
        starts.insert(before, start)
        ends.insert(before, end)
        return True

    if header.l1_size:
        claim(header.l1_table_offset, header.l1_size * 8)
    overlapping: set[int] = set()
    for number, snapshot in enumerate(snapshots):
        offset, size = snapshot.l1_table_offset, snapshot.l1_size * 8
        if not size or offset % cluster_size or snapshot.l1_size > MAX_L1_BYTES // 8:
            continue
        if not claim(offset, size):
            overlapping.add(number)
    return frozenset(overlapping)


def _bitmap_entry_valid(entry: int, cluster_size: int) -> bool:
    if entry & BME_TABLE_ENTRY_RESERVED:
        return False
    offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
    return not offset or (not entry & 1 and not offset % cluster_size)


def _encode_words(words: array[int]) -> bytes:
    out = array("Q", words)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


# --- one check (qcow2_co_check_locked), and qemu-img's check-repair-check ----------------------


@attrs.frozen
class PassResult:
    """What one check (or repair) pass found: counts, findings, and why it stopped, if it did."""

    counts: _Counts
    findings: tuple[CheckFinding, ...]
    #: The error that stopped the pass (qemu-img: "Check failed: <this>"), if any.
    failed: str | None


async def check_pass(state: Qcow2State, fix: RepairMode | None, session: Session | None = None) -> PassResult:
    """One pass of QEMU's qcow2 check over the image as it is on disk (repairing as *fix* allows).

    The caller holds the state's lock with its metadata written back, and reloads the state
    after a repair.

    A snapshot whose L1 table overlaps another L1 table (:func:`overlapping_l1_tables`) is
    reported; its clusters are counted, its entries are not walked. A repair with ``all``
    discards such a snapshot: its entry is dropped from the snapshot table (rewritten after
    the refcounts are repaired, as for incomplete entries) and nothing of it is counted. That
    is what keeps the repaired refcounts safe: the table it names belongs to another L1 table
    (or straddles several), so counting its references and keeping it would leave a snapshot
    whose deletion or application later frees or rewrites clusters other tables still use.
    What it costs: the snapshot is gone; it had no L1 table of its own, so the disk it showed
    was another snapshot's (or a mix of tables), not a state the guest ever had. A copy of the
    table for it is no option: 65536 such entries of 32 MiB each would write 2 TiB. If the
    pass fails, the table is left as it is (and the image is not marked clean).
    """
    header, snapshots = await read_header(state.storage)
    if state.writable:
        # The features this driver declared invalid when opening for writing stay so.
        header = header.__replace__(autoclear_features=state.header.autoclear_features)
    repairing = fix is RepairMode.ALL
    dropped = overlapping_l1_tables(header, snapshots) if repairing else frozenset()
    check = _Pass(state, fix, header, snapshots, session or Session(), dropped)
    result = _Counts()
    snapshot_res = _Counts()
    for number in sorted(dropped):
        snapshot = snapshots[number]
        snapshot_res.corruptions += 1
        check.report(
            FindingKind.CORRUPTION,
            f"Repairing snapshot {snapshot.id} ({snapshot.name}) l1_offset={_alt_hex(snapshot.l1_table_offset)}: "
            "L1 table overlaps another L1 table; snapshot discarded",
            offset=snapshot.table_offset,
            fixed=True,
        )
    if header.version >= 3:
        for number, snapshot in enumerate(snapshots):
            if len(snapshot.extra_data) < 16:
                snapshot_res.corruptions += 1
                check.report(
                    FindingKind.CORRUPTION,
                    f"{'Repairing' if repairing else 'ERROR'} snapshot table entry {number} is incomplete",
                    offset=snapshot.table_offset,
                    fixed=repairing,
                )
    failed: str | None = None
    try:
        await check.check_refcounts()
    except _CheckFailedError as error:
        failed = error.strerror
    result.add(check.res, allocation=True)
    if failed is None and snapshot_res.corruptions and repairing:
        try:
            kept = [snapshot for number, snapshot in enumerate(snapshots) if number not in dropped]
            await rewrite_snapshot_table(state.storage, kept, snapshots)
        except (OSError, CorruptImageError) as error:
            snapshot_res.check_errors += 1
            failed = _strerror(error)
            check.report(FindingKind.CHECK_ERROR, f"ERROR failed to update snapshot table: {failed}")
        else:
            snapshot_res.corruptions_fixed += snapshot_res.corruptions
            snapshot_res.corruptions = 0
    result.add(snapshot_res, allocation=False)
    if failed is None and fix is not None and not result.check_errors and not result.corruptions:
        await _mark_clean(state.storage)
    return PassResult(counts=result, findings=tuple(check.findings), failed=failed)


async def _mark_clean(storage: Storage) -> None:
    """Clear the dirty and corrupt bits (the image is consistent again)."""
    header, _ = await read_header(storage)
    if header.version >= 3 and header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
        await storage.flush()
        features = header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        await write_header_fields(storage, {"incompatible_features": features})


async def rewrite_snapshot_table(
    storage: Storage, snapshots: list[Snapshot], old_snapshots: list[Snapshot] | None = None
) -> None:
    """Write the snapshot table anew (complete entries), switch the header, free the old one.

    *old_snapshots* are the entries of the table on disk (default: *snapshots*), whose extent
    is freed.
    """
    header, _ = await read_header(storage)
    refcounts = Refcounts(storage, header)
    raw, _ = encode_snapshot_table(snapshots)
    new_offset = await refcounts.allocate_table(len(raw))
    await refcounts.flush()
    if raw:
        await storage.writev([memoryview(raw)], new_offset)
    await storage.flush()
    await write_header_fields(storage, {"nb_snapshots": len(snapshots), "snapshots_offset": new_offset})
    old = table_clusters(
        header.snapshots_offset,
        snapshot_table_length(snapshots if old_snapshots is None else old_snapshots, header.snapshots_offset),
        header.cluster_bits,
    )
    await refcounts.apply({cluster: -1 for cluster in old})


async def reload_state(state: Qcow2State) -> None:
    """After a repair: the header, tables and caches of the open image, from the disk again."""
    header, _ = await read_header(state.storage)
    header = header.__replace__(autoclear_features=state.header.autoclear_features)
    # (strictly, this time: what is still damaged keeps the image closed to writes)
    snapshots = await read_snapshot_table(state.storage, header, state.filename)
    l1, l1_copied = await read_l1(
        state.storage,
        table_offset=header.l1_table_offset,
        entries=header.l1_size,
        cluster_bits=header.cluster_bits,
        filename=state.filename,
    )
    state.l1_damage = {}
    state.header = header
    state.size = header.size
    state.snapshots = snapshots
    state.l1 = l1
    state.l1_copied = l1_copied
    state.tables.clear()
    state.frees.clear()  # (what they would release, the repair counted afresh)
    state.decompressed.clear()
    state.compress_cursor = 0
    state.dirty_on_disk = bool(header.incompatible_features & INCOMPAT_DIRTY)
    state.refcounts.reload(header)
    # Every L2 table is as the disk has it now, and the metadata map is built anew.
    state.open_size = state.storage.size
    state.rewritten_tables.clear()
    if not header.incompatible_features & INCOMPAT_CORRUPT:
        state.guard.corrupt = None
    if state.writable:
        await References(state).scan_metadata()


def _result(state: Qcow2State, counts: _Counts, failed: str | None, findings: tuple[CheckFinding, ...]) -> CheckResult:
    return CheckResult(
        filename=state.filename,
        format="qcow2",
        corruptions=counts.corruptions,
        leaks=counts.leaks,
        check_errors=counts.check_errors,
        corruptions_fixed=counts.corruptions_fixed,
        leaks_fixed=counts.leaks_fixed,
        image_end_offset=counts.image_end_offset,
        total_clusters=counts.total_clusters,
        allocated_clusters=counts.allocated_clusters,
        fragmented_clusters=counts.fragmented_clusters,
        compressed_clusters=counts.compressed_clusters,
        findings=findings,
        failure=failed,
    )


async def check_image(state: Qcow2State, fix: RepairMode | None) -> CheckResult:
    """``qemu-img check [-r leaks|all]``: check, repair as *fix* allows, and check again.

    As qemu-img does, the second check runs only when the repair fixed something; its counts
    are returned with the repair's fixed counts, and the repair pass's findings in
    :attr:`CheckResult.repaired`.
    """
    async with state.lock:
        if state.writable:
            await state.write_back()
        session = Session()
        first = await check_pass(state, fix, session)
        if fix is None:
            return _result(state, first.counts, first.failed, first.findings)
        if first.failed is None and (first.counts.corruptions_fixed or first.counts.leaks_fixed):
            second = await check_pass(state, None, session)
            counts = attrs.evolve(
                second.counts,
                corruptions_fixed=first.counts.corruptions_fixed,
                leaks_fixed=first.counts.leaks_fixed,
            )
            result = _result(state, counts, second.failed, second.findings)
        else:
            result = _result(state, first.counts, first.failed, first.findings)
        return result.__replace__(repaired=first.findings)  # copy.replace: a core record


def _blocks_in_use(counts: RefcountArray, block_bits: int) -> Iterator[int]:
    """The indexes of the refcount blocks covering a cluster with a nonzero count."""
    cluster = counts.next_used(0)
    while cluster < len(counts):
        index = cluster >> block_bits
        yield index
        cluster = counts.next_used((index + 1) << block_bits)


def _last_nonzero(values: array[int]) -> int:
    """The position of the last nonzero value of *values*, or -1."""
    used = len(values.tobytes().rstrip(b"\0"))
    return (used - 1) // values.itemsize if used else -1
