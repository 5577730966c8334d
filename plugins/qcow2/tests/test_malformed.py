"""A corpus of malformed qcow2 images, one per refusal rule, each with the error it must raise.

Every image starts as a small valid image made by ``qemu-img``/``qemu-io`` and is then broken
with :mod:`struct` at the offsets of QEMU's ``docs/interop/qcow2.rst``. Problems in the header
and in table locations must be refused when the image is opened; problems in L1/L2 entries and
compressed data may be refused at open or when the affected range is read, but always with the
specific error class. Resource tests open crafted tiny files in a child process whose address
space is capped, so that an image that makes the reader allocate gigabytes fails the test
instead of the machine.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import (
    BackingChainError,
    CorruptImageError,
    DenyImplicitOpenGate,
    ImagoError,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
    ReadOnlyError,
    SyncFormatAccess,
    UnsupportedFeatureError,
)
from imago_qcow2 import Qcow2

from . import _corpus as corpus
from ._corpus import Write

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

SIZE = 4 << 20
CLUSTER = 64 << 10
WRITES = (Write(0x11, 0, CLUSTER), Write(0x22, 1 << 20, CLUSTER), Write(0x33, SIZE - 4096, 4096))
EXPECTED = corpus.expected_content(SIZE, WRITES)


# --- helpers -------------------------------------------------------------------------------------


def make(
    directory: Path,
    name: str = "img.qcow2",
    *,
    writes: tuple[Write, ...] = WRITES,
    size: int = SIZE,
    **options: Any,
) -> Path:
    """A valid image made by qemu-img, with *writes* applied by qemu-io."""
    path = corpus.create(directory / name, size, **options)
    corpus.apply_writes(path, writes)
    return path


def list_snapshots(driver: Any) -> list[Any]:
    """The driver's snapshots (whatever the driver's spelling of that is)."""
    snaps = driver.snapshots
    if callable(snaps):
        snaps = snaps()
    return list(snaps)


def open_image(
    path: Path,
    *,
    gate: imago.ImplicitOpenGate | None = None,
    open_backing: bool = True,
    write: bool = False,
    allow_corrupt: bool | None = None,
) -> SyncFormatAccess:
    builder = Qcow2.builder_path(path).write(write)
    if not open_backing:
        builder = builder.backing(None)
    if allow_corrupt is not None:
        builder = builder.allow_corrupt(allow_corrupt)
    return SyncFormatAccess(builder.open_sync(gate or PermissiveImplicitOpenGate()))


def open_and_read(path: Path, **options: Any) -> bytes:
    """Open, read the whole disk, list the snapshots, close. Returns the disk content."""
    disk = open_image(path, **options)
    try:
        data = corpus.read_disk(disk)
        list_snapshots(disk.driver)
        return data
    finally:
        disk.close()


def check_corrupt(error: CorruptImageError, *, offset: int | None = None, words: tuple[str, ...] = ()) -> None:
    """The error names the file, the expected offset and what is wrong."""
    assert error.filename is not None
    assert os.path.basename(error.filename) in str(error)
    if offset is not None:
        assert error.offset == offset, f"offset {error.offset!r} != {offset:#x}: {error}"
        assert f"{offset:#x}" in str(error)
    message = error.problem.lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in {error.problem!r}"


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A valid v3 image with data in three places."""
    return make(tmp_path)


@pytest.fixture
def img_v2(tmp_path: Path) -> Path:
    return make(tmp_path, compat="0.10")


@pytest.fixture
def img_snapshot(tmp_path: Path) -> Path:
    """A v3 image with one internal snapshot (its table is at the end of the file)."""
    path = make(tmp_path)
    corpus.qemu_img("snapshot", "-c", "snap1", path)
    return path


# --- controls: the valid images the corpus starts from read correctly -------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="v3"),
        pytest.param({"compat": "0.10"}, id="v2"),
        pytest.param({"extended_l2": True}, id="extended_l2"),
        pytest.param({"cluster_size": 512}, id="512-byte-clusters"),
    ],
)
def test_control_valid_image_reads_like_qemu(tmp_path: Path, options: dict[str, Any]) -> None:
    path = make(tmp_path, **options)
    assert open_and_read(path) == EXPECTED == corpus.qemu_content(path, tmp_path / "out.raw")


def test_control_compressed_image_reads_like_qemu(tmp_path: Path) -> None:
    writes = (Write(0x44, 0, CLUSTER, compressed=True), Write(0x55, 2 * CLUSTER, CLUSTER, compressed=True))
    path = make(tmp_path, writes=writes)
    assert open_and_read(path) == corpus.expected_content(SIZE, writes)


def test_control_snapshot_image(img_snapshot: Path) -> None:
    disk = open_image(img_snapshot)
    try:
        assert corpus.read_disk(disk) == EXPECTED
        assert [s.name for s in list_snapshots(disk.driver)] == ["snap1"]
    finally:
        disk.close()


# --- header --------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"QFI\xfa", b"\0\0\0\0", b"QCOW"])
def test_bad_magic(img: Path, magic: bytes) -> None:
    corpus.patch(img, corpus.OFF_MAGIC, magic)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=0, words=("qcow2",))


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(img: Path, version: int) -> None:
    corpus.put_u32(img, corpus.OFF_VERSION, version)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert "version" in info.value.feature
    assert str(version) in info.value.feature


@pytest.mark.parametrize("length", [0, 72, 100])
def test_header_length_too_small(img: Path, length: int) -> None:
    corpus.put_u32(img, corpus.OFF_HEADER_LENGTH, length)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_HEADER_LENGTH, words=("header_length",))


@pytest.mark.parametrize(("cluster_size", "length"), [(CLUSTER, CLUSTER + 8), (512, 520), (CLUSTER, 0xFFFFFFF8)])
def test_header_length_larger_than_cluster(tmp_path: Path, cluster_size: int, length: int) -> None:
    path = make(tmp_path, cluster_size=cluster_size)
    corpus.put_u32(path, corpus.OFF_HEADER_LENGTH, length)
    with pytest.raises(CorruptImageError) as info:
        open_image(path)
    check_corrupt(info.value, offset=corpus.OFF_HEADER_LENGTH, words=("header_length",))


@pytest.mark.parametrize("bits", [0, 8, 22, 30, 63, 64, 0xFFFFFFFF])
def test_cluster_bits_out_of_range(img: Path, bits: int) -> None:
    corpus.put_u32(img, corpus.OFF_CLUSTER_BITS, bits)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_CLUSTER_BITS, words=("cluster_bits",))


def test_extended_l2_needs_16k_clusters(tmp_path: Path) -> None:
    path = make(tmp_path, extended_l2=True, cluster_size=16384, writes=())
    corpus.put_u32(path, corpus.OFF_CLUSTER_BITS, 13)
    with pytest.raises(CorruptImageError) as info:
        open_image(path)
    check_corrupt(info.value, offset=corpus.OFF_CLUSTER_BITS)


@pytest.mark.parametrize("bit", [5, 20, 63])
def test_unknown_incompatible_bit_unnamed(img: Path, bit: int) -> None:
    corpus.set_incompatible(img, 1 << bit)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert str(bit) in info.value.feature
    assert "incompatible" in str(info.value)


