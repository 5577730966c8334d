"""qcow2_write: an operation sequence applied to a qcow2 image held in memory, checked against a model.

The input is the image followed by a trailer: up to :data:`MAX_OPS` operations of 8 bytes each,
then one byte giving their number (see :func:`decode`). The image is opened for writing (a copy
of the input; its backing file is never opened), the operations are applied (write, write
zeroes, the three discards, flush, compressed write, snapshot create/apply/delete, resize,
repair), and when the image started consistent (``check`` found nothing) two more things are
findings besides unacceptable exceptions: the disk reading back other than a bytearray model of
the operations (:class:`~fuzz.verdict.DataMismatch`), before and after closing and reopening
it, and the reopened image's check finding corruptions (leaks are allowed: QEMU leaks too).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import NamedTuple

from imago import (
    Capability,
    ImagoError,
    InvalidOptionError,
    InvalidRequestError,
    SnapshotNotFoundError,
    SyncFormatAccess,
    UnsupportedFeatureError,
    runtime,
)

from ..memory import MemoryStorage
from ..verdict import DataMismatch, acceptable
from .common import DATA_FILE_LABEL, close_quietly, open_image

__all__ = [
    "ALLOWED_OS_ERRORS",
    "MAX_OPS",
    "MODEL_LIMIT",
    "OP_SIZE",
    "Op",
    "OpKind",
    "Outcome",
    "apply_input",
    "decode",
    "encode",
    "run",
]

#: Operations per input, and the bytes each takes in the trailer.
MAX_OPS = 8
OP_SIZE = 8
#: How much of the disk (from its start) the model follows; operations beyond it are applied, not verified.
MODEL_LIMIT = 8 << 20
#: The storage filling up (:data:`fuzz.memory.MAX_STORAGE_SIZE`) is the one OS error a write may raise.
ALLOWED_OS_ERRORS = frozenset({errno.ENOSPC})
#: Errors that reject a request before anything changes: the model stays valid.
_REJECTIONS = (InvalidRequestError, InvalidOptionError, UnsupportedFeatureError, SnapshotNotFoundError)
# Position-dependent write data (a misplaced write reads back wrong), up to 1 MiB plus a shift.
_PATTERN = bytes(range(256)) * ((1 << 20) // 256 + 2)


class OpKind:
    """Operation numbers (the first byte of an operation, modulo :data:`COUNT`)."""

    WRITE = 0
    WRITE_ZEROES = 1
    DISCARD_TO_ZERO = 2
    DISCARD_TO_ANY = 3
    DISCARD_TO_BACKING = 4
    FLUSH = 5
    SNAPSHOT_CREATE = 6
    GROW = 7
    SHRINK = 8
    WRITE_COMPRESSED = 9
    SNAPSHOT_APPLY = 10
    SNAPSHOT_DELETE = 11
    REPAIR = 12
    COUNT = 13


class Op(NamedTuple):
    """One decoded operation: its kind and raw parameters (scaled to the disk when applied)."""

    kind: int
    offset: int
    length: int
    arg: int
    flags: int

    def encode(self) -> bytes:
        """The operation's 8 bytes in the trailer."""
        return (
            bytes([self.kind])
            + self.offset.to_bytes(3, "little")
            + self.length.to_bytes(2, "little")
            + bytes([self.arg, self.flags])
        )


