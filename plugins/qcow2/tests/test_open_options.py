"""Storage options given when opening a qcow2 image apply to its external data file too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import imago

from . import _qemu
from ._qemu import MiB
from .test_write import check_clean


@pytest.mark.parametrize("no_flush", [True, False])
def test_no_flush_reaches_the_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_flush: bool) -> None:
    path = tmp_path / "d.qcow2"
    _qemu.create(path, 4 * MiB, options={"data_file": "d.data"}, cwd=tmp_path)
    synced: set[str] = set()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with imago.open(path, "qcow2", write=True, no_flush=no_flush) as image:
        image.write(b"\x42" * 70000, 12345)
        image.flush()
    assert synced == (set() if no_flush else {"d.qcow2", "d.data"})
    check_clean(path, cwd=tmp_path)
    _qemu.qemu_io(path, "read -P 0x42 12345 70000", cwd=tmp_path)
