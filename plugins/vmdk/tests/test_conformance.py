"""The read-only conformance suite on VMDK images made by qemu-img/qemu-io and by hand."""

from __future__ import annotations

import random
from pathlib import Path

from imago import FormatDriver, PermissiveImplicitOpenGate
from imago.testing import ReadOnlyFormatConformance
from imago_vmdk import Vmdk

from ._vmdk import MiB, craft_cowd, craft_stream, descriptor_text, qemu_img, qemu_io, qemu_raw

SIZE = 3 * MiB + 1536
WRITES = (
    "write -P 0x21 0 100k",
    "write -P 0x22 1000k 70k",
    "write -z 1010k 20k",
    "write -P 0x23 2M 64k",
    f"write -P 0x24 {SIZE - 4096} 4096",
)


def _opened(image: Path) -> tuple[FormatDriver, bytes]:
    return Vmdk.builder_path(image).open_sync(PermissiveImplicitOpenGate()), qemu_raw(image)


def _qemu_image(directory: Path, subformat: str) -> Path:
    image = directory / f"{subformat}.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", image, str(SIZE))
    qemu_io(image, *WRITES)
    return image


class TestMonolithicSparse(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _opened(_qemu_image(directory, "monolithicSparse"))


class TestTwoGbMaxExtentFlat(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        return _opened(_qemu_image(directory, "twoGbMaxExtentFlat"))


class TestStreamOptimizedWithFooter(ReadOnlyFormatConformance):
    """Compressed grains (concurrent reads decompress on all cores), the directory in the footer."""

    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        rng = random.Random(11)
        grains = {i: rng.randbytes(64 * 1024) if i % 3 else bytes([i]) * 65536 for i in range(0, 50, 2)}
        image = directory / "stream.vmdk"
        craft_stream(image, SIZE + 512, grains)
        return _opened(image)


class TestDeltaChainOverVmfsSparse(ReadOnlyFormatConformance):
    """A qemu-img delta over a hand-made vmfsSparse (COWD) parent."""

    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        rng = random.Random(12)
        craft_cowd(directory / "base-delta.vmdk", 2 * MiB, {i: rng.randbytes(8192) for i in range(0, 256, 5)})
        text = descriptor_text(['RW 4096 VMFSSPARSE "base-delta.vmdk"'], create_type="vmfsSparse", cid=0xABCDEF01)
        (directory / "base.vmdk").write_text(text)
        top = directory / "top.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top, cwd=directory)
        qemu_io(top, "write -P 0x31 64k 64k", "write -P 0x32 1M 8k")
        return _opened(top)