def decode(data: bytes) -> tuple[bytes, list[Op]]:
    """Split an input into the image and its operations (the trailer: ops, then their count).

    A count of zero means there is no trailer: the whole input is the image (a plain image seed).
    """
    count = min(data[-1] % (MAX_OPS + 1), (len(data) - 1) // OP_SIZE) if data else 0
    if count == 0:
        return data, []
    start = len(data) - 1 - count * OP_SIZE
    ops = []
    for index in range(count):
        raw = data[start + index * OP_SIZE : start + (index + 1) * OP_SIZE]
        ops.append(
            Op(
                raw[0] % OpKind.COUNT,
                int.from_bytes(raw[1:4], "little"),
                int.from_bytes(raw[4:6], "little"),
                raw[6],
                raw[7],
            )
        )
    return data[:start], ops


def encode(image: bytes, ops: list[Op]) -> bytes:
    """The input that :func:`decode` splits into *image* and *ops*.

    Without operations, the input is *image* plus a zero byte (no trailer: an image keeps it).
    """
    if len(ops) > MAX_OPS:
        raise ValueError(f"at most {MAX_OPS} operations")
    if not ops:
        return image + b"\x00"
    return image + b"".join(op.encode() for op in ops) + bytes([len(ops)])


class _Model:
    """The expected content of the disk's first :data:`MODEL_LIMIT` bytes, and of the snapshots taken."""

    def __init__(self, disk: SyncFormatAccess) -> None:
        self.data = bytearray()
        self.snapshots: dict[str, bytes] = {}
        self.resync(disk)

    def resync(self, disk: SyncFormatAccess) -> None:
        """Forget the expectations: take what the disk holds now."""
        self.data = _read(disk, min(disk.size, MODEL_LIMIT))

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Expect *data* at *offset* (clipped to the part followed)."""
        if offset >= len(self.data):
            return
        end = min(offset + len(data), len(self.data))
        self.data[offset:end] = data[: end - offset]

    def zero(self, offset: int, length: int) -> None:
        """Expect zeroes in ``[offset, offset + length)``."""
        if offset < len(self.data):
            end = min(offset + length, len(self.data))
            self.data[offset:end] = bytes(end - offset)

    def resized(self, new_size: int) -> None:
        """The disk is *new_size* bytes now: truncated, or grown by zeroes."""
        length = min(new_size, MODEL_LIMIT)
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))

    def verify(self, disk: SyncFormatAccess, when: str) -> None:
        """Raise :class:`DataMismatch` where *disk* differs from the model."""
        actual = _read(disk, len(self.data))
        if actual != self.data:
            first = next(i for i, (a, b) in enumerate(zip(actual, self.data, strict=True)) if a != b)
            raise DataMismatch(
                f"{when}: guest byte {first} reads {actual[first]:#04x}, the operations left {self.data[first]:#04x}"
            )


def _read(disk: SyncFormatAccess, length: int) -> bytearray:
    buf = bytearray(length)
    if length:
        disk.read(buf, 0)
    return buf


def _clean(disk: SyncFormatAccess) -> bool:
    if not disk.driver.supports(Capability.CHECK):
        return False
    result = disk.check()
    return result.corruptions == 0 and result.leaks == 0 and result.check_errors == 0


def _span(disk: SyncFormatAccess, op: Op) -> tuple[int, int]:
    """The op's ``(offset, length)`` inside the disk: 512-byte units or bytes, short or long."""
    size = disk.size
    offset = op.offset * 512 if op.flags & 1 else op.offset
    length = op.length * 16 if op.flags & 2 else op.length
    offset %= size
    return offset, min(length, size - offset)


def _apply(disk: SyncFormatAccess, op: Op, model: _Model | None) -> None:
    """Apply *op*; update *model* with what it should leave."""
    size = disk.size
    kind = op.kind
    if kind == OpKind.FLUSH:
        disk.flush()
    elif kind in (OpKind.GROW, OpKind.SHRINK):
        step = (op.arg + 1) * (65536 if op.flags & 2 else 4096) + (1 if op.flags & 1 else 0)
        new_size = size + step if kind == OpKind.GROW else max(0, size - step)
        prealloc = ("off", "metadata", "falloc", "full")[(op.flags >> 2) % 4]
        disk.resize(new_size, prealloc, shrink=kind == OpKind.SHRINK)
        if model is not None:
            model.resized(disk.size)
    elif kind == OpKind.REPAIR:
        disk.check("leaks" if op.flags & 1 else "all")
    elif kind in (OpKind.SNAPSHOT_CREATE, OpKind.SNAPSHOT_APPLY, OpKind.SNAPSHOT_DELETE):
        _snapshot_op(disk, op, model)
    elif size > 0:
        _data_op(disk, op, model)


def _data_op(disk: SyncFormatAccess, op: Op, model: _Model | None) -> None:
    offset, length = _span(disk, op)
    kind = op.kind
    if kind == OpKind.WRITE:
        shift = (op.arg + offset) % 256
        data = _PATTERN[shift : shift + length]
        disk.write(data, offset)
        if model is not None:
            model.put(offset, data)
    elif kind == OpKind.WRITE_COMPRESSED:
        compressed = Capability.COMPRESSED_WRITES.of(disk.driver)
        if compressed is None:
            return
        cluster = compressed.cluster_size
        offset -= offset % cluster
        length = min(cluster, disk.size - offset)
        data = bytes([op.arg]) * (length // 2) + _PATTERN[: length - length // 2]
        disk.write_compressed(data, offset)
        if model is not None:
            model.put(offset, data)
    elif kind == OpKind.DISCARD_TO_ANY:
        disk.discard_to_any(offset, length)
        if model is not None:
            # Undefined content, but it must stay what it reads now.
            model.put(offset, read_range_bytes(disk, offset, length))
    else:
        zeroing: dict[int, Callable[[int, int], None]] = {
            OpKind.WRITE_ZEROES: disk.write_zeroes,
            OpKind.DISCARD_TO_ZERO: disk.discard_to_zero,
            # The backing file is never opened: the backing reads as zeroes.
            OpKind.DISCARD_TO_BACKING: disk.discard_to_backing,
        }
        zeroing[kind](offset, length)
        if model is not None:
            model.zero(offset, length)


def read_range_bytes(disk: SyncFormatAccess, offset: int, length: int) -> bytes:
    """The disk's bytes ``[offset, offset + length)``, clipped to the model's reach."""
    length = max(0, min(length, MODEL_LIMIT - offset))
    buf = bytearray(length)
    if length:
        disk.read(buf, offset)
    return bytes(buf)


def _snapshot_op(disk: SyncFormatAccess, op: Op, model: _Model | None) -> None:
    snapshots = Capability.SNAPSHOTS.of(disk.driver)
    if snapshots is None:
        return
    if op.kind == OpKind.SNAPSHOT_CREATE:
        record = runtime.run_sync(snapshots.create_snapshot(f"fuzz{op.arg}", date_ns=0))
        if model is not None:
            model.snapshots[record.id] = bytes(model.data)
        return
    records = list(snapshots.snapshots)
    if not records:
        return
    record = records[op.arg % len(records)]
    if op.kind == OpKind.SNAPSHOT_DELETE:
        runtime.run_sync(snapshots.delete_snapshot(record.id))
        if model is not None:
            model.snapshots.pop(record.id, None)
        return
    # No mappings_changed() here: dropping stale mappings is the driver's job, which this checks.
    runtime.run_sync(snapshots.apply_snapshot(record.id))
    if model is not None:
        expected = model.snapshots.get(record.id)
        if expected is None:
            model.resync(disk)  # a snapshot the input brought: nothing to compare with
        else:
            model.data = bytearray(expected[: min(disk.size, MODEL_LIMIT)])
            model.resized(disk.size)


class Outcome(NamedTuple):
    """What :func:`apply_input` did: the image bytes after closing, and whether the model verified them."""

    image: bytes
    verified: bool


def run(data: bytes) -> None:
    """Apply the input's operations to its image, comparing with the model when the image started consistent."""
    apply_input(data)


def apply_input(data: bytes) -> Outcome:
    """:func:`run`, returning the image it leaves (the tests check it with ``qemu-img``)."""
    image, ops = decode(data)
    disk = open_image("qcow2", image, writable=True)
    storage = disk.driver.storage
    # An image naming a data file got an in-memory one: its bytes go with the image when reopened.
    data_files = [s for s in disk.driver.storages() if isinstance(s, MemoryStorage) and s.filename == DATA_FILE_LABEL]
    try:
        clean = _clean(disk)
        model = _Model(disk) if clean else None
        for op in ops:
            try:
                _apply(disk, op, model)
            except _REJECTIONS:
                pass  # refused before changing anything
            except (ImagoError, OSError) as error:
                if not acceptable(error, ALLOWED_OS_ERRORS):
                    raise
                # An acceptable error may leave any state: the sequence goes on, the model follows the disk.
                if model is not None:
                    model.resync(disk)
        if model is not None:
            model.verify(disk, "before closing")
        disk.close()
    finally:
        close_quietly(disk)
    if not isinstance(storage, MemoryStorage):
        raise AssertionError(f"the image's storage is {storage!r}, not the input's memory storage")
    final = bytes(storage.data)
    if model is not None:
        _verify_reopened(final, model, bytes(data_files[0].data) if data_files else b"")
    return Outcome(final, model is not None)


def _verify_reopened(image: bytes, model: _Model, data_file: bytes) -> None:
    disk = open_image("qcow2", image, data_file=data_file)
    try:
        model.verify(disk, "after reopening")
        result = disk.check()
        # Leaks are not findings: QEMU leaks clusters in the same places (an image whose file ends
        # inside a cluster, say), and they harm no data.
        if result.corruptions or result.check_errors:
            raise DataMismatch(
                f"the image was consistent, after the operations check reports {result.corruptions} corruptions "
                f"and {result.check_errors} check errors"
            )
    finally:
        close_quietly(disk)
