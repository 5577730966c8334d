"""The VDI header (version 1.1, the 512-byte sector at the start of the file): parsing, checks, building.

Every field is little-endian. What a header may say is bounded before anything else is read:
the block map must lie between the header and the data area and inside the file, the disk must
fit in the blocks the map has room for, and only what QEMU reads (1 MiB blocks, 512-byte sectors,
no parent or link UUID) opens; VirtualBox's undo and differencing images are refused by name.
"""

from __future__ import annotations

import struct
import uuid

from imago import CorruptImageError, UnsupportedFeatureError

__all__ = [
    "BLOCK_SIZE",
    "HEADER_SIZE",
    "MAX_BLOCKS",
    "MAX_DISK_SIZE",
    "SECTOR",
    "SIGNATURE",
    "TYPE_DYNAMIC",
    "TYPE_STATIC",
    "VdiHeader",
    "build_header",
    "parse_header",
]

SECTOR = 512
#: The header sector (the structure is 512 bytes; ``header_size`` counts from the signature on).
HEADER_SIZE = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
#: The only block size QEMU (and imago) reads and writes.
BLOCK_SIZE = 1 << 20
#: At most this many blocks: a block map of 4 GiB (QEMU's limit).
MAX_BLOCKS = 0x3FFFFFFF
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE
#: Where ``blocks_allocated`` lies in the header (rewritten when blocks are added).
BLOCKS_ALLOCATED_AT = 0x184
#: The text QEMU writes at the start of new images (any text is accepted when reading).
QEMU_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
#: The header size QEMU records for version 1.1 headers.
QEMU_HEADER_SIZE = 0x180

_LAYOUT = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")
assert _LAYOUT.size == HEADER_SIZE
_TYPE_NAMES = {3: "undo", 4: "differencing"}


