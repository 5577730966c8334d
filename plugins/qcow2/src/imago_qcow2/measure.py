"""``qemu-img measure -O qcow2``: the file size a new qcow2 image needs.

QEMU's rules, so the numbers are qemu-img's: the fully allocated size is the disk rounded up to
whole clusters plus every piece of metadata a fully allocated image needs (header cluster, L2
tables, L1 table, refcount blocks and table, each rounded up to whole clusters, the refcount
structures counting themselves). The required size replaces the data clusters by those the
source's data touches (every one with a backing file, every one when preallocating data).
"""

from __future__ import annotations

from collections.abc import Sequence

from imago import InvalidOptionError, Measurement

from .layout import MAX_L1_BYTES

__all__ = ["data_clusters_touched", "fully_allocated_size", "measure", "refcount_metadata_size"]


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table needed to count *clusters* clusters and themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    total = -1
    while True:
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        if clusters + blocks + table == total:
            return (blocks + table) * cluster_size
        total = clusters + blocks + table


def fully_allocated_size(size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """The file size of an image of *size* bytes with every cluster allocated (metadata included)."""
    entry_size = 16 if extended_l2 else 8
    data = -(-size // cluster_size) * cluster_size
    metadata = cluster_size  # the header cluster
    l2_entries = _round_up(data // cluster_size, cluster_size // entry_size)
    metadata += l2_entries * entry_size
    l1_entries = _round_up(l2_entries * entry_size // cluster_size, cluster_size // 8)
    metadata += l1_entries * 8
    metadata += refcount_metadata_size((metadata + data) // cluster_size, cluster_size, refcount_order)
    return metadata + data


def data_clusters_touched(data: Sequence[tuple[int, int]], cluster_size: int) -> int:
    """Bytes of the clusters that hold at least one byte of the *data* ranges (each counted once)."""
    total = 0
    counted_end = 0  # clusters before this offset are counted
    for offset, length in data:
        if length <= 0:
            continue
        start = max(offset // cluster_size * cluster_size, counted_end)
        end = _round_up(offset + length, cluster_size)
        if end > start:
            total += end - start
            counted_end = end
    return total


def measure(
    *,
    size: int,
    data: Sequence[tuple[int, int]] | None,
    cluster_bits: int,
    refcount_order: int,
    extended_l2: bool,
    version: int,
    preallocate_data: bool,
    has_backing_file: bool,
) -> Measurement:
    """The measurement ``qemu-img measure`` prints for these options (*data*: ``None`` without a source)."""
    cluster_size = 1 << cluster_bits
    if extended_l2 and cluster_bits < 14:
        raise InvalidOptionError(
            "extended_l2", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    if version < 3 and refcount_order != 4:
        raise InvalidOptionError(
            "refcount_bits", "Refcount widths other than 16 bits require compatibility level 1.1 (compat=1.1)"
        )
    disk = _round_up(size, cluster_size)
    entry_size = 16 if extended_l2 else 8
    if -(-(disk // cluster_size) // (cluster_size // entry_size)) * 8 > MAX_L1_BYTES:
        raise InvalidOptionError("size", "The image size is too large (try using a larger cluster size)")
    if data is None:
        required = 0
    elif has_backing_file:
        # The new image's backing file may share nothing with the source: count every cluster.
        required = disk
    else:
        required = data_clusters_touched(data, cluster_size)
    if preallocate_data:
        required = disk
    full = fully_allocated_size(disk, cluster_size, refcount_order, extended_l2)
    bitmaps = 0 if data is not None and version >= 3 else None
    return Measurement(required=full - disk + required, fully_allocated=full, bitmaps=bitmaps)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
