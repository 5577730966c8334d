"""Hostile VHDs: refused with an ImagoError naming the file, in bounded time and memory.

Each image is a well-formed one (``craft_vhd``, or qemu-img's) with one thing broken: the
checksums, the footer's copy, the dynamic header's sizes, the BAT's entries, the disk size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import imago
from imago import CorruptImageError, ImagoError, ResourceLimitError, UnsupportedFeatureError

from ._vpc import SECTOR, MiB, craft_vhd, footer_bytes, qemu_img, read_all

SIZE = 4 * MiB
BLOCK = (b"\x5a" * (2 * MiB), None)
# Where the first data block's bitmap lies in a crafted image without a parent (sectors).
FIRST_BLOCK = (3 * SECTOR + SECTOR) // SECTOR


def _refused(path: Path, error: type[ImagoError], match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        read_all(path, memory_limit=64 * MiB)
    assert str(path) in str(caught.value) or path.name in str(caught.value)


def test_the_crafted_baseline_reads(tmp_path: Path) -> None:
    image = tmp_path / "good.vhd"
    craft_vhd(image, SIZE, {1: BLOCK})
    assert read_all(image) == bytes(2 * MiB) + BLOCK[0]
    qemu_img("compare", "-f", "vpc", "-F", "vpc", image, image)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset if offset >= 0 else path.stat().st_size + offset)
        f.write(data)


CASES: dict[str, tuple[Callable[[Path], None], type[ImagoError], str]] = {
    "footer checksum": (
        lambda p: _patch(p, -SECTOR + 60, b"\x01"),  # (the disk type's first byte: summed, not matched)
        CorruptImageError,
        "checksum",
    ),
    "header checksum": (
        lambda p: craft_vhd(p, SIZE, {0: BLOCK}, bad_header_checksum=True),
        CorruptImageError,
        "checksum",
    ),
    "copy differs": (lambda p: craft_vhd(p, SIZE, {0: BLOCK}, copy_differs=True), CorruptImageError, "copy"),
    "block size zero": (
        lambda p: craft_vhd(p, SIZE, {}, header_overrides={32: bytes(4)}),
        CorruptImageError,
        "block size",
    ),
    "block size odd": (
        lambda p: craft_vhd(p, SIZE, {}, header_overrides={32: struct.pack(">I", 3 * MiB)}),
        CorruptImageError,
        "block size",
    ),
    "block size huge": (
        lambda p: craft_vhd(p, SIZE, {}, header_overrides={32: struct.pack(">I", 1 << 31)}),
        CorruptImageError,
        "block size",
    ),
    "table too small": (lambda p: craft_vhd(p, SIZE, {}, entries=1), CorruptImageError, "do not cover"),
    "table absurd": (
        lambda p: craft_vhd(p, SIZE, {}, header_overrides={28: struct.pack(">I", 0xFFFFFFFF)}),
        CorruptImageError,
        "2040 GiB",
    ),
    "table past eof": (
        lambda p: craft_vhd(p, SIZE, {}, header_overrides={28: struct.pack(">I", 1 << 18)}),
        CorruptImageError,
        "outside the file",
    ),
    "header offset past eof": (lambda p: _footers_data_offset(p, 1 << 40), CorruptImageError, "outside the file"),
    "bat past eof": (lambda p: craft_vhd(p, SIZE, {0: BLOCK}, bat_overrides={1: 0x7FFFFFF}), CorruptImageError, "past"),
    "bat into metadata": (
        lambda p: craft_vhd(p, SIZE, {0: BLOCK}, bat_overrides={1: 1}),
        CorruptImageError,
        "metadata",
    ),
    "bat overlapping": (
        lambda p: craft_vhd(p, SIZE, {0: BLOCK}, bat_overrides={1: FIRST_BLOCK + 8}),
        CorruptImageError,
        "overlap",
    ),
    "bat same block twice": (
        lambda p: craft_vhd(p, SIZE, {0: BLOCK}, bat_overrides={1: FIRST_BLOCK}),
        CorruptImageError,
        "overlap",
    ),
    "disk over 2040 GiB": (lambda p: _fixed(p, 2041 << 30), UnsupportedFeatureError, "2040 GiB"),
    "fixed longer than its file": (lambda p: _fixed(p, 8 * MiB), CorruptImageError, "longer"),
    "unknown disk type": (lambda p: _fixed(p, 0, disk_type=5), UnsupportedFeatureError, "disk type"),
    "no footer": (lambda p: p.write_bytes(bytes(4096)), CorruptImageError, "conectix"),
    "shorter than a footer": (lambda p: p.write_bytes(b"conectix"), CorruptImageError, "shorter"),
}


def _fixed(path: Path, size: int, disk_type: int = 2) -> None:
    path.write_bytes(bytes(MiB) + footer_bytes(size=size, disk_type=disk_type, data_offset=0xFFFFFFFFFFFFFFFF))


def _footers_data_offset(path: Path, offset: int) -> None:
    craft_vhd(path, SIZE, {})
    data = bytearray(path.read_bytes())
    footer = footer_bytes(size=SIZE, disk_type=3, data_offset=offset, uuid=bytes(data[68:84]))
    data[:SECTOR] = footer
    data[-SECTOR:] = footer
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile(tmp_path: Path, case: str) -> None:
    make, error, match = CASES[case]
    image = tmp_path / "hostile.vhd"
    if case == "footer checksum":
        craft_vhd(image, SIZE, {0: BLOCK})
    make(image)
    _refused(image, error, match)


def test_the_bat_counts_against_the_memory_limit(tmp_path: Path) -> None:
    """A 2 MiB BAT (512 Ki blocks of 4 KiB) is refused under a 1 MiB limit, before it is read."""
    image = tmp_path / "big-bat.vhd"
    craft_vhd(image, 2 << 30, {}, block_size=4096)
    with pytest.raises(ResourceLimitError):
        read_all(image, memory_limit=MiB)
    with imago.open(image, "vpc", memory_limit=64 * MiB) as disk:
        assert disk.size == 2 << 30
