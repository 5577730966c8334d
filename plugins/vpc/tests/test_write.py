"""Writing into VHDs: the conformance suite on images imago creates, and QEMU reading what imago wrote.

(``qemu-img check`` does not check vpc images: ``qemu-img compare`` against a raw model is the check.)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

import pytest

import imago
from imago import FormatDriver, PermissiveImplicitOpenGate, SyncFormatAccess, UnsupportedFeatureError
from imago.testing import FormatConformance
from imago_vpc import Vpc

from ._vpc import SECTOR, MiB, craft_vhd, footer_uuid, imago_cli, qemu_img, qemu_io, qemu_json, qemu_raw, run


class _Created(FormatConformance):
    options: ClassVar[dict[str, Any]] = {}

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        image = directory / "disk.vhd"
        imago.create(image, "vpc", size, force_size=True, **self.options)
        return Vpc.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        SyncFormatAccess(image).close()
        assert path is not None
        return Vpc.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


class TestDynamic(_Created):
    options: ClassVar[dict[str, Any]] = {"subformat": "dynamic"}


class TestFixed(_Created):
    options: ClassVar[dict[str, Any]] = {"subformat": "fixed"}


def _open_writable(path: Path) -> SyncFormatAccess:
    return SyncFormatAccess(Vpc.builder_path(path).write().open_sync(PermissiveImplicitOpenGate()))


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_shuffled_writes_read_by_qemu(tmp_path: Path, subformat: str) -> None:
    """Writes and zeroes in random order into a qemu-img image (some blocks qemu allocated), then QEMU reads it."""
    image = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", image, str(9 * MiB))
    qemu_io(image, "write -P 0x61 2M 100k")
    model = bytearray(qemu_raw(image))
    size = len(model)
    rng = random.Random(21)
    with _open_writable(image) as disk:
        for _ in range(40):
            length = rng.choice((512, 4096, 70000, 3 * MiB))
            offset = rng.randrange(0, size - length)
            if rng.random() < 0.25:
                disk.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                disk.write(data, offset)
                model[offset : offset + length] = data
        disk.flush()
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    qemu_img("compare", "-f", "vpc", "-F", "raw", image, raw)
    assert qemu_json("info", "-f", "vpc", image)["virtual-size"] == size
    if subformat == "dynamic":
        # The file ends with the footer, which matches its copy; blocks follow one another.
        data = image.read_bytes()
        assert data[-SECTOR:] == data[:SECTOR]
        qemu_io(image, "write -P 0x62 8M 4k")  # (QEMU can still allocate after imago's blocks)
        model[8 * MiB : 8 * MiB + 4096] = b"\x62" * 4096
        raw.write_bytes(bytes(model))
        qemu_img("compare", "-f", "vpc", "-F", "raw", image, raw)


def test_one_write_over_many_blocks_allocates_runs_of_them(tmp_path: Path) -> None:
    """A write over unallocated blocks around one QEMU allocated: each run of new blocks lies side by side."""
    image = tmp_path / "disk.vhd"
    imago.create(image, "vpc", 16 * MiB, force_size=True)
    qemu_io(image, "write -P 0x61 6M 4k")  # block 3
    data = random.Random(5).randbytes(12 * MiB)
    with _open_writable(image) as disk:
        disk.write(data, 1 * MiB)  # blocks 0-6, partly 0 and 6
        disk.flush()
    model = bytearray(16 * MiB)
    model[6 * MiB : 6 * MiB + 4096] = b"\x61" * 4096
    model[1 * MiB : 13 * MiB] = data
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    qemu_img("compare", "-f", "vpc", "-F", "raw", image, raw)
    starts = {m["start"] // (2 * MiB): m["offset"] for m in qemu_json("map", "-f", "vpc", image) if m["data"]}
    block = 2 * MiB + SECTOR  # a block and its bitmap
    assert sorted(starts) == [0, 1, 2, 3, 4, 5, 6]
    assert [starts[i] - starts[0] for i in (1, 2)] == [block, 2 * block]
    assert [starts[i] - starts[4] for i in (5, 6)] == [block, 2 * block]
    assert starts[3] < starts[0] < starts[4]  # (QEMU allocated block 3 first)
    file = image.read_bytes()
    assert all(file[starts[i] - SECTOR : starts[i]] == b"\xff" * SECTOR for i in starts)
    assert file[-SECTOR:] == file[:SECTOR]
    assert len(file) == starts[6] + 2 * MiB + SECTOR


def test_zeroes_into_unallocated_blocks_allocate_nothing(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    imago.create(image, "vpc", 8 * MiB, force_size=True)
    before = image.stat().st_size
    with _open_writable(image) as disk:
        disk.write_zeroes(0, 8 * MiB)
        disk.flush()
    assert image.stat().st_size == before
    assert qemu_json("map", "-f", "vpc", image) == [
        {"start": 0, "length": 8 * MiB, "depth": 0, "present": True, "zero": True, "data": False}
    ]


def test_convert_to_vpc_is_equal(tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, str(6 * MiB))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 1M", "-c", "write -P 0x72 4M 64k", source])
    for subformat in ("dynamic", "fixed"):
        target = tmp_path / f"target-{subformat}.vhd"
        status, _, err = imago_cli("convert", "-O", "vpc", "-o", f"subformat={subformat}", source, target)
        assert status == 0, err
        qemu_img("compare", "-f", "vpc", "-F", "qcow2", target, source)


def test_differencing_images_are_read_only(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", parent, str(4 * MiB))
    size = qemu_json("info", "-f", "vpc", parent)["virtual-size"]
    child = tmp_path / "child.vhd"
    craft_vhd(child, size, {}, disk_type=4, parent=("base.vhd", footer_uuid(parent)))
    with pytest.raises(UnsupportedFeatureError, match="differencing"):
        _open_writable(child)
