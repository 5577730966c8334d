"""The block map: one 32-bit entry per guest block, held whole, checked when it is read.

An entry is the index of the image block holding the guest block's data (at ``offset_data +
index * block_size``), ``0xffffffff`` (never allocated) or ``0xfffffffe`` (discarded); both of
the latter read as zeroes. A map is damaged when an entry names a block past the block count,
when two entries name one block, or when a block's data lies past the end of the file: such an
image opens only to be checked (:meth:`BlockMap.problems` lists what is wrong as
``qemu-img check`` does), and reading a damaged entry fails.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

from imago import CorruptImageError

from .header import VdiHeader

__all__ = ["DISCARDED", "UNALLOCATED", "BlockMap", "Damage"]

UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE


class Damage:
    """One thing wrong with a block map (a finding of the check, a refusal at opening)."""

    __slots__ = ("block", "entry", "message", "other")

    def __init__(self, block: int, entry: int, other: int | None) -> None:
        #: The guest block whose entry is wrong.
        self.block = block
        #: What it records.
        self.entry = entry
        #: For an image block named twice: the guest block that named it first.
        self.other = other
        if other is not None:
            # (QEMU's line names the image block twice; kept, so the outputs compare equal.)
            self.message = f"ERROR: block index {entry} also used by {entry}"
        else:
            self.message = f"ERROR: block index {block} too large, is {entry}"


class BlockMap:
    """The entries of one image's block map, little-endian on disk, native in memory."""

    def __init__(self, header: VdiHeader, data: bytes, file_size: int, filename: str | None) -> None:
        entries = array("I")
        entries.frombytes(data[: 4 * header.blocks_in_image])
        if sys.byteorder != "little":
            entries.byteswap()
        self.entries = entries
        self._header = header
        self._filename = filename
        #: Image blocks wholly inside the file at opening (entries at or past it are damaged).
        self.blocks_in_file = max(0, (file_size - header.offset_data) // header.block_size)

    def allocated(self) -> Iterator[tuple[int, int]]:
        """``(guest block, image block)`` for every entry naming a block."""
        for block, entry in enumerate(self.entries):
            if entry < DISCARDED:
                yield block, entry

    def problems(self) -> list[Damage]:
        """What ``qemu-img check`` reports of the map: entries past the block count, blocks named twice."""
        limit = self._header.blocks_in_image
        first_user: dict[int, int] = {}
        found = []
        for block, entry in self.allocated():
            if entry >= limit:
                found.append(Damage(block, entry, None))
            elif entry in first_user:
                found.append(Damage(block, entry, first_user[entry]))
            else:
                first_user[entry] = block
        return found

    def validate(self) -> None:
        """Refuse a damaged map: the first bad entry, named by its offset in the file."""
        limit = min(self._header.blocks_in_image, self.blocks_in_file)
        allocated = [entry for entry in self.entries if entry < DISCARDED]
        if not allocated or (max(allocated) < limit and len(set(allocated)) == len(allocated)):
            return
        seen: set[int] = set()
        for block, entry in self.allocated():
            where = self._header.offset_bmap + 4 * block
            if entry >= self._header.blocks_in_image:
                raise CorruptImageError(
                    self._filename,
                    where,
                    f"block map entry {block} names block {entry}, past the {self._header.blocks_in_image} blocks",
                )
            if entry >= self.blocks_in_file:
                raise CorruptImageError(
                    self._filename, where, f"block map entry {block} names block {entry}, past the end of the file"
                )
            if entry in seen:
                raise CorruptImageError(self._filename, where, f"block map entry {block} names block {entry} again")
            seen.add(entry)

    def count_allocated(self) -> int:
        """How many entries name a block inside the block count (what ``blocks_allocated`` must say)."""
        limit = self._header.blocks_in_image
        return sum(1 for entry in self.entries if entry < limit)

    def host_block(self, block: int) -> int | None:
        """The image block of guest *block*, ``None`` when it reads as zeroes; a damaged entry raises."""
        entry = self.entries[block]
        if entry >= DISCARDED:
            return None
        if entry >= self._header.blocks_in_image or entry >= self.blocks_in_file:
            raise CorruptImageError(
                self._filename,
                self._header.offset_bmap + 4 * block,
                f"block map entry {block} names block {entry}, past the block count or the end of the file",
            )
        return entry

    def encode(self, first: int, count: int) -> bytes:
        """Entries ``[first, first + count)`` as stored (little-endian)."""
        part = self.entries[first : first + count]
        if sys.byteorder != "little":
            part.byteswap()
        return part.tobytes()
