"""``Qcow2.amend``: options changed as ``qemu-img amend`` changes them, refusals before any write."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import Capability, InvalidOptionError, ReadOnlyError, UnsupportedFeatureError

from . import _qemu


def _amend(image: Path, options: dict[str, Any], *, write: bool = True) -> None:
    with imago.open(image, "qcow2", write=write) as disk:
        amender = Capability.AMEND.of(disk.driver)
        assert amender is not None
        imago.runtime.run_sync(amender.amend(options))


def _image(tmp_path: Path, *options: str, commands: tuple[str, ...] = ("write -P 5 0 192k",)) -> Path:
    image = tmp_path / "disk.qcow2"
    _qemu.qemu_img("create", "-q", "-f", "qcow2", *options, image, "2M")
    if commands:
        _qemu.qemu_io(image, *commands)
    return image


@pytest.mark.parametrize(
    ("create", "options", "expected"),
    [
        ((), {"lazy_refcounts": True}, {"compat": "1.1", "lazy-refcounts": True}),
        ((), {"lazy_refcounts": "on", "size": 3 << 20}, {"lazy-refcounts": True}),
        (("-o", "lazy_refcounts=on"), {"lazy_refcounts": "off"}, {"lazy-refcounts": False}),
        ((), {"compat": "0.10"}, {"compat": "0.10"}),
        (("-o", "compat=0.10"), {"compat": "v3", "lazy_refcounts": True}, {"compat": "1.1", "lazy-refcounts": True}),
        ((), {"refcount_bits": "16", "size": "4194304"}, {"refcount-bits": 16}),
    ],
)
def test_typed_and_text_values(
    tmp_path: Path, create: tuple[str, ...], options: dict[str, Any], expected: dict[str, Any]
) -> None:
    image = _image(tmp_path, *create)
    copy = tmp_path / "before.qcow2"
    shutil.copy(image, copy)
    _amend(image, options)
    info = _qemu.info(image)
    for key, value in expected.items():
        assert info["format-specific"]["data"][key] == value
    if "size" in options:
        assert info["virtual-size"] == int(options["size"])
    _qemu.check(image)
    # The old disk's content is still there (the rest of a grown disk reads as zero).
    _qemu.qemu_img("compare", copy, image)


@pytest.mark.parametrize(
    ("create", "options", "option", "error"),
    [
        ((), {"cluster_size": 4096}, "cluster_size", InvalidOptionError),
        ((), {"nonsense": 1}, "nonsense", InvalidOptionError),
        ((), {"compat": "0.9"}, "compat", InvalidOptionError),
        ((), {"lazy_refcounts": "maybe"}, "lazy_refcounts", InvalidOptionError),
        ((), {"refcount_bits": 12}, "refcount_bits", InvalidOptionError),
        ((), {"size": -1}, "size", InvalidOptionError),
        ((), {"size": 1000, "lazy_refcounts": True}, "size", InvalidOptionError),
        ((), {"compat": "0.10", "lazy_refcounts": True}, "lazy_refcounts", InvalidOptionError),
        ((), {"backing_file": "other.qcow2", "backing_fmt": "qcow2"}, "backing_file", InvalidOptionError),
        (("-o", "extended_l2=on"), {"compat": "0.10", "size": 4 << 20}, "compat", InvalidOptionError),
        ((), {"refcount_bits": 8, "compat": "0.10"}, "refcount_bits", InvalidOptionError),
    ],
)
def test_refused_before_any_write(
    tmp_path: Path, create: tuple[str, ...], options: dict[str, Any], option: str | None, error: type[Exception]
) -> None:
    image = _image(tmp_path, *create)
    before = image.read_bytes()
    with pytest.raises(error) as caught:
        _amend(image, options)
    if option is not None:
        assert isinstance(caught.value, InvalidOptionError)
        assert caught.value.option == option
    assert image.read_bytes() == before


@pytest.mark.parametrize("bits", [1, 2, 8, 64])
def test_refcount_width_changes(tmp_path: Path, bits: int) -> None:
    image = _image(tmp_path, commands=("write -P 5 0 192k", "write -P 6 1M 64k", "write -z 1536k 64k"))
    copy = tmp_path / "before.qcow2"
    shutil.copy(image, copy)
    _amend(image, {"refcount_bits": bits})
    assert _qemu.info(image)["format-specific"]["data"]["refcount-bits"] == bits
    report = _qemu.check(image)
    assert report["image-end-offset"] <= _qemu.check(copy)["image-end-offset"] + (2 << 16)  # old structure freed
    _qemu.qemu_img("compare", copy, image)
    _amend(image, {"refcount_bits": 16})
    _qemu.check(image)
    _qemu.qemu_img("compare", copy, image)


def test_refcount_width_too_narrow_for_snapshots(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _qemu.qemu_img("snapshot", "-c", "shared", image)
    before = image.read_bytes()
    with pytest.raises(InvalidOptionError, match="has a refcount of 2") as caught:
        _amend(image, {"refcount_bits": 1})
    assert caught.value.option == "refcount_bits"
    assert image.read_bytes() == before
    _amend(image, {"refcount_bits": 2})
    _qemu.check(image)
    _qemu.qemu_img("snapshot", "-a", "shared", image)
    _qemu.check(image)


def test_shrink_below_a_snapshot_refused_before_any_write(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _qemu.qemu_img("snapshot", "-c", "big", image)
    before = image.read_bytes()
    with pytest.raises(UnsupportedFeatureError, match="big"):
        _amend(image, {"size": 1 << 20, "lazy_refcounts": True})
    assert image.read_bytes() == before


def test_read_only_image_refused(tmp_path: Path) -> None:
    image = _image(tmp_path)
    before = image.read_bytes()
    with pytest.raises(ReadOnlyError):
        _amend(image, {"lazy_refcounts": True}, write=False)
    assert image.read_bytes() == before


def test_downgrade_with_snapshots(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _qemu.qemu_img("snapshot", "-c", "first", image)
    _qemu.qemu_io(image, "write -P 7 64k 64k")
    _amend(image, {"compat": "0.10"})
    assert _qemu.info(image)["format-specific"]["data"]["compat"] == "0.10"
    _qemu.check(image)
    # Back up again, and the snapshot still reads as it was.
    _amend(image, {"compat": "1.1"})
    _qemu.check(image)
    assert "first" in _qemu.qemu_img("snapshot", "-l", image)


def test_downgrade_refusals_for_snapshots(tmp_path: Path) -> None:
    image = _image(tmp_path, commands=("write -P 5 0 64k", "write -z 64k 64k"))
    _qemu.qemu_img("snapshot", "-c", "zeroes", image)
    before = image.read_bytes()
    with pytest.raises(UnsupportedFeatureError, match="zeroes"):
        _amend(image, {"compat": "0.10"})
    assert image.read_bytes() == before
    # A snapshot of another disk size: QEMU refuses the downgrade as well.
    with pytest.raises(InvalidOptionError, match="Internal snapshots prevent downgrade"):
        _amend(image, {"compat": "0.10", "size": 4 << 20})
    assert image.read_bytes() == before


def _strip_snapshot_extra_data(image: Path) -> None:
    """Rewrite the only snapshot entry of a v2 image without extra data (as QEMU before 1.1 wrote it)."""
    raw = bytearray(image.read_bytes())
    (snapshots_offset,) = struct.unpack_from(">Q", raw, 64)
    entry = snapshots_offset
    id_size, name_size = struct.unpack_from(">HH", raw, entry + 12)
    (extra_size,) = struct.unpack_from(">I", raw, entry + 36)
    names = bytes(raw[entry + 40 + extra_size : entry + 40 + extra_size + id_size + name_size])
    fixed = bytearray(raw[entry : entry + 40])
    struct.pack_into(">I", fixed, 36, 0)
    new = bytes(fixed) + names
    new += bytes(-len(new) % 8)
    old_length = 40 + extra_size + id_size + name_size
    old_length += -old_length % 8
    raw[entry : entry + old_length] = new + bytes(old_length - len(new))
    image.write_bytes(raw)


def test_upgrade_completes_old_snapshot_entries(tmp_path: Path) -> None:
    mine = _image(tmp_path, "-o", "compat=0.10")
    _qemu.qemu_img("snapshot", "-c", "old", mine)
    _strip_snapshot_extra_data(mine)
    with imago.open(mine, "qcow2") as disk:
        snapshots = Capability.SNAPSHOTS.of(disk.driver)
        assert snapshots is not None
        assert [len(getattr(snapshot, "extra_data", b"?")) for snapshot in snapshots.snapshots] == [0]
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(mine, theirs)
    _qemu.check(mine)
    _amend(mine, {"compat": "1.1"})
    _qemu.qemu_img("amend", "-o", "compat=1.1", theirs)
    _qemu.check(mine)  # a v3 image with incomplete snapshot entries would fail it
    mine_info, theirs_info = _qemu.info(mine), _qemu.info(theirs)
    for info in (mine_info, theirs_info):
        info.pop("filename")
        info.pop("actual-size")
    assert mine_info == theirs_info
    # The snapshot still holds what the disk held when it was taken.
    _qemu.qemu_io(mine, "write -P 9 0 64k")
    _qemu.qemu_img("snapshot", "-a", "old", mine)
    _qemu.qemu_io(mine, "read -P 5 0 192k")
