"""Build valid qcow2 images with qemu-img/qemu-io and break them in precise ways.

Used by ``test_malformed.py`` (one malformed image per refusal rule) and ``test_mutations.py``
(property-based mutation of valid images). Everything here needs only :mod:`struct`,
``qemu-img`` and ``qemu-io``; opening images goes through the public imago API.

Offsets follow QEMU's ``docs/interop/qcow2.rst``. All numbers in qcow2 are big-endian.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"QFI\xfb"

# Header field offsets (bytes into the file).
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_BACKING_FILE_OFFSET = 8
OFF_BACKING_FILE_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_CRYPT_METHOD = 32
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
OFF_INCOMPATIBLE_FEATURES = 72
OFF_COMPATIBLE_FEATURES = 80
OFF_AUTOCLEAR_FEATURES = 88
OFF_REFCOUNT_ORDER = 96
OFF_HEADER_LENGTH = 100
OFF_COMPRESSION_TYPE = 104

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entry bits.
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_COPIED = 1 << 63
L2_COMPRESSED = 1 << 62
L2_ZERO = 1 << 0
L2_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00

MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_NAME_LENGTH = 1023

SNAPSHOT_HEADER_SIZE = 40


# --- qemu tools ------------------------------------------------------------------------------


def qemu_img(*args: str | os.PathLike[str]) -> str:
    """Run ``qemu-img``; return its stdout (fails loudly with its stderr)."""
    proc = subprocess.run(["qemu-img", *map(os.fspath, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(map(os.fspath, args))} failed: {proc.stderr.strip()}")
    return proc.stdout


def qemu_io(path: str | os.PathLike[str], *commands: str, fmt: str = "qcow2") -> str:
    """Run ``qemu-io -f fmt -c cmd ... path``."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    args.append(os.fspath(path))
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0 or "error" in proc.stdout.lower() or "failed" in proc.stderr.lower():
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout.strip()} {proc.stderr.strip()}")
    return proc.stdout


def create(
    path: str | os.PathLike[str],
    size: int = 4 << 20,
    *,
    compat: str = "1.1",
    cluster_size: int | None = None,
    extended_l2: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = "qcow2",
    unsafe: bool = False,
    lazy_refcounts: bool = False,
) -> Path:
    """``qemu-img create -f qcow2`` with the given options."""
    options = [f"compat={compat}"]
    if cluster_size is not None:
        options.append(f"cluster_size={cluster_size}")
    if extended_l2:
        options.append("extended_l2=on")
    if lazy_refcounts:
        options.append("lazy_refcounts=on")
    args: list[str] = ["create", "-f", "qcow2", "-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
        if unsafe:
            args.append("-u")
    args += [os.fspath(path), str(size)]
    qemu_img(*args)
    return Path(path)


@dataclass(frozen=True)
class Write:
    """A pattern write: ``qemu-io -c 'write [-c] -P pattern offset length'``."""

    pattern: int
    offset: int
    length: int
    compressed: bool = False

    def command(self) -> str:
        flag = "-c " if self.compressed else ""
        return f"write {flag}-P {self.pattern:#x} {self.offset} {self.length}"


def apply_writes(path: str | os.PathLike[str], writes: Iterable[Write]) -> None:
    """Apply *writes* through qemu-io (one process)."""
    commands = [w.command() for w in writes]
    if commands:
        qemu_io(path, *commands)


def expected_content(size: int, writes: Iterable[Write], base: bytes | None = None) -> bytes:
    """The disk content after *writes* on a zero (or *base*) disk of *size* bytes."""
    data = bytearray(size) if base is None else bytearray(base[:size].ljust(size, b"\0"))
    for w in writes:
        data[w.offset : w.offset + w.length] = bytes([w.pattern]) * w.length
    return bytes(data)


def qemu_content(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> bytes:
    """The guest content of *path* as qemu-img sees it (converted to raw at *out*)."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, out)
    return Path(out).read_bytes()


# --- reading and patching bytes --------------------------------------------------------------


def read_at(path: str | os.PathLike[str], offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def patch(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """Overwrite bytes at *offset* (may extend the file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def get_u8(path: str | os.PathLike[str], offset: int) -> int:
    return int(read_at(path, offset, 1)[0])


def get_u16(path: str | os.PathLike[str], offset: int) -> int:
    return int(struct.unpack(">H", read_at(path, offset, 2))[0])


def get_u32(path: str | os.PathLike[str], offset: int) -> int:
    return int(struct.unpack(">I", read_at(path, offset, 4))[0])


def get_u64(path: str | os.PathLike[str], offset: int) -> int:
    return int(struct.unpack(">Q", read_at(path, offset, 8))[0])


def put_u8(path: str | os.PathLike[str], offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">B", value))


def put_u16(path: str | os.PathLike[str], offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">H", value))


def put_u32(path: str | os.PathLike[str], offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">I", value))


