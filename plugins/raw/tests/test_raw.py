import os
import subprocess
from pathlib import Path

import pytest

import imago
from imago import (
    DenyImplicitOpenGate,
    FormatDriver,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
    PreallocateMode,
    ReadOnlyError,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
)
from imago.testing import FormatConformance
from imago_file import File
from imago_null import Null
from imago_raw import Raw


class TestRawOnFile(FormatConformance):
    def create_image(self, directory: Path, size: int) -> FormatDriver:
        path = directory / "disk.raw"
        storage = File.create_sync(StorageCreateOptions(filename=path, overwrite=True))
        Raw.create_builder(storage).size(size).create_sync()
        return Raw.builder(storage).write(True).open_sync(DenyImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        assert path is not None
        SyncFormatAccess(image).close()
        return Raw.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


class TestRawOnDirectFile(TestRawOnFile):
    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        assert path is not None
        SyncFormatAccess(image).close()
        return (
            Raw.builder_path(path)
            .write(writable)
            .storage_options(StorageOpenOptions(direct=True))
            .open_sync(PermissiveImplicitOpenGate())
        )

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        return self.reopen_image(super().create_image(directory, size), writable=True)


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_create_matches_qemu_img(tmp_path: Path, mode: str) -> None:
    ours = tmp_path / "ours.raw"
    theirs = tmp_path / "theirs.raw"
    imago.create(ours, format="raw", size=3 << 20, preallocate=mode)
    _qemu_img("create", "-f", "raw", "-o", f"preallocation={mode}", str(theirs), str(3 << 20))
    assert ours.stat().st_size == theirs.stat().st_size == 3 << 20
    if mode != "off":
        assert ours.stat().st_blocks * 512 >= 3 << 20
    _qemu_img("compare", "-f", "raw", "-F", "raw", str(ours), str(theirs))


def test_create_truncates_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "old.raw"
    path.write_bytes(b"\xff" * 8192)
    storage = File.open_sync(StorageOpenOptions(filename=path, writable=True))
    Raw.create_builder(storage).size(4096).create_sync()
    imago.runtime.run_sync(storage.close())
    assert path.read_bytes() == bytes(4096)


def test_written_data_matches_qemu_io(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    imago.create(path, format="raw", size=1 << 20)
    with imago.open(path, format="raw", write=True) as image:
        image.write(b"\xab" * 4096, 65536)
        image.write_zeroes(65536 + 1024, 1024)
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0xab 65536 1024", "-c", "read -P 0 66560 1024", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read 1024/1024 bytes") == 2


def test_reads_data_written_by_qemu_io(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    _qemu_img("create", "-f", "raw", str(path), "1M")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5c 4096 8192", str(path)], check=True, capture_output=True
    )
    with imago.open(path, format="raw") as image:
        buf = bytearray(12288)
        image.read(buf, 0)
    assert buf == bytes(4096) + b"\x5c" * 8192


def test_probe_and_info(tmp_path: Path) -> None:
    path = tmp_path / "any.bin"
    path.write_bytes(os.urandom(1024))
    storage = File.open_sync(StorageOpenOptions(filename=path))
    assert imago.runtime.run_sync(Raw.probe(storage))
    assert imago.probe_sync(storage) is Raw
    image = Raw.builder(storage).open_sync(DenyImplicitOpenGate())
    assert image.info() == {}
    assert image.size == 1024
    assert "Raw" in repr(image)
    SyncFormatAccess(image).close()


def test_gate_consulted_for_image_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    imago.create(path, format="raw", size=4096)
    with pytest.raises(ImplicitOpenDeniedError):
        Raw.builder_path(path).open_sync(DenyImplicitOpenGate())
    Raw.builder(File.open_sync(StorageOpenOptions(filename=path))).open_sync(DenyImplicitOpenGate())


def test_writable_open_of_read_only_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    imago.create(path, format="raw", size=4096)
    storage = File.open_sync(StorageOpenOptions(filename=path))
    with pytest.raises(ReadOnlyError):
        Raw.builder(storage).write(True).open_sync(DenyImplicitOpenGate())


def test_builder_misuse(tmp_path: Path) -> None:
    with pytest.raises(imago.InvalidOptionError):
        Raw.builder("not a storage")  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidOptionError):
        Raw.builder(Null(10)).write("yes")  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidOptionError):
        Raw.builder(Null(10)).open_sync("not a gate")  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidOptionError):
        Raw.builder(Null(10)).storage_options({"direct": True})  # type: ignore[arg-type]
    with pytest.raises(imago.InvalidOptionError, match="size"):
        Raw.create_builder(Null(10)).size(-1)
    with pytest.raises(imago.InvalidOptionError, match="preallocation"):
        Raw.create_builder(Null(10)).preallocate("lots")
    with pytest.raises(imago.InvalidOptionError, match="cluster_size"):
        Raw.create_builder(Null(10)).set_option("cluster_size", 65536)
    with pytest.raises(imago.InvalidOptionError):
        Raw.create_builder(42)  # type: ignore[arg-type]


def test_resize_preallocation_on_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    imago.create(path, format="raw", size=4096)
    with imago.open(path, format="raw", write=True) as image:
        image.resize(8 << 20, PreallocateMode.FALLOC)
        assert path.stat().st_size == 8 << 20
        assert path.stat().st_blocks * 512 >= (8 << 20) - 4096  # the first block was never written
        image.resize(4096, shrink=True)
    assert path.stat().st_size == 4096


def test_discard_to_zero_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    imago.create(path, format="raw", size=8 << 20, preallocate="full")
    before = path.stat().st_blocks
    with imago.open(path, format="raw", write=True) as image:
        image.discard_to_zero(0, 4 << 20)
        buf = bytearray(4 << 20)
        image.read(buf, 0)
        assert buf == bytes(4 << 20)
    assert path.stat().st_blocks < before
