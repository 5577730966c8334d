"""Damaged images and the write path: metadata is never handed out or written over as data.

Opening for writing checks that every cluster holding metadata (header, L1 and L2 tables,
refcount table and blocks, snapshot table and snapshot tables) has a non-zero refcount, so that
allocation can never hand it out as free space; an L2 entry that maps guest data onto
metadata is refused when written through, and the image marked corrupt (as QEMU does). Both
fail with a CorruptImageError before anything else in the file changes; reading such images
still works. (More damaged images: test_overlap.py.)
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imago import CorruptImageError

from . import _qemu
from ._qemu import MiB
from .test_write import check_clean, open_ro, open_rw, read_all, sha256

CLUSTER = 65536


def make(path: Path, *, unknown_autoclear: bool = False) -> dict[str, int]:
    """A 4 MiB image with data in its first cluster; where its tables lie."""
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x11 0 {CLUSTER}")
    data = bytearray(path.read_bytes())
    if unknown_autoclear:
        struct.pack_into(">Q", data, 88, 1 << 9)
        path.write_bytes(data)
    refcount_table = struct.unpack_from(">Q", data, 48)[0]
    l1 = struct.unpack_from(">Q", data, 40)[0]
    return {
        "refcount_block": struct.unpack_from(">Q", data, refcount_table)[0],
        "l1": l1,
        "l2": struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00,
    }


def patch(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(data)


def test_l2_entry_pointing_at_metadata_is_not_written_through(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    where = make(path)
    # Guest cluster 1 "lives" in the L1 table's cluster, marked as ours (COPIED).
    patch(path, where["l2"] + 8, struct.pack(">Q", (1 << 63) | where["l1"]))
    with open_ro(path) as image:
        read_all(image)  # reading is harmless
    before = path.read_bytes()
    with open_rw(path) as image:
        with pytest.raises(CorruptImageError, match=r"metadata.*active L1 table"):
            image.write(b"\xee" * 512, CLUSTER + 100)
        # Marked corrupt: no further writes through this image, as QEMU stops using it.
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            image.write(b"\x22" * 512, 2 * CLUSTER)
    data = path.read_bytes()
    # Only the incompatible features changed.
    assert data[:72] == before[:72]
    assert data[80:] == before[80:]
    assert _qemu.info(path)["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(CorruptImageError, match="marked corrupt"):
        open_rw(path)


@pytest.mark.parametrize("table", ["l1", "l2", "refcount_block"])
def test_metadata_with_refcount_zero_is_refused_for_writing(tmp_path: Path, table: str) -> None:
    path = tmp_path / "d.qcow2"
    where = make(path, unknown_autoclear=True)
    entry = where["refcount_block"] + 2 * (where[table] // CLUSTER)  # 16-bit refcounts
    assert path.read_bytes()[entry : entry + 2] == b"\x00\x01"
    patch(path, entry, b"\x00\x00")
    before = sha256(path)
    # Opened for a repair only (as QEMU opens it): every write is refused.
    with open_rw(path) as image, pytest.raises(CorruptImageError, match="refcount is 0"):
        image.write(b"\x33" * 512, 0)
    assert sha256(path) == before  # not even the autoclear bits were cleared
    with open_ro(path) as image:
        assert read_all(image)[:CLUSTER] == b"\x11" * CLUSTER
    # Once repaired, it is writable again.
    _qemu.qemu_img("check", "-q", "-r", "all", "-f", "qcow2", path)
    with open_rw(path) as image:
        image.write(b"\x33" * 4096, MiB)
    check_clean(path)
