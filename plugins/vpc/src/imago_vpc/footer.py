"""The VHD footer (the 512 bytes at the end of every image, copied at the start of dynamic ones).

Fields are big-endian. :func:`parse_footer` checks the cookie, the checksum and the type;
:func:`disk_size` applies QEMU's rule for the disk's size (see :mod:`imago_vpc.driver`);
:func:`geometry` and :func:`chs_size` are the specification's CHS computation, which
``qemu-img create`` uses to round sizes up.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass, replace

from imago import CorruptImageError, UnsupportedFeatureError

__all__ = [
    "FOOTER_SIZE",
    "MAX_GEOMETRY",
    "MAX_SECTORS",
    "NO_OFFSET",
    "SECTOR",
    "TYPE_DIFFERENCING",
    "TYPE_DYNAMIC",
    "TYPE_FIXED",
    "Footer",
    "checksum",
    "chs_size",
    "disk_size",
    "geometry",
    "parse_footer",
]

SECTOR = 512
FOOTER_SIZE = 512
COOKIE = b"conectix"
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFFERENCING: "differencing"}
#: The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors): sizes beyond it are in the footer.
MAX_GEOMETRY = 65535 * 16 * 255
#: The largest disk QEMU opens or creates: 2040 GiB.
MAX_SECTORS = 0xFF000000
#: Creators whose footer size QEMU trusts over the CHS geometry (Hyper-V, qemu's force_size,
#: disk2vhd, XenServer, XenConverter, Azure).
SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS", b"wa\0\0")
# Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
_VHD_EPOCH = 946684800

_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")


def checksum(data: bytes | bytearray, field: int) -> int:
    """The ones' complement of the sum of the bytes, the 4 bytes at *field* counted as zero."""
    total = sum(data) - sum(data[field : field + 4])
    return ~total & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Footer:
    """The footer's fields (names as in the specification)."""

    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    uuid: bytes
    saved_state: int = 0

    @property
    def type_name(self) -> str:
        """``fixed``, ``dynamic`` or ``differencing``."""
        return TYPE_NAMES[self.disk_type]

    @property
    def chs_sectors(self) -> int:
        """The sectors the CHS geometry covers."""
        return self.cylinders * self.heads * self.sectors_per_track

    def pack(self) -> bytes:
        """The 512 bytes of the footer, its checksum computed."""
        raw = bytearray(self._pack(0))
        return self._pack(checksum(raw, 64))

    def _pack(self, sum_value: int) -> bytes:
        return _LAYOUT.pack(
            COOKIE,
            self.features,
            self.version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_os,
            self.original_size,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
            self.disk_type,
            sum_value,
            self.uuid,
            self.saved_state,
        ).ljust(FOOTER_SIZE, b"\0")

    def with_data_offset(self, data_offset: int) -> Footer:
        """A copy with another ``data_offset``."""
        return replace(self, data_offset=data_offset)


def new_footer(*, size: int, disk_type: int, force_size: bool, data_offset: int) -> Footer:
    """The footer ``qemu-img create`` writes for a disk of *size* bytes (already rounded)."""
    if force_size:
        cylinders, heads, sectors = 65535, 16, 255
    else:
        cylinders, heads, sectors = geometry(size // SECTOR)
    return Footer(
        features=2,
        version=0x00010000,
        data_offset=data_offset,
        timestamp=max(0, int(time.time()) - _VHD_EPOCH) & 0xFFFFFFFF,
        creator_app=b"qem2" if force_size else b"qemu",
        creator_version=0x00050003,
        creator_os=b"Wi2k",
        original_size=size,
        current_size=size,
        cylinders=cylinders,
        heads=heads,
        sectors_per_track=sectors,
        disk_type=disk_type,
        uuid=uuid.uuid4().bytes,
    )


def parse_footer(raw: bytes, filename: str | None, at: int) -> Footer:
    """The footer in *raw* (512 bytes read at *at*), its cookie, checksum and type checked."""
    if len(raw) < FOOTER_SIZE or raw[:8] != COOKIE:
        raise CorruptImageError(filename, at, "no VHD footer (cookie 'conectix')")
    fields = _LAYOUT.unpack_from(raw)
    recorded = fields[14]
    expected = checksum(raw[:FOOTER_SIZE], 64)
    if recorded != expected:
        raise CorruptImageError(
            filename, at + 64, f"the footer's checksum is {recorded:#010x}, its bytes sum to {expected:#010x}"
        )
    disk_type = fields[13]
    if disk_type not in TYPE_NAMES:
        raise UnsupportedFeatureError(f"VHD disk type {disk_type} (only fixed, dynamic, differencing)", filename)
    return Footer(
        features=fields[1],
        version=fields[2],
        data_offset=fields[3],
        timestamp=fields[4],
        creator_app=fields[5],
        creator_version=fields[6],
        creator_os=fields[7],
        original_size=fields[8],
        current_size=fields[9],
        cylinders=fields[10],
        heads=fields[11],
        sectors_per_track=fields[12],
        disk_type=disk_type,
        uuid=fields[15],
        saved_state=fields[16],
    )


def disk_size(footer: Footer, filename: str | None) -> int:
    """The disk's size in bytes as QEMU computes it (the rule is in :mod:`imago_vpc.driver`)."""
    sectors = footer.chs_sectors
    if footer.creator_app in SIZE_CREATORS or sectors == MAX_GEOMETRY:
        sectors = footer.current_size // SECTOR
    if sectors > MAX_SECTORS:
        raise UnsupportedFeatureError(f"VHD disks larger than 2040 GiB ({sectors} sectors)", filename)
    return sectors * SECTOR


def geometry(sectors: int) -> tuple[int, int, int]:
    """The specification's CHS geometry (cylinders, heads, sectors per track) of a disk of *sectors*."""
    sectors = min(sectors, MAX_GEOMETRY)
    if sectors >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinders_heads = sectors // per_track
    else:
        per_track = 17
        cylinders_heads = sectors // per_track
        heads = max(4, -(-cylinders_heads // 1024))
        if cylinders_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinders_heads = sectors // per_track
        if cylinders_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinders_heads = sectors // per_track
    return cylinders_heads // heads, heads, per_track


def chs_size(size: int) -> tuple[int, bool]:
    """``qemu-img create``'s size without ``force_size``: the smallest CHS geometry holding *size*.

    Returns the size in bytes and whether the geometry is the largest one (then the size is
    *size* in whole sectors, recorded in the footer only).
    """
    sectors = -(-size // SECTOR)
    covered = 0
    extra = 0
    while covered < sectors:
        cylinders, heads, per_track = geometry(sectors + extra)
        covered = cylinders * heads * per_track
        extra += 1
        if covered == MAX_GEOMETRY:
            return sectors * SECTOR, True
    return covered * SECTOR, False
