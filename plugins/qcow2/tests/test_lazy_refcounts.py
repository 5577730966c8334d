"""Lazy refcounts (compatible feature bit 0): the dirty bit guards refcounts that lag behind.

With lazy refcounts an L2 table may reach the disk before the refcounts it relies on; the
image is marked dirty first, and a flush writes the refcounts and marks it clean again. A
copy of the files taken while the image is dirty (what a crash leaves) is repaired by
``qemu-img check -r all`` without losing what was flushed. Without lazy refcounts the image
is never marked dirty.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from . import _qemu
from ._qemu import MiB
from .test_crash import is_dirty
from .test_write import check_clean, convert, open_ro, open_rw


def make(path: Path, lazy: bool) -> None:
    # 512-byte clusters: an L2 table covers 32 KiB, so writes far apart need new tables.
    _qemu.create(path, 4 * MiB, options={"cluster_size": 512, "lazy_refcounts": lazy})
    _qemu.qemu_io(path, "write -P 0x11 0 65536")


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "exact"])
def test_dirty_only_while_refcounts_lag(tmp_path: Path, lazy: bool) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, lazy)
    with open_rw(path) as image:
        assert not is_dirty(path)
        image.write(b"\x22" * 1000, 3 * MiB)  # a new L2 table, written before its refcounts
        assert is_dirty(path) == lazy
        image.flush()
        assert not is_dirty(path)
        # qemu-img cannot open what imago holds for writing (image locks): check a copy of the file.
        check_clean(shutil.copy(path, tmp_path / "flushed.qcow2"))
        assert image.driver.info()["dirty-flag"] is False
        image.write(b"\x33" * 1000, 2 * MiB)
        assert is_dirty(path) == lazy
        if lazy:
            assert image.driver.info()["dirty-flag"] is True
    # Closing flushes: clean again, nothing leaked.
    assert not is_dirty(path)
    check_clean(path)
    _qemu.qemu_io(path, "read -P 0x11 0 65536", f"read -P 0x22 {3 * MiB} 1000", f"read -P 0x33 {2 * MiB} 1000")


def test_a_dirty_copy_is_repaired_without_losing_flushed_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, True)
    copy = tmp_path / "crashed.qcow2"
    with open_rw(path) as image:
        image.write(b"\x44" * 4096, MiB)
        image.flush()
        flushed = convert(shutil.copy(path, tmp_path / "flushed.qcow2"), tmp_path)  # imago holds *path* locked
        image.write(b"\x55" * 4096, 3 * MiB + 512)
        assert is_dirty(path)
        shutil.copy(path, copy)  # the files as a crash would leave them
    # (Opening it for writing would repair it first, as QEMU does: see test_check.py.)
    # Read-only access still works, and sees what was flushed.
    with open_ro(copy) as image:
        assert image.driver.info()["dirty-flag"] is True
        got = bytearray(MiB + 4096)
        image.read(got, 0)
        assert got == flushed[: MiB + 4096]
    _qemu.qemu_img("check", "-q", "-r", "all", "-f", "qcow2", copy)
    assert not is_dirty(copy)
    check_clean(copy)
    repaired = convert(copy, tmp_path)
    # Everything flushed is there; the unflushed write may or may not be.
    assert repaired[: 3 * MiB] == flushed[: 3 * MiB]
    assert repaired[3 * MiB + 4608 :] == flushed[3 * MiB + 4608 :]
    # The repaired image is writable again.
    with open_rw(copy) as image:
        image.write(b"\x66" * 512, 0)
    check_clean(copy)
    _qemu.qemu_io(copy, "read -P 0x66 0 512")
