"""``imago.create`` of an overlay checks its backing file as ``qemu-img create`` does.

The backing file must exist and open as the named format (relative to the new image's
directory), the size is taken from it when none is given, and ``unsafe`` (``-u``) skips all
that. Each case runs ``qemu-img create`` on the same input as the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import PermissiveImplicitOpenGate, SandboxImplicitOpenGate
from imago.testing.tools import qemu_io_holding

from . import _qemu
from ._qemu import MiB


def qemu_img_create(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *args], cwd=directory, capture_output=True, text=True
    )


def recorded(image: Path) -> dict[str, Any]:
    """What qemu-img reads from an image's header: size and backing file (not opened)."""
    info = _qemu.info(image.name, cwd=image.parent)
    return {key: info.get(key) for key in ("virtual-size", "backing-filename", "backing-filename-format")}


@pytest.fixture
def bases(tmp_path: Path) -> Path:
    """``base.qcow2`` (3 MiB), ``base.raw`` (1000 bytes) and ``odd.raw`` in tmp_path."""
    _qemu.create(tmp_path / "base.qcow2", 3 * MiB)
    _qemu.qemu_io(tmp_path / "base.qcow2", "write -P 0x61 0 64k")
    (tmp_path / "base.raw").write_bytes(b"r" * 1000)
    return tmp_path


@pytest.mark.parametrize(
    ("backing", "backing_format"),
    [("base.qcow2", "qcow2"), ("base.raw", "raw"), ("base.qcow2", "raw")],  # raw opens anything
)
def test_size_taken_from_the_backing_file(bases: Path, backing: str, backing_format: str) -> None:
    imago.create(bases / "ours.qcow2", "qcow2", backing_file=backing, backing_format=backing_format)
    reference = qemu_img_create(bases, "-b", backing, "-F", backing_format, "theirs.qcow2")
    assert reference.returncode == 0, reference.stderr
    assert recorded(bases / "ours.qcow2") == recorded(bases / "theirs.qcow2")
    assert recorded(bases / "ours.qcow2")["backing-filename"] == backing
    check = _qemu.check(bases / "ours.qcow2")
    assert check.get("corruptions", 0) == 0
    assert check.get("leaks", 0) == 0


def test_size_given_is_kept(bases: Path) -> None:
    for size in (MiB, 8 * MiB):
        imago.create(bases / "ours.qcow2", "qcow2", size, backing_file="base.qcow2", backing_format="qcow2")
        qemu_img_create(bases, "-b", "base.qcow2", "-F", "qcow2", "theirs.qcow2", str(size))
        assert recorded(bases / "ours.qcow2") == recorded(bases / "theirs.qcow2")
        assert recorded(bases / "ours.qcow2")["virtual-size"] == size


def test_the_overlay_reads_the_backing_file(bases: Path) -> None:
    imago.create(bases / "top.qcow2", "qcow2", backing_file="base.qcow2", backing_format="qcow2")
    with imago.open(bases / "top.qcow2", "qcow2") as image:
        assert image.size == 3 * MiB
        buf = bytearray(65536)
        image.read(buf, 0)
        assert buf == b"a" * 65536


def test_missing_backing_file_refused(bases: Path) -> None:
    top = bases / "top.qcow2"
    top.write_bytes(b"precious")
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(top, "qcow2", MiB, backing_file="missing.qcow2", backing_format="qcow2")
    assert info.value.option == "backing_file"
    assert str(bases / "missing.qcow2") in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert top.read_bytes() == b"precious"
    reference = qemu_img_create(bases, "-b", "missing.qcow2", "-F", "qcow2", "theirs.qcow2", "1M")
    assert reference.returncode == 1
    assert "missing.qcow2" in reference.stderr


@pytest.mark.parametrize("size", [MiB, None])
def test_wrong_backing_format_refused(bases: Path, size: int | None) -> None:
    # base.raw holds no qcow2 header: qemu-img refuses to use it as a qcow2 backing file.
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(bases / "top.qcow2", "qcow2", size, backing_file="base.raw", backing_format="qcow2")
    assert info.value.option == "backing_file"
    assert "base.raw" in str(info.value)
    assert "qcow2" in str(info.value)
    assert isinstance(info.value.__cause__, imago.ImagoError)
    assert not (bases / "top.qcow2").exists()
    reference = qemu_img_create(bases, "-b", "base.raw", "-F", "qcow2", "theirs.qcow2", *([str(size)] if size else []))
    assert reference.returncode == 1


def test_unknown_backing_format(bases: Path) -> None:
    with pytest.raises(imago.DriverNotFoundError) as info:
        imago.create(bases / "top.qcow2", "qcow2", backing_file="base.raw", backing_format="nosuch")
    assert info.value.name == "nosuch"
    assert qemu_img_create(bases, "-b", "base.raw", "-F", "nosuch", "theirs.qcow2").returncode == 1


def test_backing_format_must_be_named(bases: Path) -> None:
    # qemu-img 7.2: "Backing file specified without backing format" (with or without -u).
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(bases / "top.qcow2", "qcow2", backing_file="base.qcow2")
    assert info.value.option == "backing_format"
    assert qemu_img_create(bases, "-b", "base.qcow2", "theirs.qcow2").returncode == 1
    assert qemu_img_create(bases, "-u", "-b", "base.qcow2", "theirs.qcow2", "1M").returncode == 1


