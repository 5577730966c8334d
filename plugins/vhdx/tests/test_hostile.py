"""Hostile VHDX images refused with an ImagoError naming the file, before anything large is read.

Damaged checksums, impossible block and sector sizes (CVE-2014-0148: the logical sector size),
regions and BAT entries pointing past the end of the file, into the metadata or at each other,
absurd table sizes and unknown required features.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from imago import CorruptImageError, ImagoError, UnsupportedFeatureError

from ._vhdx import (
    FILE_PARAMETERS,
    FULL,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
    VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
    MiB,
    craft_vhdx,
    crc,
    open_vhdx,
)

SIZE = 4 * MiB
BAT = 2 * MiB  # (craft_vhdx: headers, a 1 MiB log, then the BAT and the metadata)
METADATA = 3 * MiB
DATA = 4 * MiB


def _items(
    block_size: int = MiB, logical: int = 512, physical: int = 4096, size: int = SIZE
) -> list[tuple[uuid.UUID, bytes, int]]:
    return [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 0), 4),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
        (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", logical), 6),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", physical), 6),
    ]


def _patch(path: Path, offset: int, data: bytes) -> None:
    image = bytearray(path.read_bytes())
    image[offset : offset + len(data)] = data
    path.write_bytes(image)


def _bat_entry(path: Path, index: int, offset: int, state: int) -> None:
    _patch(path, BAT + 8 * index, struct.pack("<Q", (offset // MiB) << 20 | state))


def _region_table(path: Path, entries: list[tuple[uuid.UUID, int, int, int]], count: int | None = None) -> None:
    table = bytearray(64 * 1024)
    struct.pack_into("<4sIII", table, 0, b"regi", 0, len(entries) if count is None else count, 0)
    for index, (guid, offset, length, flags) in enumerate(entries):
        struct.pack_into("<16sQII", table, 16 + 32 * index, guid.bytes_le, offset, length, flags)
    table = crc(table)
    _patch(path, 192 * 1024, table)
    _patch(path, 256 * 1024, table)


BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
META_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")


def _plain(path: Path) -> None:
    craft_vhdx(path, SIZE, blocks={0: (FULL, b"\1" * 4096), 1: (FULL, b"\2")})


CASES: dict[str, tuple[Callable[[Path], None], type[ImagoError]]] = {
    "not-vhdx": (lambda p: _patch(p, 0, b"vhdxfilX"), CorruptImageError),
    "short-file": (lambda p: p.write_bytes(b"vhdxfile" + bytes(1000)), CorruptImageError),
    "both-header-checksums": (
        lambda p: (_patch(p, 64 * 1024 + 100, b"\xff"), _patch(p, 128 * 1024 + 100, b"\xff")),
        CorruptImageError,
    ),
    "both-region-checksums": (
        lambda p: (_patch(p, 192 * 1024 + 100, b"\xff"), _patch(p, 256 * 1024 + 100, b"\xff")),
        CorruptImageError,
    ),
    "metadata-signature": (lambda p: _patch(p, METADATA, b"metadatX"), CorruptImageError),
    "region-count": (lambda p: _region_table(p, [], count=100000), CorruptImageError),
    "bat-region-past-eof": (
        lambda p: _region_table(p, [(BAT_GUID, 1 << 40, MiB, 1), (META_GUID, METADATA, MiB, 1)]),
        CorruptImageError,
    ),
    "bat-region-over-log": (
        lambda p: _region_table(p, [(BAT_GUID, MiB, MiB, 1), (META_GUID, METADATA, MiB, 1)]),
        CorruptImageError,
    ),
    "regions-overlap": (
        lambda p: _region_table(p, [(BAT_GUID, METADATA, MiB, 1), (META_GUID, METADATA, MiB, 1)]),
        CorruptImageError,
    ),
    "unknown-required-region": (
        lambda p: _region_table(
            p, [(BAT_GUID, BAT, MiB, 1), (META_GUID, METADATA, MiB, 1), (uuid.UUID(int=5), DATA, MiB, 1)]
        ),
        UnsupportedFeatureError,
    ),
    "metadata-count": (lambda p: _patch(p, METADATA + 10, struct.pack("<H", 60000)), CorruptImageError),
    "bat-past-eof": (lambda p: _bat_entry(p, 0, 1 << 40, FULL), CorruptImageError),
    "bat-into-metadata": (lambda p: _bat_entry(p, 0, METADATA, FULL), CorruptImageError),
    "bat-into-headers": (lambda p: _bat_entry(p, 0, 0, FULL), CorruptImageError),
    "bat-overlapping-blocks": (lambda p: _bat_entry(p, 1, DATA, FULL), CorruptImageError),
    "bat-unknown-state": (lambda p: _bat_entry(p, 2, 0, 5), CorruptImageError),
    "bat-partial-without-parent": (lambda p: _bat_entry(p, 0, DATA, 7), CorruptImageError),
}

SIZES: dict[str, tuple[dict[str, int], type[ImagoError]]] = {
    "block-512k": ({"block_size": 512 * 1024}, CorruptImageError),
    "block-512m": ({"block_size": 512 * MiB}, CorruptImageError),
    "block-3m": ({"block_size": 3 * MiB}, CorruptImageError),
    "block-0": ({"block_size": 0}, CorruptImageError),
    "logical-1024": ({"logical": 1024}, CorruptImageError),
    "logical-0": ({"logical": 0}, CorruptImageError),
    "logical-huge": ({"logical": 1 << 31}, CorruptImageError),
    "physical-123": ({"physical": 123}, CorruptImageError),
    "size-over-64t": ({"size": 65 << 40}, CorruptImageError),
    "size-odd": ({"size": SIZE + 1}, CorruptImageError),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_structures_refused(tmp_path: Path, case: str) -> None:
    image = tmp_path / "hostile.vhdx"
    _plain(image)
    damage, error = CASES[case]
    damage(image)
    with pytest.raises(error) as caught:
        open_vhdx(image)
    assert str(image) in str(caught.value)


@pytest.mark.parametrize("case", sorted(SIZES))
def test_impossible_sizes_refused(tmp_path: Path, case: str) -> None:
    image = tmp_path / "hostile.vhdx"
    fields, error = SIZES[case]
    craft_vhdx(image, SIZE, metadata_items=_items(**fields))
    with pytest.raises(error) as caught:
        open_vhdx(image)
    assert str(image) in str(caught.value)


def test_one_damaged_header_falls_back_to_the_other(tmp_path: Path) -> None:
    image = tmp_path / "one.vhdx"
    _plain(image)
    _patch(image, 64 * 1024 + 100, b"\xff")  # (the newer header: the older one is used)
    _patch(image, 192 * 1024 + 100, b"\xff")  # (the first region table: the second is used)
    with open_vhdx(image) as disk:
        buf = bytearray(4096)
        disk.read(buf, 0)
        assert buf == b"\1" * 4096


def test_equal_sequence_numbers_with_different_headers_refused(tmp_path: Path) -> None:
    image = tmp_path / "same-seq.vhdx"
    _plain(image)
    data = bytearray(image.read_bytes())
    second = bytearray(data[128 * 1024 : 132 * 1024])
    struct.pack_into("<Q", second, 8, 5)  # (the first header's sequence number, other GUIDs)
    second[16:32] = uuid.uuid4().bytes_le
    _patch(image, 128 * 1024, bytes(crc(second)))
    with pytest.raises(CorruptImageError):
        open_vhdx(image)
