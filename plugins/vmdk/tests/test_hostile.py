"""Hostile VMDK images: refused with an ImagoError naming the file and what is wrong, in bounded work.

Each image is built by hand (``_vmdk.craft_*``); opening or reading it must raise an
``ImagoError`` subclass, never an unrelated exception, and never read or hold more than the
bounds the driver promises (a grain of output per compressed grain, the memory budget for the
grain directory).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

import imago
from imago import (
    BackingChainError,
    CorruptImageError,
    ImagoError,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
    ResourceLimitError,
    SandboxImplicitOpenGate,
    UnsupportedFeatureError,
)
from imago_vmdk import Vmdk

from ._vmdk import SECTOR, MiB, craft_cowd, craft_sparse, craft_stream, descriptor_text, open_vmdk

GRAIN = 64 * 1024
ROUNDS = 120


def _read_everything(path: Path, **options: object) -> None:
    access = open_vmdk(path, **options)
    try:
        buf = bytearray(access.size)
        access.read(buf, 0)
    finally:
        access.close()


def _descriptor(tmp_path: Path, *extents: str, create_type: str = "monolithicFlat", **kw: object) -> Path:
    path = tmp_path / "d.vmdk"
    path.write_text(descriptor_text(list(extents), create_type=create_type, **kw))  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../outside.img", "'..'"),
        ("sub/../../outside.img", "'..'"),
        ("/etc/passwd", "absolute"),
        ("json:{}", "protocol"),
        ("nbd://evil.example/export", "protocol"),
        ("http:x", "protocol"),
    ],
)
def test_extent_names_outside_the_directory(tmp_path: Path, name: str, reason: str) -> None:
    (tmp_path.parent / "outside.img").write_bytes(bytes(SECTOR * 8))
    path = _descriptor(tmp_path, f'RW 8 FLAT "{name}" 0')
    with pytest.raises(ImplicitOpenDeniedError) as caught:
        open_vmdk(path)  # (even the permissive gate: the name itself is refused)
    message = str(caught.value)
    assert reason in message
    assert "line 8 of the descriptor" in message
    assert str(path) in message
    assert caught.value.allowable is False


def test_nul_in_an_extent_name(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    text = descriptor_text(['RW 8 FLAT "a\0/../../etc/passwd" 0'], create_type="monolithicFlat")
    path.write_bytes(text.encode())
    with pytest.raises(CorruptImageError, match="line 8 of the descriptor contains a NUL byte"):
        open_vmdk(path)
    # Text after the NUL that ends the descriptor (QEMU's CID updates leave some) is not read.
    (tmp_path / "a").write_bytes(bytes(4096))
    text = descriptor_text(['RW 8 FLAT "a" 0'], create_type="monolithicFlat")
    path.write_bytes(text.encode() + b'\0\nRW 8 FLAT "/etc/passwd" 0\n')
    access = open_vmdk(path)
    assert access.size == 4096
    access.close()


def test_gate_refusal_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(4096))
    path = _descriptor(tmp_path, 'RW 8 FLAT "x-flat.vmdk" 0')
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ImplicitOpenDeniedError, match="line 8 of the descriptor"):
        imago.open(path, "vmdk", gate=SandboxImplicitOpenGate([other]))  # (the descriptor: an explicit open)
    # The CLI's gate (the image's directory) opens it.
    with imago.open(path, "vmdk") as disk:
        assert disk.size == 4096


@pytest.mark.parametrize(
    ("line", "error", "match"),
    [
        ('RW 8 VMFSRDM "dev.vmdk"', UnsupportedFeatureError, "VMFSRDM extents"),
        ('RW 8 VMFSRAW "dev.vmdk"', UnsupportedFeatureError, "VMFSRAW extents"),
        ('RW 8 FLOPPY "x.vmdk"', CorruptImageError, "unknown extent type"),
        ('RW -8 FLAT "x.vmdk" 0', CorruptImageError, "positive number of sectors"),
        ('RW 0 FLAT "x.vmdk" 0', CorruptImageError, "positive number of sectors"),
        ('RW 8 FLAT "x.vmdk"', CorruptImageError, "start sector"),
        ('RW 8 SPARSE "x.vmdk" 5', CorruptImageError, "only FLAT extents"),
        ("RW 8 FLAT x.vmdk 0", CorruptImageError, "invalid extent line"),
        ('RW 8 ZERO "x.vmdk"', CorruptImageError, "names no file"),
    ],
)
def test_bad_extent_lines(tmp_path: Path, line: str, error: type[ImagoError], match: str) -> None:
    with pytest.raises(error, match=match):
        open_vmdk(_descriptor(tmp_path, line))


def test_descriptor_over_1_mib(tmp_path: Path) -> None:
    path = tmp_path / "big.vmdk"
    text = descriptor_text(['RW 8 FLAT "x" 0'], create_type="monolithicFlat")
    path.write_bytes(text.encode() + b"#" * (1 << 20))
    with pytest.raises(CorruptImageError, match="more than 1048576"):
        open_vmdk(path)


def test_unsupported_create_types_and_missing_facts(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFeatureError, match="vmfsRDM"):
        open_vmdk(_descriptor(tmp_path, 'RW 8 FLAT "x" 0', create_type="vmfsRDM"))
    path = tmp_path / "nocid.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x" 0\n')
    with pytest.raises(CorruptImageError, match="no CID"):
        open_vmdk(path)
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=zz\nparentCID=ffffffff\ncreateType="vmfs"\n')
    with pytest.raises(CorruptImageError, match="CID must be a 32-bit hex number"):
        open_vmdk(path)
    with pytest.raises(CorruptImageError, match="lists no extents"):
        open_vmdk(_descriptor(tmp_path, create_type="vmfs"))


def test_extent_sizes_that_do_not_add_up(tmp_path: Path) -> None:
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(8 * SECTOR))
    with pytest.raises(CorruptImageError, match="longer than its file"):
        open_vmdk(_descriptor(tmp_path, 'RW 8 FLAT "x-flat.vmdk" 1'))
    craft_sparse(tmp_path / "s.vmdk", MiB, {0: b"a"})
    with pytest.raises(CorruptImageError, match="differs from its size in the descriptor"):
        open_vmdk(_descriptor(tmp_path, 'RW 4096 SPARSE "s.vmdk"', create_type="twoGbMaxExtentSparse"))
    (tmp_path / "n.vmdk").write_bytes(b"not a sparse extent" * 100)
    with pytest.raises(CorruptImageError, match="not a sparse extent"):
        open_vmdk(_descriptor(tmp_path, 'RW 8 SPARSE "n.vmdk"', create_type="twoGbMaxExtentSparse"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"gtes": 513}, "513 entries per grain table"),
        ({"gtes": 0}, "0 entries per grain table"),
        ({"grain": 0}, "invalid grain size of 0 sectors"),
        ({"grain": 0x200001}, "invalid grain size"),
        ({"version": 4}, "version 4"),
        ({"compress": 2}, "compression algorithm 2"),
        ({"gd": 1 << 40}, "grain directory .* past the end of the file"),
        ({"overhead": 1 << 30}, "truncated"),
        ({"desc_size": 4096}, "more than 1048576 bytes"),
    ],
)
def test_bad_sparse_headers(tmp_path: Path, overrides: dict[str, int], match: str) -> None:
    path = tmp_path / "s.vmdk"
    craft_sparse(path, MiB, {0: b"a"}, header_overrides=overrides)
    with pytest.raises(ImagoError, match=match):
        _read_everything(path)


def test_capacity_needing_too_many_directory_entries(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    craft_sparse(path, MiB, {}, header_overrides={"capacity": (32 << 20) + 1, "grain": 1, "gtes": 1})
    with pytest.raises(CorruptImageError, match="more than 33554432"):
        open_vmdk(path)


def test_grain_directory_charged_to_the_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    craft_sparse(path, MiB, {}, header_overrides={"capacity": 8192 * 2048})  # 2048 directory entries
    with path.open("r+b") as f:
        f.truncate(16 * MiB)  # (sparse: the directory lies inside the file)
    with pytest.raises(ResourceLimitError, match="grain directory"):
        Vmdk.builder_path(path).memory_limit(4096).open_sync(PermissiveImplicitOpenGate())


def _patch_u32(path: Path, offset: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))


def _first_gt_entry_offset(path: Path) -> int:
    data = path.read_bytes()
    gd = struct.unpack_from("<Q", data, 56)[0] * SECTOR
    return struct.unpack_from("<I", data, gd)[0] * SECTOR


def test_grain_and_table_offsets_out_of_bounds(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    craft_sparse(path, MiB, {0: b"a" * 8192, 1: b"b" * 8192}, redundant=False)
    entry = _first_gt_entry_offset(path)
    _patch_u32(path, entry, 1 << 30)  # past the end of the file
    with pytest.raises(CorruptImageError, match="past the end of the file"):
        _read_everything(path)
    _patch_u32(path, entry, 2)  # into the header and tables
    with pytest.raises(CorruptImageError, match="into the extent's metadata"):
        _read_everything(path)
    size = path.stat().st_size
    _patch_u32(path, entry, size // SECTOR - 1)  # the grain starts inside the file but ends past it
    with pytest.raises(CorruptImageError, match="past the end of the file"):
        _read_everything(path)
    data = path.read_bytes()
    gd = struct.unpack_from("<Q", data, 56)[0] * SECTOR
    _patch_u32(path, gd, 1 << 28)  # a grain table past the end of the file
    with pytest.raises(CorruptImageError, match=r"grain table .* outside the file"):
        _read_everything(path)


def test_compressed_grains(tmp_path: Path) -> None:
    path = tmp_path / "c.vmdk"
    capacity = 2 * MiB
    # Inflating to more than a grain (a deflate bomb: 64 MiB of zeroes in 64 KiB of input).
    bomb = zlib.compress(bytes(64 * MiB), 9)
    assert len(bomb) <= 2 * GRAIN
    craft_stream(path, capacity, {}, raw_grains={0: (0, bomb)})
    with pytest.raises(CorruptImageError, match="inflates to more than a grain"):
        _read_everything(path)
    craft_stream(path, capacity, {}, raw_grains={1: (128, zlib.compress(bytes(GRAIN + 1)))})
    with pytest.raises(CorruptImageError, match="inflates to more than a grain"):
        _read_everything(path)
    craft_stream(path, capacity, {}, raw_grains={1: (128, zlib.compress(bytes(100)))})
    with pytest.raises(CorruptImageError, match="inflates to 100 bytes"):
        _read_everything(path)
    craft_stream(path, capacity, {}, raw_grains={1: (128, b"garbage, not zlib")})
    with pytest.raises(CorruptImageError, match="cannot be inflated"):
        _read_everything(path)
    craft_stream(path, capacity, {}, raw_grains={1: (1 << 40, zlib.compress(bytes(GRAIN)))})
    with pytest.raises(CorruptImageError, match="LBA 1099511627776"):
        _read_everything(path)
    craft_stream(path, capacity, {}, raw_grains={1: (0, zlib.compress(bytes(GRAIN)))})
    with pytest.raises(CorruptImageError, match="LBA 0 is not the grain's sector 128"):
        _read_everything(path)
    # A marker whose size is larger than two grains, or zero.
    craft_stream(path, capacity, {1: b"x" * GRAIN})
    marker = _first_gt_entry_offset_stream(path)
    with path.open("r+b") as f:
        f.seek(marker + 8)
        f.write(struct.pack("<I", 2 * GRAIN + 1))
    with pytest.raises(CorruptImageError, match="size 131073 is out of range"):
        _read_everything(path)


def _first_gt_entry_offset_stream(path: Path) -> int:
    """The host offset of the first allocated grain of a crafted stream-optimized file (its marker)."""
    data = path.read_bytes()
    footer = len(data) - 3 * SECTOR
    gd = struct.unpack_from("<Q", data, footer + SECTOR + 56)[0] * SECTOR
    gt = struct.unpack_from("<I", data, gd)[0] * SECTOR
    entries = struct.unpack_from("<512I", data, gt)
    return next(e for e in entries if e) * SECTOR


def test_footer(tmp_path: Path) -> None:
    path = tmp_path / "f.vmdk"
    craft_stream(path, 2 * MiB, {0: b"a" * GRAIN}, footer_overrides={"capacity": 8192})
    with pytest.raises(CorruptImageError, match=r"footer's capacity .* differs from the header's"):
        open_vmdk(path)
    craft_stream(path, 2 * MiB, {0: b"a" * GRAIN})
    data = bytearray(path.read_bytes())
    data[-SECTOR:] = bytes(SECTOR)
    data[-SECTOR + 12] = 7  # no end-of-stream marker after the footer
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="end-of-stream marker"):
        open_vmdk(path)
    path.write_bytes(bytes(data[:SECTOR]))
    with pytest.raises(CorruptImageError, match="too short for the footer"):
        open_vmdk(path)


def test_cowd_directory_too_small(tmp_path: Path) -> None:
    path = tmp_path / "c.vmdk"
    craft_cowd(path, 64 * MiB, {})
    _patch_u32(path, 24, 0)
    with pytest.raises(CorruptImageError, match="has 0 entries; the capacity needs 2"):
        open_vmdk(path)


def test_not_vmdk(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    path.write_bytes(b"\x01" * 4096)
    with pytest.raises(CorruptImageError, match="not a VMDK image"):
        open_vmdk(path)
    path.write_bytes(b"KDMV")
    with pytest.raises(CorruptImageError, match="shorter than a sparse header"):
        open_vmdk(path)
    path.write_bytes(b"COWD" + bytes(9))  # (a fuzz finding: struct.error)
    with pytest.raises(CorruptImageError, match="shorter than a COWD header"):
        open_vmdk(path)
    # A COWD extent file named by a descriptor, as short.
    path.write_text(descriptor_text(['RW 8 VMFSSPARSE "x-delta.vmdk"'], create_type="vmfsSparse"))
    (tmp_path / "x-delta.vmdk").write_bytes(b"COWD" + bytes(20))
    with pytest.raises(CorruptImageError, match="shorter than a COWD header"):
        open_vmdk(path)


def _chain_descriptor(path: Path, cid: int, parent_cid: int, parent: str | None) -> None:
    path.with_name(path.stem + "-flat.vmdk").write_bytes(bytes(4096))
    extents = [f'RW 8 FLAT "{path.stem}-flat.vmdk" 0']
    text = descriptor_text(extents, create_type="monolithicFlat", cid=cid, parent_cid=parent_cid, parent=parent)
    path.write_text(text)


def test_parent_loops_and_cid_mismatch(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    _chain_descriptor(a, 1, 2, "b.vmdk")
    _chain_descriptor(b, 2, 1, "a.vmdk")
    with pytest.raises(BackingChainError, match="loops"):
        open_vmdk(a)
    _chain_descriptor(b, 3, 0xFFFFFFFF, None)
    with pytest.raises(CorruptImageError, match="CID 00000003, but the image expects parentCID 00000002"):
        open_vmdk(a)
    _chain_descriptor(b, 2, 0xFFFFFFFF, None)
    access = open_vmdk(a)
    assert access.driver.backing is not None
    access.close()
    # Opened alone (qemu-img info), the parent is named and not opened.
    alone = Vmdk.builder_path(a).open_backing(False).open_sync(PermissiveImplicitOpenGate())
    assert alone.backing is None
    assert alone.info()["backing-filename"] == "b.vmdk"
    imago.SyncFormatAccess(alone).close()
    # A monolithic sparse delta (no extent file to open): the gate's refusal names the parent's role.
    c = tmp_path / "c.vmdk"
    text = descriptor_text(['RW 2048 SPARSE "c.vmdk"'], create_type="monolithicSparse", parent_cid=2, parent="b.vmdk")
    craft_sparse(c, MiB, {}, descriptor=text)
    with pytest.raises(ImplicitOpenDeniedError, match="named as the parent, parentFileNameHint, of"):
        imago.open(c, "vmdk", gate=imago.DenyImplicitOpenGate())
    with imago.open(c, "vmdk", gate=PermissiveImplicitOpenGate()) as disk:
        assert disk.access.driver.backing is not None


def test_writing_a_cowd_extent_is_refused(tmp_path: Path) -> None:
    craft_cowd(tmp_path / "c-delta.vmdk", MiB, {})
    (tmp_path / "c.vmdk").write_text(descriptor_text(['RW 2048 VMFSSPARSE "c-delta.vmdk"'], create_type="vmfsSparse"))
    with pytest.raises(UnsupportedFeatureError, match="writing vmdk images"):
        Vmdk.builder_path(tmp_path / "c.vmdk").write(True).open_sync(PermissiveImplicitOpenGate())


def test_one_file_many_extents(tmp_path: Path) -> None:
    """Extents sharing a file open it once (a descriptor cannot make us hold a descriptor per line)."""
    (tmp_path / "a-flat.vmdk").write_bytes(bytes(range(256)) * 16)
    lines = [f'RW 1 FLAT "a-flat.vmdk" {i % 8}' for i in range(5000)]
    access = open_vmdk(_descriptor(tmp_path, *lines))
    assert len(access.driver.storages()) == 2
    assert access.size == 5000 * SECTOR
    buf = bytearray(SECTOR)
    access.read(buf, 9 * SECTOR)
    assert bytes(buf) == bytes(range(256)) * 2
    access.close()


def test_random_damage_gives_imago_errors(tmp_path: Path) -> None:
    """Bytes of the headers, tables, markers and descriptors flipped at random: an ImagoError or a clean read."""
    import random

    rng = random.Random(13)
    sparse, stream = tmp_path / "sparse.vmdk", tmp_path / "stream.vmdk"
    text = descriptor_text(['RW 2048 SPARSE "sparse.vmdk"'], create_type="monolithicSparse")
    craft_sparse(sparse, MiB, {0: b"a" * 8192, 7: None, 100: b"b" * 8192}, zero_grain=True, descriptor=text)
    craft_stream(stream, MiB, {0: rng.randbytes(GRAIN), 5: b"c" * GRAIN})
    outcomes = {"read": 0, "refused": 0}
    for original in (sparse, stream):
        pristine = original.read_bytes()
        metadata_end = min(len(pristine), 40 * SECTOR)
        for _ in range(ROUNDS):
            damaged = bytearray(pristine)
            for _ in range(rng.randrange(1, 4)):
                where = rng.choice((rng.randrange(metadata_end), rng.randrange(len(damaged))))
                damaged[where] = rng.randrange(256)
            path = tmp_path / "damaged.vmdk"
            path.write_bytes(bytes(damaged))
            try:
                _read_everything(path)
            except ImagoError:
                outcomes["refused"] += 1
            else:
                outcomes["read"] += 1
    assert outcomes["refused"] > 20, outcomes
    assert outcomes["read"] > 20, outcomes
