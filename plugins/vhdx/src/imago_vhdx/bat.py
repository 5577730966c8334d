"""The block allocation table: payload block states and offsets, sector bitmap entries.

The BAT interleaves one sector bitmap entry after every *chunk ratio* payload entries (the
number of blocks whose sectors one 1 MiB bitmap block covers). It is held whole (charged to the
chain's memory budget) and every entry is checked at open: states known, present blocks 1 MiB
aligned, inside the file, clear of the headers, log, BAT and metadata regions and of each other.
"""

from __future__ import annotations

import itertools
import re
from array import array
from collections.abc import Iterator

from imago import CorruptImageError

from .layout import MiB

__all__ = [
    "BLOCK_FULLY_PRESENT",
    "BLOCK_NOT_PRESENT",
    "BLOCK_PARTIALLY_PRESENT",
    "BLOCK_UNDEFINED",
    "BLOCK_UNMAPPED",
    "BLOCK_ZERO",
    "BITMAP_PRESENT",
    "BatGeometry",
    "check_bat",
]

BLOCK_NOT_PRESENT = 0
BLOCK_UNDEFINED = 1
BLOCK_ZERO = 2
BLOCK_UNMAPPED = 3
BLOCK_FULLY_PRESENT = 6
BLOCK_PARTIALLY_PRESENT = 7
BITMAP_PRESENT = 6
_PAYLOAD_STATES = frozenset({0, 1, 2, 3, 6, 7})
_BITMAP_STATES = frozenset({0, 6})
#: Sectors one sector bitmap block (1 MiB of bits) covers.
_BITMAP_SECTORS = 8 * MiB


class BatGeometry:
    """How many entries the BAT has and where block *n*'s entry lies."""

    __slots__ = ("block_size", "blocks", "chunk_ratio", "entries", "sector_size", "virtual_size")

    def __init__(self, virtual_size: int, block_size: int, sector_size: int, has_parent: bool) -> None:
        self.block_size = block_size
        self.virtual_size = virtual_size
        self.sector_size = sector_size
        self.chunk_ratio = _BITMAP_SECTORS * sector_size // block_size
        self.blocks = -(-virtual_size // block_size)
        bitmaps = -(-self.blocks // self.chunk_ratio)
        if self.blocks == 0:
            self.entries = 0
        elif has_parent:
            self.entries = bitmaps * (self.chunk_ratio + 1)
        else:
            self.entries = self.blocks + (self.blocks - 1) // self.chunk_ratio

    def payload_index(self, block: int) -> int:
        """The BAT index of payload block *block*."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        """The BAT index of the sector bitmap entry covering payload block *block*."""
        chunk = block // self.chunk_ratio
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def check_bat(
    bat: array[int],
    geometry: BatGeometry,
    has_parent: bool,
    file_end: int,
    reserved: list[tuple[int, int, str]],
    bat_at: int,
    filename: str | None,
) -> None:
    """Refuse a BAT with unknown states, or blocks outside the file, in metadata, or sharing space."""
    spans: list[tuple[int, int, int]] = []
    ratio = geometry.chunk_ratio
    for index in _interesting(bat):
        entry = bat[index]
        state = entry & 7
        offset = (entry >> 20) * MiB
        is_bitmap = index % (ratio + 1) == ratio
        where = bat_at + 8 * index
        if is_bitmap:
            if state not in _BITMAP_STATES:
                raise CorruptImageError(filename, where, f"BAT entry {index}: unknown sector bitmap state {state}")
            if state != BITMAP_PRESENT:
                continue
            if not has_parent:
                continue  # (unused outside differencing images: QEMU ignores them too)
            length = MiB
        else:
            if state not in _PAYLOAD_STATES:
                raise CorruptImageError(filename, where, f"BAT entry {index}: unknown payload block state {state}")
            if state == BLOCK_PARTIALLY_PRESENT and not has_parent:
                raise CorruptImageError(
                    filename, where, f"BAT entry {index}: a partially present block in an image without a parent"
                )
            if state not in (BLOCK_FULLY_PRESENT, BLOCK_PARTIALLY_PRESENT):
                continue
            # (The last block's tail past the disk's end need not be in the file: QEMU's fixed images end there.)
            block = index - index // (ratio + 1)
            length = min(geometry.block_size, geometry.virtual_size - block * geometry.block_size)
        if offset < MiB or offset + length > file_end:
            raise CorruptImageError(
                filename,
                where,
                f"BAT entry {index}: {length} bytes at {offset:#x} lie outside the file's data area "
                f"(the file ends at {file_end:#x})",
            )
        for start, size, name in reserved:
            if offset < start + size and start < offset + length:
                raise CorruptImageError(
                    filename, where, f"BAT entry {index}: {length} bytes at {offset:#x} overlap the {name}"
                )
        spans.append((offset, offset + length, index))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise CorruptImageError(
                filename, bat_at + 8 * second, f"BAT entries {first} and {second} share space at {start:#x}"
            )


# Entries in a state without data and without an offset: a run of them is skipped in one match.
_UNALLOCATED_RUN = re.compile(rb"(?:[\x00-\x03]\x00\x00\x00\x00\x00\x00\x00)+")


def _interesting(bat: array[int]) -> Iterator[int]:
    """The indexes of the entries that are not plainly unallocated (their check costs Python time)."""
    data = bat.tobytes() if bat.itemsize == 8 and _little_endian() else b"".join(e.to_bytes(8, "little") for e in bat)
    position = 0
    end = len(data)
    while position < end:
        run = _UNALLOCATED_RUN.match(data, position)
        if run is not None:
            position = run.end()
            continue
        yield position // 8
        position += 8


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"
