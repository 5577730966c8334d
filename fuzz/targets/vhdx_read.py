"""vhdx_read: the input is a compact encoding of a VHDX, expanded and opened read-only in memory.

The smallest VHDX worth reading is several MiB (headers and region tables in the first MiB, then
the log, the BAT and the metadata region each 1 MiB aligned, then blocks of at least 1 MiB), but
almost all of it is zeroes. An input therefore lists only the non-zero pieces, as *records*:

======  ========  ============================================================================
offset  size      field
======  ========  ============================================================================
0       1         bits 0-4: the *slot*, the MiB of the file the piece lies in (0-31); bit 7:
                  recompute the checksum of the structure the piece starts (see below);
                  bits 5-6 are ignored
1       2         where in that MiB the piece starts, in 16-byte units (little-endian)
3       2         the piece's length in bytes (little-endian)
5       length    the piece (cut short if the input ends first)
======  ========  ============================================================================

Records follow each other to the end of the input (a last record shorter than 5 bytes is
ignored). :func:`decode` lays the pieces, in order, over zeroes; the file is as long as the
furthest record reaches (each record reaches at least the end of its slot's MiB), but at least
:data:`MIN_FILE_SIZE` (room for whole 1 MiB blocks after the structures qemu-img and imago place
in the first 4 MiB) and at most :data:`MAX_FILE_SIZE` (pieces are cut there). So a piece at slot
0 offset 0x1000 (units) is the first header, slot 2 the BAT, slot 3 the metadata table, slot 3
offset 0x1000 its items, in the layout qemu-img and imago write.

With bit 7 set, once every piece is laid, the CRC-32C of the structure at the piece's start is
recomputed: a header (``head``, 4 KiB), a region table (``regi``, 64 KiB), or the log entries
(``loge``, each as long as its own length field says) starting there and following each other
inside the piece. Mutations of those fields then reach the code behind the checksum checks;
seeds carry the bit on their checksummed structures, and a cleared bit tests the checks
themselves. :func:`encode` turns an image into records (and back: ``decode(encode(image))`` is
the image, padded with zeroes to the minimum size).

The image is then opened as ``vhdx`` through the deny gate (a differencing image's parent
refused, then the image opened without it), mapped end to end (bounded), read in bounded chunks
and ``info()`` asked: a pending log is replayed in memory, so damaged headers, region tables,
log entries, metadata items, the BAT and sector bitmaps are what the input varies.
"""

from __future__ import annotations

import struct

import crc32c

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = [
    "FIX_CHECKSUM",
    "MAX_FILE_SIZE",
    "MIN_FILE_SIZE",
    "RECORD_HEAD",
    "SLOT_MASK",
    "UNIT",
    "decode",
    "encode",
    "run",
]

MiB = 1 << 20
#: A record's head: the slot byte, the offset in 16-byte units, the length.
RECORD_HEAD = struct.Struct("<BHH")
#: The slot bits of a record's first byte, and the bit asking for a checksum to be recomputed.
SLOT_MASK = 0x1F
FIX_CHECKSUM = 0x80
#: The unit of a record's offset within its slot.
UNIT = 16
#: The longest piece one record holds.
MAX_PIECE = 0xFFFF
#: Where :func:`encode` splits a long stretch (a multiple of the unit, within a piece's length).
_SPLIT = MAX_PIECE // UNIT * UNIT
#: The file sizes a decoded input may have.
MIN_FILE_SIZE = 8 * MiB
MAX_FILE_SIZE = 32 * MiB
#: How many checksums one input may ask to recompute (bounded work).
MAX_FIXES = 32
#: Pieces of an encoded image closer than this are one record (a record's head costs 5 bytes).
_GAP = 32
#: The checksummed structures by signature: their size (the log entry's: its length field).
_HEADER, _REGION, _LOG = b"head", b"regi", b"loge"
_FIXED_SIZES = {_HEADER: 4096, _REGION: 64 << 10}


