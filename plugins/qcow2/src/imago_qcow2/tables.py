"""L1 and L2 tables: entry layout, validation, and contiguous runs.

How each width of L2 entries is interpreted and updated is :mod:`imago_qcow2.l2_entries`.

A standard L2 table is validated once, when loaded, and its entries classified into runs
(consecutive entries of the same kind, data ones also contiguous in the host file), so a
mapping request costs a couple of array look-ups. Extended L2 tables (32 subclusters per
cluster) are validated on load and classified per subcluster on demand.
"""

from __future__ import annotations

import sys
from array import array
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
    raw: bytes | bytearray, *, table_offset: int, cluster_bits: int, file_size: int, filename: str | None
) -> tuple[array[int], bytearray]:
    """Validate an L1 table; returns its L2 table offsets (0: no table) and COPIED flags."""
    entries = decode_words(raw)
    cluster_mask = (1 << cluster_bits) - 1
    offsets = array("Q", bytes(len(entries) * 8))
    copied = bytearray(len(entries))
    for index, entry in enumerate(entries):
        if not entry:
            continue
        where = table_offset + 8 * index
        if entry & L1_RESERVED:
            raise CorruptImageError(filename, where, f"L1 entry {index} has reserved bits set ({entry:#018x})")
        l2_offset = entry & L1_OFFSET_MASK
        if l2_offset & cluster_mask:
            raise CorruptImageError(filename, where, f"L1 entry {index}: L2 table offset {l2_offset:#x} is unaligned")
        if l2_offset and l2_offset + (1 << cluster_bits) > file_size:
            raise CorruptImageError(
                filename, where, f"L1 entry {index}: L2 table at {l2_offset:#x} lies past the end of the file"
            )
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


class L2Table:
    """One L2 table, validated and classified.

    Standard tables: ``kinds[i]``, ``hosts[i]`` (host cluster offset, or the compressed
    descriptor) and ``run_end[i]`` (index of the first entry after *i*'s run).
    """

    __slots__ = (
        "cluster_bits",
        "entries",
        "extended",
        "external_data",
        "hosts",
        "kinds",
        "offset",
        "run_end",
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
        if extended:
            self.kinds = bytearray()
            self.hosts = array("Q")
            self.run_end = array("I")
            self._validate_extended(cluster_bits, external_data, image_size, data_size, filename)
        else:
            self._classify(cluster_bits, zero_flag, external_data, image_size, data_size, filename)

    def _classify(
        self,
        cluster_bits: int,
        zero_flag: bool,
        external_data: bool,
        image_size: int,
        data_size: int,
        filename: str | None,
    ) -> None:
        entries = self.entries
        count = len(entries)
        kinds = bytearray(count)
        hosts = array("Q", bytes(8 * count))
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
                kinds[index] = COMPRESSED
                hosts[index] = entry
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
            if entry & OFLAG_ZERO:
                kinds[index] = ZERO
                hosts[index] = host
            elif host or (external_data and entry & OFLAG_COPIED):
                kinds[index] = DATA
                hosts[index] = host
        self.kinds = kinds
        self.hosts = hosts
        self.run_end = array("I", bytes(4 * count))
        self.recompute_runs()

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
            return self.run_end[index] - index
        kinds, hosts = self.kinds, self.hosts
        kind = kinds[index]
        step = 1 << self.cluster_bits
        end = min(len(kinds), index + max(limit, 1))
        position = index + 1
        while (
            position < end
            and kinds[position] == kind
            and (kind != DATA or hosts[position] == hosts[position - 1] + step)
        ):
            position += 1
        return position - index

    def recompute_runs(self) -> None:
        """Rebuild the run table after updates."""
        kinds, hosts, run_end = self.kinds, self.hosts, self.run_end
        count = len(kinds)
        step = 1 << self.cluster_bits
        following = count
        for index in range(count - 1, -1, -1):
            if index + 1 < count:
                kind = kinds[index]
                if kind != kinds[index + 1] or (kind == DATA and hosts[index + 1] != hosts[index] + step):
                    following = index + 1
            run_end[index] = following
        self.runs_valid = True

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

    def subcluster(self, index: int, subcluster: int, cluster_bits: int) -> tuple[int, int]:
        """Extended tables: ``(kind, host offset or descriptor)`` of one subcluster."""
        entries = self.entries
        entry = entries[2 * index]
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry
        bitmap = entries[2 * index + 1]
        if bitmap >> subcluster & 1:
            return DATA, (entry & L2_OFFSET_MASK) + (subcluster << (cluster_bits - 5))
        if bitmap >> (SUBCLUSTERS + subcluster) & 1:
            return ZERO, 0
        return UNALLOCATED, 0