@pytest.mark.parametrize("bit", [5, 20, 63])
def test_unknown_incompatible_bit_named_by_feature_table(img: Path, bit: int) -> None:
    exts, _ = corpus.extensions(img)
    table = corpus.extension(img, corpus.EXT_FEATURE_TABLE)
    new_table = table.data + corpus.feature_table_entry(0, bit, "evil time travel")
    corpus.rewrite_extensions(
        img, [(e.type, new_table if e.type == corpus.EXT_FEATURE_TABLE else e.data) for e in exts]
    )
    corpus.set_incompatible(img, 1 << bit)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert "evil time travel" in info.value.feature
    assert "evil time travel" in str(info.value)


def test_unknown_incompatible_bit_named_with_full_length_name(img: Path) -> None:
    # 46 bytes of name, not NUL-terminated.
    name = "n" * 45 + "X"
    exts, _ = corpus.extensions(img)
    table = corpus.extension(img, corpus.EXT_FEATURE_TABLE)
    new_table = table.data + corpus.feature_table_entry(0, 33, name)
    corpus.rewrite_extensions(
        img, [(e.type, new_table if e.type == corpus.EXT_FEATURE_TABLE else e.data) for e in exts]
    )
    corpus.set_incompatible(img, 1 << 33)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert name in info.value.feature


def test_feature_table_naming_a_compatible_bit_does_not_name_the_incompatible_one(img: Path) -> None:
    exts, _ = corpus.extensions(img)
    table = corpus.extension(img, corpus.EXT_FEATURE_TABLE)
    new_table = table.data + corpus.feature_table_entry(1, 20, "harmless compat thing")
    corpus.rewrite_extensions(
        img, [(e.type, new_table if e.type == corpus.EXT_FEATURE_TABLE else e.data) for e in exts]
    )
    corpus.set_incompatible(img, 1 << 20)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert "harmless compat thing" not in str(info.value)
    assert "20" in info.value.feature


@pytest.mark.parametrize(("method", "word"), [(1, "aes"), (2, "luks"), (3, "encryption"), (0xFFFFFFFF, "encryption")])
def test_encryption_refused(img: Path, method: int, word: str) -> None:
    corpus.put_u32(img, corpus.OFF_CRYPT_METHOD, method)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert word in info.value.feature.lower()
    assert "encrypt" in info.value.feature.lower()


def test_encryption_refused_on_v2(img_v2: Path) -> None:
    corpus.put_u32(img_v2, corpus.OFF_CRYPT_METHOD, 1)
    with pytest.raises(UnsupportedFeatureError):
        open_image(img_v2)


def test_unknown_compression_type(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_COMPRESSION)
    corpus.put_u8(img, corpus.OFF_COMPRESSION_TYPE, 7)
    with pytest.raises(UnsupportedFeatureError) as info:
        open_image(img)
    assert "compression" in info.value.feature


def test_compression_type_without_its_feature_bit(img: Path) -> None:
    corpus.put_u8(img, corpus.OFF_COMPRESSION_TYPE, 1)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_COMPRESSION_TYPE)


@pytest.mark.parametrize("order", [7, 64, 0xFFFFFFFF])
def test_refcount_order_too_large(img: Path, order: int) -> None:
    corpus.put_u32(img, corpus.OFF_REFCOUNT_ORDER, order)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_ORDER, words=("refcount_order",))


# --- corrupt and dirty bits ----------------------------------------------------------------------


def test_corrupt_bit_refuses_read_only_open(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_CORRUPT)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    assert "corrupt" in str(info.value).lower()


def test_corrupt_bit_refuses_write_open(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_CORRUPT)
    with pytest.raises((ReadOnlyError, CorruptImageError)):
        open_image(img, write=True)
    assert corpus.get_u64(img, corpus.OFF_INCOMPATIBLE_FEATURES) & corpus.INCOMPAT_CORRUPT


def test_corrupt_bit_refuses_writes_even_with_allow_corrupt(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_CORRUPT)
    before = img.read_bytes()
    with pytest.raises(CorruptImageError):
        open_image(img, write=True)
    # allow_corrupt opens it for a repair only (as qemu-img check -r does): writes are refused.
    disk = open_image(img, write=True, allow_corrupt=True)
    try:
        with pytest.raises((ReadOnlyError, CorruptImageError)):
            disk.write(b"\x33" * 512, 0)
    finally:
        disk.close()
    assert img.read_bytes() == before


def test_corrupt_bit_allow_corrupt_reads(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_CORRUPT)
    before = img.read_bytes()
    assert open_and_read(img, allow_corrupt=True) == EXPECTED
    assert img.read_bytes() == before


@pytest.mark.parametrize("lazy", [False, True])
def test_dirty_bit_read_only_open_reads(tmp_path: Path, lazy: bool) -> None:
    path = make(tmp_path, lazy_refcounts=lazy)
    corpus.set_incompatible(path, corpus.INCOMPAT_DIRTY)
    before = path.read_bytes()
    assert open_and_read(path) == EXPECTED
    assert path.read_bytes() == before


def test_dirty_bit_with_broken_refcounts_reads(tmp_path: Path) -> None:
    # A dirty image's refcounts may be wrong: a reader must not depend on them.
    path = make(tmp_path, lazy_refcounts=True)
    corpus.set_incompatible(path, corpus.INCOMPAT_DIRTY)
    for block in corpus.refcount_blocks(path):
        corpus.patch(path, block, b"\xff" * 64)
    assert open_and_read(path) == EXPECTED


# --- L1 table location and size -------------------------------------------------------------------


def test_l1_table_offset_misaligned(img: Path) -> None:
    corpus.put_u64(img, corpus.OFF_L1_TABLE_OFFSET, corpus.header(img).l1_table_offset + 8)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_L1_TABLE_OFFSET, words=("L1", "aligned"))


@pytest.mark.parametrize("where", ["eof", "far", "2**55"])
def test_l1_table_offset_past_eof(img: Path, where: str) -> None:
    past = {
        "eof": corpus.align_up(corpus.file_size(img), CLUSTER),
        "far": 1 << 40,
        "2**55": 1 << 55,
    }[where]
    corpus.put_u64(img, corpus.OFF_L1_TABLE_OFFSET, past)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_L1_TABLE_OFFSET, words=("L1", "end of the file"))


def test_l1_table_runs_past_eof(img: Path) -> None:
    # Within the 32 MiB cap, but longer than the file.
    corpus.put_u32(img, corpus.OFF_L1_SIZE, 1 << 20)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_L1_TABLE_OFFSET, words=("L1",))


@pytest.mark.parametrize("l1_size", [(32 << 20) // 8 + 1, 0xFFFFFFFF])
def test_l1_table_larger_than_32_mib(img: Path, l1_size: int) -> None:
    corpus.put_u32(img, corpus.OFF_L1_SIZE, l1_size)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_L1_SIZE, words=("L1", "MiB"))


def test_l1_size_zero_for_nonempty_disk(img: Path) -> None:
    corpus.put_u32(img, corpus.OFF_L1_SIZE, 0)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_L1_SIZE, words=("too small",))


@pytest.mark.parametrize("size", [1 << 40, (1 << 63) - 1, (1 << 64) - 1])
def test_l1_size_too_small_for_virtual_size(img: Path, size: int) -> None:
    corpus.put_u64(img, corpus.OFF_SIZE, size)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, words=("L1",))
    assert info.value.offset in (corpus.OFF_L1_SIZE, corpus.OFF_SIZE)


