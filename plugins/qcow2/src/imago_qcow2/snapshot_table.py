"""The internal snapshot table: reading, validating and encoding its entries."""

from __future__ import annotations

import struct
from typing import Any

from imago import CorruptImageError, Record, Storage

from .header import Header, check_table
from .layout import MAX_L1_BYTES, MAX_NAME_BYTES, MAX_SNAPSHOTS, field_offset

__all__ = [
    "MAX_TABLE_BYTES",
    "Snapshot",
    "encode_snapshot",
    "encode_snapshot_table",
    "read_snapshot_table",
    "snapshot_table_length",
]

#: Sets a field of a frozen record, once, in its ``__init__``.
_set = object.__setattr__

_ENTRY = struct.Struct(">QIHHIIQII")
# QEMU's caps: extra data per snapshot, and the whole table.
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 64 << 20


class Snapshot(Record, kw_only=True):
    """One internal snapshot, as recorded in the snapshot table."""

    __slots__ = (
        "date_nsec",
        "date_sec",
        "disk_size",
        "extra_data",
        "icount",
        "id",
        "l1_size",
        "l1_table_offset",
        "name",
        "table_offset",
        "vm_clock_nsec",
        "vm_state_size",
    )

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int | None
    extra_data: bytes
    #: Where the entry lies in the file.
    table_offset: int

    def __init__(
        self,
        *,
        id: str,
        name: str,
        l1_table_offset: int,
        l1_size: int,
        date_sec: int,
        date_nsec: int,
        vm_clock_nsec: int,
        vm_state_size: int,
        disk_size: int,
        icount: int | None,
        extra_data: bytes,
        table_offset: int,
    ) -> None:
        _set(self, "id", id)
        _set(self, "name", name)
        _set(self, "l1_table_offset", l1_table_offset)
        _set(self, "l1_size", l1_size)
        _set(self, "date_sec", date_sec)
        _set(self, "date_nsec", date_nsec)
        _set(self, "vm_clock_nsec", vm_clock_nsec)
        _set(self, "vm_state_size", vm_state_size)
        _set(self, "disk_size", disk_size)
        _set(self, "icount", icount)
        _set(self, "extra_data", extra_data)
        _set(self, "table_offset", table_offset)

    def describe(self) -> dict[str, Any]:
        """The snapshot as ``qemu-img info --output=json`` lists it, plus its virtual ``disk-size``."""
        info: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "disk-size": self.disk_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            info["icount"] = self.icount
        return info


class _Reader:
    """Sequential reads of the snapshot table, in chunks, bounded by the file size."""

    def __init__(self, storage: Storage, offset: int, filename: str | None) -> None:
        self._storage = storage
        self._position = offset
        self._start = offset
        self._filename = filename
        # What was read ahead, and where in it the position is (an index, not a re-sliced
        # remainder: taking an entry costs its own length, not the buffer's).
        self._buffer = b""
        self._used = 0

    @property
    def position(self) -> int:
        return self._position

    async def take(self, length: int, what: str) -> bytes:
        if self._position - self._start + length > MAX_TABLE_BYTES:
            raise CorruptImageError(self._filename, self._position, "snapshot table exceeds 64 MiB")
        if self._position + length > self._storage.size:
            raise CorruptImageError(self._filename, self._position, f"{what} runs past the end of the file")
        if len(self._buffer) - self._used < length:
            rest = self._buffer[self._used :]
            # (Never past the end of the file: checked above for what is taken.)
            ahead = min(max(length - len(rest), 65536), self._storage.size - self._position - len(rest))
            chunk = bytearray(ahead)
            await self._storage.readv([memoryview(chunk)], self._position + len(rest))
            self._buffer = rest + bytes(chunk)
            self._used = 0
        data = self._buffer[self._used : self._used + length]
        self._used += length
        self._position += length
        return data


