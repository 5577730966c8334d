"""The conformance suites: images imago creates (static and dynamic), and images qemu makes, read-only."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import imago
from imago import FormatDriver, PermissiveImplicitOpenGate
from imago.testing import FormatConformance, ReadOnlyFormatConformance
from imago_vdi import Vdi

from ._vdi import MiB, qemu_img, qemu_io, qemu_raw


class _Created(FormatConformance):
    static: ClassVar[bool] = False

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        image = directory / "disk.vdi"
        imago.create(image, "vdi", size, static=self.static)
        return Vdi.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        imago.SyncFormatAccess(image).close()
        assert path is not None
        return Vdi.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


class TestDynamic(_Created):
    pass


class TestStatic(_Created):
    static = True


SIZE = 3 * MiB + 1536
WRITES = ("write -P 0x21 0 100k", "write -P 0x22 1000k 70k", "write -z 1010k 20k", f"write -P 0x24 {SIZE - 4096} 4096")


class TestQemuDynamic(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        image = directory / "qemu.vdi"
        qemu_img("create", "-q", "-f", "vdi", image, str(SIZE))
        qemu_io(image, *WRITES)
        return Vdi.builder_path(image).open_sync(PermissiveImplicitOpenGate()), qemu_raw(image)


class TestQemuStatic(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        image = directory / "qemu.vdi"
        qemu_img("create", "-q", "-f", "vdi", "-o", "static=on", image, str(SIZE))
        qemu_io(image, *WRITES)
        return Vdi.builder_path(image).open_sync(PermissiveImplicitOpenGate()), qemu_raw(image)
