"""libvhdi (``pyvhdi``, from libvhdi-python) as a second reader: of images imago writes, and of the
differencing images the tests build from the specification (QEMU cannot read those)."""

from __future__ import annotations

import random
from pathlib import Path

import pyvhdi

import imago

from ._vhdx import (
    FULL,
    NOT_PRESENT,
    PARTIAL,
    MiB,
    craft_vhdx,
    header_guid,
    open_vhdx,
    qemu_img,
    qemu_io,
    qemu_raw,
    read_all,
)

SIZE = 4 * MiB


def _libvhdi_read(path: Path, parent: Path | None = None) -> bytes:
    image = pyvhdi.file()
    image.open(str(path))
    opened = [image]
    if parent is not None:
        base = pyvhdi.file()
        base.open(str(parent))
        image.set_parent(base)
        opened.append(base)
    try:
        size = image.get_media_size()
        return bytes(image.read_buffer_at_offset(size, 0)) if size else b""
    finally:
        for handle in opened:
            handle.close()


def test_images_imago_writes(tmp_path: Path) -> None:
    rng = random.Random(5)
    for options in ({}, {"subformat": "fixed"}):
        image = tmp_path / "disk.vhdx"
        imago.create(image, "vhdx", size=SIZE + 512, block_size=MiB, **options)
        model = bytearray(SIZE + 512)
        with open_vhdx(image, writable=True) as disk:
            for _ in range(10):
                offset, length = rng.randrange(SIZE // 512) * 512, rng.choice((512, 9000 // 512 * 512, MiB))
                data = rng.randbytes(min(length, len(model) - offset))
                disk.write(data, offset)
                model[offset : offset + len(data)] = data
        assert _libvhdi_read(image) == model


def test_differencing_image(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, str(SIZE))
    qemu_io(parent, "write -P 0x51 0 4M", "write -P 0x52 1M 8k")
    rng = random.Random(6)
    present, partial = rng.randbytes(MiB), rng.randbytes(MiB)
    bits = bytearray(MiB)
    for sector in range(0, 2048, 3):
        bits[256 + sector // 8] |= 1 << (sector % 8)
    child = tmp_path / "child.vhdx"
    craft_vhdx(
        child,
        SIZE,
        blocks={0: (FULL, present), 1: (PARTIAL, partial), 2: (NOT_PRESENT, None)},
        bitmaps={0: bytes(bits)},
        parent={"parent_linkage": "{" + str(header_guid(parent)) + "}", "relative_path": ".\\parent.vhdx"},
    )
    ours = read_all(child)
    assert ours == _libvhdi_read(child, parent)
    assert ours[2 * MiB :] == qemu_raw(parent)[2 * MiB :]
