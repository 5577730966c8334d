"""The layout of a new hosted sparse extent, as ``qemu-img create -f vmdk`` lays it out.

One sector of header (``KDMV``), the embedded descriptor area (sectors 1-20), the redundant
grain directory and its grain tables, the primary grain directory and its grain tables (every
table preallocated, zeroed), then the grains from the next grain boundary on. Grains of 64 KiB,
512 entries per grain table.
"""

from __future__ import annotations

import struct

from imago import Record

from .header import FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, KDMV_MAGIC, SECTOR

__all__ = ["DESCRIPTOR_AREA", "GRAIN_SECTORS", "NewSparseExtent", "plan_sparse_extent"]

GRAIN_SECTORS = 128
GTES_PER_GT = 512
DESCRIPTOR_OFFSET_SECTORS = 1
DESCRIPTOR_SECTORS = 20
#: Bytes of descriptor text a new monolithic sparse file can hold.
DESCRIPTOR_AREA = DESCRIPTOR_SECTORS * SECTOR

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")


class NewSparseExtent(Record):
    """What to write for a new sparse extent: ``writes`` (offset, bytes) and the file's ``file_size``."""

    __slots__ = ("file_size", "writes")

    writes: tuple[tuple[int, bytes], ...]
    file_size: int

    def __init__(self, writes: tuple[tuple[int, bytes], ...], file_size: int) -> None:
        object.__setattr__(self, "writes", writes)
        object.__setattr__(self, "file_size", file_size)


def _ceil(value: int, unit: int) -> int:
    return -(-value // unit)


def plan_sparse_extent(capacity: int, *, zeroed_grain: bool, descriptor: bool) -> NewSparseExtent:
    """The header and grain directories of a sparse extent of *capacity* bytes (a multiple of 512).

    *descriptor*: whether the header names the embedded descriptor area (monolithic sparse files);
    extent files of a descriptor file have the area too (as QEMU makes them), named the same way.
    """
    sectors = capacity // SECTOR
    grains = _ceil(sectors, GRAIN_SECTORS)
    gt_sectors = _ceil(GTES_PER_GT * 4, SECTOR)
    gt_count = _ceil(grains, GTES_PER_GT)
    gd_sectors = _ceil(gt_count * 4, SECTOR)
    rgd = DESCRIPTOR_OFFSET_SECTORS + DESCRIPTOR_SECTORS
    gd = rgd + gd_sectors + gt_sectors * gt_count
    overhead = _ceil(gd + gd_sectors + gt_sectors * gt_count, GRAIN_SECTORS) * GRAIN_SECTORS
    flags = FLAG_RGD | FLAG_NL_DETECT | (FLAG_ZERO_GRAIN if zeroed_grain else 0)
    header = _HEADER.pack(
        KDMV_MAGIC,
        2 if zeroed_grain else 1,
        flags,
        sectors,
        GRAIN_SECTORS,
        DESCRIPTOR_OFFSET_SECTORS,
        DESCRIPTOR_SECTORS,
        GTES_PER_GT,
        rgd,
        gd,
        overhead,
        0,
        b"\n \r\n",
        0,
    )
    del descriptor  # (QEMU names the area in every sparse extent it creates)
    writes = [(0, header.ljust(SECTOR, b"\0"))]
    for directory in (rgd, gd):
        first_table = directory + gd_sectors
        entries = struct.pack(f"<{gt_count}I", *(first_table + i * gt_sectors for i in range(gt_count)))
        writes.append((directory * SECTOR, entries.ljust(gd_sectors * SECTOR, b"\0")))
    return NewSparseExtent(tuple(writes), overhead * SECTOR)
