"""The read-only conformance suite on VHD images made by qemu-img/qemu-io and by hand (differencing)."""

from __future__ import annotations

import random
from pathlib import Path

from imago import FormatDriver, PermissiveImplicitOpenGate
from imago.testing import ReadOnlyFormatConformance
from imago_vpc import Vpc

from ._vpc import MiB, craft_vhd, footer_uuid, qemu_img, qemu_io, qemu_json, qemu_raw

SIZE = 5 * MiB + 1536
WRITES = (
    "write -P 0x21 0 100k",
    "write -P 0x22 1000k 70k",
    "write -z 1010k 20k",
    "write -P 0x23 4M 64k",
)


def _qemu_image(directory: Path, subformat: str) -> tuple[FormatDriver, bytes]:
    image = directory / f"{subformat}.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", image, str(SIZE))
    qemu_io(image, *WRITES)
    return Vpc.builder_path(image).open_sync(PermissiveImplicitOpenGate()), qemu_raw(image)


class TestDynamic(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _qemu_image(directory, "dynamic")


class TestFixed(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _qemu_image(directory, "fixed")


class TestDifferencing(ReadOnlyFormatConformance):
    """A hand-made differencing image over a qemu-img parent: sectors from both, by the bitmaps."""

    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        parent = directory / "base.vhd"
        qemu_img("create", "-q", "-f", "vpc", parent, str(SIZE))
        qemu_io(parent, *WRITES)
        size = qemu_json("info", "-f", "vpc", parent)["virtual-size"]
        model = bytearray(qemu_raw(parent))
        rng = random.Random(3)
        block = rng.randbytes(2 * MiB)
        present = {s for s in range(4096) if s % 7 in (0, 1)}
        for sector in present:
            model[sector * 512 : sector * 512 + 512] = block[sector * 512 : sector * 512 + 512]
        child = directory / "child.vhd"
        craft_vhd(child, size, {0: (block, present)}, disk_type=4, parent=("base.vhd", footer_uuid(parent)))
        return Vpc.builder_path(child).open_sync(PermissiveImplicitOpenGate()), bytes(model)
