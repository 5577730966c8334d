"""seSparse extents (ESXi snapshots), read-only: bytes, maps and info as qemu-img 7.2 reads them.

The images are built by hand (``_vmdk.craft_sesparse``, from the format's rules: constant and
volatile headers, 64-bit directory and table entries typed by their top nibble); qemu-img is
the reference for what they hold. Hostile images are refused with an ``ImagoError``; where
qemu-img refuses them too, that is checked as well.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import (
    CorruptImageError,
    FormatDriver,
    ImagoError,
    PermissiveImplicitOpenGate,
    ResourceLimitError,
    UnsupportedFeatureError,
)
from imago.testing import ReadOnlyFormatConformance
from imago_vmdk import Vmdk

from ._vmdk import (
    SECTOR,
    SESPARSE_GRAIN,
    UNMAPPED,
    MiB,
    assert_qemu_clean_and_equal,
    craft_sesparse,
    descriptor_text,
    imago_cli,
    open_vmdk,
    open_writable,
    qemu_img,
    qemu_io,
    qemu_json,
    qemu_raw,
    read_all,
    sesparse_grain_entry,
)


def _check_like_qemu(image: Path) -> None:
    """Bytes, ``map`` and ``info`` equal to qemu-img's."""
    assert read_all(image) == qemu_raw(image)
    for command in ("map", "info"):
        status, out, err = imago_cli(command, "-f", "vmdk", "--output=json", image)
        assert status == 0, err
        assert json.loads(out) == qemu_json(command, "-f", "vmdk", image), command


def _qemu_fails(*args: str | Path) -> str:
    """qemu-img ARGS must fail; its error message."""
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0, f"qemu-img {args} succeeded"
    return proc.stderr


def _read_everything(image: Path) -> None:
    access = open_vmdk(image)
    try:
        buf = bytearray(access.size)
        access.read(buf, 0)
    finally:
        access.close()


def test_grain_kinds_tables_and_order(tmp_path: Path) -> None:
    """Allocated grains (out of order on the host, runs across them), zeroed and unmapped grains,
    unallocated ones and tables; three grain tables, one of them absent; a partial last grain."""
    rng = random.Random(13)
    capacity = 40 * MiB + 1536
    grains: dict[int, bytes | str | None] = {i: rng.randbytes(SESPARSE_GRAIN) for i in range(0, 6)}
    grains.update({6: None, 7: None, 8: UNMAPPED, 9: b"\x09" * 100, 100: rng.randbytes(SESPARSE_GRAIN)})
    last = capacity // SESPARSE_GRAIN
    grains.update({last: b"\x77" * 1536, last - 1: None, 4096 * 2 + 7: rng.randbytes(SESPARSE_GRAIN)})
    placed = [i for i, d in grains.items() if isinstance(d, bytes)]
    order = placed[3:] + placed[:3]  # grains 3-5 follow each other on the host, 0-2 too, after the others
    image = craft_sesparse(tmp_path, "s", capacity, grains, order=order)
    _check_like_qemu(image)
    info = open_vmdk(image).driver.info()
    assert info["format-specific"]["data"]["create-type"] == "seSparse"
    assert info["format-specific"]["data"]["extents"][0]["format"] == "SESPARSE"
    assert info["cluster-size"] == SESPARSE_GRAIN
    # Probed (the descriptor names its format) and converted as qemu-img does.
    status, out, err = imago_cli("info", "--output=json", image)
    assert status == 0, err
    assert json.loads(out) == qemu_json("info", image)
    status, _, err = imago_cli("convert", "-f", "vmdk", "-O", "raw", image, tmp_path / "imago.raw")
    assert status == 0, err
    assert (tmp_path / "imago.raw").read_bytes() == qemu_raw(image)
    # The map holds every kind (what the comparison above covered).
    kinds = {(e["data"], e["zero"], e["present"]) for e in qemu_json("map", "-f", "vmdk", image)}
    assert kinds == {(True, False, True), (False, True, True), (False, True, False)}


def test_empty_image(tmp_path: Path) -> None:
    _check_like_qemu(craft_sesparse(tmp_path, "e", 3 * MiB, {}))


