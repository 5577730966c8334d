"""L1 and L2 tables: entry layout, validation, and contiguous runs.

How each width of L2 entries is interpreted and updated is :mod:`imago_qcow2.l2_entries`.

A standard L2 table is validated once, when loaded, and its entries classified into runs
(consecutive entries of the same kind, data ones and zero ones that keep a host cluster also
contiguous in the host file), so a mapping request costs a couple of array look-ups. Extended
L2 tables (32 subclusters per cluster) are validated on load and classified per subcluster on
demand.

Validation and classification treat the whole table as one big integer of 64-bit lanes, so
every step runs in C, not in a Python loop per entry; only when something is wrong does an
entry by entry walk find the first bad entry, to name it.
"""

from __future__ import annotations

import functools
import re
import sys
from array import array
from bisect import bisect_right
from collections.abc import Sequence

from imago import CorruptImageError, Storage

__all__ = [
    "decode_words",
    "COMPRESSED",
    "DATA",
    "L1_OFFSET_MASK",
    "L1_RESERVED",
    "L2_OFFSET_MASK",
    "OFLAG_COMPRESSED",
    "OFLAG_COPIED",
    "OFLAG_ZERO",
    "ALL_SUBCLUSTERS",
    "SUBCLUSTERS",
    "UNALLOCATED",
    "ZERO",
    "CompressedDescriptor",
    "L2Table",
    "decode_compressed",
    "encode_l1",
    "entry_clusters",
    "l2_table_bytes",
    "parse_l1",
    "read_l1",
    "table_clusters",
]

# Entry kinds (per cluster, or per subcluster in extended tables).
UNALLOCATED = 0
DATA = 1
ZERO = 2
COMPRESSED = 3

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61 of a standard cluster descriptor
SUBCLUSTERS = 32
#: The allocation bits of a subcluster bitmap (the zero bits are these shifted by SUBCLUSTERS).
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

CompressedDescriptor = tuple[int, int]


