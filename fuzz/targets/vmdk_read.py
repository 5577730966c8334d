"""vmdk_read: the input is a single-file VMDK (embedded descriptor), opened read-only in memory.

Extents in other files, parent disks and anything else the descriptor names are refused by the
deny gate (an :class:`~imago.ImagoError`); the image itself is mapped end to end (bounded) and
read in bounded chunks, so damaged grain tables, markers, footers and deflate streams are what
the input varies.
"""

from __future__ import annotations

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = ["run"]


def run(data: bytes) -> None:
    """Open *data* as a VMDK (read-only, through the deny gate) and exercise it."""
    disk = open_image("vmdk", data)
    try:
        exercise_read(disk, input_random(data))
    finally:
        close_quietly(disk)
