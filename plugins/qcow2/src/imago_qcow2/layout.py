"""The qcow2 file layout: format constants, the header field table, and where metadata goes.

Header fields are updated in place through :func:`write_header_fields` only, which knows each
field's offset and width from :data:`HEADER_FIELDS` and writes fields that lie next to each
other in one write: a crash then leaves them all old or all new (the sector write is atomic).
The sizing of a new image's metadata (:func:`plan_image`) and of L1 tables (:func:`l1_entries`)
is computed here too, for creating and for resizing.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from imago import Record, Storage

__all__ = [
    "AUTOCLEAR_BITMAPS",
    "AUTOCLEAR_DATA_FILE_RAW",
    "COMPAT_LAZY_REFCOUNTS",
    "COMPRESSION_TYPES",
    "CREATED_V3_HEADER_LENGTH",
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "HEADER_FIELDS",
    "HEADER_PROBE_BYTES",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DATA_FILE",
    "INCOMPAT_DIRTY",
    "INCOMPAT_EXTENDED_L2",
    "KNOWN_INCOMPAT",
    "MAGIC",
    "MAX_CLUSTER_BITS",
    "MAX_L1_BYTES",
    "MAX_NAME_BYTES",
    "MAX_REFCOUNT_TABLE_BYTES",
    "MAX_SNAPSHOTS",
    "MIN_CLUSTER_BITS",
    "NO_LIMIT",
    "V2_HEADER_LENGTH",
    "V3_HEADER_LENGTH",
    "HeaderField",
    "ImageLayout",
    "field_offset",
    "header_field_writes",
    "header_struct",
    "l1_entries",
    "plan_image",
    "write_header_fields",
]

#: Sets a field of a frozen record, once, in its ``__init__``.
_set = object.__setattr__

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: Header length QEMU writes for version 3: the compression type byte, padded to 8 bytes.
CREATED_V3_HEADER_LENGTH = 112
#: Bytes to read first: enough for the version 3 header with its compression type.
HEADER_PROBE_BYTES = 112
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# QEMU's limits, so that no image makes us allocate more than they would.
MAX_L1_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_NAME_BYTES = 1023

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

#: A size limit that is no limit (checks against it always pass).
NO_LIMIT = 1 << 63


class HeaderField(Record):
    """Where a header field lies: its byte offset and its (big-endian) struct format code."""

    __slots__ = ("format", "offset")

    offset: int
    format: str

    def __init__(self, offset: int, format: str) -> None:
        _set(self, "offset", offset)
        _set(self, "format", format)

    @property
    def end(self) -> int:
        """The offset just past the field."""
        return self.offset + struct.calcsize(">" + self.format)


#: Every fixed header field by its :class:`~imago_qcow2.Header` attribute name, in file order.
HEADER_FIELDS: dict[str, HeaderField] = {
    "magic": HeaderField(0, "4s"),
    "version": HeaderField(4, "I"),
    "backing_file_offset": HeaderField(8, "Q"),
    "backing_file_size": HeaderField(16, "I"),
    "cluster_bits": HeaderField(20, "I"),
    "size": HeaderField(24, "Q"),
    "crypt_method": HeaderField(32, "I"),
    "l1_size": HeaderField(36, "I"),
    "l1_table_offset": HeaderField(40, "Q"),
    "refcount_table_offset": HeaderField(48, "Q"),
    "refcount_table_clusters": HeaderField(56, "I"),
    "nb_snapshots": HeaderField(60, "I"),
    "snapshots_offset": HeaderField(64, "Q"),
    # Version 3 only:
    "incompatible_features": HeaderField(72, "Q"),
    "compatible_features": HeaderField(80, "Q"),
    "autoclear_features": HeaderField(88, "Q"),
    "refcount_order": HeaderField(96, "I"),
    "header_length": HeaderField(100, "I"),
    "compression_type": HeaderField(104, "B"),
}


def field_offset(name: str) -> int:
    """The byte offset of the header field *name* (for writes, and for errors about it)."""
    return HEADER_FIELDS[name].offset


def header_struct(start: int, end: int) -> struct.Struct:
    """The struct of the header fields from byte *start* to byte *end* (which must bound fields)."""
    fields = [field for field in HEADER_FIELDS.values() if start <= field.offset and field.end <= end]
    return struct.Struct(">" + "".join(field.format for field in fields))


def header_field_writes(values: Mapping[str, int]) -> list[tuple[int, bytes]]:
    """The writes that store *values* (field name: value): ``(offset, bytes)``, adjacent fields merged."""
    writes: list[tuple[int, bytes]] = []
    for name in sorted(values, key=field_offset):
        field = HEADER_FIELDS[name]
        data = struct.pack(">" + field.format, values[name])
        if writes and writes[-1][0] + len(writes[-1][1]) == field.offset:
            writes[-1] = (writes[-1][0], writes[-1][1] + data)
        else:
            writes.append((field.offset, data))
    return writes


async def write_header_fields(storage: Storage, values: Mapping[str, int]) -> None:
    """Update header fields in place, adjacent ones in one write, and wait until they are on disk.

    The flush makes the header switch a barrier: what it points to was written before, what
    it stops pointing to is released after.
    """
    for offset, data in header_field_writes(values):
        await storage.writev([memoryview(data)], offset)
    await storage.flush()


def l1_entries(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """L1 entries needed to map a disk of *size* bytes (one L2 table, one cluster, each)."""
    entries_per_table = (1 << cluster_bits) // (16 if extended_l2 else 8)
    return -(-size // (entries_per_table << cluster_bits))


class ImageLayout(Record, kw_only=True):
    """Where a new image's metadata goes, in clusters from the start of the file.

    QEMU's order: header cluster, refcount table, refcount blocks, L1 table, then (when the
    disk is mapped from the start) the L2 tables and the data clusters, contiguously.
    """

    __slots__ = (
        "cluster_bits",
        "data_clusters",
        "data_in_file",
        "entries_per_table",
        "guest_clusters",
        "l1_clusters",
        "l1_entries",
        "l2_tables",
        "refcount_blocks",
        "refcount_table_clusters",
    )

    cluster_bits: int
    #: Guest clusters of the disk, and L2 entries per table.
    guest_clusters: int
    entries_per_table: int
    refcount_table_clusters: int
    refcount_blocks: int
    l1_entries: int
    l1_clusters: int
    #: L2 tables mapping the disk from the start (0: the disk starts unmapped).
    l2_tables: int
    #: Data clusters in the image file (0: none, or data in an external data file).
    data_clusters: int
    data_in_file: bool

    def __init__(
        self,
        *,
        cluster_bits: int,
        guest_clusters: int,
        entries_per_table: int,
        refcount_table_clusters: int,
        refcount_blocks: int,
        l1_entries: int,
        l1_clusters: int,
        l2_tables: int,
        data_clusters: int,
        data_in_file: bool,
    ) -> None:
        _set(self, "cluster_bits", cluster_bits)
        _set(self, "guest_clusters", guest_clusters)
        _set(self, "entries_per_table", entries_per_table)
        _set(self, "refcount_table_clusters", refcount_table_clusters)
        _set(self, "refcount_blocks", refcount_blocks)
        _set(self, "l1_entries", l1_entries)
        _set(self, "l1_clusters", l1_clusters)
        _set(self, "l2_tables", l2_tables)
        _set(self, "data_clusters", data_clusters)
        _set(self, "data_in_file", data_in_file)

    @property
    def refcount_table_offset(self) -> int:
        """Byte offset of the refcount table (right after the header cluster)."""
        return 1 << self.cluster_bits

    @property
    def refcount_blocks_offset(self) -> int:
        """Byte offset of the first refcount block."""
        return self.refcount_table_offset + (self.refcount_table_clusters << self.cluster_bits)

    @property
    def l1_offset(self) -> int:
        """Byte offset of the L1 table."""
        return self.refcount_blocks_offset + (self.refcount_blocks << self.cluster_bits)

    @property
    def l2_offset(self) -> int:
        """Byte offset of the first L2 table."""
        return self.l1_offset + (self.l1_clusters << self.cluster_bits)

    @property
    def data_offset(self) -> int:
        """Byte offset of the data area (and the end of the metadata)."""
        return self.l2_offset + (self.l2_tables << self.cluster_bits)

    def data_host(self, guest_cluster: int) -> int:
        """Where the L2 tables map a guest cluster: into the data area, or guest = host in a data file."""
        offset = guest_cluster << self.cluster_bits
        return self.data_offset + offset if self.data_in_file else offset

    @property
    def clusters_in_use(self) -> int:
        """Clusters from the start of the file that the refcount blocks count as used."""
        return (self.data_offset >> self.cluster_bits) + self.data_clusters


def plan_image(
    *, size: int, cluster_bits: int, refcount_order: int, extended_l2: bool, mapped: bool, data_in_file: bool
) -> ImageLayout:
    """The layout of a new image of *size* bytes.

    *mapped*: L2 tables map every guest cluster from the start (preallocation, or a raw
    external data file); *data_in_file*: the data clusters they map lie in the image file.
    """
    cluster_size = 1 << cluster_bits
    guest_clusters = -(-size // cluster_size)
    l1 = l1_entries(size, cluster_bits, extended_l2)
    l1_clusters = -(-l1 * 8 // cluster_size)  # none for an empty disk, as in QEMU
    l2_tables = l1 if mapped else 0
    data_clusters = guest_clusters if mapped and data_in_file else 0
    # Refcount blocks must cover themselves and the refcount table: grow until stable.
    per_block = cluster_size * 8 >> refcount_order
    table_clusters = blocks = 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters + l2_tables + data_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    return ImageLayout(
        cluster_bits=cluster_bits,
        guest_clusters=guest_clusters,
        entries_per_table=cluster_size // (16 if extended_l2 else 8),
        refcount_table_clusters=table_clusters,
        refcount_blocks=blocks,
        l1_entries=l1,
        l1_clusters=l1_clusters,
        l2_tables=l2_tables,
        data_clusters=data_clusters,
        data_in_file=data_in_file,
    )
