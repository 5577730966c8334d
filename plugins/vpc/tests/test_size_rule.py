"""The virtual size rule: CHS geometry, or the footer's size for the creators QEMU trusts.

QEMU 7.2 is the reference for every creator but Azure's ``wa\\0\\0``, which current QEMU
trusts (and 7.2 does not yet): there the expected size is the footer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ._vpc import NO_OFFSET, MiB, footer_bytes, imago_cli, qemu_json

SIZE = 10 * MiB
SMALL_GEOMETRY = (300, 4, 17)  # (10 444 800 bytes: less than the footer's size)


def _fixed(path: Path, creator: bytes, geometry: tuple[int, int, int], size: int = SIZE) -> None:
    footer = footer_bytes(size=size, disk_type=2, data_offset=NO_OFFSET, geometry=geometry, creator=creator)
    with path.open("wb") as out:
        out.truncate(size)
        out.seek(size)
        out.write(footer)


def _imago_size(path: Path) -> int:
    status, out, err = imago_cli("info", "-f", "vpc", "--output=json", path)
    assert status == 0, err
    size: int = json.loads(out)["virtual-size"]
    return size


@pytest.mark.parametrize("creator", [b"vpc ", b"qemu", b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS", b"vs  "])
def test_as_qemu_reads_it(tmp_path: Path, creator: bytes) -> None:
    image = tmp_path / "disk.vhd"
    _fixed(image, creator, SMALL_GEOMETRY)
    assert _imago_size(image) == qemu_json("info", "-f", "vpc", image)["virtual-size"]


def test_azure_uses_the_footer_size(tmp_path: Path) -> None:
    image = tmp_path / "azure.vhd"
    _fixed(image, b"wa\0\0", SMALL_GEOMETRY)
    assert _imago_size(image) == SIZE
    assert qemu_json("info", "-f", "vpc", image)["virtual-size"] == 300 * 4 * 17 * 512  # (7.2: not yet)


def test_largest_geometry_uses_the_footer_size(tmp_path: Path) -> None:
    image = tmp_path / "big.vhd"
    _fixed(image, b"vpc ", (65535, 16, 255), size=200 << 30)
    assert _imago_size(image) == 200 << 30 == qemu_json("info", "-f", "vpc", image)["virtual-size"]
