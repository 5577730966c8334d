"""Hostile and damaged VDI files: refused with an ImagoError before anything large is read or held.

Damaged block maps (entries past the block count, a block named twice, a wrong allocated count)
open only to be checked, and ``imago check`` then reports what ``qemu-img check`` reports.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import (
    CorruptImageError,
    ImagoError,
    PermissiveImplicitOpenGate,
    ResourceLimitError,
    SyncFormatAccess,
    UnsupportedFeatureError,
)
from imago_vdi import Vdi

from ._vdi import DISCARDED, UNALLOCATED, MiB, craft_vdi, imago_cli, open_vdi, run

_BLOCKS = {0: b"\x11" * 4096, 2: b"\x22" * 4096}

# (id, craft_vdi keyword arguments, the error class, a word the message must hold)
HOSTILE: list[tuple[str, dict[str, Any], type[ImagoError], str]] = [
    ("signature", {"signature": 0x12345678}, CorruptImageError, "signature"),
    ("version", {"version": 0x00010000}, UnsupportedFeatureError, "version"),
    ("undo-image", {"image_type": 3}, UnsupportedFeatureError, "undo"),
    ("differencing-type", {"image_type": 4}, UnsupportedFeatureError, "differencing"),
    ("unknown-type", {"image_type": 9}, CorruptImageError, "type"),
    ("sector-size", {"sector_size": 4096}, UnsupportedFeatureError, "sector"),
    ("block-size-small", {"block_size": 4096}, UnsupportedFeatureError, "block size"),
    ("block-size-huge", {"block_size": 1 << 31}, UnsupportedFeatureError, "block size"),
    ("block-extra", {"block_extra": 512}, UnsupportedFeatureError, "extra"),
    ("link-uuid", {"uuid_link": b"\1" * 16}, UnsupportedFeatureError, "link"),
    ("parent-uuid", {"uuid_parent": b"\1" * 16}, UnsupportedFeatureError, "parent"),
    ("too-many-blocks", {"blocks_in_image": 0x40000000}, CorruptImageError, "too many blocks"),
    ("disk-past-blocks", {"stored_disk_size": 4 * MiB + 512}, CorruptImageError, "room"),
    ("disk-size-absurd", {"stored_disk_size": 1 << 63}, CorruptImageError, "limit"),
    (
        "map-past-eof",
        {"blocks_in_image": 0x3FFFFF00, "offset_data": 0xFFFFFE00, "file_size": 4096},
        CorruptImageError,
        "end",
    ),
    ("map-into-data", {"offset_data": 512}, CorruptImageError, "inside the block map"),
    ("map-over-header", {"offset_bmap": 0}, CorruptImageError, "after the header"),
    ("map-unaligned", {"offset_bmap": 700}, CorruptImageError, "sector"),
    ("data-unaligned", {"offset_data": 1100}, CorruptImageError, "aligned"),
    ("data-past-eof", {"offset_data": 1 << 31, "file_size": 4096}, CorruptImageError, "end of the file"),
    ("entry-past-count", {"entries": [0, UNALLOCATED, 7, UNALLOCATED]}, CorruptImageError, "past the 4 blocks"),
    ("entry-twice", {"entries": [0, 0, 1, UNALLOCATED]}, CorruptImageError, "again"),
    ("entry-past-eof", {"entries": [0, UNALLOCATED, 1, 3]}, CorruptImageError, "end of the file"),
    ("truncated-file", {"file_size": 300}, CorruptImageError, "too short"),
]


@pytest.mark.parametrize(("fields", "error", "word"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_header_or_map_refused(
    tmp_path: Path, fields: dict[str, Any], error: type[ImagoError], word: str
) -> None:
    image = tmp_path / "hostile.vdi"
    craft_vdi(image, 4 * MiB, _BLOCKS, **fields)
    tracemalloc.start()
    try:
        with pytest.raises(error) as caught:
            open_vdi(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB
    assert word in str(caught.value)
    assert str(image) in str(caught.value)
    # The command line reports it on one line, no traceback.
    status, _, err = imago_cli("info", "-f", "vdi", image)
    assert status == 1
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_large_block_map_charged_to_the_memory_limit(tmp_path: Path) -> None:
    image = tmp_path / "large-map.vdi"
    blocks = 4 * MiB  # (a 16 MiB block map, in a sparse file)
    craft_vdi(
        image,
        blocks * MiB,
        {},
        entries=[UNALLOCATED] * 4,
        blocks_in_image=blocks,
        offset_data=512 + 16 * MiB,
        file_size=512 + 16 * MiB,
    )
    with pytest.raises(ResourceLimitError, match="block map"):
        Vdi.builder_path(image).memory_limit(MiB).open_sync(PermissiveImplicitOpenGate())


def test_discarded_blocks_read_as_zeroes(tmp_path: Path) -> None:
    image = tmp_path / "discarded.vdi"
    craft_vdi(image, 3 * MiB, entries=[DISCARDED, UNALLOCATED, DISCARDED], blocks_allocated=0)
    with open_vdi(image) as disk:
        buf = bytearray(b"\xff" * 3 * MiB)
        disk.read(buf, 0)
        assert buf == bytes(3 * MiB)
    # qemu-img reads them as zeroes too, and its check finds nothing wrong.
    assert run(["qemu-img", "check", "-f", "vdi", image]).returncode == 0
    status, out, _ = imago_cli("map", "-f", "vdi", "--output=json", image)
    qemu = run(["qemu-img", "map", "-f", "vdi", "--output=json", image])
    assert (status, out) == (0, qemu.stdout)


# (id, entries of a 4-block image with blocks 0 and 1 stored, blocks_allocated)
DAMAGED = [
    ("entry-past-count", [0, 9, 1, UNALLOCATED], 2),
    ("entry-twice", [0, 1, 1, UNALLOCATED], 3),
    ("count-mismatch", [0, UNALLOCATED, 1, UNALLOCATED], 5),
    ("all-at-once", [7, 0, 0, 1], 1),
]


@pytest.mark.parametrize(("entries", "allocated"), [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
@pytest.mark.parametrize("output", ["human", "json"])
def test_check_reports_what_qemu_img_reports(tmp_path: Path, entries: list[int], allocated: int, output: str) -> None:
    image = tmp_path / "damaged.vdi"
    craft_vdi(image, 4 * MiB, {0: b"\1" * 512, 1: b"\2" * 512}, blocks_allocated=allocated, entries=entries)
    qemu = run(["qemu-img", "check", "-f", "vdi", f"--output={output}", image])
    status, out, err = imago_cli("check", "-f", "vdi", f"--output={output}", image)
    assert (status, out, err) == (qemu.returncode, qemu.stdout, qemu.stderr)
    assert status == 2
    # Such an image opens for checking only, and then read-only.
    if entries != [0, UNALLOCATED, 1, UNALLOCATED]:
        with pytest.raises(CorruptImageError):
            open_vdi(image)
        with pytest.raises(CorruptImageError):
            Vdi.builder_path(image).for_check().write().open_sync(PermissiveImplicitOpenGate())


def test_check_repair_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "clean.vdi"
    imago.create(image, "vdi", 2 * MiB)
    theirs = run(["qemu-img", "check", "-r", "all", "-f", "vdi", image])
    assert theirs.returncode == 63
    status, _, err = imago_cli("check", "-r", "all", "-f", "vdi", image)
    assert status == 63
    assert err == "imago: This image format does not support checks\n"
    assert "does not support checks" in theirs.stderr
    disk = SyncFormatAccess(Vdi.builder_path(image).write().open_sync(PermissiveImplicitOpenGate()))
    with disk, pytest.raises(UnsupportedFeatureError):
        disk.check(imago.RepairMode.ALL)