def test_delta_over_a_parent(tmp_path: Path) -> None:
    """A snapshot over a monolithicSparse parent: unallocated grains show the parent, zeroed and
    unmapped ones hide it; the chain as ``qemu-img info --backing-chain`` shows it; CID checked."""
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, str(4 * MiB))
    qemu_io(base, "write -P 0x11 0 4M")
    base_cid = qemu_json("info", base)["format-specific"]["data"]["cid"]
    grains: dict[int, bytes | str | None] = {1: b"\x22" * SESPARSE_GRAIN, 2: None, 3: UNMAPPED, 20: b"\x23" * 512}
    top = craft_sesparse(tmp_path, "top", 4 * MiB, grains, parent="base.vmdk", parent_cid=base_cid)
    _check_like_qemu(top)
    data = read_all(top)
    assert data[:4096] == b"\x11" * 4096
    assert data[8192:16384] == bytes(8192)
    expected = qemu_json("info", "--backing-chain", top)
    status, out, _ = imago_cli("info", "--backing-chain", "--output=json", top)
    assert status == 0
    assert json.loads(out) == expected
    # The parent changed since the snapshot: refused (qemu-img fails reading through it).
    stale = craft_sesparse(tmp_path, "stale", 4 * MiB, grains, parent="base.vmdk", parent_cid=base_cid ^ 1)
    with pytest.raises(CorruptImageError, match="parentCID"):
        open_vmdk(stale)
    _qemu_fails("convert", "-O", "raw", stale, tmp_path / "out.raw")


