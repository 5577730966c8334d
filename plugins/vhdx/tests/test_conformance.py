"""The read-only conformance suite on VHDX images made by qemu-img/qemu-io and by hand."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import ClassVar

import imago
from imago import FormatDriver, PermissiveImplicitOpenGate
from imago.testing import FormatConformance, ReadOnlyFormatConformance
from imago_vhdx import Vhdx

from ._vhdx import FULL, NOT_PRESENT, PARTIAL, MiB, craft_vhdx, header_guid, qemu_img, qemu_io, qemu_raw

SIZE = 3 * MiB + 1536
WRITES = (
    "write -P 0x21 0 100k",
    "write -P 0x22 1000k 70k",
    "write -z 1010k 20k",
    "write -P 0x23 2M 64k",
    f"write -P 0x24 {SIZE - 4096} 4096",
)


def _opened(image: Path) -> tuple[FormatDriver, bytes]:
    return Vhdx.builder_path(image).open_sync(PermissiveImplicitOpenGate()), qemu_raw(image)


def _qemu_image(directory: Path, options: str) -> Path:
    image = directory / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", options, image, str(SIZE))
    qemu_io(image, *WRITES)
    return image


class TestDynamic(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _opened(_qemu_image(directory, "subformat=dynamic,block_size=1M"))


class TestFixed(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _opened(_qemu_image(directory, "subformat=fixed,block_size=1M,block_state_zero=off"))


class TestDifferencing(ReadOnlyFormatConformance):
    """A hand-made differencing image over a qemu-img parent: present, partially present and parent blocks."""

    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        parent = _qemu_image(directory, "block_size=1M")
        rng = random.Random(4)
        present, partial = rng.randbytes(MiB), rng.randbytes(MiB)
        bits = bytearray(MiB)
        sectors = [s for s in range(2048) if (s // 16) % 3 == 0]
        for sector in sectors:
            bits[256 + sector // 8] |= 1 << (sector % 8)
        child = directory / "child.vhdx"
        craft_vhdx(
            child,
            SIZE,
            blocks={0: (NOT_PRESENT, None), 1: (PARTIAL, partial), 2: (FULL, present)},
            bitmaps={0: bytes(bits)},
            parent={"parent_linkage": str(header_guid(parent)), "relative_path": "disk.vhdx"},
            data_write=uuid.uuid4(),
        )
        expected = bytearray(qemu_raw(parent))
        for sector in sectors:
            expected[MiB + 512 * sector : MiB + 512 * sector + 512] = partial[512 * sector : 512 * sector + 512]
        expected[2 * MiB : 3 * MiB] = present
        driver = Vhdx.builder_path(child).open_sync(PermissiveImplicitOpenGate())
        return driver, bytes(expected)


class _Created(FormatConformance):
    """Images imago creates, written through the log."""

    options: ClassVar[dict[str, object]] = {}

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        image = directory / "disk.vhdx"
        imago.create(image, "vhdx", size=size, block_size=MiB, **self.options)
        return Vhdx.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        imago.SyncFormatAccess(image).close()
        assert path is not None
        return Vhdx.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


class TestCreatedDynamic(_Created):
    pass


class TestCreatedFixed(_Created):
    options: ClassVar[dict[str, object]] = {"subformat": "fixed"}