# --- refcount table -------------------------------------------------------------------------------


def test_refcount_table_offset_misaligned(img: Path) -> None:
    corpus.put_u64(img, corpus.OFF_REFCOUNT_TABLE_OFFSET, corpus.header(img).refcount_table_offset + 0x200)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_OFFSET, words=("refcount", "aligned"))


@pytest.mark.parametrize("past", [1 << 30, 1 << 56, 0xFFFF_FFFF_FFFF_0000])
def test_refcount_table_offset_past_eof(img: Path, past: int) -> None:
    corpus.put_u64(img, corpus.OFF_REFCOUNT_TABLE_OFFSET, past)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_OFFSET, words=("refcount", "end of the file"))


def test_refcount_table_offset_zero(img: Path) -> None:
    corpus.put_u64(img, corpus.OFF_REFCOUNT_TABLE_OFFSET, 0)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_OFFSET, words=("refcount",))


@pytest.mark.parametrize("clusters", [(8 << 20) // CLUSTER + 1, 0xFFFFFFFF])
def test_refcount_table_larger_than_8_mib(img: Path, clusters: int) -> None:
    corpus.put_u32(img, corpus.OFF_REFCOUNT_TABLE_CLUSTERS, clusters)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_CLUSTERS, words=("refcount", "8 MiB"))


def test_refcount_table_runs_past_eof(img: Path) -> None:
    corpus.put_u32(img, corpus.OFF_REFCOUNT_TABLE_CLUSTERS, 100)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_OFFSET, words=("refcount",))


# --- snapshot table -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [65537, 0x7FFFFFFF, 0xFFFFFFFF])
def test_too_many_snapshots(img_snapshot: Path, count: int) -> None:
    corpus.put_u32(img_snapshot, corpus.OFF_NB_SNAPSHOTS, count)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, offset=corpus.OFF_NB_SNAPSHOTS, words=("snapshots",))


def test_snapshot_count_at_the_limit_but_table_past_eof(img_snapshot: Path) -> None:
    corpus.put_u32(img_snapshot, corpus.OFF_NB_SNAPSHOTS, 65536)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("end of the file",))


def test_snapshot_table_offset_misaligned(img_snapshot: Path) -> None:
    corpus.put_u64(img_snapshot, corpus.OFF_SNAPSHOTS_OFFSET, corpus.header(img_snapshot).snapshots_offset + 8)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, offset=corpus.OFF_SNAPSHOTS_OFFSET, words=("snapshot", "aligned"))


@pytest.mark.parametrize("past", [1 << 30, 1 << 62])
def test_snapshot_table_offset_past_eof(img_snapshot: Path, past: int) -> None:
    corpus.put_u64(img_snapshot, corpus.OFF_SNAPSHOTS_OFFSET, past)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, offset=corpus.OFF_SNAPSHOTS_OFFSET, words=("snapshot", "end of the file"))


def test_snapshot_table_offset_zero(img_snapshot: Path) -> None:
    corpus.put_u64(img_snapshot, corpus.OFF_SNAPSHOTS_OFFSET, 0)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, offset=corpus.OFF_SNAPSHOTS_OFFSET, words=("snapshot",))


def test_snapshot_table_runs_past_eof(img_snapshot: Path) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    corpus.put_u32(img_snapshot, corpus.OFF_NB_SNAPSHOTS, 2)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("end of the file",))
    # QEMU does not write the padding after the last entry: the error lies at the end of the
    # first entry, unpadded (its padding is missing) or padded (the second entry is missing).
    unpadded = entry.offset + 40 + 24 + len(entry.id) + len(entry.name)
    assert info.value.offset in (unpadded, entry.offset + entry.length)


def _pad_file(path: Path, extra: int = 8192) -> None:
    """Add zeros at the end, so that a longer snapshot entry still lies in the file."""
    corpus.patch(path, corpus.file_size(path), bytes(extra))


@pytest.mark.parametrize("length", [1024, 0xFFFF])
def test_snapshot_name_too_long(img_snapshot: Path, length: int) -> None:
    _pad_file(img_snapshot, 70000)
    entry = corpus.snapshots(img_snapshot)[0]
    corpus.put_u16(img_snapshot, entry.name_length_offset, length)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("name",))
    assert info.value.offset in (entry.offset, entry.id_length_offset, entry.name_length_offset)


@pytest.mark.parametrize("length", [1024, 0xFFFF])
def test_snapshot_id_too_long(img_snapshot: Path, length: int) -> None:
    _pad_file(img_snapshot, 70000)
    entry = corpus.snapshots(img_snapshot)[0]
    corpus.put_u16(img_snapshot, entry.id_length_offset, length)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("ID",))
    assert info.value.offset in (entry.offset, entry.id_length_offset)


def _long_names_snapshot(path: Path, *, id_length: int, name_length: int) -> None:
    """Replace the snapshot table with one whose entry has an ID and name of the given lengths."""
    entry = corpus.snapshots(path)[0]
    new = corpus.encode_snapshot_entry(
        l1_table_offset=entry.l1_table_offset,
        l1_size=entry.l1_size,
        id=b"7" * id_length,
        name=b"s" * name_length,
        disk_size=SIZE,
    )
    corpus.replace_snapshot_table(path, [new])


def test_snapshot_id_and_name_of_1023_bytes_are_fine(img_snapshot: Path) -> None:
    # (qemu-img itself cuts names at 255 bytes; the format allows up to 1023.)
    _long_names_snapshot(img_snapshot, id_length=1023, name_length=1023)
    disk = open_image(img_snapshot)
    try:
        assert [(s.id, s.name) for s in list_snapshots(disk.driver)] == [("7" * 1023, "s" * 1023)]
        assert corpus.read_disk(disk) == EXPECTED
    finally:
        disk.close()


@pytest.mark.parametrize(("id_length", "name_length"), [(1024, 5), (5, 1024), (1024, 1024)])
def test_snapshot_rebuilt_with_too_long_names(img_snapshot: Path, id_length: int, name_length: int) -> None:
    _long_names_snapshot(img_snapshot, id_length=id_length, name_length=name_length)
    table = corpus.header(img_snapshot).snapshots_offset
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("longer than 1023",))
    assert info.value.offset in (table, table + 12, table + 14)


def test_snapshot_extra_data_huge(img_snapshot: Path) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    corpus.put_u32(img_snapshot, entry.offset + 36, 0xFFFFFFFF)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("extra data",))
    assert info.value.offset in (entry.offset, entry.offset + 36)


def test_snapshot_name_not_utf8(img_snapshot: Path) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    # The name is "snap1" and lies at the end of the entry, before the padding.
    raw = corpus.read_at(img_snapshot, entry.offset, entry.length)
    name_at = entry.offset + raw.rindex(b"snap1")
    corpus.patch(img_snapshot, name_at, b"\xff\xfe")
    with pytest.raises(CorruptImageError):
        open_and_read(img_snapshot)


