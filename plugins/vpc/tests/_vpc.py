"""Helpers for the vpc tests: QEMU's tools as the reference, and VHD files built from the specification.

``craft_vhd`` writes a VHD byte by byte from the specification's rules (footer, its copy,
dynamic header, BAT, block bitmaps and data, parent locators), independently of the driver, so
that differencing images (which qemu-img cannot create) and hostile images can be tested.
"""

from __future__ import annotations

import struct
import uuid as uuid_module
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import imago
from imago import PermissiveImplicitOpenGate
from imago.testing import tools

# Re-exported for the test modules: the tools every format plugin runs its images against.
from imago.testing.tools import StrPath as StrPath
from imago.testing.tools import imago_cli as imago_cli
from imago.testing.tools import qemu_img as qemu_img
from imago.testing.tools import qemu_json as qemu_json
from imago.testing.tools import run as run

SECTOR = 512
MiB = 1 << 20
NO_OFFSET = 0xFFFFFFFFFFFFFFFF


def qemu_io(image: StrPath, *commands: str) -> None:
    """``qemu-io -f vpc -c CMD ... IMAGE``; any failed command fails the call."""
    tools.qemu_io(image, *commands, fmt="vpc")


def qemu_raw(image: Path) -> bytes:
    """The disk's bytes as ``qemu-img convert -f vpc -O raw`` writes them."""
    return tools.qemu_raw(image, "vpc")


def read_all(path: StrPath, **options: Any) -> bytes:
    """Every byte of the disk, through imago."""
    gate = options.pop("gate", PermissiveImplicitOpenGate())
    with imago.open(path, "vpc", gate=gate, **options) as disk:
        buf = bytearray(disk.size)
        disk.read(buf, 0)
        return bytes(buf)


# --- crafting images ----------------------------------------------------------------------------


def vhd_checksum(data: bytes | bytearray) -> int:
    """The specification's checksum: the ones' complement of the byte sum (checksum field zero)."""
    return ~sum(data) & 0xFFFFFFFF


def footer_bytes(
    *,
    size: int,
    disk_type: int,
    data_offset: int,
    geometry: tuple[int, int, int] = (0, 0, 0),
    creator: bytes = b"win ",
    uuid: bytes | None = None,
    bad_checksum: bool = False,
) -> bytes:
    """A footer (512 bytes): features 2, version 1.0, Windows creator host."""
    cylinders, heads, sectors = geometry
    fields = struct.pack(
        ">8sIIQI4sI4sQQHBBI",
        b"conectix",
        2,
        0x00010000,
        data_offset,
        0,
        creator,
        0x000A0000,
        b"Wi2k",
        size,
        size,
        cylinders,
        heads,
        sectors,
        disk_type,
    )
    body = bytearray(fields + b"\0\0\0\0" + (uuid or uuid_module.uuid4().bytes) + b"\0")
    body = body.ljust(SECTOR, b"\0")
    struct.pack_into(">I", body, 64, vhd_checksum(body) ^ (1 if bad_checksum else 0))
    return bytes(body)


def footer_uuid(path: Path) -> bytes:
    """The UUID of the footer at the end of *path*."""
    data = path.read_bytes()
    return data[-SECTOR:][68:84]


def _bitmap(sectors: set[int] | None, block_sectors: int, nbytes: int) -> bytes:
    bits = bytearray(nbytes)
    for sector in range(block_sectors) if sectors is None else sectors:
        bits[sector // 8] |= 0x80 >> (sector % 8)
    return bytes(bits)


def craft_vhd(
    path: Path,
    size: int,
    blocks: Mapping[int, tuple[bytes, set[int] | None]],
    *,
    disk_type: int = 3,
    block_size: int = 2 * MiB,
    parent: tuple[str, bytes] | None = None,
    locator_code: bytes = b"W2ru",
    creator: bytes = b"win ",
    entries: int | None = None,
    header_overrides: Mapping[int, bytes] | None = None,
    bat_overrides: Mapping[int, int] | None = None,
    bad_header_checksum: bool = False,
    copy_differs: bool = False,
    uuid: bytes | None = None,
) -> bytes:
    """A dynamic (3) or differencing (4) VHD; *blocks* maps block index -> (data, sectors present or None: all).

    *parent* is (relative name, the parent's footer UUID). Returns the footer's UUID.
    """
    block_sectors = block_size // SECTOR
    bitmap_bytes = (block_sectors + 7) // 8
    bitmap_size = (bitmap_bytes + SECTOR - 1) // SECTOR * SECTOR
    count = entries if entries is not None else -(-size // block_size)
    table_at = 3 * SECTOR
    table_bytes = -(-4 * count // SECTOR) * SECTOR
    position = table_at + table_bytes
    locator_data = b""
    locator_at = 0
    if parent is not None:
        name = parent[0]
        encoded = name.encode("utf-16-le") if locator_code in (b"W2ru", b"W2ku") else name.encode()
        locator_data = encoded.ljust(-(-len(encoded) // SECTOR) * SECTOR or SECTOR, b"\0")
        locator_at = position
        position += len(locator_data)
    bat = [0xFFFFFFFF] * count
    body = bytearray()
    for index in sorted(blocks):
        data, present = blocks[index]
        bat[index] = (position + len(body)) // SECTOR
        body += _bitmap(present, block_sectors, bitmap_size)
        body += data.ljust(block_size, b"\0")
    for index, value in (bat_overrides or {}).items():
        bat[index] = value
    footer_uuid_value = uuid or uuid_module.uuid4().bytes
    footer = footer_bytes(size=size, disk_type=disk_type, data_offset=SECTOR, creator=creator, uuid=footer_uuid_value)
    header = bytearray(1024)
    struct.pack_into(">8sQQIII", header, 0, b"cxsparse", NO_OFFSET, table_at, 0x00010000, count, block_size)
    if parent is not None:
        header[40:56] = parent[1]
        name_utf16 = parent[0].encode("utf-16-be")[:512]
        header[64 : 64 + len(name_utf16)] = name_utf16
        space = len(locator_data) // SECTOR
        struct.pack_into(">4sIIIQ", header, 576, locator_code, space, len(encoded), 0, locator_at)
    for at, value in (header_overrides or {}).items():
        header[at : at + len(value)] = value
    struct.pack_into(">I", header, 36, vhd_checksum(header) ^ (1 if bad_header_checksum else 0))
    table = struct.pack(f">{count}I", *bat).ljust(table_bytes, b"\xff")
    copy = footer
    if copy_differs:
        copy = footer_bytes(size=size + SECTOR, disk_type=disk_type, data_offset=SECTOR, uuid=footer_uuid_value)
    with path.open("wb") as out:
        out.write(copy + bytes(header) + table + locator_data + bytes(body) + footer)
    return footer_uuid_value
