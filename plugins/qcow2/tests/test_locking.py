"""qcow2 images are locked as QEMU locks them: the image file, its backing file, its data file.

The oracle is ``qemu-io`` holding the same image: the bytes it locks on each file (read from
``/proc/locks``) must be the bytes imago locks, for read-write, read-only and ``-U`` opens.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imago
from imago import ImageLockedError
from imago.testing.tools import qemu_io_holding
from imago_file.locking import locked_bytes

from . import _qemu
from ._qemu import MiB


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    """An overlay over a backing file, and an image with an external data file."""
    base, overlay, data_image = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2", tmp_path / "data.qcow2"
    _qemu.create(base, MiB)
    _qemu.qemu_io(base, "write -P 0x61 0 64k")
    _qemu.create(overlay, MiB, options={"backing_file": "base.qcow2", "backing_fmt": "qcow2"}, cwd=tmp_path)
    _qemu.create(data_image, MiB, options={"data_file": "data.raw"}, cwd=tmp_path)
    return {"base": base, "overlay": overlay, "data_image": data_image, "data": tmp_path / "data.raw"}


@pytest.fixture
def qemu_io_holder() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def hold_with_qemu_io(
    image: Path, flags: tuple[str, ...], watched: list[Path], processes: list[subprocess.Popen[str]]
) -> dict[Path, dict[int, int]]:
    """Start ``qemu-io FLAGS image`` holding the image; once it has opened it, what it locked."""
    process = qemu_io_holding(image, "-f", "qcow2", *flags, cwd=image.parent)
    processes.append(process)
    locks = {path: locked_bytes(path) for path in watched}
    assert all(locks.values()), f"qemu-io {flags} did not lock {watched}"
    return locks


def read4(image: imago.SyncFormatAccess) -> bytes:
    buf = bytearray(4)
    image.read(buf, 0)
    return bytes(buf)


MODES = [((), {"write": True}), (("-r",), {}), (("-r", "-U"), {"force_share": True})]
MODE_IDS = ["read-write", "read-only", "force-share"]


@pytest.mark.parametrize(("qemu_flags", "open_kwargs"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize(("image", "files"), [("overlay", ["overlay", "base"]), ("data_image", ["data_image", "data"])])
def test_files_are_locked_as_qemu_locks_them(chain, qemu_io_holder, qemu_flags, open_kwargs, image, files):
    watched = [chain[name] for name in files]
    qemu_locks = hold_with_qemu_io(chain[image], qemu_flags, watched, qemu_io_holder)
    qemu_io_holder.pop().kill()
    deadline = time.monotonic() + 10
    while any(locked_bytes(path) for path in watched):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with imago.open(chain[image], "qcow2", **open_kwargs):
        assert {path: locked_bytes(path) for path in watched} == qemu_locks
    assert not any(locked_bytes(path) for path in watched)


def test_backing_file_held_for_writing_stops_a_reader_unless_force_share(chain, qemu_io_holder):
    hold_with_qemu_io(chain["base"], (), [chain["base"]], qemu_io_holder)
    with pytest.raises(ImageLockedError) as refused:
        imago.open(chain["overlay"], "qcow2")
    assert refused.value.filename == str(chain["base"])
    assert (refused.value.lock, refused.value.shared) == ("write", True)
    # Nothing stays locked by the refused open.
    assert not locked_bytes(chain["overlay"])
    with imago.open(chain["overlay"], "qcow2", force_share=True) as image:
        assert read4(image) == b"aaaa"


def test_probing_takes_no_lock_that_hides_the_real_conflict(chain, qemu_io_holder):
    hold_with_qemu_io(chain["overlay"], ("-r",), [chain["overlay"]], qemu_io_holder)
    with pytest.raises(ImageLockedError) as refused:
        imago.open(chain["overlay"], write=True)  # the format is probed first
    assert (refused.value.lock, refused.value.shared) == ("write", False)
    with imago.open(chain["overlay"]) as image:  # probed, then opened read-only beside qemu-io -r
        assert read4(image) == b"aaaa"


def test_force_share_with_write_is_refused(chain):
    with pytest.raises(imago.InvalidOptionError) as refused:
        imago.open(chain["overlay"], "qcow2", write=True, force_share=True)
    assert refused.value.option == "force_share"
