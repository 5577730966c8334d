"""What the targets share: opening an input as an image, and walking a disk in bounded steps.

Every open names its format and goes through :class:`imago.DenyImplicitOpenGate`, so a crafted
backing or data file name opens nothing; an image refused for naming one is opened again
without its backing file (and with an empty in-memory data file), so that its own metadata is
still exercised.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from typing import Any

import imago
from imago import Capability, DenyImplicitOpenGate, ImplicitOpenDeniedError, SyncFormatAccess, runtime

from ..memory import MemoryStorage

__all__ = [
    "CHUNK",
    "MAX_MAPPINGS",
    "MAX_SNAPSHOTS",
    "WALK_LIMIT",
    "close_quietly",
    "exercise_read",
    "input_random",
    "open_image",
    "walk_mappings",
]

#: How much of a disk is read from its start, and the read size (bounded work per input).
WALK_LIMIT = 16 << 20
CHUNK = 1 << 20
#: Mapping look-ups per walk (the walk covers the whole disk, however large, in at most this many).
MAX_MAPPINGS = 4096
#: Snapshots read through per input.
MAX_SNAPSHOTS = 4
#: Reads at offsets drawn from the input (beyond the walked start), and their size.
RANDOM_READS = 4
RANDOM_READ_SIZE = 64 << 10

_BUFFER = bytearray(CHUNK)


def input_random(data: bytes) -> random.Random:
    """A random source seeded by the input: the same input always does the same work."""
    return random.Random(zlib.crc32(data))


#: The label of the in-memory data file :func:`open_image` gives an image that names one.
DATA_FILE_LABEL = "fuzz-data-file"


def _builder(
    format_name: str, data: bytes, *, writable: bool, no_backing: bool, data_file: bytes | None, check: bool
) -> Any:
    storage = MemoryStorage(data, writable=writable)
    builder: Any = imago.format_driver(format_name).builder(storage).write(writable).open_backing(not no_backing)
    if data_file is not None:
        # qcow2's builder option (Qcow2Builder.data_file); open_image asks hasattr first.
        builder.data_file(MemoryStorage(data_file, writable=writable, label=DATA_FILE_LABEL))
    return builder.for_check(check)


def open_image(
    format_name: str, data: bytes, *, writable: bool = False, for_check: bool = False, data_file: bytes = b""
) -> SyncFormatAccess:
    """Open *data* as a *format_name* image held in memory.

    The first attempt opens the image as it is (its backing file through the deny gate); an
    image the gate refuses is opened again without its backing file, then also with an
    in-memory data file holding *data_file* (empty by default; a reopened image gets the bytes
    its data file held). With *for_check*, an image refused as corrupt is opened again as
    ``qemu-img check`` opens damaged images.
    """
    gate = DenyImplicitOpenGate()
    no_backing = check = False
    given_data_file: bytes | None = None
    while True:
        builder = _builder(
            format_name, data, writable=writable, no_backing=no_backing, data_file=given_data_file, check=check
        )
        try:
            return SyncFormatAccess(runtime.run_sync(builder.open(gate)))
        except ImplicitOpenDeniedError:
            if not no_backing:
                no_backing = True
            elif given_data_file is None and hasattr(builder, "data_file"):
                given_data_file = data_file
            else:
                raise
        except imago.CorruptImageError:
            if not for_check or check:
                raise
            check = True


def close_quietly(disk: SyncFormatAccess) -> None:
    """Close *disk*; an ImagoError from the final flush is an acceptable outcome, not a finding."""
    with contextlib.suppress(imago.ImagoError):
        disk.close()


def walk_mappings(disk: SyncFormatAccess, limit: int = MAX_MAPPINGS) -> int:
    """Ask for the mappings of the whole disk (at most *limit* look-ups, shallow and resolved); returns bytes mapped."""
    mapped = 0
    for look_up in (disk.get_mapping, disk.get_shallow_mapping):
        size = disk.size
        mapped = steps = 0
        while mapped < size and steps < limit:
            _mapping, length = look_up(mapped, size - mapped)
            if length <= 0:
                raise AssertionError(f"{look_up.__name__}({mapped}) reported {length} bytes")
            mapped += length
            steps += 1
    return mapped


def read_range(disk: SyncFormatAccess, offset: int, length: int) -> int:
    """Read ``[offset, offset + length)`` (clipped to the disk) in chunks; returns bytes read."""
    end = min(disk.size, offset + length)
    view = memoryview(_BUFFER)
    done = 0
    while offset < end:
        step = min(CHUNK, end - offset)
        disk.read(view[:step], offset)
        offset += step
        done += step
    return done


def exercise_read(disk: SyncFormatAccess, rng: random.Random, *, walk_limit: int = WALK_LIMIT) -> int:
    """Map the disk, read its start and a few offsets drawn from *rng*, read snapshots, check it.

    Returns the bytes read (the tests count work with it).
    """
    walk_mappings(disk)
    done = read_range(disk, 0, walk_limit)
    size = disk.size
    if size > 0:
        offsets = [rng.randrange(size) for _ in range(RANDOM_READS)] + [max(0, size - RANDOM_READ_SIZE)]
        for offset in offsets:
            done += read_range(disk, offset, RANDOM_READ_SIZE)
    disk.driver.info()
    done += _read_snapshots(disk, rng, walk_limit)
    if disk.driver.supports(Capability.CHECK):
        disk.check()
    return done


def _read_snapshots(disk: SyncFormatAccess, rng: random.Random, walk_limit: int) -> int:
    snapshots = Capability.SNAPSHOTS.of(disk.driver)
    if snapshots is None:
        return 0
    done = 0
    for record in list(snapshots.snapshots)[:MAX_SNAPSHOTS]:
        record.describe()
        view = SyncFormatAccess(runtime.run_sync(snapshots.read_snapshot(record.id)))
        try:
            walk_mappings(view, MAX_MAPPINGS // 4)
            done += read_range(view, 0, walk_limit // 4)
            if view.size > 0:
                done += read_range(view, rng.randrange(view.size), RANDOM_READ_SIZE)
        finally:
            view.close()
    return done
