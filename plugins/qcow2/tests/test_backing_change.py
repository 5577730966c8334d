"""Changing the backing file a qcow2 image records, against ``qemu-img rebase -u`` on a copy.

The header cluster imago writes must be byte for byte the one qemu-img writes for the same
change (fields, extensions in QEMU's order, backing name), on version 2 and 3 images and on
images with extensions (external data file, bitmaps); ``qemu-img check`` stays clean and both
tools open the image with the new backing file.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import imago
from imago import Capability, InvalidOptionError, PermissiveImplicitOpenGate, ReadOnlyError, runtime

from . import _qemu
from ._qemu import MiB

SIZE = 2 * MiB


def change(image: Path, filename: str | None, format: str | None) -> None:
    """imago's change of the backing file (the old one is not opened)."""
    with imago.open(image, "qcow2", write=True, backing=False) as disk:
        changer = Capability.CHANGE_BACKING.of(disk.driver)
        assert changer is not None
        runtime.run_sync(changer.change_backing_file(filename, format))


def header_cluster(image: Path) -> bytes:
    cluster_size = int(_qemu.info(image)["cluster-size"])
    return image.read_bytes()[:cluster_size]


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """``old.raw`` (0x11) and ``new.qcow2`` (0x22 in the first 64 KiB) in tmp_path."""
    (tmp_path / "old.raw").write_bytes(b"\x11" * SIZE)
    _qemu.create(tmp_path / "new.qcow2", SIZE)
    _qemu.qemu_io(tmp_path / "new.qcow2", "write -P 0x22 0 64k")
    return tmp_path


KINDS = {
    "v2": {"compat": "0.10"},
    "v3": {},
    "data-file": {"data_file": "top.data"},
    "bitmaps": {},
    "small-clusters": {"cluster_size": 512},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("filename", "format"), [("new.qcow2", "qcow2"), (None, None)], ids=["change", "remove"])
def test_header_equals_qemu_rebase_unsafe(chain: Path, kind: str, filename: str | None, format: str | None) -> None:
    ours, theirs = chain / "ours.qcow2", chain / "theirs.qcow2"
    _qemu.create(ours, None, options=KINDS[kind], backing="old.raw", backing_fmt="raw", cwd=chain)
    _qemu.qemu_io(ours, "write -P 0x33 64k 64k", cwd=chain)
    if kind == "bitmaps":
        _qemu.qemu_img("bitmap", "--add", "ours.qcow2", "b0", cwd=chain)
    shutil.copy(ours, theirs)
    original = header_cluster(ours)
    if kind == "data-file":
        # Each copy gets a data file of its own, under a name of the same length.
        shutil.copy(chain / "top.data", chain / "tip.data")
        _qemu.qemu_img("amend", "-o", "data_file=tip.data", "theirs.qcow2", cwd=chain)

    change(ours, filename, format)
    argv = ["rebase", "-u", "-b", filename or ""] + (["-F", format] if format else [])
    _qemu.qemu_img(*argv, "theirs.qcow2", cwd=chain)

    mine, reference = header_cluster(ours), bytearray(header_cluster(theirs))
    if kind == "data-file":
        reference = reference.replace(b"tip.data", b"top.data")
    if kind == "bitmaps":
        # imago does not maintain bitmaps: opening for writing cleared their autoclear bit, as
        # the specification asks. The extension itself is kept.
        reference[95] &= ~1
        # qemu-img, which maintains them, rewrote the bitmap directory elsewhere; imago keeps it.
        marker = struct.pack(">II", 0x23852875, 24)
        at, was = reference.find(marker) + 8, original.find(marker) + 8
        assert at >= 8
        assert was >= 8
        reference[at : at + 24] = original[was : was + 24]
    assert mine == reference
    if kind == "bitmaps":
        # QEMU ignores bitmaps whose autoclear bit is clear: their clusters count as leaks to it.
        _qemu.qemu_img("check", "-q", "-r", "leaks", "ours.qcow2", cwd=chain)
    _qemu.check(ours, cwd=chain)
    info = _qemu.info(ours, cwd=chain)
    assert info.get("backing-filename") == filename
    assert info.get("backing-filename-format") == format

    # Both tools now read the new backing file where the image allocates nothing.
    new_base = b"\x22" * (64 << 10) + bytes(SIZE - (64 << 10)) if filename else bytes(SIZE)
    expected = new_base[: 64 << 10] + b"\x33" * (64 << 10) + new_base[128 << 10 :]
    assert _qemu.convert_to_raw(ours, chain / "ours.raw", cwd=chain) == expected
    with imago.open(ours, "qcow2", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(SIZE)
        disk.read(buf, 0)
        assert bytes(buf) == expected


def test_state_follows_the_change(chain: Path) -> None:
    """Further writes through the same open image keep the new header (and its dirty bit logic)."""
    image = chain / "top.qcow2"
    _qemu.create(image, None, options={"lazy_refcounts": True}, backing="old.raw", backing_fmt="raw", cwd=chain)
    with imago.open(image, "qcow2", write=True, backing=False) as disk:
        changer = Capability.CHANGE_BACKING.of(disk.driver)
        assert changer is not None
        runtime.run_sync(changer.change_backing_file("new.qcow2", "qcow2"))
        disk.write(b"\x44" * 4096, 0)
        runtime.run_sync(changer.change_backing_file("old.raw", None))
        disk.write(b"\x55" * 4096, 1 << 20)
    _qemu.check(image, cwd=chain)
    info = _qemu.info(image, cwd=chain)
    assert (info["backing-filename"], info.get("backing-filename-format")) == ("old.raw", None)
    data = _qemu.convert_to_raw(image, chain / "out.raw", cwd=chain)
    assert data[:4096] == b"\x44" * 4096
    # The backing file was not opened: the rest of the written cluster reads as zeros.
    assert data[4096 : 64 << 10] == bytes((64 << 10) - 4096)
    assert data[64 << 10 : 1 << 20] == b"\x11" * ((1 << 20) - (64 << 10))
    assert data[1 << 20 : (1 << 20) + 4096] == b"\x55" * 4096


@pytest.mark.parametrize(
    ("options", "filename", "format", "option"),
    [
        ({}, "x" * 1024, None, "backing_file"),
        ({}, None, "raw", "backing_fmt"),
        ({"cluster_size": 512}, "y" * 1000, "raw", "backing_file"),  # does not fit a 512-byte header
        ({"data_file": "d.raw", "data_file_raw": True}, "new.qcow2", None, "backing_file"),
    ],
    ids=["name-too-long", "format-without-file", "header-too-big", "data-file-raw"],
)
def test_refused_without_change(
    chain: Path, options: dict[str, object], filename: str | None, format: str | None, option: str
) -> None:
    image = chain / "top.qcow2"
    _qemu.create(image, SIZE, options=options, cwd=chain)
    before = image.read_bytes()
    with pytest.raises(InvalidOptionError) as error:
        change(image, filename, format)
    assert error.value.option == option
    assert image.read_bytes() == before


def test_read_only_image_refused(chain: Path) -> None:
    image = chain / "top.qcow2"
    _qemu.create(image, None, backing="old.raw", backing_fmt="raw", cwd=chain)
    before = image.read_bytes()
    with imago.open(image, "qcow2", backing=False) as disk:
        changer = Capability.CHANGE_BACKING.of(disk.driver)
        assert changer is not None
        with pytest.raises(ReadOnlyError, match=r"top\.qcow2"):
            runtime.run_sync(changer.change_backing_file("new.qcow2", "qcow2"))
    assert image.read_bytes() == before
