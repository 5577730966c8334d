"""Helpers for the vhdx tests: QEMU's tools as the reference, and VHDX files built by hand.

``qemu_img``/``qemu_io`` run QEMU's tools with their status checked (missing tools fail the
tests). :func:`craft_vhdx` builds an image byte by byte from the specification's rules,
independently of the driver under test: any block size and sector size, payload blocks in any
state, differencing images (sector bitmaps, a parent locator) and a log (:func:`log_entry`), so
that what qemu-img cannot make (differencing images, pending logs) and hostile images can be
tested. QEMU reads the well-formed non-differencing ones back as the check that they are what
they claim to be.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import crc32c

import imago
from imago import PermissiveImplicitOpenGate, SyncFormatAccess
from imago.testing import tools

# Re-exported for the test modules: the tools every format plugin runs its images against.
from imago.testing.tools import StrPath as StrPath
from imago.testing.tools import imago_cli as imago_cli
from imago.testing.tools import qemu_img as qemu_img
from imago.testing.tools import qemu_json as qemu_json
from imago.testing.tools import run as run
from imago_vhdx import Vhdx

KiB = 1024
MiB = 1 << 20

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

NOT_PRESENT, ZERO, UNMAPPED, FULL, PARTIAL = 0, 2, 3, 6, 7


def qemu_io(image: StrPath, *commands: str) -> None:
    """``qemu-io -f vhdx -c CMD ... IMAGE``; any failed command fails the call."""
    tools.qemu_io(image, *commands, fmt="vhdx")


def qemu_raw(image: Path) -> bytes:
    """The disk's bytes as ``qemu-img convert -f vhdx -O raw`` writes them."""
    return tools.qemu_raw(image, "vhdx")


def open_vhdx(path: StrPath, writable: bool = False) -> SyncFormatAccess:
    """The image opened through a permissive gate."""
    builder = Vhdx.builder_path(path)
    if writable:
        builder.write()
    return SyncFormatAccess(builder.open_sync(PermissiveImplicitOpenGate()))


