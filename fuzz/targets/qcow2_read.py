"""qcow2_read: the input is a qcow2 image, opened read-only in memory and read, mapped, snapshots read, checked."""

from __future__ import annotations

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = ["run"]


def run(data: bytes) -> None:
    """Open *data* as qcow2 (read-only; a damaged image as for a check) and exercise it."""
    disk = open_image("qcow2", data, for_check=True)
    try:
        exercise_read(disk, input_random(data))
    finally:
        close_quietly(disk)
