"""The dynamic disk header (``cxsparse``) of dynamic and differencing VHDs, and its parent locators.

Every field that sizes memory or work is checked before a table is read: the block size (a
power of two from 512 bytes to 256 MiB), the BAT's entries (enough for the disk, at most what
2040 GiB need), the BAT's place (after the header, inside the file). Parent locators are decoded
as the specification says (``W2ru``/``W2ku``: UTF-16LE, ``Mac``/``MacX``: UTF-8) and only
relative local names are used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from imago import CorruptImageError, ImplicitOpenDeniedError

from .footer import MAX_SECTORS, NO_OFFSET, SECTOR, checksum

__all__ = ["DYNAMIC_HEADER_SIZE", "DynamicHeader", "bitmap_bytes", "new_dynamic_header", "parse_dynamic_header"]

DYNAMIC_HEADER_SIZE = 1024
COOKIE = b"cxsparse"
#: Block sizes outside this range are refused (the specification's default is 2 MiB).
MAX_BLOCK_SIZE = 256 << 20
_LAYOUT = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">4sIIIQ")
_LOCATORS_AT = 576
#: The longest parent locator data read (a path name; the specification's sectors are 512 bytes).
MAX_LOCATOR_BYTES = 64 * 1024


def bitmap_bytes(block_size: int) -> int:
    """The bytes of a block's sector bitmap (one bit per sector, padded to whole sectors)."""
    nbytes = -(-(block_size // SECTOR) // 8)
    return -(-nbytes // SECTOR) * SECTOR


@dataclass(frozen=True, slots=True)
class Locator:
    """A parent locator entry: *platform* code, where its data is and how long."""

    platform: bytes
    data_length: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The dynamic disk header's fields that imago uses."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes
    parent_timestamp: int
    parent_name: str
    locators: tuple[Locator, ...]

    @property
    def bitmap_size(self) -> int:
        """The bytes of each block's sector bitmap."""
        return bitmap_bytes(self.block_size)

    @property
    def table_bytes(self) -> int:
        """The BAT's bytes on disk (whole sectors)."""
        return -(-4 * self.max_table_entries // SECTOR) * SECTOR


def new_dynamic_header(*, table_offset: int, entries: int, block_size: int) -> bytes:
    """The header ``qemu-img create`` writes (no parent)."""
    fields = (COOKIE, NO_OFFSET, table_offset, 0x00010000, entries, block_size)
    raw = bytearray(_LAYOUT.pack(*fields, 0, bytes(16), 0, 0, bytes(512)).ljust(DYNAMIC_HEADER_SIZE, b"\0"))
    struct.pack_into(">I", raw, 36, checksum(raw, 36))
    return bytes(raw)


def parse_dynamic_header(raw: bytes, filename: str | None, at: int, disk_size: int, data_end: int) -> DynamicHeader:
    """The header in *raw* (1024 bytes read at *at*), checked against the disk size and *data_end* (the footer)."""
    if len(raw) < DYNAMIC_HEADER_SIZE or raw[:8] != COOKIE:
        raise CorruptImageError(filename, at, "no dynamic disk header (cookie 'cxsparse') where the footer points")
    fields = _LAYOUT.unpack_from(raw)
    recorded = fields[6]
    expected = checksum(raw[:DYNAMIC_HEADER_SIZE], 36)
    if recorded != expected:
        raise CorruptImageError(
            filename, at + 36, f"the dynamic header's checksum is {recorded:#010x}, its bytes sum to {expected:#010x}"
        )
    table_offset, entries, block_size = fields[2], fields[4], fields[5]
    if block_size < SECTOR or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise CorruptImageError(
            filename, at + 32, f"block size {block_size} is not a power of two from 512 bytes to 256 MiB"
        )
    if entries > MAX_SECTORS * SECTOR // block_size:
        raise CorruptImageError(filename, at + 28, f"{entries} BAT entries map more than 2040 GiB")
    if entries * block_size < disk_size:
        raise CorruptImageError(
            filename, at + 28, f"{entries} BAT entries of {block_size} bytes do not cover the disk ({disk_size} bytes)"
        )
    table_bytes = 4 * entries
    if table_offset % SECTOR or table_offset < SECTOR or table_offset + table_bytes > data_end:
        raise CorruptImageError(
            filename, at + 16, f"the BAT ({table_bytes} bytes at {table_offset:#x}) lies outside the file"
        )
    if table_offset < at + DYNAMIC_HEADER_SIZE and at < table_offset + table_bytes:
        raise CorruptImageError(filename, at + 16, f"the BAT at {table_offset:#x} overlaps the dynamic header")
    locators = []
    for index in range(8):
        code, _space, length, _reserved, offset = _LOCATOR.unpack_from(raw, _LOCATORS_AT + 24 * index)
        if code != bytes(4):
            locators.append(Locator(code, length, offset))
    name = fields[10].decode("utf-16-be", "replace").split("\0", 1)[0]
    return DynamicHeader(table_offset, entries, block_size, fields[7], fields[8], name, tuple(locators))


def decode_locator(locator: Locator, data: bytes, filename: str | None) -> str | None:
    """The parent's relative file name a locator holds (``None``: an absolute name or another platform).

    Names with ``..`` components are refused here: a VHD's parent lies next to it or below it.
    """
    code = locator.platform
    if code in (b"W2ru", b"W2ku"):
        text = data.decode("utf-16-le", "replace")
    elif code in (b"Mac ", b"MacX"):
        text = data.decode("utf-8", "replace")
    else:
        return None
    text = text.split("\0", 1)[0]
    if code == b"MacX" or code == b"Mac ":
        return None  # (file URLs and alias records: absolute)
    name = text.replace("\\", "/")
    if name.startswith("./"):
        name = name[2:]
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    if any(part == ".." for part in name.split("/")):
        raise ImplicitOpenDeniedError(
            name, f"the parent locator of {filename or 'the image'} leaves the image's directory", allowable=False
        )
    return name