async def read_snapshot_table(
    storage: Storage, header: Header, filename: str | None, *, check_l1: bool = True
) -> list[Snapshot]:
    """Parse and validate every snapshot entry (with *check_l1* False, not where its L1 table is)."""
    count = header.nb_snapshots
    if count == 0:
        return []
    if count > MAX_SNAPSHOTS:
        raise CorruptImageError(
            filename, field_offset("nb_snapshots"), f"{count} snapshots exceed the limit of {MAX_SNAPSHOTS}"
        )
    reader = _Reader(storage, header.snapshots_offset, filename)
    snapshots: list[Snapshot] = []
    seen_ids: set[str] = set()
    for number in range(count):
        if number:
            # Entries start 8-byte aligned; QEMU pads before an entry, not after the last one.
            await reader.take(-(reader.position - header.snapshots_offset) % 8, "snapshot entry padding")
        start = reader.position
        (
            l1_offset,
            l1_size,
            id_size,
            name_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra_size,
        ) = _ENTRY.unpack(await reader.take(_ENTRY.size, "snapshot entry"))
        if extra_size > MAX_EXTRA_DATA:
            raise CorruptImageError(filename, start + 36, f"snapshot extra data of {extra_size} bytes is too large")
        if id_size > MAX_NAME_BYTES or name_size > MAX_NAME_BYTES:
            raise CorruptImageError(filename, start + 12, f"snapshot ID or name longer than {MAX_NAME_BYTES} bytes")
        extra = await reader.take(extra_size, "snapshot extra data")
        raw_id = await reader.take(id_size, "snapshot ID")
        raw_name = await reader.take(name_size, "snapshot name")
        try:
            snapshot_id = raw_id.decode("utf-8")
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptImageError(filename, start, "snapshot ID or name is not valid UTF-8") from None
        if snapshot_id in seen_ids:
            raise CorruptImageError(filename, start, f"snapshot ID {snapshot_id!r} appears twice")
        seen_ids.add(snapshot_id)
        if check_l1 and l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImageError(filename, start + 8, f"snapshot {snapshot_id!r} L1 table is too large")
        vm_state_large = struct.unpack_from(">Q", extra, 0)[0] if extra_size >= 8 else vm_state_size
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else header.size
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_size >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        if check_l1 and l1_size < header.l1_entries_needed(disk_size):
            raise CorruptImageError(filename, start + 8, f"snapshot {snapshot_id!r} L1 table is too small")
        if check_l1 and l1_size:
            check_table(
                filename,
                start,
                f"snapshot {snapshot_id!r} L1 table",
                l1_offset,
                l1_size * 8,
                header.cluster_size,
                storage.size,
            )
        snapshots.append(
            Snapshot(
                id=snapshot_id,
                name=name,
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                date_sec=date_sec,
                date_nsec=date_nsec,
                vm_clock_nsec=vm_clock_nsec,
                vm_state_size=vm_state_large,
                disk_size=disk_size,
                icount=icount,
                extra_data=extra,
                table_offset=start,
            )
        )
    return snapshots


# The extra data this driver writes: vm_state_size_large, disk_size, icount.
_EXTRA = struct.Struct(">QQQ")
_NO_ICOUNT = (1 << 64) - 1


def _extra_data(snapshot: Snapshot) -> bytes:
    """The extra data as written: the known fields, then whatever a newer writer added."""
    icount = _NO_ICOUNT if snapshot.icount is None else snapshot.icount
    return _EXTRA.pack(snapshot.vm_state_size, snapshot.disk_size, icount) + snapshot.extra_data[_EXTRA.size :]


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """One snapshot table entry (unpadded): header, extra data, ID and name."""
    raw_id = snapshot.id.encode("utf-8")
    raw_name = snapshot.name.encode("utf-8")
    extra = _extra_data(snapshot)
    entry = _ENTRY.pack(
        snapshot.l1_table_offset,
        snapshot.l1_size,
        len(raw_id),
        len(raw_name),
        snapshot.date_sec,
        snapshot.date_nsec,
        snapshot.vm_clock_nsec,
        # The 32-bit field holds the size when it fits (older readers use it), else 0.
        snapshot.vm_state_size if snapshot.vm_state_size < 1 << 32 else 0,
        len(extra),
    )
    return entry + extra + raw_id + raw_name


def encode_snapshot_table(snapshots: list[Snapshot]) -> tuple[bytes, list[Snapshot]]:
    """The whole snapshot table (entries 8-byte aligned) and the snapshots as now recorded.

    The recorded snapshots' ``table_offset`` is relative to the start of the table.
    """
    table = bytearray()
    placed: list[Snapshot] = []
    for snapshot in snapshots:
        table += bytes(-len(table) % 8)
        placed.append(snapshot.__replace__(table_offset=len(table), extra_data=_extra_data(snapshot)))
        table += encode_snapshot(snapshot)
    return bytes(table), placed


def snapshot_table_length(snapshots: list[Snapshot], table_offset: int) -> int:
    """Bytes of the snapshot table as recorded (up to the end of its last entry)."""
    if not snapshots:
        return 0
    last = snapshots[-1]
    entry = 40 + len(last.extra_data) + len(last.id.encode()) + len(last.name.encode())
    return last.table_offset + entry - table_offset