@pytest.mark.parametrize("kind", ["misaligned", "past-eof", "zero", "huge"])
def test_snapshot_l1_offset_invalid(img_snapshot: Path, kind: int) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    bad = {
        "misaligned": entry.l1_table_offset + 512,
        "past-eof": corpus.align_up(corpus.file_size(img_snapshot), CLUSTER) + CLUSTER,
        "zero": 0,
        "huge": 0xFFFF_FFFF_FFFF_0000,
    }[kind]
    corpus.put_u64(img_snapshot, entry.offset, bad)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("snapshot", "L1"))
    assert info.value.offset in (entry.offset, entry.offset + 8)


@pytest.mark.parametrize("l1_size", [(32 << 20) // 8 + 1, 0xFFFFFFFF])
def test_snapshot_l1_size_too_large(img_snapshot: Path, l1_size: int) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    corpus.put_u32(img_snapshot, entry.offset + 8, l1_size)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("snapshot", "L1"))


def test_snapshot_l1_size_too_small_for_its_disk_size(img_snapshot: Path) -> None:
    entry = corpus.snapshots(img_snapshot)[0]
    # v3 snapshots record their disk size in the extra data (bytes 48..55 of the entry).
    corpus.put_u64(img_snapshot, entry.offset + 48, 1 << 40)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_snapshot)
    check_corrupt(info.value, words=("snapshot", "L1"))


def test_duplicate_snapshot_ids(tmp_path: Path) -> None:
    path = make(tmp_path)
    corpus.qemu_img("snapshot", "-c", "a", path)
    corpus.qemu_img("snapshot", "-c", "b", path)
    second = corpus.snapshots(path)[1]
    # IDs are "1" and "2"; make the second "1" too.
    raw = corpus.read_at(path, second.offset, second.length)
    id_at = second.offset + 40 + struct.unpack_from(">I", raw, 36)[0]
    assert corpus.read_at(path, id_at, 1) == b"2"
    corpus.patch(path, id_at, b"1")
    with pytest.raises(CorruptImageError):
        open_and_read(path)


# --- L1 entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 1, 8, 56, 60, 62])
def test_l1_entry_reserved_bits(img: Path, bit: int) -> None:
    entry = corpus.l1_entry_offset(img, 0)
    corpus.put_u64(img, entry, corpus.get_u64(img, entry) | 1 << bit)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("L1",))


@pytest.mark.parametrize("where", ["eof", "far"])
def test_l1_entry_past_eof(img: Path, where: str) -> None:
    entry = corpus.l1_entry_offset(img, 0)
    past = corpus.align_up(corpus.file_size(img), CLUSTER) if where == "eof" else 1 << 50
    corpus.put_u64(img, entry, corpus.L2_COPIED | past)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("L2", "end of the file"))


def test_l1_entry_misaligned(img: Path) -> None:
    entry = corpus.l1_entry_offset(img, 0)
    corpus.put_u64(img, entry, corpus.get_u64(img, entry) + 0x200)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("L2", "aligned"))


def test_l1_entry_past_eof_in_a_later_table(tmp_path: Path) -> None:
    # 512-byte clusters: 64 entries per L2 table, so 4 MiB needs 128 L1 entries.
    path = make(tmp_path, cluster_size=512)
    entry = corpus.l1_entry_offset(path, 1 << 20)
    corpus.put_u64(path, entry, corpus.L2_COPIED | 1 << 40)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value, offset=entry)


# --- L2 entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [1, 2, 8, 56, 61])
def test_l2_entry_reserved_bits(img: Path, bit: int) -> None:
    entry = corpus.l2_entry_offset(img, 1 << 20)
    corpus.put_u64(img, entry, corpus.get_u64(img, entry) | 1 << bit)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("L2",))


@pytest.mark.parametrize("bit", [1, 56])
def test_l2_entry_reserved_bits_on_unallocated_cluster(img: Path, bit: int) -> None:
    entry = corpus.l2_entry_offset(img, CLUSTER)  # unallocated cluster in an allocated L2 table
    assert corpus.get_u64(img, entry) == 0
    corpus.put_u64(img, entry, 1 << bit)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry)


@pytest.mark.parametrize("where", ["eof", "far", "2**55"])
def test_l2_entry_past_eof(img: Path, where: str) -> None:
    entry = corpus.l2_entry_offset(img, 1 << 20)
    past = {
        "eof": corpus.align_up(corpus.file_size(img), CLUSTER),
        "far": 1 << 40,
        "2**55": 1 << 55,
    }[where]
    corpus.put_u64(img, entry, corpus.L2_COPIED | past)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("end of the file",))


def test_l2_entry_data_offset_misaligned(img: Path) -> None:
    entry = corpus.l2_entry_offset(img, 1 << 20)
    corpus.put_u64(img, entry, corpus.get_u64(img, entry) + 0x200)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img)
    check_corrupt(info.value, offset=entry, words=("aligned",))


def test_l2_entry_zero_flag_on_v2_image(img_v2: Path) -> None:
    entry = corpus.l2_entry_offset(img_v2, 1 << 20)
    corpus.put_u64(img_v2, entry, corpus.get_u64(img_v2, entry) | corpus.L2_ZERO)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_v2)
    check_corrupt(info.value, offset=entry)


def test_l2_entry_data_cluster_partly_past_eof_reads_like_qemu(tmp_path: Path) -> None:
    # A data cluster that starts inside the file but ends past its end: QEMU reads zeros for
    # the missing part (and `qemu-img check` finds no error), so this is not a refusal rule.
    path = make(tmp_path, writes=(Write(0x22, 1 << 20, CLUSTER),))
    last = corpus.file_size(path) - CLUSTER
    assert corpus.read_at(path, last, 4) == b"\x22" * 4
    os.truncate(path, last + CLUSTER // 2)
    expected = corpus.qemu_content(path, tmp_path / "out.raw")
    assert expected[1 << 20 : (1 << 20) + CLUSTER] == b"\x22" * (CLUSTER // 2) + bytes(CLUSTER // 2)
    assert open_and_read(path) == expected


# --- compressed clusters -----------------------------------------------------------------------------


@pytest.fixture
def img_compressed(tmp_path: Path) -> Path:
    writes = (Write(0x44, 0, CLUSTER, compressed=True), Write(0x55, 2 * CLUSTER, CLUSTER, compressed=True))
    return make(tmp_path, writes=writes)


def test_compressed_descriptor_past_eof(img_compressed: Path) -> None:
    h = corpus.header(img_compressed)
    entry = corpus.l2_entry_offset(img_compressed, 0)
    past = corpus.file_size(img_compressed) + 4096
    corpus.put_u64(img_compressed, entry, corpus.compressed_descriptor(h.cluster_bits, past, 100))
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_compressed)
    check_corrupt(info.value, offset=entry, words=("end of the file",))


@pytest.mark.parametrize("factor", [2, 64])
def test_compressed_data_larger_than_a_cluster(img_compressed: Path, factor: int) -> None:
    stream = corpus.raw_deflate(b"\x66" * (factor * CLUSTER))
    entry, host = corpus.append_compressed(img_compressed, 0, stream)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_compressed)
    check_corrupt(info.value, words=("more than a cluster",))
    assert info.value.offset in (entry, host)


