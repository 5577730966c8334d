"""libvhdi (``pyvhdi``, from libvhdi-python) as a second reader: of images imago writes, and of the
differencing fixtures the tests build from the specification (which QEMU 7.2 cannot read right).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyvhdi

import imago
from imago import PermissiveImplicitOpenGate, SyncFormatAccess
from imago_vpc import Vpc

from ._vpc import MiB, craft_vhd, footer_uuid, qemu_img, qemu_io, qemu_json, read_all


def _libvhdi_read(path: Path, parent: Path | None = None) -> bytes:
    image = pyvhdi.file()
    image.open(str(path))
    opened = [image]
    if parent is not None:
        base = pyvhdi.file()
        base.open(str(parent))
        opened.append(base)
        image.set_parent(base)
    try:
        return bytes(image.read_buffer_at_offset(image.get_media_size(), 0))
    finally:
        for handle in opened:
            handle.close()


def test_images_imago_writes(tmp_path: Path) -> None:
    rng = random.Random(8)
    for subformat in ("dynamic", "fixed"):
        path = tmp_path / f"{subformat}.vhd"
        imago.create(path, "vpc", 7 * MiB, subformat=subformat, force_size=True)
        model = bytearray(7 * MiB)
        with SyncFormatAccess(Vpc.builder_path(path).write().open_sync(PermissiveImplicitOpenGate())) as disk:
            for _ in range(12):
                length = rng.choice((512, 8192, MiB + 4096))
                offset = rng.randrange(0, 7 * MiB - length)
                data = rng.randbytes(length)
                disk.write(data, offset)
                model[offset : offset + length] = data
        assert _libvhdi_read(path) == bytes(model)


def test_differencing_fixtures(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", parent, str(5 * MiB))
    qemu_io(parent, "write -P 0x51 0 3M")
    size = qemu_json("info", "-f", "vpc", parent)["virtual-size"]
    rng = random.Random(9)
    child = tmp_path / "child.vhd"
    # Each bitmap byte's present sectors end the byte: libvhdi 20260901 reads a byte's sectors from the
    # first set bit on as present, so only such bitmaps test the bit order (most significant first).
    present = {s for s in range(4096) if (s // 8) % 3 == 0 and s % 8 >= (s // 24) % 8}
    blocks = {0: (rng.randbytes(2 * MiB), present), 2: (rng.randbytes(2 * MiB), None)}
    craft_vhd(child, size, blocks, disk_type=4, parent=("base.vhd", footer_uuid(parent)))
    ours = read_all(child)
    assert ours == _libvhdi_read(child, parent)
    assert ours[:512] == blocks[0][0][:512]  # (sector 0: the child's)
    assert ours[8 * 512 : 9 * 512] == b"\x51" * 512  # (sector 8: the parent's)
    assert ours[24 * 512 : 25 * 512] == b"\x51" * 512  # (sector 24: the parent's, 25-31 the child's)
    assert ours[25 * 512 : 26 * 512] == blocks[0][0][25 * 512 : 26 * 512]