def _fix_checksums(image: bytearray, start: int, end: int) -> int:
    """Recompute the checksum of the structure at *start* (log entries: of each up to *end*); returns fixes."""
    signature = bytes(image[start : start + 4])
    size = _FIXED_SIZES.get(signature)
    if size is not None:
        _store_checksum(image, start, size)
        return 1
    fixes = 0
    while signature == _LOG and fixes < MAX_FIXES:
        length = int.from_bytes(image[start + 8 : start + 12], "little")
        if length < 4096 or length % 4096 or start + length > len(image):
            break
        _store_checksum(image, start, length)
        fixes += 1
        start += length
        if start >= end:
            break
        signature = bytes(image[start : start + 4])
    return fixes


def _store_checksum(image: bytearray, start: int, size: int) -> None:
    end = min(len(image), start + size)
    image[start + 4 : start + 8] = bytes(4)
    image[start + 4 : start + 8] = crc32c.crc32c(bytes(image[start:end])).to_bytes(4, "little")


def decode(data: bytes) -> bytes:
    """The VHDX file an input describes (see the module's documentation)."""
    pieces: list[tuple[int, bytes, bool]] = []
    size = MIN_FILE_SIZE
    at = 0
    while at + RECORD_HEAD.size <= len(data):
        slot_byte, units, length = RECORD_HEAD.unpack_from(data, at)
        at += RECORD_HEAD.size
        piece = data[at : at + length]
        at += length
        start = (slot_byte & SLOT_MASK) * MiB + units * UNIT
        size = max(size, ((slot_byte & SLOT_MASK) + 1) * MiB, -(-(start + len(piece)) // MiB) * MiB)
        pieces.append((start, piece, bool(slot_byte & FIX_CHECKSUM)))
    image = bytearray(min(size, MAX_FILE_SIZE))
    for start, piece, _fix in pieces:
        image[start : start + len(piece)] = piece[: max(0, len(image) - start)]
    fixes = 0
    for start, piece, fix in pieces:
        if fix and fixes < MAX_FIXES:
            fixes += _fix_checksums(image, start, start + len(piece))
    return bytes(image)


def _runs(image: bytes) -> list[tuple[int, int]]:
    """The non-zero stretches of *image* as ``(start, end)``, starts 16-byte aligned, near ones merged."""
    runs: list[tuple[int, int]] = []
    view = memoryview(image)
    zero = bytes(UNIT)
    for at in range(0, len(image), UNIT):
        if view[at : at + UNIT] != zero:
            end = min(len(image), at + UNIT)
            if runs and at - runs[-1][1] < _GAP:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((at, end))
    return runs


def encode(image: bytes, *, fix_checksums: bool = True) -> bytes:
    """Records describing *image* (a whole number of MiB, at most :data:`MAX_FILE_SIZE`).

    ``decode(encode(image))`` is *image*, padded with zeroes to :data:`MIN_FILE_SIZE` if shorter.

    With *fix_checksums*, records starting a header, a region table or a log entry ask for its
    checksum to be recomputed (the same checksum, for a valid image: the bytes do not change).
    """
    if len(image) % MiB or len(image) > MAX_FILE_SIZE:
        raise ValueError(
            f"a VHDX to encode must be a whole number of MiB up to {MAX_FILE_SIZE}, not {len(image)} bytes"
        )
    out = bytearray()
    reached = MIN_FILE_SIZE  # the length the records decode to so far
    for run_start, run_end in _runs(image):
        for start in range(run_start, run_end, _SPLIT):
            end = min(run_end, start + _SPLIT)
            slot, within = divmod(start, MiB)
            flag = FIX_CHECKSUM if fix_checksums and image[start : start + 4] in (_HEADER, _REGION, _LOG) else 0
            out += RECORD_HEAD.pack(slot | flag, within // UNIT, end - start) + image[start:end]
            reached = max(reached, (slot + 1) * MiB, -(-end // MiB) * MiB)
    if len(image) > reached:
        out += RECORD_HEAD.pack(len(image) // MiB - 1, 0, 0)  # an empty record: the file's length
    return bytes(out)


def run(data: bytes) -> None:
    """Decode *data* into a VHDX, open it (read-only, through the deny gate) and exercise it."""
    disk = open_image("vhdx", decode(data))
    try:
        exercise_read(disk, input_random(data))
    finally:
        close_quietly(disk)