def test_compressed_data_smaller_than_a_cluster(img_compressed: Path) -> None:
    stream = corpus.raw_deflate(b"\x66" * (CLUSTER // 2))
    corpus.append_compressed(img_compressed, 0, stream)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_compressed)
    check_corrupt(info.value, words=("decompress",))


@pytest.mark.parametrize("garbage", [b"\xff" * 600, bytes(range(256)) * 3, b"\x00" * 4])
def test_compressed_garbage(img_compressed: Path, garbage: bytes) -> None:
    corpus.append_compressed(img_compressed, 0, garbage)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_compressed)
    check_corrupt(info.value, words=("compressed",))


def test_compressed_stream_of_exactly_a_cluster_reads(img_compressed: Path) -> None:
    # Control for the two tests above: a hand-made stream of one cluster decompresses.
    stream = corpus.raw_deflate(b"\x66" * CLUSTER)
    corpus.append_compressed(img_compressed, 0, stream)
    data = open_and_read(img_compressed)
    assert data[:CLUSTER] == b"\x66" * CLUSTER
    assert data[2 * CLUSTER : 3 * CLUSTER] == b"\x55" * CLUSTER


@pytest.fixture
def img_zstd(tmp_path: Path) -> Path:
    path = tmp_path / "zstd.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", path, str(SIZE))
    corpus.apply_writes(
        path, (Write(0x44, 0, CLUSTER, compressed=True), Write(0x55, 2 * CLUSTER, CLUSTER, compressed=True))
    )
    return path


def test_control_zstd_image_reads_like_qemu(img_zstd: Path, tmp_path: Path) -> None:
    assert open_and_read(img_zstd) == corpus.qemu_content(img_zstd, tmp_path / "out.raw")


def test_zstd_cluster_of_two_frames_reads_like_qemu(img_zstd: Path, tmp_path: Path) -> None:
    # QEMU decompresses consecutive zstd frames until it has a cluster.
    stream = zstd.compress(b"\x66" * (CLUSTER // 2)) + zstd.compress(b"\x67" * (CLUSTER // 2))
    corpus.append_compressed(img_zstd, 0, stream)
    expected = corpus.qemu_content(img_zstd, tmp_path / "out.raw")
    assert expected[:CLUSTER] == b"\x66" * (CLUSTER // 2) + b"\x67" * (CLUSTER // 2)
    assert open_and_read(img_zstd) == expected


@pytest.mark.parametrize("factor", [2, 64])
def test_zstd_data_larger_than_a_cluster(img_zstd: Path, factor: int) -> None:
    entry, host = corpus.append_compressed(img_zstd, 0, zstd.compress(b"\x66" * (factor * CLUSTER)))
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_zstd)
    check_corrupt(info.value, words=("more than a cluster",))
    assert info.value.offset in (entry, host)


def test_zstd_data_smaller_than_a_cluster(img_zstd: Path) -> None:
    corpus.append_compressed(img_zstd, 0, zstd.compress(b"\x66" * (CLUSTER // 2)))
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_zstd)
    check_corrupt(info.value, words=("decompress",))


@pytest.mark.parametrize(
    "garbage",
    [b"\xff" * 600, b"\x28\xb5\x2f\xfd" + b"\xff" * 100, b"\x28\xb5\x2f\xfd\x00"],
    ids=["no-magic", "bad-frame", "truncated-frame"],
)
def test_zstd_garbage(img_zstd: Path, garbage: bytes) -> None:
    corpus.append_compressed(img_zstd, 0, garbage)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(img_zstd)
    check_corrupt(info.value, words=("compressed",))


def test_compressed_cluster_with_subcluster_bitmap(tmp_path: Path) -> None:
    path = make(tmp_path, extended_l2=True, writes=(Write(0x44, 0, CLUSTER, compressed=True),))
    entry = corpus.l2_entry_offset(path, 0)
    assert corpus.get_u64(path, entry) & corpus.L2_COMPRESSED
    corpus.put_u64(path, entry + 8, 1)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value)
    assert info.value.offset in (entry, entry + 8)


# --- extended L2 entries -----------------------------------------------------------------------------


@pytest.mark.parametrize("subcluster", [0, 5, 31])
def test_extended_l2_subcluster_allocated_and_zero(tmp_path: Path, subcluster: int) -> None:
    path = make(tmp_path, extended_l2=True)
    entry = corpus.l2_entry_offset(path, 0)
    bitmap = corpus.get_u64(path, entry + 8)
    assert bitmap & 0xFFFFFFFF == 0xFFFFFFFF
    corpus.put_u64(path, entry + 8, bitmap | 1 << (32 + subcluster))
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value)
    assert info.value.offset in (entry, entry + 8)


def test_extended_l2_allocated_subcluster_without_host_offset(tmp_path: Path) -> None:
    path = make(tmp_path, extended_l2=True)
    entry = corpus.l2_entry_offset(path, 1 << 20)
    corpus.put_u64(path, entry, 0)
    corpus.put_u64(path, entry + 8, 1)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value)
    assert info.value.offset in (entry, entry + 8)


def test_extended_l2_entry_past_eof(tmp_path: Path) -> None:
    path = make(tmp_path, extended_l2=True)
    entry = corpus.l2_entry_offset(path, 1 << 20)
    corpus.put_u64(path, entry, corpus.L2_COPIED | 1 << 40)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value, offset=entry)


# --- header extensions and the backing file name --------------------------------------------------


@pytest.fixture
def img_backed(tmp_path: Path) -> Path:
    make(tmp_path, "base.qcow2")
    return corpus.create(tmp_path / "top.qcow2", SIZE, backing="base.qcow2")


def test_control_backed_image_reads(img_backed: Path) -> None:
    assert open_and_read(img_backed) == EXPECTED


@pytest.mark.parametrize("length", [1024, 4096, 0xFFFFFFFF])
def test_backing_file_name_too_long(img_backed: Path, length: int) -> None:
    corpus.put_u32(img_backed, corpus.OFF_BACKING_FILE_SIZE, length)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, offset=corpus.OFF_BACKING_FILE_SIZE, words=("backing file name",))


@pytest.mark.parametrize("offset", [CLUSTER, CLUSTER + 0x10, 1 << 40, 0xFFFF_FFFF_FFFF_FFF0])
def test_backing_file_offset_past_the_header_cluster(img_backed: Path, offset: int) -> None:
    corpus.put_u64(img_backed, corpus.OFF_BACKING_FILE_OFFSET, offset)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, offset=corpus.OFF_BACKING_FILE_OFFSET, words=("backing file name",))


def test_backing_file_name_straddles_the_header_cluster(img_backed: Path) -> None:
    name = corpus.backing_file_name(img_backed)
    assert name is not None
    corpus.patch(img_backed, CLUSTER - 4, name)
    corpus.put_u64(img_backed, corpus.OFF_BACKING_FILE_OFFSET, CLUSTER - 4)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, offset=corpus.OFF_BACKING_FILE_OFFSET)


def test_backing_file_name_inside_the_header(img_backed: Path) -> None:
    corpus.put_u64(img_backed, corpus.OFF_BACKING_FILE_OFFSET, 16)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, offset=corpus.OFF_BACKING_FILE_OFFSET)


@pytest.mark.parametrize("length", [CLUSTER, CLUSTER - 0x70, 0xFFFFFFF0])
def test_header_extension_runs_past_the_header_cluster(img: Path, length: int) -> None:
    first = corpus.extensions(img)[0][0]
    corpus.put_u32(img, first.offset + 4, length)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=first.offset, words=("extension", "header cluster"))