def read_all(path: StrPath) -> bytes:
    """Every byte of the disk, through ``imago.open``."""
    with imago.open(path, "vhdx", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(disk.size)
        if buf:
            disk.read(buf, 0)
        return bytes(buf)


def crc(data: bytes | bytearray, at: int = 4) -> bytearray:
    """*data* with its CRC-32C (over *data*, the field at *at* zeroed) stored at *at*."""
    out = bytearray(data)
    out[at : at + 4] = b"\0\0\0\0"
    struct.pack_into("<I", out, at, crc32c.crc32c(bytes(out)))
    return out


def header_bytes(
    sequence: int, log_guid: uuid.UUID, data_write: uuid.UUID, log_offset: int, log_length: int
) -> bytearray:
    """A 4 KiB header."""
    data = bytearray(4096)
    struct.pack_into(
        "<4sIQ16s16s16sHHIQ",
        data,
        0,
        b"head",
        0,
        sequence,
        uuid.UUID(int=1).bytes_le,
        data_write.bytes_le,
        log_guid.bytes_le,
        0,
        1,
        log_length,
        log_offset,
    )
    return crc(data)


def locator(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator holding *entries*."""
    head = struct.pack("<16s2xH", VHDX_LOCATOR.bytes_le, len(entries))
    table = b""
    strings = b""
    base = len(head) + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k), len(k), len(v))
        strings += k + v
    return head + table + strings


class Crafted:
    """A hand-built image's layout facts (for tests that damage it further)."""

    def __init__(self, **facts: int) -> None:
        self.__dict__.update(facts)

    bat_offset: int
    metadata_offset: int
    log_offset: int
    data_offset: int
    chunk_ratio: int


def craft_vhdx(
    path: Path,
    size: int,
    *,
    block_size: int = MiB,
    sector_size: int = 512,
    blocks: dict[int, tuple[int, bytes | None]] | None = None,
    bitmaps: dict[int, bytes] | None = None,
    parent: dict[str, str] | None = None,
    data_write: uuid.UUID | None = None,
    log_guid: uuid.UUID | None = None,
    log_length: int = MiB,
    log: bytes = b"",
    metadata_items: Sequence[tuple[uuid.UUID, bytes, int]] | None = None,
) -> Crafted:
    """Write a VHDX image: *blocks* maps block -> (state, data written there if present).

    Present blocks are stored in block order after the metadata; *bitmaps* maps a chunk to its
    sector bitmap bytes (differencing images: *parent* is the locator's entries).
    """
    blocks = blocks or {}
    bitmaps = bitmaps or {}
    ratio = (8 * MiB * sector_size) // block_size
    nblocks = -(-size // block_size)
    if parent is not None:
        entries = -(-nblocks // ratio) * (ratio + 1)
    else:
        entries = nblocks + (nblocks - 1) // ratio if nblocks else 0
    log_offset = MiB
    bat_offset = log_offset + log_length
    bat_length = max(MiB, -(-8 * entries // MiB) * MiB)
    metadata_offset = bat_offset + bat_length
    data_offset = metadata_offset + MiB
    image = bytearray(data_offset)
    image[:8] = b"vhdxfile"
    dw = data_write or uuid.uuid4()
    lg = log_guid or uuid.UUID(int=0)
    image[64 * KiB : 68 * KiB] = header_bytes(5, lg, dw, log_offset, log_length)
    image[128 * KiB : 132 * KiB] = header_bytes(4, lg, dw, log_offset, log_length)
    table = bytearray(64 * KiB)
    struct.pack_into("<4sIII", table, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", table, 16, BAT_GUID.bytes_le, bat_offset, bat_length, 1)
    struct.pack_into("<16sQII", table, 48, METADATA_GUID.bytes_le, metadata_offset, MiB, 1)
    table = crc(table)
    image[192 * KiB : 256 * KiB] = table
    image[256 * KiB : 320 * KiB] = table
    image[log_offset : log_offset + len(log)] = log
    if metadata_items is None:
        items: list[tuple[uuid.UUID, bytes, int]] = [
            (FILE_PARAMETERS, struct.pack("<II", block_size, 2 if parent is not None else 0), 4),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
            (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, 6),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", sector_size), 6),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", 4096), 6),
        ]
        if parent is not None:
            items.append((PARENT_LOCATOR, locator(parent), 6))
    else:
        items = list(metadata_items)
    struct.pack_into("<8sHH", image, metadata_offset, b"metadata", 0, len(items))
    at = 64 * KiB
    for index, (guid, data, flags) in enumerate(items):
        struct.pack_into("<16sIII4x", image, metadata_offset + 32 + 32 * index, guid.bytes_le, at, len(data), flags)
        image[metadata_offset + at : metadata_offset + at + len(data)] = data
        at += len(data)
    bat = [0] * entries
    tail = data_offset
    for chunk, bits in sorted(bitmaps.items()):
        bat[chunk * (ratio + 1) + ratio] = (tail // MiB) << 20 | 6
        image += bits.ljust(MiB, b"\0")
        tail += MiB
    for block, (state, data) in sorted(blocks.items()):
        offset = 0
        if state in (FULL, PARTIAL):
            offset = tail
            image += (data or b"").ljust(block_size, b"\0")
            tail += block_size
        bat[block + block // ratio] = (offset // MiB) << 20 | state
    image[bat_offset : bat_offset + 8 * entries] = struct.pack(f"<{entries}Q", *bat)
    path.write_bytes(image)
    return Crafted(
        bat_offset=bat_offset,
        metadata_offset=metadata_offset,
        log_offset=log_offset,
        data_offset=data_offset,
        chunk_ratio=ratio,
    )


def log_entry(
    sequence: int,
    tail: int,
    log_guid: uuid.UUID,
    *,
    writes: Sequence[tuple[int, bytes]] = (),
    zeroes: Sequence[tuple[int, int]] = (),
    flushed: int = 0,
    last: int = 0,
) -> bytes:
    """One log entry: 4 KiB *writes* ``(file offset, 4096 bytes)`` and *zeroes* ``(file offset, length)``."""
    count = len(writes) + len(zeroes)
    head_sectors = -(-(64 + 32 * count) // 4096)
    length = (head_sectors + len(writes)) * 4096
    entry = bytearray(length)
    struct.pack_into(
        "<4sIIIQII16sQQ", entry, 0, b"loge", 0, length, tail, sequence, count, 0, log_guid.bytes_le, flushed, last
    )
    at = 64
    for offset, zero_length in zeroes:
        struct.pack_into("<4sIQQQ", entry, at, b"zero", 0, zero_length, offset, sequence)
        at += 32
    for index, (offset, data) in enumerate(writes):
        assert len(data) == 4096
        leading = struct.unpack_from("<Q", data, 0)[0]
        trailing = struct.unpack_from("<I", data, 4092)[0]
        struct.pack_into("<4sIQQQ", entry, at, b"desc", trailing, leading, offset, sequence)
        at += 32
        sector = (head_sectors + index) * 4096
        struct.pack_into("<4sI", entry, sector, b"data", sequence >> 32)
        entry[sector + 8 : sector + 4092] = data[8:4092]
        struct.pack_into("<I", entry, sector + 4092, sequence & 0xFFFFFFFF)
    return bytes(crc(entry))


def header_guid(path: Path) -> uuid.UUID:
    """The DataWriteGuid of the header with the higher sequence number (for parent_linkage)."""
    data = path.read_bytes()[: 132 * KiB]
    best = max((64 * KiB, 128 * KiB), key=lambda at: struct.unpack_from("<Q", data, at + 8)[0])
    return uuid.UUID(bytes_le=data[best + 32 : best + 48])
