"""vdi_read: the input is a VirtualBox VDI (static or dynamic), opened read-only in memory.

A parent disk the image names is refused by the deny gate (an :class:`~imago.ImagoError`), and
the image is then opened without it; the image is mapped end to end (bounded), read in bounded
chunks and checked where the driver checks, so a damaged header and block map are what the input
varies.

A VDI block is 1 MiB and a map entry naming a block past the end of the file is refused, so an
input small enough to fuzz could never reach the reads of allocated blocks: a short input is
therefore also opened with zeroes appended (:data:`PADDING`), which gives its map real blocks.
"""

from __future__ import annotations

import contextlib

import imago

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = ["PADDED_BELOW", "PADDING", "run"]

#: Inputs up to this size are also opened with :data:`PADDING` zero bytes appended.
PADDED_BELOW = 64 << 10
#: Room for a few 1 MiB blocks after a short input's header and map.
PADDING = 3 << 20


def _exercise(data: bytes, padding: int = 0) -> None:
    disk = open_image("vdi", data + bytes(padding) if padding else data)
    try:
        exercise_read(disk, input_random(data))  # seeded by the input alone: the padding is all zeroes
    finally:
        close_quietly(disk)


def run(data: bytes) -> None:
    """Open *data* as a VDI (read-only, through the deny gate) and exercise it (padded first, if short)."""
    if len(data) <= PADDED_BELOW:
        # The padded image's refusal says nothing the unpadded one's does not: the latter decides.
        with contextlib.suppress(imago.ImagoError):
            _exercise(data, PADDING)
    _exercise(data)