def test_last_header_extension_runs_past_the_header_cluster(img: Path) -> None:
    # An unknown extension in place of the end marker, one byte too long for the cluster.
    _, end = corpus.extensions(img)
    corpus.put_u32(img, end, 0x12345678)
    corpus.put_u32(img, end + 4, CLUSTER - end - 8 + 1)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=end, words=("extension",))


def test_header_extension_overlaps_the_backing_file_name(img_backed: Path) -> None:
    exts, end = corpus.extensions(img_backed)
    h = corpus.header(img_backed)
    assert h.backing_file_offset == end + 8
    last = exts[-1]
    # Make the last extension long enough to cover the end marker and the name.
    corpus.put_u32(img_backed, last.offset + 4, len(last.data) + 16)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, offset=last.offset, words=("extension", "backing file name"))


def test_backing_file_name_inside_the_extension_area(img_backed: Path) -> None:
    # Point the name into the middle of the feature name table: the extension that follows
    # the start of the name then runs past it.
    table = corpus.extension(img_backed, corpus.EXT_FEATURE_TABLE)
    corpus.put_u64(img_backed, corpus.OFF_BACKING_FILE_OFFSET, table.offset + 8 + 48)
    corpus.put_u32(img_backed, corpus.OFF_BACKING_FILE_SIZE, 8)
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, words=("backing file name",))


def test_feature_table_length_not_a_multiple_of_48(img: Path) -> None:
    table = corpus.extension(img, corpus.EXT_FEATURE_TABLE)
    corpus.put_u32(img, table.offset + 4, len(table.data) - 8)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=table.offset)


def test_duplicate_backing_format_extension(img_backed: Path) -> None:
    exts, _ = corpus.extensions(img_backed)
    fmt = corpus.extension(img_backed, corpus.EXT_BACKING_FORMAT)
    corpus.rewrite_extensions(img_backed, [(fmt.type, b"raw"), *((e.type, e.data) for e in exts)])
    with pytest.raises(CorruptImageError) as info:
        open_image(img_backed, open_backing=False)
    check_corrupt(info.value, words=("twice",))


@pytest.mark.parametrize("name", [b"a\0b.qcow2", b"\xff\xfe.qcow2"])
def test_backing_file_name_not_a_clean_string(img_backed: Path, name: bytes) -> None:
    corpus.set_backing_file_name(img_backed, name)
    with pytest.raises((CorruptImageError, ImplicitOpenDeniedError)):
        open_image(img_backed)


# --- backing chains and names --------------------------------------------------------------------------


def test_backing_loop_self(tmp_path: Path) -> None:
    path = corpus.create(tmp_path / "a.qcow2", SIZE, backing="a.qcow2", unsafe=True)
    with pytest.raises(BackingChainError) as info:
        open_image(path)
    assert "a.qcow2" in str(info.value)


def test_backing_loop_self_through_other_spelling(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = corpus.create(tmp_path / "a.qcow2", SIZE, backing="sub/../a.qcow2", unsafe=True)
    with pytest.raises(BackingChainError):
        open_image(path)


def test_backing_loop_self_through_symlink(tmp_path: Path) -> None:
    os.symlink("a.qcow2", tmp_path / "link.qcow2")
    path = corpus.create(tmp_path / "a.qcow2", SIZE, backing="link.qcow2", unsafe=True)
    with pytest.raises(BackingChainError):
        open_image(path)


def test_backing_loop_two_images(tmp_path: Path) -> None:
    a = corpus.create(tmp_path / "a.qcow2", SIZE, backing="b.qcow2", unsafe=True)
    corpus.create(tmp_path / "b.qcow2", SIZE, backing="a.qcow2", unsafe=True)
    with pytest.raises(BackingChainError) as info:
        open_image(a)
    assert "a.qcow2" in str(info.value)


def test_backing_loop_three_images_entered_midway(tmp_path: Path) -> None:
    corpus.create(tmp_path / "top.qcow2", SIZE, backing="a.qcow2", unsafe=True)
    corpus.create(tmp_path / "a.qcow2", SIZE, backing="b.qcow2", unsafe=True)
    corpus.create(tmp_path / "b.qcow2", SIZE, backing="c.qcow2", unsafe=True)
    corpus.create(tmp_path / "c.qcow2", SIZE, backing="a.qcow2", unsafe=True)
    with pytest.raises(BackingChainError):
        open_image(tmp_path / "top.qcow2")


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """70 tiny images, img00 at the bottom (with data), each backed by the one before."""
    directory = tmp_path_factory.mktemp("chain")
    paths = [make(directory, "img00.qcow2", size=1 << 20, writes=(Write(0x77, 0, 4096),))]
    for i in range(1, 70):
        paths.append(corpus.create(directory / f"img{i:02}.qcow2", 1 << 20, backing=paths[-1].name, unsafe=True))
    return paths


def test_backing_chain_deeper_than_the_limit(deep_chain: list[Path]) -> None:
    with pytest.raises(BackingChainError) as info:
        open_image(deep_chain[-1])
    assert str(imago.MAX_CHAIN_DEPTH) in str(info.value)


def test_backing_chain_one_deeper_than_the_limit(deep_chain: list[Path]) -> None:
    # MAX_CHAIN_DEPTH + 1 images: the bottom one is one too many.
    with pytest.raises(BackingChainError):
        open_image(deep_chain[imago.MAX_CHAIN_DEPTH])


def test_backing_chain_at_the_limit_reads(deep_chain: list[Path]) -> None:
    disk = open_image(deep_chain[imago.MAX_CHAIN_DEPTH - 1])
    try:
        buf = bytearray(8192)
        disk.read(buf, 0)
        assert buf == b"\x77" * 4096 + bytes(4096)
    finally:
        disk.close()


@pytest.mark.parametrize(
    "name",
    [
        'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/etc/passwd"}}',
        "nbd://x",
        "nbd:localhost:10809",
        "file:foo",
        "file:/etc/passwd",
        "http://example.com/disk.qcow2",
        "ssh://host/disk",
    ],
)
def test_backing_name_not_a_local_file(tmp_path: Path, name: str) -> None:
    path = corpus.create(tmp_path / "img.qcow2", SIZE, backing=name, unsafe=True)
    assert corpus.backing_file_name(path) == name.encode()
    with pytest.raises(ImplicitOpenDeniedError) as info:
        open_image(path, gate=PermissiveImplicitOpenGate())
    assert name in str(info.value)


def test_backing_name_without_format_is_not_a_local_file(tmp_path: Path) -> None:
    path = corpus.create(tmp_path / "img.qcow2", SIZE)
    corpus.set_backing_file_name(path, b"nbd://x")
    with pytest.raises(LookupError):
        corpus.extension(path, corpus.EXT_BACKING_FORMAT)
    with pytest.raises(ImplicitOpenDeniedError):
        open_image(path)


def test_backing_refused_by_deny_gate(img_backed: Path) -> None:
    storage = corpus.open_storage(img_backed)
    try:
        with pytest.raises(ImplicitOpenDeniedError) as info:
            Qcow2.builder(storage).open_sync(DenyImplicitOpenGate())
    finally:
        imago.runtime.run_sync(storage.close())
    assert "base.qcow2" in str(info.value)


@pytest.mark.parametrize("fmt", [b"vmdk-nonexistent", b"file", b""])
def test_unknown_backing_format(img_backed: Path, fmt: bytes) -> None:
    exts, _ = corpus.extensions(img_backed)
    corpus.rewrite_extensions(
        img_backed, [(e.type, fmt if e.type == corpus.EXT_BACKING_FORMAT else e.data) for e in exts]
    )
    with pytest.raises(ImagoError):
        open_image(img_backed)


@pytest.mark.parametrize("name", ["../outside.qcow2", "{outside}", "sub/../../outside.qcow2", "link.qcow2"])
def test_sandbox_gate_refuses_backing_outside(tmp_path: Path, name: str) -> None:
    outside = make(tmp_path, "outside.qcow2")
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "sub").mkdir()
    os.symlink(outside, inside / "link.qcow2")
    path = corpus.create(inside / "img.qcow2", SIZE, backing=name.format(outside=outside), unsafe=True)
    storage = corpus.open_storage(path)
    try:
        with pytest.raises(ImplicitOpenDeniedError) as info:
            Qcow2.builder(storage).open_sync(imago.SandboxImplicitOpenGate([inside]))
    finally:
        imago.runtime.run_sync(storage.close())
    assert "outside" in str(info.value)