def put_u64(path: str | os.PathLike[str], offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">Q", value))


def file_size(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_size


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --- structure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The qcow2 header fields (v3 fields read as their v2 defaults for version 2)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size


def parse_header(data: bytes) -> Header:
    """Parse the header from the first bytes of an image."""
    (_magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off) = (
        struct.unpack_from(">4sIQIIQIIQQIIQ", data, 0)
    )
    if version >= 3:
        incompat, compat, autoclear, refcount_order, header_length = struct.unpack_from(">QQQII", data, 72)
    else:
        incompat = compat = autoclear = 0
        refcount_order, header_length = 4, V2_HEADER_LENGTH
    return Header(
        version=version,
        backing_file_offset=bfo,
        backing_file_size=bfs,
        cluster_bits=cbits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
    )


def header(path: str | os.PathLike[str]) -> Header:
    return parse_header(read_at(path, 0, 112))


@dataclass(frozen=True)
class Extension:
    """A header extension: where its 8-byte header sits, its type and its data."""

    offset: int
    type: int
    data: bytes

    @property
    def end(self) -> int:
        """Offset after its data and padding."""
        return self.offset + 8 + align_up(len(self.data), 8)


def extensions(path: str | os.PathLike[str]) -> tuple[list[Extension], int]:
    """The header extensions of a (valid) image and the offset of the end marker."""
    h = header(path)
    cluster = read_at(path, 0, h.cluster_size)
    offset = h.header_length
    found: list[Extension] = []
    while offset + 8 <= len(cluster):
        ext_type, length = struct.unpack_from(">II", cluster, offset)
        if ext_type == EXT_END:
            return found, offset
        found.append(Extension(offset, ext_type, cluster[offset + 8 : offset + 8 + length]))
        offset = found[-1].end
    raise ValueError("no end of the header extension area")


def extension(path: str | os.PathLike[str], ext_type: int) -> Extension:
    for ext in extensions(path)[0]:
        if ext.type == ext_type:
            return ext
    raise LookupError(f"no header extension {ext_type:#x}")


def encode_extensions(exts: Sequence[tuple[int, bytes]]) -> bytes:
    """The bytes of an extension area (padded entries, then the end marker)."""
    out = bytearray()
    for ext_type, data in exts:
        out += struct.pack(">II", ext_type, len(data)) + data
        out += bytes(align_up(len(out), 8) - len(out))
    return bytes(out + bytes(8))


def rewrite_extensions(path: str | os.PathLike[str], exts: Sequence[tuple[int, bytes]]) -> int:
    """Replace the extension area; move the backing file name behind it. Returns its end."""
    h = header(path)
    backing_name = backing_file_name(path)
    area = encode_extensions(exts)
    end = h.header_length + len(area)
    if end + len(backing_name or b"") > h.cluster_size:
        raise ValueError("extensions do not fit in the header cluster")
    # Clear the old area (up to the end of the header cluster) first.
    patch(path, h.header_length, bytes(h.cluster_size - h.header_length))
    patch(path, h.header_length, area)
    if backing_name is not None:
        patch(path, end, backing_name)
        put_u64(path, OFF_BACKING_FILE_OFFSET, end)
    return end


def feature_table_entry(kind: int, bit: int, name: str) -> bytes:
    """One 48-byte feature name table entry."""
    return struct.pack(">BB46s", kind, bit, name.encode())


def backing_file_name(path: str | os.PathLike[str]) -> bytes | None:
    h = header(path)
    if h.backing_file_offset == 0:
        return None
    return read_at(path, h.backing_file_offset, h.backing_file_size)


def set_backing_file_name(path: str | os.PathLike[str], name: bytes) -> None:
    """Record *name* as the backing file name (right after the extension area)."""
    _, end_marker = extensions(path)
    offset = end_marker + 8
    patch(path, offset, name)
    put_u64(path, OFF_BACKING_FILE_OFFSET, offset)
    put_u32(path, OFF_BACKING_FILE_SIZE, len(name))


def set_incompatible(path: str | os.PathLike[str], bits: int) -> None:
    """OR *bits* into the incompatible feature mask."""
    put_u64(path, OFF_INCOMPATIBLE_FEATURES, get_u64(path, OFF_INCOMPATIBLE_FEATURES) | bits)


def l1_entry_offset(path: str | os.PathLike[str], guest_offset: int) -> int:
    """File offset of the L1 entry covering *guest_offset*."""
    h = header(path)
    index = (guest_offset >> h.cluster_bits) // h.l2_entries
    return h.l1_table_offset + 8 * index


def l2_table_offset(path: str | os.PathLike[str], guest_offset: int) -> int:
    """Host offset of the L2 table covering *guest_offset* (must be allocated)."""
    entry = get_u64(path, l1_entry_offset(path, guest_offset))
    offset = entry & L1_OFFSET_MASK
    if offset == 0:
        raise LookupError(f"no L2 table for guest offset {guest_offset:#x}")
    return offset


def l2_entry_offset(path: str | os.PathLike[str], guest_offset: int) -> int:
    """File offset of the L2 entry (its first 64 bits) for *guest_offset*."""
    h = header(path)
    index = (guest_offset >> h.cluster_bits) % h.l2_entries
    return l2_table_offset(path, guest_offset) + h.l2_entry_size * index


def l2_tables(path: str | os.PathLike[str], l1_offset: int | None = None, l1_size: int | None = None) -> list[int]:
    """Host offsets of the L2 tables an L1 table (default: the active one) refers to."""
    h = header(path)
    l1_offset = h.l1_table_offset if l1_offset is None else l1_offset
    l1_size = h.l1_size if l1_size is None else l1_size
    raw = read_at(path, l1_offset, 8 * l1_size)
    entries = struct.unpack(f">{l1_size}Q", raw)
    return sorted({e & L1_OFFSET_MASK for e in entries if e & L1_OFFSET_MASK})


def refcount_blocks(path: str | os.PathLike[str]) -> list[int]:
    """Host offsets of the refcount blocks."""
    h = header(path)
    raw = read_at(path, h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size)
    entries = struct.unpack(f">{len(raw) // 8}Q", raw)
    return sorted({e & REFT_OFFSET_MASK for e in entries if e & REFT_OFFSET_MASK})


@dataclass(frozen=True)
class SnapshotEntry:
    """A snapshot table entry and where it lies."""

    offset: int
    length: int
    l1_table_offset: int
    l1_size: int
    id: bytes
    name: bytes

    @property
    def id_length_offset(self) -> int:
        return self.offset + 12

    @property
    def name_length_offset(self) -> int:
        return self.offset + 14


def snapshots(path: str | os.PathLike[str]) -> list[SnapshotEntry]:
    """Parse the snapshot table of a (valid) image."""
    h = header(path)
    offset = h.snapshots_offset
    found = []
    for _ in range(h.nb_snapshots):
        fixed = read_at(path, offset, SNAPSHOT_HEADER_SIZE)
        l1_off, l1_size, id_len, name_len, _, _, _, _, extra = struct.unpack(">QIHHIIQII", fixed)
        pos = offset + SNAPSHOT_HEADER_SIZE + extra
        ident = read_at(path, pos, id_len)
        name = read_at(path, pos + id_len, name_len)
        length = align_up(SNAPSHOT_HEADER_SIZE + extra + id_len + name_len, 8)
        found.append(SnapshotEntry(offset, length, l1_off, l1_size, ident, name))
        offset += length
    return found


def encode_snapshot_entry(
    *, l1_table_offset: int, l1_size: int, id: bytes, name: bytes, disk_size: int, extra: bytes | None = None
) -> bytes:
    """One snapshot table entry (v3 extra data: VM state size and disk size), padded to 8."""
    if extra is None:
        extra = struct.pack(">QQ", 0, disk_size)
    entry = struct.pack(">QIHHIIQII", l1_table_offset, l1_size, len(id), len(name), 0, 0, 0, 0, len(extra))
    entry += extra + id + name
    return entry + bytes(-len(entry) % 8)


def replace_snapshot_table(path: str | os.PathLike[str], entries: Sequence[bytes]) -> int:
    """Write a new snapshot table at the cluster-aligned end of the file; point the header at it."""
    h = header(path)
    offset = align_up(file_size(path), h.cluster_size)
    patch(path, offset, b"".join(entries))
    put_u64(path, OFF_SNAPSHOTS_OFFSET, offset)
    put_u32(path, OFF_NB_SNAPSHOTS, len(entries))
    return offset


def compressed_extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """File ranges of the compressed clusters the active L1 table reaches."""
    h = header(path)
    size = file_size(path)
    found = set()
    for table in l2_tables(path):
        raw = read_at(path, table, h.cluster_size)
        for index in range(0, len(raw), h.l2_entry_size):
            (entry,) = struct.unpack_from(">Q", raw, index)
            if entry & L2_COMPRESSED:
                x = 62 - (h.cluster_bits - 8)
                host = entry & ((1 << x) - 1)
                sectors = (entry >> x) & ((1 << (62 - x)) - 1)
                end = min((host & ~511) + (sectors + 1) * 512, size)
                found.add((host, end))
    return sorted(found)


def regions(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, int]]]:
    """Metadata regions of a valid image, as ``name -> [(start, end), ...]`` file ranges.

    Names: ``header``, ``extensions`` (including the end marker and backing file name),
    ``l1``, ``l2``, ``compressed_data``, ``refcount_table`` (its used part), ``refcount_block``,
    ``snapshot_table``, ``snapshot_l1``. Regions that the image lacks are left out.
    """
    h = header(path)
    out: dict[str, list[tuple[int, int]]] = {"header": [(0, h.header_length)]}
    _, end_marker = extensions(path)
    ext_end = end_marker + 8
    if h.backing_file_offset:
        ext_end = max(ext_end, h.backing_file_offset + h.backing_file_size)
    if h.version >= 3 or ext_end > h.header_length + 8:
        out["extensions"] = [(h.header_length, ext_end)]
    out["l1"] = [(h.l1_table_offset, h.l1_table_offset + 8 * h.l1_size)]
    l2 = l2_tables(path)
    if l2:
        out["l2"] = [(t, t + h.cluster_size) for t in l2]
    compressed = compressed_extents(path)
    if compressed:
        out["compressed_data"] = compressed
    blocks = refcount_blocks(path)
    used_rt = 8 * max(1, len(blocks))
    out["refcount_table"] = [(h.refcount_table_offset, h.refcount_table_offset + used_rt)]
    out["refcount_block"] = [(b, b + h.cluster_size) for b in blocks]
    if h.nb_snapshots:
        snaps = snapshots(path)
        out["snapshot_table"] = [(h.snapshots_offset, snaps[-1].offset + snaps[-1].length)]
        out["snapshot_l1"] = [(s.l1_table_offset, s.l1_table_offset + 8 * s.l1_size) for s in snaps]
    return out


