"""Image locking as QEMU does it, tested against real ``qemu-io``/``qemu-img`` processes.

The oracle is QEMU itself: which bytes ``qemu-io`` locks (read from ``/proc/locks``), whether
QEMU's tools open an image imago holds, and whether imago opens an image QEMU holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imago import ImageLockedError, ImagoError, StorageCreateOptions, StorageOpenOptions, runtime
from imago.testing.tools import qemu_io_holding
from imago_file import File
from imago_file.locking import locked_bytes

# The byte ranges the protocol uses (QEMU's RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE).


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is required for the locking tests (Debian package qemu-utils)")
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 1 MiB qcow2 image (QEMU takes its strictest locks on qcow2), with a pattern at offset 0."""
    path = tmp_path / "image.qcow2"
    subprocess.run([_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    qemu_io_run(path, "write -P 0x5a 0 4k", check=True)
    return path


def qemu_io_run(path: Path, command: str, *flags: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run one qemu-io command on *path* (qcow2, or what *flags* say)."""
    fmt = [] if "-f" in flags else ["-f", "qcow2"]
    result = subprocess.run(
        [_tool("qemu-io"), *fmt, *flags, "-c", command, str(path)], capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result
        assert "failed" not in result.stdout + result.stderr, result
    return result


def qemu_can_write(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return qemu_io_run(path, "write -P 0x77 64k 512", *flags)


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes holding images, stopped after the test."""
    processes: list[subprocess.Popen[Any]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def qemu_holds(holders: list[subprocess.Popen[Any]]) -> Callable[..., dict[int, int]]:
    """``qemu_holds(path, *flags)``: ``qemu-io FLAGS`` keeps *path* open; returns the bytes it locked."""

    def hold(path: Path, *flags: str) -> dict[int, int]:
        fmt = [] if "-f" in flags else ["-f", "qcow2"]
        baseline = locked_bytes(path)
        holders.append(qemu_io_holding(path, *fmt, *flags))
        current = locked_bytes(path)
        return {byte: count - baseline.get(byte, 0) for byte, count in current.items() if count != baseline.get(byte)}

    return hold


# A child process that holds a File open as told and reports "ready" (or its error), then waits
# for its stdin to close.
_HOLDER = """
import sys
from imago import ImageLockedError, StorageOpenOptions
from imago_file import File
path, writable, force_share = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
try:
    storage = File.open_sync(StorageOpenOptions(filename=path, writable=writable, force_share=force_share))
except ImageLockedError as error:
    print("locked", error.lock, error.shared, error, flush=True)
    sys.exit(3)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def imago_holds(holders: list[subprocess.Popen[Any]]) -> Callable[..., subprocess.Popen[bytes]]:
    """``imago_holds(path, writable=..., force_share=...)``: another Python process holds *path* open."""

    def hold(path: Path, *, writable: bool = False, force_share: bool = False) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path), str(int(writable)), str(int(force_share))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        holders.append(process)
        assert process.stdout is not None
        process.line = process.stdout.readline().decode()  # type: ignore[attr-defined]
        return process

    return hold


def open_storage(path: Path, *, writable: bool = False, force_share: bool = False) -> File:
    return File.open_sync(StorageOpenOptions(filename=path, writable=writable, force_share=force_share))


def close(storage: File) -> None:
    runtime.run_sync(storage.close())


def read(storage: File, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


# --- the bytes: imago locks what qemu-io locks -----------------------------------------------------


@pytest.mark.parametrize(
    ("qemu_flags", "writable", "force_share"),
    [((), True, False), (("-r",), False, False), (("-r", "-U"), False, True)],
    ids=["read-write", "read-only", "force-share"],
)
def test_locks_the_bytes_qemu_io_locks(image, qemu_holds, holders, qemu_flags, writable, force_share):
    qemu_locks = qemu_holds(image, *qemu_flags)
    holders[0].kill()
    holders[0].wait()
    assert locked_bytes(image) == {}
    storage = open_storage(image, writable=writable, force_share=force_share)
    try:
        assert locked_bytes(image) == qemu_locks
    finally:
        close(storage)
    assert locked_bytes(image) == {}


# --- QEMU holds the image ------------------------------------------------------------------------


def test_qemu_writer_stops_imago_writer_and_reader(image, qemu_holds):
    qemu_holds(image)
    qemu_reader = qemu_io_run(image, "read 0 512", "-r")
    assert qemu_reader.returncode != 0
    assert 'Failed to get shared "write" lock' in qemu_reader.stderr
    before = locked_bytes(image)

    with pytest.raises(ImageLockedError) as writer:
        open_storage(image, writable=True)
    assert writer.value.filename == str(image)
    assert (writer.value.lock, writer.value.shared) == ("write", False)
    assert 'Failed to get "write" lock' in str(writer.value)
    assert str(image) in str(writer.value)
    assert "force_share" in str(writer.value)
    assert "-U" in str(writer.value)
    assert isinstance(writer.value, ImagoError)
    assert isinstance(writer.value, OSError)

    with pytest.raises(ImageLockedError) as reader:
        open_storage(image)
    # The same lock QEMU's own reader could not get.
    assert 'Failed to get shared "write" lock' in str(reader.value)
    assert (reader.value.lock, reader.value.shared) == ("write", True)
    # A refused open leaves no lock behind.
    assert locked_bytes(image) == before


def test_force_share_reads_what_qemu_holds_for_writing(image, qemu_holds):
    qemu_holds(image)
    assert qemu_io_run(image, "read 0 512", "-r", "-U").returncode == 0  # QEMU's -U reads too
    storage = open_storage(image, force_share=True)
    try:
        assert read(storage, 0, 4) == b"QFI\xfb"
    finally:
        close(storage)


def test_qemu_reader_stops_imago_writer_not_reader(image, qemu_holds):
    qemu_holds(image, "-r")
    with pytest.raises(ImageLockedError) as writer:
        open_storage(image, writable=True)
    assert (writer.value.lock, writer.value.shared) == ("write", False)
    close(open_storage(image))


def test_create_over_an_image_qemu_holds_leaves_it_untouched(image, qemu_holds):
    content = image.read_bytes()
    qemu_holds(image, "-r")
    with pytest.raises(ImageLockedError):
        File.create_sync(StorageCreateOptions(filename=image, size=4096, overwrite=True))
    assert image.read_bytes() == content


# --- imago holds the image -----------------------------------------------------------------------


def test_imago_writer_stops_qemu(image):
    storage = open_storage(image, writable=True)
    try:
        refused = qemu_can_write(image)
        assert refused.returncode != 0
        assert 'Failed to get "write" lock' in refused.stderr
        info = subprocess.run([_tool("qemu-img"), "info", str(image)], capture_output=True, text=True)
        assert info.returncode != 0
        assert 'Failed to get shared "write" lock' in info.stderr
        shared = subprocess.run([_tool("qemu-img"), "info", "-U", str(image)], capture_output=True, text=True)
        assert shared.returncode == 0, shared.stderr
    finally:
        close(storage)
    # Closing releases the locks.
    assert qemu_can_write(image).returncode == 0


def test_imago_reader_stops_qemu_writer_not_readers(image):
    storage = open_storage(image)
    try:
        refused = qemu_can_write(image)
        assert refused.returncode != 0
        assert 'Failed to get "write" lock' in refused.stderr
        assert qemu_io_run(image, "read -P 0x5a 0 4k", "-r").returncode == 0
    finally:
        close(storage)
    assert qemu_can_write(image).returncode == 0


def test_imago_force_share_does_not_stop_qemu_writer(image):
    storage = open_storage(image, force_share=True)
    try:
        assert qemu_can_write(image).returncode == 0
    finally:
        close(storage)


# --- two imago processes ---------------------------------------------------------------------------


def test_two_imago_processes_exclude_each_other(image, imago_holds):
    writer = imago_holds(image, writable=True)
    assert writer.line.startswith("ready")
    for kwargs, shared in (({"writable": True}, False), ({}, True)):
        with pytest.raises(ImageLockedError) as refused:
            open_storage(image, **kwargs)
        assert (refused.value.lock, refused.value.shared) == ("write", shared)
    close(open_storage(image, force_share=True))
    refused_child = imago_holds(image, writable=True)
    assert refused_child.line.startswith("locked write False")
    assert refused_child.wait() == 3


def test_imago_reader_processes_share_and_stop_a_writer_process(image, imago_holds):
    readers = [imago_holds(image), imago_holds(image)]  # readers share
    assert [reader.line[:5] for reader in readers] == ["ready", "ready"]
    assert imago_holds(image, writable=True).line.startswith("locked write False")
    for reader in readers:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait()
    # Once the readers are gone, the image is free for a writer.
    assert imago_holds(image, writable=True).line.startswith("ready")


def test_foreign_exclusive_lock_is_a_conflict(image, holders):
    # A process holding a POSIX write lock on the whole file stops QEMU ("Failed to lock byte
    # 100") and imago alike, and imago leaves nothing locked behind.
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); "
            "sys.stdin.read()",
            str(image),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    holders.append(locker)
    assert locker.stdout is not None
    locker.stdout.readline()
    assert "Failed to lock byte 100" in qemu_io_run(image, "read 0 512", "-r").stderr
    before = locked_bytes(image)
    with pytest.raises(ImageLockedError) as refused:
        open_storage(image)
    assert refused.value.lock == "consistent read"
    assert locked_bytes(image) == before


# --- one process, close, fork, exec ----------------------------------------------------------------


def test_second_open_in_the_same_process_conflicts(image):
    # OFD locks belong to the open file description, not the process.
    storage = open_storage(image, writable=True)
    try:
        with pytest.raises(ImageLockedError):
            open_storage(image)
        close(open_storage(image, force_share=True))
    finally:
        close(storage)
    close(open_storage(image, writable=True))


def test_garbage_collected_storage_releases_its_locks(image):
    storage = open_storage(image, writable=True)
    del storage
    assert locked_bytes(image) == {}


def test_forked_child_exiting_keeps_the_parent_locks(image):
    storage = open_storage(image, writable=True)
    try:
        held = locked_bytes(image)
        pid = os.fork()
        if pid == 0:  # the child closes its copy and exits, as a multiprocessing worker may
            try:
                close(storage)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert locked_bytes(image) == held
        assert qemu_can_write(image).returncode != 0
    finally:
        close(storage)
    assert locked_bytes(image) == {}


def test_parent_close_frees_the_image_while_a_forked_child_lives(image):
    storage = open_storage(image, writable=True)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child keeps the inherited descriptor open until the parent is done
        try:
            os.close(ready_w)
            os.read(ready_r, 1)
        finally:
            os._exit(0)
    os.close(ready_r)
    try:
        close(storage)
        assert locked_bytes(image) == {}
        assert qemu_can_write(image).returncode == 0
    finally:
        os.close(ready_w)
        os.waitpid(pid, 0)


def test_block_device_is_locked_like_a_file(tmp_path, qemu_holds):
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "device.img"
    backing.write_bytes(bytes(1 << 20))
    setup = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if setup.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {setup.stderr.strip() or setup.returncode}")
    device = Path(setup.stdout.strip())
    try:
        storage = open_storage(device, writable=True)
        try:
            assert storage.block_device
            refused = qemu_can_write(device, "-f", "raw")
            assert refused.returncode != 0
            assert 'Failed to get "write" lock' in refused.stderr
        finally:
            close(storage)
        # qemu-io on a raw image shares write but holds it: imago, which does not share it, stays out.
        qemu_holds(device, "-f", "raw")
        with pytest.raises(ImageLockedError) as reader:
            open_storage(device)
        assert (reader.value.filename, reader.value.lock, reader.value.shared) == (str(device), "write", True)
    finally:
        subprocess.run(["losetup", "-d", str(device)], capture_output=True, check=False)


def test_exec_does_not_inherit_the_descriptor(image):
    storage = open_storage(image, writable=True)
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; print(sorted(os.listdir('/proc/self/fd'))); sys.stdin.read()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=False,
        )
        try:
            assert child.stdout is not None
            child.stdout.readline()
            inherited = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
            assert str(image) not in inherited
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
    finally:
        close(storage)
    assert locked_bytes(image) == {}