def test_sandbox_gate_refuses_data_file_outside(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    path = inside / "img.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", path, str(SIZE))
    storage = corpus.open_storage(path)
    try:
        with pytest.raises(ImplicitOpenDeniedError):
            Qcow2.builder(storage).open_sync(imago.SandboxImplicitOpenGate([inside]))
    finally:
        imago.runtime.run_sync(storage.close())


def test_missing_backing_file_is_an_os_error(img_backed: Path) -> None:
    os.unlink(img_backed.parent / "base.qcow2")
    with pytest.raises(FileNotFoundError):
        open_image(img_backed)


# --- external data file ------------------------------------------------------------------------------


def test_external_data_file_bit_without_name(img: Path) -> None:
    corpus.set_incompatible(img, corpus.INCOMPAT_DATA_FILE)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, words=("data file",))


def test_external_data_file_name_not_a_local_file(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    path = tmp_path / "img.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", path, str(SIZE))
    exts, _ = corpus.extensions(path)
    corpus.rewrite_extensions(path, [(e.type, b"nbd://x" if e.type == corpus.EXT_DATA_FILE else e.data) for e in exts])
    with pytest.raises(ImplicitOpenDeniedError):
        open_image(path)


def test_external_data_file_name_without_its_bit(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    path = tmp_path / "img.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", path, str(SIZE))
    put = corpus.get_u64(path, corpus.OFF_INCOMPATIBLE_FEATURES) & ~corpus.INCOMPAT_DATA_FILE
    corpus.put_u64(path, corpus.OFF_INCOMPATIBLE_FEATURES, put)
    with pytest.raises(CorruptImageError):
        open_image(path)


def test_control_external_data_file_reads(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    path = tmp_path / "img.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", path, str(SIZE))
    corpus.apply_writes(path, WRITES)
    assert open_and_read(path) == EXPECTED


def test_compressed_cluster_in_external_data_file_image(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    path = tmp_path / "img.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", path, str(SIZE))
    corpus.apply_writes(path, WRITES)
    # A valid stream, in both files at the same offset: only the rule can refuse it.
    stream = corpus.raw_deflate(b"\x66" * CLUSTER)
    entry, host = corpus.append_compressed(path, 0, stream)
    corpus.patch(data, host, stream)
    with pytest.raises(CorruptImageError) as info:
        open_and_read(path)
    check_corrupt(info.value, offset=entry, words=("compressed",))


# --- resource safety: crafted tiny files in a child with a capped address space ------------------------

GiB = 1 << 30


def _tiny_images() -> Iterator[tuple[str, bytes, tuple[str, ...]]]:
    """``(id, file content, acceptable error class names)``; an empty tuple means "may open"."""
    corrupt = ("CorruptImageError",)
    yield "empty", b"", corrupt
    yield "100-bytes", corpus.craft_header(file_length=100), corrupt
    yield "v2-truncated", corpus.craft_header(version=2, file_length=50), corrupt
    yield "l1-size-max", corpus.craft_header(l1_size=0xFFFFFFFF, size=1 << 61), corrupt
    yield "l1-size-max-size-max", corpus.craft_header(l1_size=0xFFFFFFFF, size=(1 << 64) - 1), corrupt
    yield "l1-32MiB-past-eof", corpus.craft_header(l1_size=1 << 22, size=1 << 51), corrupt
    yield (
        "l1-32MiB-512b-clusters",
        corpus.craft_header(
            cluster_bits=9, l1_size=1 << 22, size=1 << 34, l1_table_offset=512, refcount_table_offset=512
        ),
        corrupt,
    )
    yield "refcount-clusters-max", corpus.craft_header(refcount_table_clusters=0xFFFFFFFF), corrupt
    yield "refcount-8MiB-past-eof", corpus.craft_header(refcount_table_clusters=128), corrupt
    yield (
        "refcount-2MiB-clusters-max",
        corpus.craft_header(cluster_bits=21, refcount_table_clusters=0xFFFFFFFF, refcount_table_offset=1 << 21),
        corrupt,
    )
    yield "snapshots-max", corpus.craft_header(nb_snapshots=0xFFFFFFFF, snapshots_offset=0x10000), corrupt
    yield (
        "snapshots-65536-past-eof",
        corpus.craft_header(
            cluster_bits=9, nb_snapshots=65536, snapshots_offset=512, l1_table_offset=512, refcount_table_offset=512
        ),
        corrupt,
    )
    yield "header-length-max", corpus.craft_header(header_length=0xFFFFFFF8), corrupt
    yield "cluster-bits-max", corpus.craft_header(cluster_bits=0xFFFFFFFF), corrupt
    yield "cluster-bits-63", corpus.craft_header(cluster_bits=63), corrupt
    yield (
        "extension-length-max",
        corpus.craft_header(tail=struct.pack(">II", 0x12345678, 0xFFFFFFF0)),
        corrupt,
    )
    yield (
        "backing-size-max",
        corpus.craft_header(backing_file_offset=0x200, backing_file_size=0xFFFFFFFF),
        corrupt,
    )
    yield "size-max-l1-0", corpus.craft_header(size=(1 << 64) - 1, l1_size=0), corrupt


@pytest.mark.parametrize(("content", "errors"), [pytest.param(c, e, id=i) for i, c, e in _tiny_images()])
def test_tiny_crafted_file_is_refused_without_allocating(
    tmp_path: Path, content: bytes, errors: tuple[str, ...]
) -> None:
    path = tmp_path / "tiny.qcow2"
    path.write_bytes(content)
    result = corpus.open_limited(path, address_space=GiB, timeout=60)
    assert result["outcome"] == "error", result
    assert result["imago"], result
    assert result["type"] in errors, result