def decode_words(raw: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries (L1, L2 and refcount tables) as integers."""
    words = array("Q")
    words.frombytes(raw)
    if sys.byteorder == "little":
        words.byteswap()
    return words


def encode_l1(offsets: Sequence[int], copied: bytearray | None = None) -> bytes:
    """An L1 table as stored: big-endian entries, COPIED flags only where *copied* says."""
    words = array("Q", offsets)
    if copied is not None:
        for index, flag in enumerate(copied):
            if flag and words[index]:
                words[index] |= OFLAG_COPIED
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def table_clusters(offset: int, length: int, cluster_bits: int) -> range:
    """The clusters a table of *length* bytes at *offset* occupies (none for offset or length 0)."""
    if not offset or not length:
        return range(0)
    return range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1)


def entry_clusters(entry: int, cluster_bits: int) -> range:
    """The image-file clusters an L2 entry (a standard one, or an extended one's descriptor) uses.

    Compressed data may span two clusters; a data or preallocated zero cluster is one. (With
    an external data file, data clusters are not in the image file: callers leave them out.)
    """
    if entry & OFLAG_COMPRESSED:
        host, length = decode_compressed(entry, cluster_bits)
        return range(host >> cluster_bits, ((host + length - 1) >> cluster_bits) + 1)
    host = entry & L2_OFFSET_MASK
    return range(host >> cluster_bits, (host >> cluster_bits) + 1) if host else range(0)


def parse_l1(
    raw: bytes | bytearray,
    *,
    table_offset: int,
    cluster_bits: int,
    file_size: int,
    filename: str | None,
    damage: dict[int, CorruptImageError] | None = None,
) -> tuple[array[int], bytearray]:
    """Validate an L1 table; returns its L2 table offsets (0: no table) and COPIED flags.

    A bad entry raises :class:`CorruptImageError`, or, with *damage*, is recorded there by index
    (its offset left 0) and the walk goes on: one pass, however many entries are bad.
    """
    entries = decode_words(raw)
    cluster_mask = (1 << cluster_bits) - 1
    offsets = array("Q", bytes(len(entries) * 8))
    copied = bytearray(len(entries))
    for index, entry in enumerate(entries):
        if not entry:
            continue
        where = table_offset + 8 * index
        problem: str | None = None
        l2_offset = entry & L1_OFFSET_MASK
        if entry & L1_RESERVED:
            problem = f"L1 entry {index} has reserved bits set ({entry:#018x})"
        elif l2_offset & cluster_mask:
            problem = f"L1 entry {index}: L2 table offset {l2_offset:#x} is unaligned"
        elif l2_offset and l2_offset + (1 << cluster_bits) > file_size:
            problem = f"L1 entry {index}: L2 table at {l2_offset:#x} lies past the end of the file"
        if problem is not None:
            error = CorruptImageError(filename, where, problem)
            if damage is None:
                raise error
            damage[index] = error
            continue
        offsets[index] = l2_offset
        copied[index] = 1 if entry & OFLAG_COPIED else 0
    return offsets, copied


async def read_l1(
    storage: Storage, *, table_offset: int, entries: int, cluster_bits: int, filename: str | None
) -> tuple[array[int], bytearray]:
    """Read and validate an L1 table of *entries* entries (the active one or a snapshot's).

    Returns its L2 table offsets (0: no table) and COPIED flags.
    """
    raw = bytearray(entries * 8)
    if raw:
        await storage.readv([memoryview(raw)], table_offset)
    return parse_l1(
        raw, table_offset=table_offset, cluster_bits=cluster_bits, file_size=storage.size, filename=filename
    )


def decode_compressed(entry: int, cluster_bits: int) -> CompressedDescriptor:
    """``(host_offset, length)`` of the compressed data a descriptor points to."""
    offset_bits = 62 - (cluster_bits - 8)
    host = entry & ((1 << offset_bits) - 1)
    sectors = (entry >> offset_bits) & ((1 << (cluster_bits - 8)) - 1)
    return host, (sectors + 1) * 512 - (host & 511)


def _compressed_past(entry: int, cluster_bits: int, image_size: int) -> bool:
    """Whether compressed data starts past the end of the file, or reaches a cluster past it.

    Its last sector may end past the last byte of the file, never in a cluster after it: a
    cluster there is not the data's (it may have been handed out since).
    """
    host, length = decode_compressed(entry, cluster_bits)
    return host >= image_size or (host + length - 1) >> cluster_bits << cluster_bits >= image_size


# What a cached L2 table costs beyond its arrays (the objects, a few runs), and each run more.
_TABLE_OVERHEAD = 512
_RUN_BYTES = 40
_TYPICAL_RUNS = 64


def l2_table_bytes(cluster_size: int) -> int:
    """What a cached L2 table of *cluster_size* bytes takes in memory, classified into a few runs.

    (Entries and host offsets 8 bytes each, kinds 1 byte: about 2.1 times the table; tables
    split into many more runs, fragmented ones, are counted at what they take, :meth:`L2Table.nbytes`.)
    """
    return 2 * cluster_size + cluster_size // 8 + _TABLE_OVERHEAD + _TYPICAL_RUNS * _RUN_BYTES


class L2Table:
    """One L2 table, validated and classified.

    Standard tables: ``kinds[i]``, ``hosts[i]`` (host cluster offset, or the compressed
    descriptor) and ``run_starts`` (where each run of consecutive entries of the same kind
    starts, data and allocated zero ones also contiguous in the host file; the table's
    length last).
    """

    __slots__ = (
        "__weakref__",
        "cluster_bits",
        "entries",
        "extended",
        "external_data",
        "hosts",
        "kinds",
        "offset",
        "run_starts",
        "runs_valid",
        "zero_flag",
    )

    def __init__(
        self,
        raw: bytes | bytearray | memoryview,
        *,
        offset: int,
        cluster_bits: int,
        extended: bool,
        zero_flag: bool,
        external_data: bool,
        image_size: int,
        data_size: int,
        filename: str | None,
    ) -> None:
        self.offset = offset
        self.extended = extended
        self.cluster_bits = cluster_bits
        self.zero_flag = zero_flag
        self.external_data = external_data
        self.runs_valid = True
        self.entries = decode_words(raw)
        self.run_starts: list[int] = [len(self.entries)]
        if extended:
            self.kinds = bytearray()
            self.hosts = array("Q")
            if not self._extended_valid(raw, image_size, data_size):
                # Something is wrong: the entry by entry walk names the first bad entry.
                self._validate_extended(cluster_bits, external_data, image_size, data_size, filename)
        elif not self._classify(raw, image_size, data_size):
            # Something is wrong: the entry by entry walk names the first bad entry.
            self._classify_slowly(cluster_bits, zero_flag, external_data, image_size, data_size, filename)

    def nbytes(self) -> int:
        """The bytes this table takes in memory (its arrays and runs), as a cache counts it."""
        return (
            self.entries.itemsize * len(self.entries)
            + self.hosts.itemsize * len(self.hosts)
            + len(self.kinds)
            + _RUN_BYTES * len(self.run_starts)
            + _TABLE_OVERHEAD
        )

    def _classify(self, raw: bytes | bytearray | memoryview, image_size: int, data_size: int) -> bool:
        """Validate and classify a standard table a whole table at a time; False if some entry is bad.

        The entries from the first non-zero one to the last are one big integer of 64-bit lanes
        (the first entry the most significant), so each step (masking, comparing, finding run
        boundaries) runs over every entry in C.
        """
        count = len(self.entries)
        data = bytes(raw)
        first, last = _nonzero_window(data)
        if first == last:  # nothing allocated: the common case of a sparse image
            self.kinds = bytearray(count)
            self.hosts = array("Q", bytes(8 * count))
            self.run_starts = [0, count]
            return True
        width = last - first
        lanes = _lanes(width)
        table = int.from_bytes(data[8 * first : 8 * last], "big")
        compressed = (table >> 62) & lanes.one
        if compressed:
            if self.external_data:
                return False
            flags = _lane_bytes(compressed, width)
            position = flags.find(1)
            while position >= 0:
                if _compressed_past(self.entries[first + position], self.cluster_bits, image_size):
                    return False
                position = flags.find(1, position + 1)
            table_plain = table & ~(compressed * _LANE)
        else:
            table_plain = table
        masks = _masks(width, self.cluster_bits, self.zero_flag)
        if table_plain & masks.bad:  # reserved bits, unaligned host offsets
            return False
        hosts = table_plain & masks.host
        has_host = ((hosts + lanes.low63) >> 63) & lanes.one
        if data_size <= L2_OFFSET_MASK and ((hosts + lanes.high - data_size * lanes.one) >> 63) & has_host:
            return False  # a host offset at or past data_size
        self._set_classes(table, compressed, hosts, has_host, first, width)
        return True

    def _set_classes(self, table: int, compressed: int, hosts: int, has_host: int, first: int, width: int) -> None:
        """kinds, hosts and runs from entries ``[first, first + width)`` as lanes (see :meth:`_classify`).

        The entries around them are zero (unallocated). The entries are valid, or ours.
        """
        count = len(self.entries)
        last = first + width
        lanes = _lanes(width)
        zero = table & lanes.one if self.zero_flag else 0
        if compressed:
            zero &= ~compressed
        allocated = has_host | ((table >> 63) & lanes.one) if self.external_data else has_host
        if compressed:
            allocated &= ~compressed
        data = allocated & ~zero
        kinds = data | zero << 1 | compressed * COMPRESSED
        self.kinds = bytearray(count)
        self.kinds[first:last] = _lane_bytes(kinds, width)
        host_lanes = hosts | (table & compressed * _LANE) if compressed else hosts
        words = array("Q")
        words.frombytes(host_lanes.to_bytes(8 * width, "big"))
        if sys.byteorder == "little":
            words.byteswap()
        if width == count:
            self.hosts = words
        else:
            self.hosts = array("Q", bytes(8 * count))
            self.hosts[first:last] = words
        # Entries with a place in the host file: data, and zero ones that keep a host cluster.
        located = data | (zero & has_host)
        # A run key per entry: its kind, and (located ones) host offset minus its index's share,
        # equal for neighbours that are contiguous in the host file. The bias keeps lanes apart.
        stair = _stair(count, self.cluster_bits) >> (64 * (count - width))
        keys = kinds << 62 | ((hosts + stair) & located * _LANE)
        changes = keys ^ (keys >> 64)
        changed = ((((changes & lanes.low63) + lanes.low63) | changes) >> 63) & lanes.one
        flags = _lane_bytes(changed, width)
        # The unallocated entries before and after the window join its first and last runs.
        starts = [0] if first == 0 or self.kinds[first] == UNALLOCATED else [0, first]
        starts.extend(first + match.start() for match in _ONE_BYTE.finditer(flags, 1))
        if last < count and self.kinds[last - 1] != UNALLOCATED:
            starts.append(last)
        starts.append(count)
        self.run_starts = starts
        self.runs_valid = True

    def _classify_slowly(
        self,
        cluster_bits: int,
        zero_flag: bool,
        external_data: bool,
        image_size: int,
        data_size: int,
        filename: str | None,
    ) -> None:
        """Validate entry by entry, raising for the first bad one."""
        entries = self.entries
        cluster_mask = (1 << cluster_bits) - 1
        reserved = L2_RESERVED if zero_flag else L2_RESERVED | OFLAG_ZERO
        for index, entry in enumerate(entries):
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                if external_data:
                    raise CorruptImageError(
                        filename, self.offset + 8 * index, "compressed cluster in an image with an external data file"
                    )
                if _compressed_past(entry, cluster_bits, image_size):
                    raise CorruptImageError(
                        filename,
                        self.offset + 8 * index,
                        f"compressed cluster data at {decode_compressed(entry, cluster_bits)[0]:#x} runs past the "
                        "end of the file",
                    )
                continue
            if entry & reserved:
                raise CorruptImageError(
                    filename, self.offset + 8 * index, f"L2 entry {index} has reserved bits set ({entry:#018x})"
                )
            host = entry & L2_OFFSET_MASK
            if host & cluster_mask:
                raise CorruptImageError(
                    filename, self.offset + 8 * index, f"L2 entry {index}: data offset {host:#x} is unaligned"
                )
            if host and host >= data_size:
                raise CorruptImageError(
                    filename,
                    self.offset + 8 * index,
                    f"L2 entry {index}: data at {host:#x} lies past the end of the file",
                )
        # Every entry is valid after all: classify as usual.
        self.recompute_runs()

    def _extended_valid(self, raw: bytes | bytearray | memoryview, image_size: int, data_size: int) -> bool:
        """Whether every extended entry is valid, checked a whole table at a time (see :meth:`_classify`).

        Descriptors are the even lanes, subcluster bitmaps the odd ones.
        """
        count = len(self.entries)
        table = int.from_bytes(raw, "big")
        if not table:
            return True
        pairs = _pair_lanes(count)
        compressed = (table >> 62) & pairs.even
        bitmaps = table & pairs.odd_lanes
        if compressed:
            if self.external_data:
                return False
            if bitmaps & (compressed >> 64) * _LANE:
                return False  # a compressed cluster with a subcluster bitmap
            flags = _lane_bytes(compressed, count)
            position = flags.find(1)
            while position >= 0:
                if _compressed_past(self.entries[position], self.cluster_bits, image_size):
                    return False
                position = flags.find(1, position + 1)
            descriptors = table & pairs.even_lanes & ~(compressed * _LANE)
        else:
            descriptors = table & pairs.even_lanes
        bad = (L2_RESERVED | OFLAG_ZERO) | (L2_OFFSET_MASK & ((1 << self.cluster_bits) - 1))
        if descriptors & pairs.even * bad:
            return False  # reserved bits, unaligned host offsets
        if bitmaps & (bitmaps >> SUBCLUSTERS) & pairs.odd * ALL_SUBCLUSTERS:
            return False  # subclusters both allocated and zero
        hosts = descriptors & pairs.even * L2_OFFSET_MASK
        has_host = ((hosts + pairs.even * ((1 << 63) - 1)) >> 63) & pairs.even
        allocated = has_host | ((descriptors >> 63) & pairs.even) if self.external_data else has_host
        some_allocated = (
            ((bitmaps & pairs.odd * ALL_SUBCLUSTERS) + pairs.odd * ALL_SUBCLUSTERS) >> SUBCLUSTERS
        ) & pairs.odd
        if some_allocated << 64 & ~allocated:
            return False  # allocated subclusters in an unallocated cluster
        return not (
            data_size <= L2_OFFSET_MASK and ((hosts + pairs.even * (1 << 63) - data_size * pairs.even) >> 63) & has_host
        )

    def _validate_extended(
        self, cluster_bits: int, external_data: bool, image_size: int, data_size: int, filename: str | None
    ) -> None:
        entries = self.entries
        cluster_mask = (1 << cluster_bits) - 1
        for index in range(0, len(entries), 2):
            entry, bitmap = entries[index], entries[index + 1]
            where = self.offset + 8 * index
            if entry & OFLAG_COMPRESSED:
                if external_data:
                    raise CorruptImageError(
                        filename, where, "compressed cluster in an image with an external data file"
                    )
                if _compressed_past(entry, cluster_bits, image_size):
                    raise CorruptImageError(
                        filename,
                        where,
                        f"compressed cluster data at {decode_compressed(entry, cluster_bits)[0]:#x} runs past the "
                        "end of the file",
                    )
                if bitmap:
                    raise CorruptImageError(filename, where + 8, "compressed cluster has a subcluster bitmap")
                continue
            if entry & (L2_RESERVED | OFLAG_ZERO):
                raise CorruptImageError(filename, where, f"extended L2 entry {index // 2} has reserved bits set")
            if bitmap & (bitmap >> SUBCLUSTERS) & ALL_SUBCLUSTERS:
                raise CorruptImageError(filename, where + 8, "subcluster is marked both allocated and zero")
            host = entry & L2_OFFSET_MASK
            allocated = host or (external_data and entry & OFLAG_COPIED)
            if not allocated and bitmap & ALL_SUBCLUSTERS:
                raise CorruptImageError(filename, where + 8, "unallocated cluster has allocated subclusters")
            if host & cluster_mask:
                raise CorruptImageError(filename, where, f"L2 entry {index // 2}: data offset {host:#x} is unaligned")
            if host and host >= data_size:
                raise CorruptImageError(
                    filename, where, f"L2 entry {index // 2}: data at {host:#x} lies past the end of the file"
                )

    # --- updates (standard tables) ------------------------------------------------------------

    def kind_of(self, entry: int) -> tuple[int, int]:
        """``(kind, host offset or descriptor)`` of a standard entry this driver wrote."""
        if not entry:
            return UNALLOCATED, 0
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry
        host = entry & L2_OFFSET_MASK
        if self.zero_flag and entry & OFLAG_ZERO:
            return ZERO, host
        if host or (self.external_data and entry & OFLAG_COPIED):
            return DATA, host
        return UNALLOCATED, 0

    def set_entry(self, index: int, entry: int) -> None:
        """Replace a standard entry; runs are recomputed lazily."""
        self.entries[index] = entry
        self.kinds[index], self.hosts[index] = self.kind_of(entry)
        self.runs_valid = False

    def run_length(self, index: int, limit: int) -> int:
        """Entries from *index* in the same run (at least 1), scanning at most *limit* while stale."""
        if self.runs_valid:
            starts = self.run_starts
            return starts[bisect_right(starts, index)] - index
        kinds, hosts = self.kinds, self.hosts
        kind = kinds[index]
        step = 1 << self.cluster_bits
        end = min(len(kinds), index + max(limit, 1))
        position = index + 1
        located = kind == DATA or (kind == ZERO and hosts[index])
        while (
            position < end
            and kinds[position] == kind
            and (hosts[position] == hosts[position - 1] + step if located else not hosts[position] or kind != ZERO)
        ):
            position += 1
        return position - index

    def recompute_runs(self) -> None:
        """Rebuild the classification (kinds, hosts, runs) from the entries after updates."""
        count = len(self.entries)
        data = self.to_bytes()
        first, last = _nonzero_window(data)
        if first == last:
            self.kinds = bytearray(count)
            self.hosts = array("Q", bytes(8 * count))
            self.run_starts = [0, count]
            self.runs_valid = True
            return
        width = last - first
        lanes = _lanes(width)
        table = int.from_bytes(data[8 * first : 8 * last], "big")
        compressed = (table >> 62) & lanes.one
        hosts = table & ~(compressed * _LANE) & _masks(width, self.cluster_bits, self.zero_flag).host
        has_host = ((hosts + lanes.low63) >> 63) & lanes.one
        self._set_classes(table, compressed, hosts, has_host, first, width)

    def to_bytes(self) -> bytes:
        """The table as stored (big-endian entries)."""
        words = array("Q", self.entries)
        if sys.byteorder == "little":
            words.byteswap()
        return words.tobytes()

    # --- extended tables ---------------------------------------------------------------------

    def set_extended(self, index: int, descriptor: int, bitmap: int) -> None:
        """Replace an extended entry: the cluster descriptor and its subcluster bitmap."""
        entries = self.entries
        entries[2 * index] = descriptor
        entries[2 * index + 1] = bitmap

    def subcluster(self, index: int, subcluster: int, cluster_bits: int) -> tuple[int, int | None]:
        """Extended tables: ``(kind, host offset or descriptor)`` of one subcluster.

        The host offset is ``None`` outside allocated clusters; zero and unallocated subclusters
        of an allocated cluster have theirs (the space stays reserved for them).
        """
        entries = self.entries
        entry = entries[2 * index]
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry
        bitmap = entries[2 * index + 1]
        host: int | None = entry & L2_OFFSET_MASK
        if host or (self.external_data and entry & OFLAG_COPIED):
            host = (entry & L2_OFFSET_MASK) + (subcluster << (cluster_bits - 5))
        else:
            host = None
        if bitmap >> subcluster & 1:
            return DATA, host
        if bitmap >> (SUBCLUSTERS + subcluster) & 1:
            return ZERO, host
        return UNALLOCATED, host


# --- whole-table arithmetic -------------------------------------------------------------------------

#: Every bit of one 64-bit lane.
_LANE = (1 << 64) - 1
#: A byte that is not zero (lane flags are 0 or 1 per entry).
_ONE_BYTE = re.compile(b"\x01")


class _Lanes:
    """Constants over *count* 64-bit lanes: 1 in each, the top bit of each, the low 63 bits of each."""

    __slots__ = ("high", "low63", "one")

    def __init__(self, count: int) -> None:
        self.one = int.from_bytes(b"\0\0\0\0\0\0\0\1" * count, "big")
        self.high = self.one << 63
        self.low63 = self.one * ((1 << 63) - 1)


class _Masks:
    """Per-lane masks of a standard table: bits no valid entry has set, and the host offset."""

    __slots__ = ("bad", "host")

    def __init__(self, count: int, cluster_bits: int, zero_flag: bool) -> None:
        one = _lanes(count).one
        reserved = L2_RESERVED if zero_flag else L2_RESERVED | OFLAG_ZERO
        self.bad = one * (reserved | (L2_OFFSET_MASK & ((1 << cluster_bits) - 1)))
        self.host = one * L2_OFFSET_MASK


@functools.lru_cache(maxsize=64)
def _lanes(count: int) -> _Lanes:
    return _Lanes(count)


class _PairLanes:
    """Constants over the lanes of an extended table.

    1 in each descriptor lane (even), in each bitmap lane (odd), and every bit of the even and
    of the odd lanes.
    """

    __slots__ = ("even", "even_lanes", "odd", "odd_lanes")

    def __init__(self, count: int) -> None:
        self.even = int.from_bytes((b"\0\0\0\0\0\0\0\1" + bytes(8)) * (count // 2), "big")
        self.odd = self.even >> 64
        self.even_lanes = self.even * _LANE
        self.odd_lanes = self.odd * _LANE


@functools.lru_cache(maxsize=8)
def _pair_lanes(count: int) -> _PairLanes:
    return _PairLanes(count)


@functools.lru_cache(maxsize=64)
def _masks(count: int, cluster_bits: int, zero_flag: bool) -> _Masks:
    return _Masks(count, cluster_bits, zero_flag)


@functools.cache
def _stair(count: int, cluster_bits: int) -> int:
    """Lane *i*: ``2**61 - i * cluster_size`` (host offset plus this is equal along a contiguous run)."""
    words = array("Q", range(1 << 61, (1 << 61) - (count << cluster_bits), -(1 << cluster_bits)))
    if sys.byteorder == "little":
        words.byteswap()
    return int.from_bytes(words.tobytes(), "big")


def _nonzero_window(data: bytes) -> tuple[int, int]:
    """The entries from the first non-zero one to the last (``(first, last + 1)``; equal: all zero)."""
    body = data.lstrip(b"\0")
    if not body:
        return 0, 0
    first = (len(data) - len(body)) // 8
    return first, (len(data.rstrip(b"\0")) + 7) // 8


def _lane_bytes(lanes: int, count: int) -> bytearray:
    """The low byte of each of *count* lanes, in entry order."""
    return bytearray(lanes.to_bytes(8 * count, "big")[7::8])
