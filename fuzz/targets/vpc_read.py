"""vpc_read: the input is a VHD (fixed, dynamic or differencing; qemu's ``vpc``), opened read-only in memory.

A parent disk the image names is refused by the deny gate (an :class:`~imago.ImagoError`), and
the image is then opened without it; the image is mapped end to end (bounded), read in bounded
chunks and checked where the driver checks, so a damaged footer, dynamic header, BAT and sector
bitmaps are what the input varies.

A dynamic VHD block is 2 MiB, too large for an input small enough to fuzz, so a short input is
also opened with :data:`PADDING` bytes inserted before its last 512 (the footer, which ends the
file): a BAT entry naming the sector where the footer begins in the input then finds a whole block
there. The padding repeats 256 bytes ``0xff`` and 256 zero bytes, so that a sector bitmap in it
marks sectors both present and absent.
"""

from __future__ import annotations

import contextlib

import imago

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = ["FOOTER_SIZE", "PADDED_BELOW", "PADDING", "run"]

#: The footer at the end of every VHD.
FOOTER_SIZE = 512
#: Inputs up to this size are also opened padded.
PADDED_BELOW = 64 << 10
#: What is inserted: room for two blocks (a 512-byte sector bitmap and 2 MiB of data each).
PADDING = (b"\xff" * 256 + bytes(256)) * ((5 << 20) // 512)


def _exercise(data: bytes, *, padded: bool = False) -> None:
    image = data[:-FOOTER_SIZE] + PADDING + data[-FOOTER_SIZE:] if padded else data
    disk = open_image("vpc", image)
    try:
        exercise_read(disk, input_random(data))  # seeded by the input alone: the padding is fixed
    finally:
        close_quietly(disk)


def run(data: bytes) -> None:
    """Open *data* as a VHD (read-only, through the deny gate) and exercise it (padded first, if short)."""
    if FOOTER_SIZE <= len(data) <= PADDED_BELOW:
        # The padded image's refusal says nothing the unpadded one's does not: the latter decides.
        with contextlib.suppress(imago.ImagoError):
            _exercise(data, padded=True)
    _exercise(data)