def test_writing_is_refused(tmp_path: Path) -> None:
    image = craft_sesparse(tmp_path, "w", MiB, {0: b"a" * SESPARSE_GRAIN})
    before = (tmp_path / "w-sesparse.vmdk").read_bytes()
    with pytest.raises(UnsupportedFeatureError, match="writing seSparse extents"):
        Vmdk.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())
    status, _, err = imago_cli("resize", "-f", "vmdk", image, "2M")
    assert status != 0
    assert "seSparse" in err
    assert (tmp_path / "w-sesparse.vmdk").read_bytes() == before
    proc = subprocess.run(["qemu-io", "-c", "write 0 4k", str(image)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "seSparse" in proc.stderr
    # Read-only opens through the generic API work.
    with imago.open(image, "vmdk", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(4096)
        disk.read(buf, 0)
        assert bytes(buf) == b"a" * 4096


# (word index of the constant header, value) or ("volatile", word, value); the error; whether
# qemu-img refuses to open it too.
HOSTILE_HEADERS: list[tuple[str, dict[str, Any], type[ImagoError], str, bool]] = [
    ("magic", {"const_overrides": {0: 0xCAFEBABF}}, CorruptImageError, "bad seSparse header magic", True),
    ("version", {"const_overrides": {1: 0x0000000300000001}}, UnsupportedFeatureError, "seSparse version", True),
    ("grain 16", {"const_overrides": {3: 16}}, UnsupportedFeatureError, "grain size of 16 sectors", True),
    ("grain 0", {"const_overrides": {3: 0}}, UnsupportedFeatureError, "grain size of 0 sectors", True),
    ("table size", {"const_overrides": {4: 128}}, UnsupportedFeatureError, "grain table size of 128", True),
    ("flags", {"const_overrides": {5: 1}}, UnsupportedFeatureError, "seSparse flags", True),
    ("reserved", {"const_overrides": {7: 1}}, UnsupportedFeatureError, "reserved fields", True),
    ("volatile magic", {"volatile_overrides": {0: 0}}, CorruptImageError, "volatile header magic", True),
    ("dirty", {"volatile_overrides": {3: 1}}, UnsupportedFeatureError, "journal must be replayed", True),
    ("volatile past EOF", {"const_overrides": {10: 1 << 40}}, CorruptImageError, "volatile header .* past", True),
    ("directory huge", {"const_overrides": {17: 1 << 20}}, CorruptImageError, "more than 33554432", True),
    ("capacity huge", {"const_overrides": {2: 1 << 62}}, CorruptImageError, "grain tables, more than", True),
    ("directory past EOF", {"const_overrides": {16: 1 << 30}}, CorruptImageError, "directory .* past the end", False),
    ("grains over header", {"const_overrides": {24: 0}}, CorruptImageError, "grains .* overlap the header", False),
    (
        "regions overlap",
        {"const_overrides": {18: 8}},
        CorruptImageError,
        "grain directory .* grain tables .* overlap",
        False,
    ),
    ("capacity differs", {"const_overrides": {2: 4104}}, CorruptImageError, "differs from its size", False),
]


@pytest.mark.parametrize(
    ("overrides", "error", "match", "qemu_refuses"),
    [h[1:] for h in HOSTILE_HEADERS],
    ids=[h[0] for h in HOSTILE_HEADERS],
)
def test_hostile_headers(
    tmp_path: Path, overrides: dict[str, Any], error: type[ImagoError], match: str, qemu_refuses: bool
) -> None:
    image = craft_sesparse(tmp_path, "h", 2 * MiB, {0: b"a" * SESPARSE_GRAIN}, **overrides)
    with pytest.raises(error, match=match) as caught:
        open_vmdk(image)
    assert "h-sesparse.vmdk" in str(caught.value)
    if qemu_refuses:
        _qemu_fails("info", image)


def _header_word(extent: Path, word: int) -> int:
    value: int = struct.unpack_from("<Q", extent.read_bytes(), 8 * word)[0]
    return value


def _patch(extent: Path, offset: int, value: int) -> None:
    with extent.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


# A patched entry: "gd" (the first directory entry) or "gt" (the second entry of the first
# table); the value; the error's text; whether qemu-img fails to read the image too.
HOSTILE_ENTRIES = [
    ("gd top bits", "gd", (0x2 << 60) | 0, "invalid grain directory entry", True),
    ("gd high word", "gd", (0x1 << 60) | (1 << 32), "invalid grain directory entry", True),
    ("gd past tables", "gd", (0x1 << 60) | 5, "past the grain tables area", False),
    ("gte type 4", "gt", 0x4 << 60, "invalid grain table entry", True),
    ("gte type f", "gt", 0xF << 60 | 7, "invalid grain table entry", True),
    ("gte free but set", "gt", 5, "invalid grain table entry", True),
    ("grain past area", "gt", sesparse_grain_entry(1 << 30), "past the grains area", False),
    ("grain past EOF", "gt", sesparse_grain_entry(100), "past the end of the file", False),
]


@pytest.mark.parametrize(
    ("where", "value", "match", "qemu_fails"), [h[1:] for h in HOSTILE_ENTRIES], ids=[h[0] for h in HOSTILE_ENTRIES]
)
def test_hostile_entries(tmp_path: Path, where: str, value: int, match: str, qemu_fails: bool) -> None:
    image = craft_sesparse(tmp_path, "h", 2 * MiB, {0: b"a" * SESPARSE_GRAIN, 1: b"b" * SESPARSE_GRAIN})
    extent = tmp_path / "h-sesparse.vmdk"
    gd = _header_word(extent, 16) * SECTOR
    tables = _header_word(extent, 18) * SECTOR
    _patch(extent, gd if where == "gd" else tables + 8, value)
    with pytest.raises(CorruptImageError, match=match):
        _read_everything(image)
    if qemu_fails:
        _qemu_fails("convert", "-O", "raw", image, tmp_path / "out.raw")
    if where == "gt":
        # Only the damaged grain fails: the one before it still reads (as in QEMU).
        access = open_vmdk(image)
        buf = bytearray(SESPARSE_GRAIN)
        access.read(buf, 0)
        assert bytes(buf) == b"a" * SESPARSE_GRAIN
        access.close()


def test_directory_shorter_than_the_capacity(tmp_path: Path) -> None:
    """As QEMU: opens (info works), reading past what the directory covers fails.

    One sector of directory: 64 entries, 1 GiB of disk, of a 1 GiB + 16 MiB capacity.
    """
    image = craft_sesparse(tmp_path, "short", 1040 * MiB, {0: b"a" * SESPARSE_GRAIN}, gd_entries=64)
    access = open_vmdk(image)
    buf = bytearray(SESPARSE_GRAIN)
    access.read(buf, 0)
    assert bytes(buf) == b"a" * SESPARSE_GRAIN
    with pytest.raises(CorruptImageError, match="the grain directory has 64 entries"):
        access.read(buf, 1030 * MiB)
    access.close()
    qemu_json("info", image)
    _qemu_fails("map", image)


def test_directory_charged_to_the_memory_limit(tmp_path: Path) -> None:
    image = craft_sesparse(tmp_path, "big", 64 * 1024 * MiB, {})  # 4096 directory entries: 32 KiB
    with pytest.raises(ResourceLimitError, match="grain directory"):
        Vmdk.builder_path(image).memory_limit(16384).open_sync(PermissiveImplicitOpenGate())
    access = open_vmdk(image)
    assert access.size == 64 * 1024 * MiB
    access.close()


def _esxi_chain(directory: Path) -> Path:
    """What ESXi snapshots look like: a ``vmfs`` flat base, two seSparse snapshots over it; the top's path."""
    rng = random.Random(31)
    size = 4 * MiB + 2048
    (directory / "base-flat.vmdk").write_bytes(rng.randbytes(size))
    text = descriptor_text([f'RW {size // SECTOR} VMFS "base-flat.vmdk"'], create_type="vmfs", cid=0x1111)
    (directory / "base.vmdk").write_text(text)
    first: dict[int, bytes | str | None] = {i: rng.randbytes(SESPARSE_GRAIN) for i in range(3, 300, 7)}
    first.update({i: None for i in range(400, 420)})
    craft_sesparse(directory, "snap1", size, first, cid=0x2222, parent="base.vmdk", parent_cid=0x1111)
    second: dict[int, bytes | str | None] = {i: rng.randbytes(SESPARSE_GRAIN) for i in range(10, 600, 13)}
    second.update({405: rng.randbytes(SESPARSE_GRAIN), 17: UNMAPPED, 1024: b"\x55" * 2048})
    order = sorted((i for i, d in second.items() if isinstance(d, bytes)), key=lambda i: -i)
    # (Grain numbers from 5000 on: their high bits are stored apart from the low 12.)
    return craft_sesparse(
        directory, "snap2", size, second, order=order, parent="snap1.vmdk", parent_cid=0x2222, first_slot=5000
    )


def test_esxi_snapshot_chain(tmp_path: Path) -> None:
    top = _esxi_chain(tmp_path)
    _check_like_qemu(top)
    expected = qemu_json("info", "--backing-chain", top)
    status, out, err = imago_cli("info", "--backing-chain", "--output=json", top)
    assert status == 0, err
    assert json.loads(out) == expected
    access = open_vmdk(top)
    assert access.driver.backing is not None
    assert access.driver.backing.driver.backing is not None
    access.close()


class TestSeSparseChainConformance(ReadOnlyFormatConformance):
    """The read-only conformance suite on the ESXi-like chain (seSparse over seSparse over vmfs)."""

    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        top = _esxi_chain(directory)
        return Vmdk.builder_path(top).open_sync(PermissiveImplicitOpenGate()), qemu_raw(top)


def test_random_damage_gives_imago_errors(tmp_path: Path) -> None:
    """Bytes of the headers, directory and tables changed at random: an image or an ImagoError."""
    rng = random.Random(41)
    grains: dict[int, bytes | str | None] = {i: bytes([i]) * SESPARSE_GRAIN for i in range(0, 200, 3)}
    grains.update({7: None, 8: UNMAPPED})
    image = craft_sesparse(tmp_path, "d", 2 * MiB, grains)
    extent = tmp_path / "d-sesparse.vmdk"
    pristine = extent.read_bytes()
    grains_at = _header_word(extent, 24) * SECTOR
    tables = _header_word(extent, 18) * SECTOR
    hot = [range(0, 208), range(SECTOR, SECTOR + 32), range(8 * SECTOR, 8 * SECTOR + 8), range(tables, tables + 1600)]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        data = bytearray(pristine)
        for _ in range(rng.randrange(1, 4)):
            area = rng.choice(hot) if rng.random() < 0.8 else range(grains_at)
            data[rng.choice(area)] = rng.randrange(256)
        extent.write_bytes(bytes(data))
        try:
            _read_everything(image)
            outcomes["ok"] += 1
        except ImagoError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0
    assert outcomes["error"] > 0


def test_writable_delta_over_a_sesparse_parent(tmp_path: Path) -> None:
    """A qemu-img delta over a snapshot: written by imago, the seSparse parent only read."""
    _esxi_chain(tmp_path)
    parent_before = (tmp_path / "snap2-sesparse.vmdk").read_bytes()
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "snap2.vmdk", "-F", "vmdk", top, cwd=tmp_path)
    access = open_writable(top)
    access.write(b"\x66" * 70000, 12345)
    access.flush()
    access.close()
    assert (tmp_path / "snap2-sesparse.vmdk").read_bytes() == parent_before
    model = bytearray(qemu_raw(tmp_path / "snap2.vmdk"))
    model[12345 : 12345 + 70000] = b"\x66" * 70000
    assert_qemu_clean_and_equal(top, bytes(model))


def test_grain_tables_past_the_end_of_the_file(tmp_path: Path) -> None:
    """The tables region moved past the end (QEMU reads zeroes there): opens, reading its table fails."""
    image = craft_sesparse(tmp_path, "t", 2 * MiB, {0: b"a" * SESPARSE_GRAIN}, const_overrides={18: 1 << 30})
    access = open_vmdk(image)
    buf = bytearray(SESPARSE_GRAIN)
    with pytest.raises(CorruptImageError, match=r"a grain table .* past the end of the file"):
        access.read(buf, 0)
    access.close()
