"""Images qemu-img cannot make, built from the specification's rules: pending logs and differencing images.

A pending log is replayed in memory by a read-only open (the file stays as it was: QEMU refuses
such images) and to disk by a writable one, after which QEMU reads the image and
``qemu-img check`` finds it clean. A differencing image reads its present blocks, its partially
present blocks sector by sector (the sector bitmap), and the rest from the parent opened through
the gate, whose DataWriteGuid must be the locator's ``parent_linkage``.
"""

from __future__ import annotations

import random
import struct
import uuid
from pathlib import Path

import pytest

import imago
from imago import (
    CorruptImageError,
    DenyImplicitOpenGate,
    ImagoError,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
)

from ._vhdx import (
    FULL,
    NOT_PRESENT,
    PARTIAL,
    ZERO,
    MiB,
    craft_vhdx,
    header_guid,
    imago_cli,
    log_entry,
    open_vhdx,
    qemu_img,
    qemu_io,
    qemu_raw,
    read_all,
)

LOG_GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")
SIZE = 4 * MiB


def _log_image(path: Path, log: bytes, *, guid: uuid.UUID = LOG_GUID) -> tuple[bytes, int]:
    """A dynamic image, block 0 present (0xa1), its pending *log* laid in: (block 0 data, data offset)."""
    block0 = bytes([0xA1]) * MiB
    facts = craft_vhdx(path, SIZE, blocks={0: (FULL, block0), 1: (ZERO, None)}, log_guid=guid, log=log)
    return block0, facts.data_offset