class VdiHeader:
    """The facts of a VDI header that the driver uses (sizes and offsets in bytes)."""

    __slots__ = (
        "block_size",
        "blocks_allocated",
        "blocks_in_image",
        "disk_size",
        "image_type",
        "offset_bmap",
        "offset_data",
        "raw",
        "stored_disk_size",
        "uuid_image",
        "uuid_last_snap",
    )

    def __init__(
        self,
        *,
        raw: bytes,
        image_type: int,
        offset_bmap: int,
        offset_data: int,
        stored_disk_size: int,
        block_size: int,
        blocks_in_image: int,
        blocks_allocated: int,
        uuid_image: uuid.UUID,
        uuid_last_snap: uuid.UUID,
    ) -> None:
        #: The header sector as read (rewritten with only ``blocks_allocated`` changed).
        self.raw = raw
        self.image_type = image_type
        self.offset_bmap = offset_bmap
        self.offset_data = offset_data
        #: ``disk_size`` as recorded; :attr:`disk_size` rounds it up to whole sectors, as QEMU does.
        self.stored_disk_size = stored_disk_size
        self.disk_size = -(-stored_disk_size // SECTOR) * SECTOR
        self.block_size = block_size
        self.blocks_in_image = blocks_in_image
        self.blocks_allocated = blocks_allocated
        self.uuid_image = uuid_image
        self.uuid_last_snap = uuid_last_snap

    @property
    def static(self) -> bool:
        """Whether the image is static (every block preallocated) rather than dynamic."""
        return self.image_type == TYPE_STATIC

    def with_blocks_allocated(self, count: int) -> bytes:
        """The header sector recording *count* allocated blocks (everything else as read)."""
        raw = bytearray(self.raw)
        struct.pack_into("<I", raw, BLOCKS_ALLOCATED_AT, count)
        return bytes(raw)


def _uuid(raw: bytes) -> uuid.UUID:
    # VirtualBox stores UUIDs with the first three fields little-endian (RFC 4122 "bytes_le").
    return uuid.UUID(bytes_le=raw)


def parse_header(raw: bytes, file_size: int, filename: str | None) -> VdiHeader:
    """Parse and check the header sector *raw* of a file of *file_size* bytes.

    Raises :class:`CorruptImageError` (naming the field's offset) for what no valid image has and
    :class:`UnsupportedFeatureError` for valid images imago does not read.
    """
    if len(raw) < HEADER_SIZE or file_size < HEADER_SIZE:
        raise CorruptImageError(filename, 0, f"the file is too short for a VDI header ({file_size} bytes)")
    (
        _text,
        signature,
        version,
        _header_size,
        image_type,
        _flags,
        _description,
        offset_bmap,
        offset_data,
        _cylinders,
        _heads,
        _sectors,
        sector_size,
        _unused1,
        disk_size,
        block_size,
        block_extra,
        blocks_in_image,
        blocks_allocated,
        uuid_image,
        uuid_last_snap,
        uuid_link,
        uuid_parent,
        _unused2,
    ) = _LAYOUT.unpack_from(raw)

    def corrupt(offset: int, problem: str) -> CorruptImageError:
        return CorruptImageError(filename, offset, problem)

    def unsupported(feature: str) -> UnsupportedFeatureError:
        return UnsupportedFeatureError(feature, filename)

    if signature != SIGNATURE:
        raise corrupt(0x40, f"not a VDI image (signature {signature:#010x})")
    if version != VERSION_1_1:
        raise unsupported(f"VDI version {version >> 16}.{version & 0xFFFF} (only 1.1 is read)")
    if image_type in _TYPE_NAMES:
        raise unsupported(f"VDI {_TYPE_NAMES[image_type]} images")
    if image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
        raise corrupt(0x4C, f"unknown VDI image type {image_type}")
    if sector_size != SECTOR:
        raise unsupported(f"VDI sector size {sector_size} (only 512)")
    if block_size != BLOCK_SIZE:
        raise unsupported(f"VDI block size {block_size} (only {BLOCK_SIZE})")
    if block_extra != 0:
        raise unsupported(f"VDI blocks with {block_extra} bytes of extra data")
    if uuid_link != bytes(16):
        raise unsupported("VDI images with a link UUID (snapshots)")
    if uuid_parent != bytes(16):
        raise unsupported("VDI differencing images (a parent UUID)")
    if blocks_in_image > MAX_BLOCKS:
        raise corrupt(0x180, f"too many blocks ({blocks_in_image}, at most {MAX_BLOCKS})")
    if disk_size > MAX_DISK_SIZE:
        raise corrupt(0x170, f"disk size {disk_size} is larger than VDI's limit {MAX_DISK_SIZE}")
    if disk_size > blocks_in_image * block_size:
        raise corrupt(
            0x170, f"disk size {disk_size} needs more than the {blocks_in_image} blocks the block map has room for"
        )
    if offset_bmap % SECTOR or offset_bmap < HEADER_SIZE:
        raise corrupt(0x154, f"block map offset {offset_bmap:#x} is not a sector after the header")
    if offset_data % SECTOR:
        raise corrupt(0x158, f"data offset {offset_data:#x} is not sector-aligned")
    map_end = offset_bmap + 4 * blocks_in_image
    if offset_data < map_end:
        raise corrupt(0x158, f"data offset {offset_data:#x} lies inside the block map (which ends at {map_end:#x})")
    if map_end > file_size:
        raise corrupt(0x154, f"the block map ({blocks_in_image} entries at {offset_bmap:#x}) ends past the file's end")
    return VdiHeader(
        raw=bytes(raw[:HEADER_SIZE]),
        image_type=image_type,
        offset_bmap=offset_bmap,
        offset_data=offset_data,
        stored_disk_size=disk_size,
        block_size=block_size,
        blocks_in_image=blocks_in_image,
        blocks_allocated=blocks_allocated,
        uuid_image=_uuid(uuid_image),
        uuid_last_snap=_uuid(uuid_last_snap),
    )


def build_header(*, disk_size: int, blocks: int, static: bool, offset_data: int) -> bytes:
    """A new header as ``qemu-img create -f vdi`` writes it (map at 512, random image UUIDs)."""
    return _LAYOUT.pack(
        QEMU_TEXT,
        SIGNATURE,
        VERSION_1_1,
        QEMU_HEADER_SIZE,
        TYPE_STATIC if static else TYPE_DYNAMIC,
        0,
        b"",
        HEADER_SIZE,
        offset_data,
        0,
        0,
        0,
        SECTOR,
        0,
        disk_size,
        BLOCK_SIZE,
        0,
        blocks,
        blocks if static else 0,
        uuid.uuid4().bytes_le,
        uuid.uuid4().bytes_le,
        bytes(16),
        bytes(16),
        b"",
    )
