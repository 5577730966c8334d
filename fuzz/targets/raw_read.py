"""raw_read: the input is a raw image (the raw plugin over an in-memory storage), read and mapped."""

from __future__ import annotations

from .common import close_quietly, exercise_read, input_random, open_image

__all__ = ["run"]


def run(data: bytes) -> None:
    """Open *data* as raw (read-only) and exercise it."""
    disk = open_image("raw", data)
    try:
        exercise_read(disk, input_random(data))
    finally:
        close_quietly(disk)