# --- compressed clusters -----------------------------------------------------------------------


def raw_deflate(data: bytes, level: int = 9) -> bytes:
    """A raw deflate stream (no zlib header), as qcow2's zlib compression type stores it."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def compressed_descriptor(cluster_bits: int, host_offset: int, length: int) -> int:
    """An L2 entry for compressed data of *length* bytes at *host_offset*."""
    x = 62 - (cluster_bits - 8)
    sectors = ((host_offset + length - 1) >> 9) - (host_offset >> 9)
    if host_offset >= 1 << x or sectors >= 1 << (62 - x):
        raise ValueError("compressed data does not fit in a descriptor")
    return L2_COMPRESSED | (sectors << x) | host_offset


def append_compressed(path: str | os.PathLike[str], guest_offset: int, stream: bytes) -> tuple[int, int]:
    """Append *stream* to the file (sector aligned) and point *guest_offset*'s L2 entry at it.

    Returns the file offsets of the L2 entry and of the compressed data.
    """
    h = header(path)
    host = align_up(file_size(path), 512)
    patch(path, host, stream)
    # Whole sectors, so that a reader may read the last sector in full.
    end = align_up(host + len(stream), 512)
    if file_size(path) < end:
        patch(path, end - 1, b"\0")
    entry = l2_entry_offset(path, guest_offset)
    put_u64(path, entry, compressed_descriptor(h.cluster_bits, host, len(stream)))
    if h.extended_l2:
        put_u64(path, entry + 8, 0)
    return entry, host


# --- crafting images from scratch --------------------------------------------------------------


def craft_header(
    *,
    version: int = 3,
    cluster_bits: int = 16,
    size: int = 1 << 20,
    l1_size: int = 1,
    l1_table_offset: int = 0x30000,
    refcount_table_offset: int = 0x10000,
    refcount_table_clusters: int = 1,
    nb_snapshots: int = 0,
    snapshots_offset: int = 0,
    backing_file_offset: int = 0,
    backing_file_size: int = 0,
    crypt_method: int = 0,
    incompatible_features: int = 0,
    header_length: int = 112,
    file_length: int = 1024,
    tail: bytes = b"",
) -> bytes:
    """A header-only file of *file_length* bytes (extension area empty unless *tail* is given)."""
    data = bytearray(max(file_length, 4096))
    struct.pack_into(
        ">4sIQIIQIIQQIIQ",
        data,
        0,
        MAGIC,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    )
    if version >= 3:
        struct.pack_into(">QQQII", data, 72, incompatible_features, 0, 0, 4, header_length)
    start = header_length if version >= 3 else V2_HEADER_LENGTH
    data[start : start + len(tail)] = tail
    return bytes(data[:file_length])


# --- opening through imago ---------------------------------------------------------------------


def open_storage(path: str | os.PathLike[str], *, writable: bool = False) -> Any:
    """Open *path* with the ``file`` storage driver."""
    import imago
    from imago_file import File

    return File.open_sync(imago.StorageOpenOptions(filename=path, writable=writable))


def read_disk(disk: Any, limit: int = 16 << 20, chunk: int = 1 << 20) -> bytes:
    """Read the disk (its first *limit* bytes) through a SyncFormatAccess, in chunks."""
    size = min(disk.size, limit)
    out = bytearray(size)
    view = memoryview(out)
    for offset in range(0, size, chunk):
        disk.read(view[offset : offset + chunk], offset)
    return bytes(out)


# A script run in a child process with a capped address space: opens an image, reads it, lists
# snapshots, and reports the outcome as JSON on stdout.
_LIMITED_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import imago
    from imago_qcow2 import Qcow2

    def run():
        driver = Qcow2.builder_path(sys.argv[1]).backing(None).open_sync(imago.PermissiveImplicitOpenGate())
        disk = imago.SyncFormatAccess(driver)
        try:
            size = min(disk.size, 64 << 20)
            buf = bytearray(1 << 20)
            for offset in range(0, size, len(buf)):
                n = min(len(buf), size - offset)
                disk.read(memoryview(buf)[:n], offset)
            snaps = getattr(driver, "snapshots", None)
            if callable(snaps):
                snaps = snaps()
            if snaps is not None:
                list(snaps)
        finally:
            disk.close()

    try:
        run()
    except BaseException as exc:
        result = {
            "outcome": "error",
            "type": type(exc).__name__,
            "imago": isinstance(exc, imago.ImagoError),
            "message": str(exc)[:500],
        }
    else:
        result = {"outcome": "ok", "type": None, "imago": False, "message": ""}
    print(json.dumps(result))
    """
)


def open_limited(path: str | os.PathLike[str], *, address_space: int = 1 << 30, timeout: float = 60) -> dict[str, Any]:
    """Open and read *path* in a child process limited to *address_space* bytes.

    Returns ``{"outcome": "ok"|"error", "type": ..., "imago": bool, "message": ...}``; a
    crash, a hang (past *timeout* seconds) or unexpected output raises AssertionError.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LIMITED_SCRIPT, os.fspath(path), str(address_space)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"opening {path} hung for more than {timeout} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child crashed (exit status {proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