def _sparse_snapshot_bomb(path: Path) -> None:
    """65536 snapshots, each with a valid 32 MiB L1 table (all the same one, in a sparse file)."""
    cluster = 1 << 16
    l1_entries = (32 << 20) // 8
    l1_offset = 4 << 20
    entry = bytearray(struct.pack(">QIHHIIQII", l1_offset, l1_entries, 1, 1, 0, 0, 0, 0, 16))
    entry += struct.pack(">QQ", 0, 1 << 20)  # extra data: vm state size, disk size
    table = bytearray()
    for i in range(65536):
        ident = f"{i:x}".encode()
        raw = bytearray(entry)
        struct.pack_into(">H", raw, 12, len(ident))
        raw += ident + b"s"
        raw += bytes(-len(raw) % 8)
        table += raw
    snapshots_offset = corpus.align_up(l1_offset + l1_entries * 8, cluster)
    header = corpus.craft_header(
        size=1 << 20,
        l1_size=1,
        l1_table_offset=1 * cluster,
        refcount_table_offset=2 * cluster,
        nb_snapshots=65536,
        snapshots_offset=snapshots_offset,
        file_length=cluster,
    )
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(snapshots_offset)
        f.seek(snapshots_offset)
        f.write(table)


def test_snapshot_bomb_in_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.qcow2"
    _sparse_snapshot_bomb(path)
    result = corpus.open_limited(path, address_space=GiB, timeout=120)
    # Everything here is within QEMU's limits: opening must work without loading all L1 tables.
    assert result["outcome"] == "ok" or (result["imago"] and result["type"] == "CorruptImageError"), result
    assert result["outcome"] == "ok", result


def test_compressed_bomb_with_2mib_clusters(tmp_path: Path) -> None:
    """A 2 MiB-cluster image whose compressed cluster inflates to ~4 GiB of zeros."""
    path = corpus.create(tmp_path / "bomb.qcow2", 8 << 20, cluster_size=2 << 20)
    corpus.apply_writes(path, [Write(0x11, 0, 2 << 20, compressed=True)])
    # Nearly 4 MiB of deflate stream (the 13-bit sector count of 2 MiB clusters allows 4 MiB):
    # one block of zeros repeated, each decoding to 1 MiB (it refers only to earlier zeros).
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    repeat = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    stream = bytearray(first)
    while len(stream) + len(repeat) < (4 << 20) - 512:
        stream += repeat
    # The stream is what it claims: 1 MiB of zeros per block.
    assert zlib.decompressobj(-15).decompress(bytes(stream[: len(first) + 8 * len(repeat)])) == bytes(9 << 20)
    corpus.append_compressed(path, 0, bytes(stream))
    result = corpus.open_limited(path, address_space=GiB, timeout=120)
    assert result["outcome"] == "error", result
    assert result["type"] == "CorruptImageError", result


def test_zstd_bomb_with_2mib_clusters(tmp_path: Path) -> None:
    """A 2 MiB-cluster zstd image whose compressed cluster inflates to 8 GiB of zeros."""
    path = tmp_path / "bomb.qcow2"
    corpus.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=2M,compression_type=zstd", path, str(8 << 20))
    corpus.apply_writes(path, [Write(0x11, 0, 2 << 20, compressed=True)])
    compressor = zstd.ZstdCompressor()
    chunk = bytes(64 << 20)
    stream = b"".join(compressor.compress(chunk) for _ in range(128)) + compressor.flush()
    assert len(stream) < 4 << 20
    corpus.append_compressed(path, 0, stream)
    result = corpus.open_limited(path, address_space=GiB, timeout=120)
    assert result["outcome"] == "error", result
    assert result["type"] == "CorruptImageError", result


def test_large_valid_l1_table_opens_under_the_cap(tmp_path: Path) -> None:
    # The largest legal L1 table (32 MiB, in a sparse file) must open under a 1 GiB cap.
    path = tmp_path / "big-l1.qcow2"
    cluster = 1 << 16
    l1_entries = (32 << 20) // 8
    header = corpus.craft_header(
        size=l1_entries * (cluster // 8) * cluster,
        l1_size=l1_entries,
        l1_table_offset=2 * cluster,
        refcount_table_offset=1 * cluster,
        file_length=cluster,
    )
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(2 * cluster + l1_entries * 8)
    result = corpus.open_limited(path, address_space=GiB, timeout=120)
    assert result["outcome"] == "ok", result


# --- rules aligned with QEMU's ------------------------------------------------------------------


def test_refcount_table_of_zero_clusters(img: Path) -> None:
    corpus.put_u32(img, corpus.OFF_REFCOUNT_TABLE_CLUSTERS, 0)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_REFCOUNT_TABLE_CLUSTERS, words=("refcount table",))


def test_misaligned_snapshot_table_offset_without_snapshots(img: Path) -> None:
    assert corpus.header(img).nb_snapshots == 0
    corpus.put_u64(img, corpus.OFF_SNAPSHOTS_OFFSET, 0x10200)
    with pytest.raises(CorruptImageError) as info:
        open_image(img)
    check_corrupt(info.value, offset=corpus.OFF_SNAPSHOTS_OFFSET, words=("snapshot", "aligned"))


def test_backing_file_name_of_length_zero_means_no_backing(img_backed: Path) -> None:
    corpus.put_u32(img_backed, corpus.OFF_BACKING_FILE_SIZE, 0)
    image = Qcow2.builder_path(img_backed).open_sync(PermissiveImplicitOpenGate())
    assert image.implicit_backing_file is None
    assert image.backing is None
    SyncFormatAccess(image).close()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (lambda entry: entry | 0x1, ("reserved",)),
        (lambda entry: entry + 0x200, ("aligned",)),
        (lambda entry: 1 << 40, ("end of the file",)),
    ],
    ids=["reserved-bits", "misaligned", "past-eof"],
)
def test_bad_refcount_table_entry(img: Path, value: Any, words: tuple[str, ...]) -> None:
    table = corpus.header(img).refcount_table_offset
    entry = corpus.get_u64(img, table)
    assert entry
    corpus.put_u64(img, table, value(entry))
    image = Qcow2.builder_path(img).open_sync(PermissiveImplicitOpenGate())
    assert open_and_read(img) == EXPECTED  # reading needs no refcounts
    with pytest.raises(CorruptImageError) as info:
        imago.runtime.run_sync(image.refcount(0))
    check_corrupt(info.value, offset=table, words=words)
    SyncFormatAccess(image).close()


def test_an_l1_table_of_garbage_is_read_in_one_pass(tmp_path: Path) -> None:
    """Found by the mutation test: l1_size raised to 31195 over an extended-L2 image, so the L1
    table ran over other clusters. Every bad entry restarted the walk, and each kept its error
    (and that walk's arrays) alive: hours and gigabytes. Now one pass records every bad entry."""
    path = tmp_path / "garbage-l1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(path), "1M"], check=True)
    entries = 40_000
    with open(path, "r+b") as f:
        header = f.read(48)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(36)
        f.write(struct.pack(">I", entries))
        f.seek(l1_offset)
        # Entries with reserved bits, unaligned ones and ones past the end of the file, mixed.
        pattern = [1 << 62 | 1, 0x10200, 1 << 50]
        f.write(b"".join(struct.pack(">Q", pattern[i % 3]) for i in range(entries)))
    with imago.open(path, "qcow2") as disk, pytest.raises(CorruptImageError, match="L1 entry 0"):
        disk.read(bytearray(4096), 0)  # damaged entries stay unusable
    with imago.open(path, "qcow2", write=True) as disk, pytest.raises(ImagoError):
        disk.write(b"x" * 4096, 0)  # open for a repair only
