"""Options for opening qcow2 images: storage options reach the data file; discarding freed clusters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import imago
from imago import InvalidOptionError, PermissiveImplicitOpenGate, SyncFormatAccess
from imago_qcow2 import Qcow2

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


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.parametrize("discard_freed", [True, False])
def test_freed_clusters_are_punched_out_unless_asked_not_to(tmp_path: Path, discard_freed: bool) -> None:
    path = tmp_path / "p.qcow2"
    _qemu.create(path, 8 * MiB)
    _qemu.qemu_io(path, f"write -P 0x11 0 {4 * MiB}")
    before = allocated(path)
    builder = Qcow2.builder_path(path).write(True).discard_freed(discard_freed)
    with SyncFormatAccess(builder.open_sync(PermissiveImplicitOpenGate())) as image:
        image.discard_to_zero(0, 4 * MiB)
    check_clean(path)
    _qemu.qemu_io(path, f"read -P 0 0 {4 * MiB}")
    if discard_freed:
        assert allocated(path) < before - 3 * MiB
    else:
        assert allocated(path) >= before


@pytest.mark.parametrize("value", [1, "yes", None])
def test_discard_freed_must_be_a_bool(value: object) -> None:
    with pytest.raises(InvalidOptionError, match="discard_freed"):
        Qcow2.builder_path("x.qcow2").discard_freed(value)  # type: ignore[arg-type]