def test_unsafe_skips_the_backing_file(bases: Path) -> None:
    imago.create(bases / "ours.qcow2", "qcow2", MiB, unsafe=True, backing_file="later.raw", backing_format="raw")
    reference = qemu_img_create(bases, "-u", "-b", "later.raw", "-F", "raw", "theirs.qcow2", "1M")
    assert reference.returncode == 0, reference.stderr
    assert recorded(bases / "ours.qcow2") == recorded(bases / "theirs.qcow2")
    # Not even the format is checked against the file: -u trusts the caller.
    imago.create(bases / "ours.qcow2", "qcow2", MiB, unsafe=True, backing_file="base.raw", backing_format="qcow2")


def test_unsafe_needs_a_size(bases: Path) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(bases / "top.qcow2", "qcow2", unsafe=True, backing_file="base.qcow2", backing_format="qcow2")
    assert info.value.option == "size"
    assert "unsafe" in str(info.value)
    assert qemu_img_create(bases, "-u", "-b", "base.qcow2", "-F", "qcow2", "theirs.qcow2").returncode == 1


def test_size_needed_without_backing_file(tmp_path: Path) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(tmp_path / "top.qcow2", "qcow2")
    assert info.value.option == "size"
    assert not (tmp_path / "top.qcow2").exists()


def test_backing_file_is_not_the_image_itself(bases: Path) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(bases / "base.qcow2", "qcow2", backing_file="base.qcow2", backing_format="qcow2")
    assert info.value.option == "backing_file"
    assert _qemu.info(bases / "base.qcow2")["virtual-size"] == 3 * MiB  # untouched
    assert qemu_img_create(bases, "-b", "base.qcow2", "-F", "qcow2", "base.qcow2").returncode == 1


def test_backing_relative_to_the_new_image(bases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = bases / "images"
    images.mkdir()
    shutil.copy(bases / "base.qcow2", images / "inner.qcow2")
    monkeypatch.chdir(bases)  # holds no inner.qcow2: the name is not taken relative to the cwd
    imago.create("images/top.qcow2", "qcow2", backing_file="inner.qcow2", backing_format="qcow2")
    assert recorded(images / "top.qcow2")["virtual-size"] == 3 * MiB
    with pytest.raises(imago.InvalidOptionError):
        imago.create("images/top.qcow2", "qcow2", backing_file="base.qcow2", backing_format="qcow2")
    imago.create(
        "images/top.qcow2",
        "qcow2",
        backing_file="../base.qcow2",
        backing_format="qcow2",
        gate=SandboxImplicitOpenGate([bases]),
    )


def test_backing_file_goes_through_the_gate(bases: Path) -> None:
    images = bases / "images"
    images.mkdir()
    # The default gate is the sandbox of the new image's directory, as for imago.open.
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.create(images / "top.qcow2", "qcow2", backing_file="../base.qcow2", backing_format="qcow2")
    assert "base.qcow2" in str(info.value)
    assert not (images / "top.qcow2").exists()
    with pytest.raises(imago.ImplicitOpenDeniedError):
        imago.create(
            images / "top.qcow2",
            "qcow2",
            backing_file="../base.qcow2",
            backing_format="qcow2",
            gate=imago.DenyImplicitOpenGate(),
        )
    imago.create(
        images / "top.qcow2",
        "qcow2",
        backing_file="../base.qcow2",
        backing_format="qcow2",
        gate=PermissiveImplicitOpenGate(),
    )
    assert recorded(images / "top.qcow2")["virtual-size"] == 3 * MiB
    with pytest.raises(imago.InvalidOptionError) as bad:
        imago.create(images / "x.qcow2", "qcow2", MiB, gate="permissive")  # type: ignore[arg-type]
    assert bad.value.option == "gate"


def test_the_backing_chain_of_the_backing_file_is_opened(bases: Path) -> None:
    # qemu-img opens the backing file with its own backing chain: a broken chain is refused.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "mid.qcow2", "1M"],
        cwd=bases,
        check=True,
    )
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(bases / "top.qcow2", "qcow2", backing_file="mid.qcow2", backing_format="qcow2")
    assert "gone.qcow2" in str(info.value)
    assert qemu_img_create(bases, "-b", "mid.qcow2", "-F", "qcow2", "theirs.qcow2").returncode == 1


@pytest.fixture
def writer_holding(bases: Path) -> Iterator[subprocess.Popen[str]]:
    """``qemu-io`` holding base.qcow2 open for writing (and locked, as QEMU locks it)."""
    process = qemu_io_holding("base.qcow2", "-f", "qcow2", cwd=bases)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_backing_file_in_use_by_a_writer(bases: Path, writer_holding: subprocess.Popen[str]) -> None:
    # qemu-img opens the backing file sharing it with writers (force-share), and so does imago.
    reference = qemu_img_create(bases, "-b", "base.qcow2", "-F", "qcow2", "theirs.qcow2")
    assert reference.returncode == 0, reference.stderr
    imago.create(bases / "ours.qcow2", "qcow2", backing_file="base.qcow2", backing_format="qcow2")
    assert recorded(bases / "ours.qcow2") == recorded(bases / "theirs.qcow2")
    assert writer_holding.poll() is None


def test_no_lock_is_left_on_the_backing_file(bases: Path) -> None:
    imago.create(bases / "top.qcow2", "qcow2", backing_file="base.qcow2", backing_format="qcow2")
    inode = os.stat(bases / "base.qcow2").st_ino
    assert not any(f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())
    _qemu.qemu_io(bases / "base.qcow2", "write -P 0x62 0 512")  # a writer can open it
