"""The bytes of a new VHDX image: file identifier, headers, region tables, metadata, BAT.

Laid out as the specification's recommended order: headers and region tables in the first MiB,
then the log, the BAT and the metadata region (1 MiB aligned), then the payload blocks (a
fixed image's, contiguous, all present).
"""

from __future__ import annotations

import struct
import uuid

from .bat import BLOCK_FULLY_PRESENT, BLOCK_NOT_PRESENT, BLOCK_ZERO, BatGeometry
from .layout import (
    BAT_GUID,
    FILE_PARAMETERS,
    HEADER_OFFSETS,
    LOGICAL_SECTOR_SIZE,
    METADATA_GUID,
    PHYSICAL_SECTOR_SIZE,
    REGION_OFFSETS,
    REGION_TABLE_SIZE,
    SIGNATURE,
    VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
    Header,
    MiB,
    with_checksum,
)

__all__ = ["NewImage", "plan_image"]

_CREATOR = "imago"
_SECTOR_SIZE = 512


class NewImage:
    """What to write: ``(offset, bytes)`` pieces and the file's size."""

    __slots__ = ("file_size", "writes")

    def __init__(self, writes: list[tuple[int, bytes]], file_size: int) -> None:
        self.writes = writes
        self.file_size = file_size


def _round_mib(value: int) -> int:
    return -(-value // MiB) * MiB


def plan_image(size: int, block_size: int, log_size: int, fixed: bool, zero_blocks: bool) -> NewImage:
    """The pieces of a new image of *size* bytes (a fixed image's blocks all present)."""
    geometry = BatGeometry(size, block_size, _SECTOR_SIZE, has_parent=False)
    log_offset = MiB
    bat_offset = log_offset + log_size
    bat_length = max(MiB, _round_mib(8 * geometry.entries))
    if geometry.blocks == 0:
        # QEMU counts the entries of an empty disk with an unsigned "blocks - 1" (2^32 - 1 shifted
        # by the chunk ratio's bits) and refuses a smaller BAT region: room is made for them.
        bat_length = _round_mib(8 * ((1 << 32) - 1 >> (geometry.chunk_ratio.bit_length() - 1)))
    metadata_offset = bat_offset + bat_length
    data_offset = metadata_offset + MiB

    writes: list[tuple[int, bytes]] = []
    ident = bytearray(64 * 1024)
    ident[:8] = SIGNATURE
    creator = _CREATOR.encode("utf-16-le")
    ident[8 : 8 + len(creator)] = creator
    writes.append((0, bytes(ident)))

    file_write, data_write = uuid.uuid4(), uuid.uuid4()
    for slot in (0, 1):
        header = Header(
            slot=slot,
            sequence=slot,
            file_write_guid=file_write,
            data_write_guid=data_write,
            log_guid=uuid.UUID(int=0),
            log_length=log_size,
            log_offset=log_offset,
        )
        writes.append((HEADER_OFFSETS[slot], bytes(header.encode())))

    table = bytearray(REGION_TABLE_SIZE)
    struct.pack_into("<4sIII", table, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", table, 16, BAT_GUID.bytes_le, bat_offset, bat_length, 1)
    struct.pack_into("<16sQII", table, 48, METADATA_GUID.bytes_le, metadata_offset, MiB, 1)
    with_checksum(table, 4)
    for at in REGION_OFFSETS:
        writes.append((at, bytes(table)))

    metadata = bytearray(64 * 1024 + 40)
    struct.pack_into("<8sHH", metadata, 0, b"metadata", 0, 5)
    items = (
        (FILE_PARAMETERS, struct.pack("<II", block_size, 1 if fixed else 0), 4),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
        (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", _SECTOR_SIZE), 6),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", _SECTOR_SIZE), 6),
    )
    data_at = 64 * 1024
    for index, (guid, data, flags) in enumerate(items):
        struct.pack_into("<16sIII4x", metadata, 32 + 32 * index, guid.bytes_le, data_at, len(data), flags)
        metadata[data_at : data_at + len(data)] = data
        data_at += len(data)
    writes.append((metadata_offset, bytes(metadata)))

    bat = bytearray(8 * geometry.entries)
    for block in range(geometry.blocks):
        if fixed:
            entry = (data_offset + block * block_size) // MiB << 20 | BLOCK_FULLY_PRESENT
        else:
            entry = BLOCK_ZERO if zero_blocks else BLOCK_NOT_PRESENT
        struct.pack_into("<Q", bat, 8 * geometry.payload_index(block), entry)
    if bat:
        writes.append((bat_offset, bytes(bat)))
    file_size = data_offset + (geometry.blocks * block_size if fixed else 0)
    return NewImage(writes, file_size)
