"""The file the caller names is opened whatever its type and wherever it is; the gate rules only
the files an image names (backing file, data file)."""

from __future__ import annotations

import collections.abc
import os
import pathlib
import shutil
import stat
import subprocess

import pytest

import imago
from imago import DenyImplicitOpenGate, PermissiveImplicitOpenGate, SandboxImplicitOpenGate

DEVICE_SIZE = 1 << 20


@pytest.fixture
def loop_device(tmp_path: pathlib.Path) -> collections.abc.Iterator[tuple[str, pathlib.Path]]:
    """A loop device over a file of *DEVICE_SIZE* bytes in tmp_path: (device, backing file)."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "device.img"
    backing.write_bytes(bytes(range(256)) * (DEVICE_SIZE // 256))
    result = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {result.stderr.strip() or result.returncode}")
    device = result.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def test_block_device_opens_with_the_default_gate(loop_device: tuple[str, pathlib.Path]) -> None:
    device, backing = loop_device
    assert stat.S_ISBLK(os.stat(device).st_mode)
    with imago.open(device, "raw") as image:
        assert image.size == DEVICE_SIZE
        buf = bytearray(4)
        image.read(buf, 254)
        assert buf == bytes([254, 255, 0, 1])
    with imago.open(device, "raw", write=True) as image:
        image.write(b"device", 4096)
    assert backing.read_bytes()[4096:4102] == b"device"
    # Probing opens the named file too; so does every gate, deny included.
    for gate in (None, DenyImplicitOpenGate(), SandboxImplicitOpenGate([backing.parent])):
        with imago.open(device, gate=gate) as image:
            assert image.format_name == "raw"


def test_qcow2_on_a_block_device(loop_device: tuple[str, pathlib.Path]) -> None:
    device, _ = loop_device
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", device, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", device], check=True, capture_output=True)
    with imago.open(device, write=True) as image:
        assert image.format_name == "qcow2"
        buf = bytearray(65536)
        image.read(buf, 0)
        assert buf == b"\x5a" * 65536
        image.write(b"\xa5" * 4096, 1 << 20)
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 1M 4k", device], capture_output=True, text=True, check=True
    )
    assert "verification failed" not in read.stdout


def test_block_device_named_by_an_image_is_still_refused_by_the_sandbox(
    loop_device: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # Implicit opens stay restricted to regular files, even inside the allowed directories.
    device, _ = loop_device
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", device, "-F", "raw", str(top), "1M"], check=True
    )
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2", gate=SandboxImplicitOpenGate([tmp_path, os.path.dirname(device)]))
    assert info.value.filename == device
    assert "not a regular file" in str(info.value)
    with imago.open(top, "qcow2", gate=PermissiveImplicitOpenGate()) as image:
        assert image.driver.backing is not None
        assert image.driver.backing.size == DEVICE_SIZE


def test_image_outside_every_allowed_directory(tmp_path: pathlib.Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "base.raw").write_bytes(b"b" * 65536)
    imago.create(images / "top.qcow2", "qcow2", backing_file="base.raw", backing_format="raw")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    # The image itself opens; its backing file, outside the allowed directory, does not.
    with imago.open(images / "base.raw", "raw", gate=SandboxImplicitOpenGate([allowed])) as image:
        assert image.size == 65536
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.open(images / "top.qcow2", "qcow2", gate=SandboxImplicitOpenGate([allowed]))
    assert info.value.filename == str(images / "base.raw")


def test_character_device_is_the_storage_drivers_call() -> None:
    # Not refused as an implicit open: the file storage itself serves regular files and block
    # devices, and says so naming the file and its type.
    for gate in (None, DenyImplicitOpenGate()):
        with pytest.raises(imago.UnsupportedFileTypeError) as info:
            imago.open("/dev/null", "raw", gate=gate)
        assert "/dev/null" in str(info.value)
        assert info.value.kind == "a character device"


def test_fifo_is_the_storage_drivers_call(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Opened for writing (a read-only open of a FIFO waits for a writer, as it does for qemu-img).
    with pytest.raises(imago.UnsupportedFileTypeError) as info:
        imago.open(fifo, "raw", write=True, gate=DenyImplicitOpenGate())
    assert str(fifo) in str(info.value)
    assert info.value.kind == "a FIFO"
