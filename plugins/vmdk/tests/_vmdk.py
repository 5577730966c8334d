"""Helpers for the vmdk tests: QEMU's tools as the reference, and images built by hand.

``qemu_img``/``qemu_io`` run QEMU's tools with their status checked (missing tools fail the
tests). The ``craft_*`` functions build VMDK files byte by byte, independently of the driver
under test: hosted sparse extents (plain or stream-optimized, with the grain directory in the
header or in a footer), VMFS sparse (COWD) extents and descriptor files, so that the subformats
qemu-img cannot create, and hostile images, can be tested; QEMU reads the well-formed ones back
as the check that they are what they claim to be.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import imago
from imago import PermissiveImplicitOpenGate, SyncFormatAccess
from imago.testing import tools

# Re-exported for the test modules: the tools every format plugin runs its images against.
from imago.testing.tools import StrPath as StrPath
from imago.testing.tools import imago_cli as imago_cli
from imago.testing.tools import qemu_img as qemu_img
from imago.testing.tools import qemu_json as qemu_json
from imago.testing.tools import run as run
from imago_vmdk import Vmdk

SECTOR = 512
MiB = 1 << 20


def qemu_io(image: StrPath, *commands: str) -> None:
    """``qemu-io -f vmdk -c CMD ... IMAGE``; any failed command fails the call."""
    tools.qemu_io(image, *commands, fmt="vmdk")


def qemu_raw(image: Path) -> bytes:
    """The disk's bytes as ``qemu-img convert -f vmdk -O raw`` writes them."""
    return tools.qemu_raw(image, "vmdk")


def open_vmdk(path: StrPath, **options: Any) -> SyncFormatAccess:
    """The image opened read-only with the permissive gate (the tests' own files)."""
    driver = Vmdk.builder_path(path).open_sync(options.pop("gate", PermissiveImplicitOpenGate()))
    return SyncFormatAccess(driver)