def _replayed_layout(path: Path) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]], bytes, int]:
    """The updates of a log that maps block 2 to a new block (appended: 0xc3), rewrites and zeroes part of block 0.

    Returns (writes, zeroes, the expected disk, the file's length after the new block).
    """
    _, facts_data = _log_image(path, b"")
    data = bytearray(path.read_bytes())
    bat_offset = 2 * MiB  # (craft_vhdx: the log at 1 MiB, 1 MiB long, then the BAT)
    new_block = len(data)
    data += bytes([0xC3]) * MiB
    path.write_bytes(data)
    bat_sector = bytearray(data[bat_offset : bat_offset + 4096])
    struct.pack_into("<Q", bat_sector, 16, (new_block // MiB) << 20 | FULL)
    first = bytes([0xD4]) * 4096
    writes = [(bat_offset, bytes(bat_sector)), (facts_data, first)]
    zeroes = [(facts_data + 4096, 8192)]
    expected = bytearray(SIZE)
    expected[:MiB] = bytes([0xA1]) * MiB
    expected[:4096] = first
    expected[4096 : 3 * 4096] = bytes(8192)
    expected[2 * MiB : 3 * MiB] = bytes([0xC3]) * MiB
    return writes, zeroes, bytes(expected), len(data)


def test_log_replayed_in_memory_read_only_then_to_disk(tmp_path: Path) -> None:
    image = tmp_path / "log.vhdx"
    writes, zeroes, expected, end = _replayed_layout(image)
    log = log_entry(10, 0, LOG_GUID, writes=writes, zeroes=zeroes, flushed=end, last=end)
    data = bytearray(image.read_bytes())
    data[MiB : MiB + len(log)] = log
    image.write_bytes(data)
    before = image.read_bytes()

    with open_vhdx(image) as disk:
        assert disk.driver.log_replayed_in_memory
        whole = bytearray(SIZE)
        disk.read(whole, 0)
        assert whole == expected
    assert image.read_bytes() == before  # (read-only: nothing written)
    status, _, err = imago_cli("convert", "-f", "vhdx", "-O", "raw", image, tmp_path / "out.raw")
    assert status == 0, err
    assert (tmp_path / "out.raw").read_bytes() == expected

    with open_vhdx(image, writable=True) as disk:
        assert not disk.driver.log_replayed_in_memory
    # Replayed to disk, the log gone: QEMU reads the image and finds it clean.
    qemu_img("check", "-f", "vhdx", image)
    assert qemu_raw(image) == expected
    with open_vhdx(image) as disk:
        assert not disk.driver.log_replayed_in_memory


def test_log_sequence_across_the_wrap_with_stale_entries(tmp_path: Path) -> None:
    """Two entries, the first starting in the log's last sector (its data sector wraps), an older sequence ignored."""
    image = tmp_path / "wrap.vhdx"
    writes, zeroes, expected, end = _replayed_layout(image)
    first_at = MiB - 4096
    first = log_entry(20, first_at, LOG_GUID, writes=writes[:1], flushed=end, last=end)
    second = log_entry(21, first_at, LOG_GUID, writes=writes[1:], zeroes=zeroes, flushed=end, last=end)
    stale = log_entry(7, 64 * 1024, LOG_GUID, writes=[(writes[1][0], bytes([0xEE]) * 4096)], flushed=end, last=end)
    log = bytearray(MiB)
    log[first_at:] = first[:4096]
    log[: len(first) - 4096] = first[4096:]
    log[len(first) - 4096 : len(first) - 4096 + len(second)] = second
    log[64 * 1024 : 64 * 1024 + len(stale)] = stale
    data = bytearray(image.read_bytes())
    data[MiB : 2 * MiB] = log
    image.write_bytes(data)
    assert read_all(image) == expected


@pytest.mark.parametrize("damage", ["checksum", "guid", "tail", "headers", "flushed"])
def test_hostile_logs_refused(tmp_path: Path, damage: str) -> None:
    image = tmp_path / "bad-log.vhdx"
    writes, zeroes, _, end = _replayed_layout(image)
    tail, flushed, guid = 0, end, LOG_GUID
    if damage == "tail":
        tail = 8192  # (no entry there: the sequence is incomplete)
    if damage == "headers":
        writes = [(64 * 1024, bytes(4096))]
    if damage == "flushed":
        flushed = end + MiB
    if damage == "guid":
        guid = uuid.uuid4()
    log = bytearray(log_entry(10, tail, guid, writes=writes, zeroes=zeroes, flushed=flushed, last=flushed))
    if damage == "checksum":
        log[5000] ^= 1
    data = bytearray(image.read_bytes())
    data[MiB : MiB + len(log)] = log
    image.write_bytes(data)
    before = image.read_bytes()
    with pytest.raises(CorruptImageError):
        open_vhdx(image)
    with pytest.raises(CorruptImageError):
        open_vhdx(image, writable=True)
    assert image.read_bytes() == before


# --- differencing images -------------------------------------------------------------------------


def _parent(directory: Path) -> Path:
    parent = directory / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, str(SIZE))
    qemu_io(parent, "write -P 0x51 0 4M", "write -P 0x52 1M 8k", "write -z 3M 4k")
    return parent


def _child(directory: Path, parent: Path, **locator: str) -> tuple[Path, bytes]:
    rng = random.Random(3)
    present = rng.randbytes(MiB)
    partial = rng.randbytes(MiB)
    bits = bytearray(MiB)
    # Block 1 (chunk 0's second block: 256 bytes of bits into the bitmap): sectors 0-7 and 100-227 here.
    for sector in [*range(8), *range(100, 228)]:
        bits[256 + sector // 8] |= 1 << (sector % 8)
    entries = {"parent_linkage": "{" + str(header_guid(parent)) + "}", "relative_path": ".\\parent.vhdx", **locator}
    child = directory / "child.vhdx"
    craft_vhdx(
        child,
        SIZE,
        blocks={0: (FULL, present), 1: (PARTIAL, partial), 2: (NOT_PRESENT, None), 3: (ZERO, None)},
        bitmaps={0: bytes(bits)},
        parent=entries,
    )
    expected = bytearray(qemu_raw(parent))
    expected[:MiB] = present
    for sector in [*range(8), *range(100, 228)]:
        at = MiB + sector * 512
        expected[at : at + 512] = partial[sector * 512 : sector * 512 + 512]
    expected[3 * MiB :] = bytes(MiB)
    return child, bytes(expected)


def test_differencing_image_reads_through_its_parent(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    child, expected = _child(tmp_path, parent)
    assert read_all(child) == expected
    with open_vhdx(child) as disk:
        assert disk.driver.info()["backing-filename"] == "parent.vhdx"
        assert disk.driver.backing is not None
    status, out, err = imago_cli("info", "--output=json", child)
    assert status == 0, err
    assert '"backing-filename": "parent.vhdx"' in out
    target = tmp_path / "flat.raw"
    status, _, err = imago_cli("convert", "-f", "vhdx", "-O", "raw", child, target)
    assert status == 0, err
    assert target.read_bytes() == expected


@pytest.mark.parametrize(
    ("locator", "error"),
    [
        ({"relative_path": "..\\parent.vhdx"}, ImplicitOpenDeniedError),
        ({"relative_path": "C:\\disks\\parent.vhdx"}, ImplicitOpenDeniedError),
        ({"relative_path": "\\\\server\\share\\parent.vhdx"}, ImplicitOpenDeniedError),
        ({"relative_path": "json:{}"}, ImplicitOpenDeniedError),
        ({"parent_linkage": "{" + str(uuid.UUID(int=7)) + "}"}, CorruptImageError),
        ({"parent_linkage": "not a guid"}, CorruptImageError),
        ({"relative_path": "child.vhdx"}, ImagoError),  # (itself: a loop)
    ],
)
def test_hostile_parents_refused(tmp_path: Path, locator: dict[str, str], error: type[Exception]) -> None:
    parent = _parent(tmp_path)
    child, _ = _child(tmp_path, parent, **locator)
    with pytest.raises(error):
        open_vhdx(child)


def test_parent_loop_between_two_images(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhdx", tmp_path / "b.vhdx"
    guid_a, guid_b = uuid.uuid4(), uuid.uuid4()
    craft_vhdx(a, SIZE, parent={"parent_linkage": str(guid_b), "relative_path": "b.vhdx"}, data_write=guid_a)
    craft_vhdx(b, SIZE, parent={"parent_linkage": str(guid_a), "relative_path": "a.vhdx"}, data_write=guid_b)
    with pytest.raises(ImagoError):
        open_vhdx(a)


def test_parent_through_a_deny_gate(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    child, _ = _child(tmp_path, parent)
    with pytest.raises(ImplicitOpenDeniedError, match="parent"):
        imago.open(child, "vhdx", gate=DenyImplicitOpenGate())
    with imago.open(child, "vhdx", gate=PermissiveImplicitOpenGate()) as disk:
        assert disk.size == SIZE