def read_all(path: StrPath) -> bytes:
    """Every byte of the disk, through imago."""
    with imago.open(path, "vmdk", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(disk.size)
        disk.read(buf, 0)
        return bytes(buf)


# --- crafting images ----------------------------------------------------------------------------


def descriptor_text(
    extents: Sequence[str],
    *,
    create_type: str,
    cid: int = 0x12345678,
    parent_cid: int = 0xFFFFFFFF,
    parent: str | None = None,
) -> str:
    """A descriptor with the extent lines *extents* (``'RW 2048 FLAT "x-flat.vmdk" 0'``)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
    ]
    if parent is not None:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", "", 'ddb.adapterType = "ide"']
    return "\n".join(lines) + "\n"


def _kdmv_header(
    *,
    version: int,
    flags: int,
    capacity: int,
    grain: int,
    desc_offset: int,
    desc_size: int,
    gtes: int,
    rgd: int,
    gd: int,
    overhead: int,
    compress: int,
) -> bytes:
    head = struct.pack(
        "<4sIIQQQQIQQQB4sH",
        b"KDMV",
        version,
        flags,
        capacity,
        grain,
        desc_offset,
        desc_size,
        gtes,
        rgd,
        gd,
        overhead,
        0,
        b"\n \r\n",
        compress,
    )
    return head.ljust(SECTOR, b"\0")


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % SECTOR)


def craft_sparse(
    path: Path,
    capacity: int,
    grains: Mapping[int, bytes | None],
    *,
    grain_sectors: int = 16,
    gtes: int = 512,
    version: int = 1,
    zero_grain: bool = False,
    descriptor: str | None = None,
    redundant: bool = True,
    header_overrides: Mapping[str, int] | None = None,
) -> None:
    """A hosted sparse extent of *capacity* bytes: *grains* maps grain index -> data (``None``: zeroed entry)."""
    grain_size = grain_sectors * SECTOR
    n_gts = -(-capacity // (gtes * grain_size))
    desc = _pad(descriptor.encode()) if descriptor is not None else b""
    desc_sectors = max(len(desc) // SECTOR, 0)
    gd_sectors = -(-n_gts * 4 // SECTOR)
    gt_sectors = -(-gtes * 4 // SECTOR)
    position = 1 + desc_sectors
    rgd = position if redundant else 0
    if redundant:
        position += gd_sectors + n_gts * gt_sectors
    gd = position
    position += gd_sectors + n_gts * gt_sectors
    overhead = -(-position // grain_sectors) * grain_sectors
    tables = [[0] * gtes for _ in range(n_gts)]
    body = bytearray()
    for index in sorted(grains):
        data = grains[index]
        if data is None:
            tables[index // gtes][index % gtes] = 1
            continue
        tables[index // gtes][index % gtes] = overhead + len(body) // SECTOR
        body += data.ljust(grain_size, b"\0")
    flags = (1 << 0) | (1 << 1 if redundant else 0) | (1 << 2 if zero_grain else 0)
    fields = {
        "version": version,
        "flags": flags,
        "capacity": capacity // SECTOR,
        "grain": grain_sectors,
        "desc_offset": 1 if desc else 0,
        "desc_size": desc_sectors,
        "gtes": gtes,
        "rgd": rgd,
        "gd": gd,
        "overhead": overhead,
        "compress": 0,
    }
    fields.update(header_overrides or {})
    image = bytearray(_kdmv_header(**fields))
    image += desc

    def directory(start: int) -> bytes:
        entries = [start + gd_sectors + i * gt_sectors for i in range(n_gts)]
        out = _pad(struct.pack(f"<{n_gts}I", *entries))
        for table in tables:
            out += _pad(struct.pack(f"<{gtes}I", *table))
        return out

    if redundant:
        image += directory(rgd)
    image += directory(gd)
    image += b"\0" * (overhead * SECTOR - len(image))
    image += body
    path.write_bytes(bytes(image))


def _marker(value: int, size: int, marker_type: int) -> bytes:
    return struct.pack("<QII", value, size, marker_type).ljust(SECTOR, b"\0")


def craft_stream(
    path: Path,
    capacity: int,
    grains: Mapping[int, bytes],
    *,
    grain_sectors: int = 128,
    footer: bool = True,
    descriptor: str | None = None,
    raw_grains: Mapping[int, tuple[int, bytes]] | None = None,
    footer_overrides: Mapping[str, int] | None = None,
) -> None:
    """A stream-optimized extent as VMware lays it out: compressed grains with markers, tables at the end.

    *grains* maps grain index -> content (compressed here); *raw_grains* maps grain index ->
    (marker LBA, compressed bytes) as given (for hostile grains). With *footer*, the header
    says ``gdOffset = -1`` and a footer holds the real one.
    """
    grain_size = grain_sectors * SECTOR
    gtes = 512
    n_gts = -(-capacity // (gtes * grain_size))
    default = descriptor_text([f'RW {capacity // SECTOR} SPARSE "x.vmdk"'], create_type="streamOptimized")
    desc = _pad((descriptor or default).encode())
    desc_sectors = len(desc) // SECTOR
    overhead = 1 + desc_sectors
    out = bytearray(SECTOR) + desc
    tables = [[0] * gtes for _ in range(n_gts)]
    items = {index: (index * grain_sectors, zlib.compress(data)) for index, data in grains.items()}
    items.update(raw_grains or {})
    for index in sorted(items):
        lba, packed = items[index]
        tables[index // gtes][index % gtes] = len(out) // SECTOR
        out += _pad(struct.pack("<QI", lba, len(packed)) + packed)
    gt_offsets = []
    for table in tables:
        out += _marker(gtes * 4 // SECTOR, 0, 1)
        gt_offsets.append(len(out) // SECTOR)
        out += _pad(struct.pack(f"<{gtes}I", *table))
    out += _marker(-(-n_gts * 4 // SECTOR), 0, 2)
    gd = len(out) // SECTOR
    out += _pad(struct.pack(f"<{n_gts}I", *gt_offsets))
    fields = {
        "version": 3,
        "flags": (1 << 0) | (1 << 16) | (1 << 17),
        "capacity": capacity // SECTOR,
        "grain": grain_sectors,
        "desc_offset": 1,
        "desc_size": desc_sectors,
        "gtes": gtes,
        "rgd": 0,
        "gd": 0xFFFFFFFFFFFFFFFF if footer else gd,
        "overhead": overhead,
        "compress": 1,
    }
    out[:SECTOR] = _kdmv_header(**fields)
    if footer:
        footer_fields = {**fields, "gd": gd, **(footer_overrides or {})}
        out += _marker(1, 0, 3) + _kdmv_header(**footer_fields)
    out += _marker(0, 0, 0)
    path.write_bytes(bytes(out))


def craft_cowd(path: Path, capacity: int, grains: Mapping[int, bytes], *, grain_sectors: int = 16) -> None:
    """A VMFS sparse (COWD) extent: 4096 entries per grain table, the directory after the 2 KiB header."""
    grain_size = grain_sectors * SECTOR
    gtes = 4096
    n_gts = -(-capacity // (gtes * grain_size))
    gd = 4
    gd_sectors = -(-n_gts * 4 // SECTOR)
    gt_sectors = gtes * 4 // SECTOR
    first_gt = gd + gd_sectors
    data_start = first_gt + n_gts * gt_sectors
    tables = [[0] * gtes for _ in range(n_gts)]
    body = bytearray()
    for index in sorted(grains):
        tables[index // gtes][index % gtes] = data_start + len(body) // SECTOR
        body += grains[index].ljust(grain_size, b"\0")
    file_sectors = data_start + len(body) // SECTOR
    header = struct.pack("<4s10I", b"COWD", 1, 3, capacity // SECTOR, grain_sectors, gd, n_gts, file_sectors, 0, 0, 0)
    image = bytearray(header.ljust(4 * SECTOR, b"\0"))
    image += _pad(struct.pack(f"<{n_gts}I", *[first_gt + i * gt_sectors for i in range(n_gts)]))
    for table in tables:
        image += struct.pack(f"<{gtes}I", *table)
    image += body
    path.write_bytes(bytes(image))


# --- helpers for the create and write tests --------------------------------------------------------

#: The subformats imago writes in place (streamOptimized is written by its own sequential writer).
WRITABLE_SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


def open_writable(path: StrPath) -> SyncFormatAccess:
    """The VMDK image at *path*, opened for writing (extents and parent through a permissive gate)."""
    return SyncFormatAccess(Vmdk.builder_path(path).write().open_sync(PermissiveImplicitOpenGate()))


def assert_qemu_clean_and_equal(image: Path, model: bytes) -> None:
    """``qemu-img check`` finds nothing and ``qemu-img compare`` finds *image* equal to the raw *model*."""
    qemu_img("check", "-q", image)
    raw = image.with_name(image.name + ".model.raw")
    raw.write_bytes(model)
    try:
        qemu_img("compare", "-f", "vmdk", "-F", "raw", image, raw)
    finally:
        raw.unlink()


def descriptor_of(image: Path) -> str:
    """The descriptor text of *image*: the file itself, or the one embedded at sector 1 of a sparse file."""
    data = image.read_bytes()
    if data[:4] == b"KDMV":
        return data[SECTOR : 21 * SECTOR].split(b"\0", 1)[0].decode()
    return data.decode()


# --- seSparse extents ------------------------------------------------------------------------------

#: What :func:`craft_sesparse` writes for an unmapped grain (SCSI UNMAP: reads as zeroes).
UNMAPPED = "unmapped"
SESPARSE_GRAIN = 4096
#: Grain table entries and the guest bytes one table covers (16 MiB).
SESPARSE_GTES = 4096
SESPARSE_GT_COVERAGE = SESPARSE_GTES * SESPARSE_GRAIN


def sesparse_grain_entry(grain: int) -> int:
    """The grain table entry of an allocated grain *grain* of the grains region (type 3)."""
    return (3 << 60) | ((grain & 0xFFF) << 48) | (grain >> 12)


def craft_sesparse(
    directory: Path,
    name: str,
    capacity: int,
    grains: Mapping[int, bytes | str | None],
    *,
    order: Sequence[int] | None = None,
    cid: int = 0x0BADCAFE,
    parent: str | None = None,
    parent_cid: int = 0xFFFFFFFF,
    const_overrides: Mapping[int, int] | None = None,
    volatile_overrides: Mapping[int, int] | None = None,
    gd_entries: int | None = None,
    first_slot: int = 0,
) -> Path:
    """An seSparse image: descriptor ``NAME.vmdk`` and extent ``NAME-sesparse.vmdk``; the descriptor's path.

    *grains* maps a 4 KiB grain index -> data (allocated), ``None`` (zeroed entry) or
    :data:`UNMAPPED`. Allocated grains are stored in the grains region in *order* (grain
    indexes; default: ascending), tables in the order their first grain appears. The layout
    (sectors): constant header 0, volatile header 1, journal header 2, journal 4-7, grain
    directory from 8, grain tables after it, free bitmap and back map (one sector each), then
    the grains region (sized for the whole capacity, only the used part written).
    *const_overrides* / *volatile_overrides* patch the headers' 64-bit words by index (hostile
    images); *gd_entries* sets the directory's size in entries (default: what the capacity
    needs), rounded up to a sector; *first_slot* leaves that many grains of the grains region
    unused (a hole in the file), so that grain numbers of 4096 and more are stored.
    """
    assert capacity % SECTOR == 0
    n_gts = -(-capacity // SESPARSE_GT_COVERAGE)
    gd_len = n_gts if gd_entries is None else gd_entries
    gd_sectors = max(1, -(-gd_len * 8 // SECTOR))
    gd = 8
    table_of: dict[int, int] = {}
    for index in sorted(grains):
        table_of.setdefault(index // SESPARSE_GTES, len(table_of))
    tables_offset = gd + gd_sectors
    tables_sectors = max(1, len(table_of)) * 64
    bitmap = tables_offset + tables_sectors
    backmap = bitmap + 1
    grains_offset = -(-(backmap + 1) // 8) * 8
    placed = list(order) if order is not None else sorted(i for i, d in grains.items() if isinstance(d, bytes))
    grains_sectors = max(-(-capacity // SESPARSE_GRAIN), first_slot + len(placed)) * 8
    slot = {index: first_slot + n for n, index in enumerate(placed)}
    tables = [[0] * SESPARSE_GTES for _ in table_of]
    for index, data in grains.items():
        table = tables[table_of[index // SESPARSE_GTES]]
        if data is None:
            entry = 2 << 60
        elif data == UNMAPPED:
            entry = 1 << 60
        else:
            entry = sesparse_grain_entry(slot[index])
        table[index % SESPARSE_GTES] = entry
    directory_entries = [0] * gd_len
    for gt, table_index in table_of.items():
        if gt < gd_len:
            directory_entries[gt] = (1 << 60) | table_index
    words = [0] * 26
    words[0:6] = [0xCAFEBABE, 0x0000000200000001, capacity // SECTOR, 8, 64, 0]
    words[10:24] = [1, 1, 2, 1, 4, 4, gd, gd_sectors, tables_offset, tables_sectors, bitmap, 1, backmap, 1]
    words[24:26] = [grains_offset, grains_sectors]
    for word, value in (const_overrides or {}).items():
        words[word] = value
    volatile = [0xCAFECAFE, 0, 1, 0]
    for word, value in (volatile_overrides or {}).items():
        volatile[word] = value
    image = bytearray(grains_offset * SECTOR)
    image[0:208] = struct.pack("<26Q", *words)
    image[SECTOR : SECTOR + 32] = struct.pack("<4Q", *volatile)
    image[gd * SECTOR : gd * SECTOR + 8 * gd_len] = struct.pack(f"<{gd_len}Q", *directory_entries)
    for table_index, table in enumerate(tables):
        at = (tables_offset + table_index * 64) * SECTOR
        image[at : at + 64 * SECTOR] = struct.pack(f"<{SESPARSE_GTES}Q", *table)
    body = bytearray()
    for index in placed:
        data = grains[index]
        assert isinstance(data, bytes)
        body += data.ljust(SESPARSE_GRAIN, b"\0")
    extent = f"{name}-sesparse.vmdk"
    with (directory / extent).open("wb") as f:
        f.write(image)
        f.seek(first_slot * SESPARSE_GRAIN, os.SEEK_CUR)
        f.write(body)
    text = descriptor_text(
        [f'RW {capacity // SECTOR} SESPARSE "{extent}"'],
        create_type="seSparse",
        cid=cid,
        parent_cid=parent_cid,
        parent=parent,
    )
    path = directory / f"{name}.vmdk"
    path.write_text(text)
    return path
