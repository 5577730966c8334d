"""imago.open / open_async / create / create_async / probe / probe_sync."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess

import pytest

import imago
from imago import (
    DenyImplicitOpenGate,
    FormatAccess,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    StorageOpenOptions,
    SyncFormatAccess,
)
from imago_file import File
from imago_null import Null
from imago_raw import Raw

# --- create -----------------------------------------------------------------------------------


def test_create_makes_a_zeroed_raw_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    assert imago.create(path, "raw", 65536) is None
    assert path.stat().st_size == 65536
    assert path.read_bytes() == bytes(65536)


def test_create_accepts_str_path(tmp_path: pathlib.Path) -> None:
    imago.create(str(tmp_path / "s.img"), "raw", 1000)
    assert (tmp_path / "s.img").stat().st_size == 1000


def test_create_zero_size(tmp_path: pathlib.Path) -> None:
    imago.create(tmp_path / "empty.img", "raw", 0)
    assert (tmp_path / "empty.img").stat().st_size == 0
    with imago.open(tmp_path / "empty.img", "raw") as image:
        assert image.size == 0
        image.read(bytearray(), 0)


def test_create_replaces_existing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"old data" * 10000)
    imago.create(path, "raw", 4096)
    assert path.read_bytes() == bytes(4096)


@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full", "zero", imago.PreallocateMode.FULL])
def test_create_with_preallocation(tmp_path: pathlib.Path, mode: object) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xff" * 100)
    imago.create(path, "raw", 8192, preallocate=mode)
    assert path.read_bytes() == bytes(8192)


def test_create_full_preallocation_allocates(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "full.img"
    imago.create(path, "raw", 1 << 20, preallocate="full")
    assert path.stat().st_blocks * 512 >= 1 << 20


def test_create_accepts_qemu_img_option_names(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "full.img"
    imago.create(path, "raw", 1 << 20, preallocation="full")  # qemu-img's name for "preallocate"
    assert path.stat().st_blocks * 512 >= 1 << 20


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"cluster_size": 65536}, "cluster_size"),
        ({"backing_file": "base.img"}, "backing_file"),
        ({"lazy_refcounts": True}, "lazy_refcounts"),
        ({"compat": "1.1"}, "compat"),
    ],
)
def test_create_unknown_option_keeps_existing_file(
    tmp_path: pathlib.Path, options: dict[str, object], name: str
) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"precious" * 512)
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(path, "raw", 4096, **options)
    assert info.value.option == name
    assert name in str(info.value)
    assert path.read_bytes() == b"precious" * 512


def test_create_bad_option_value_keeps_existing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"precious")
    with pytest.raises(imago.InvalidOptionError):
        imago.create(path, "raw", 4096, preallocate="bogus")
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("size", [-1, -4096, 1.5, "4096", None, True, 4096.0])
def test_create_bad_size(tmp_path: pathlib.Path, size: object) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"precious")
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.create(path, "raw", size)  # type: ignore[arg-type]
    assert info.value.option == "size"
    assert path.read_bytes() == b"precious"
    assert not (tmp_path / "other.img").exists()


def test_create_unknown_format(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"precious")
    with pytest.raises(imago.DriverNotFoundError) as info:
        imago.create(path, "vhdx-nonexistent", 4096)
    assert "imago-vhdx-nonexistent" in str(info.value)
    assert info.value.distribution == "imago-vhdx-nonexistent"
    assert isinstance(info.value, LookupError)
    assert path.read_bytes() == b"precious"


def test_create_in_missing_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        imago.create(tmp_path / "no" / "such" / "dir.img", "raw", 512)


def test_create_async(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"x" * 10)
    asyncio.run(imago.create_async(path, "raw", 12345))
    assert path.read_bytes() == bytes(12345)


def test_create_inside_a_running_loop(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        imago.create(tmp_path / "in-loop.img", "raw", 2048)

    asyncio.run(main())
    assert (tmp_path / "in-loop.img").read_bytes() == bytes(2048)


# --- open -------------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 64)
    return path


def test_open_named_format(disk: pathlib.Path) -> None:
    with imago.open(disk, "raw") as image:
        assert isinstance(image, SyncFormatAccess)
        assert image.format_name == "raw"
        assert image.size == 16384
        assert image.filename == str(disk)
        assert not image.writable
        buf = bytearray(4)
        image.read(buf, 254)
        assert buf == bytes([254, 255, 0, 1])
    assert image.closed


def test_open_probes_when_no_format(disk: pathlib.Path) -> None:
    with imago.open(disk) as image:
        assert image.format_name == "raw"
        assert isinstance(image.driver, Raw)
        buf = bytearray(3)
        image.read(buf, 1)
        assert buf == b"\x01\x02\x03"


def test_open_probes_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    with imago.open(path) as image:
        assert image.format_name == "raw"
        assert image.size == 0


def test_open_unknown_format(disk: pathlib.Path) -> None:
    with pytest.raises(imago.DriverNotFoundError) as info:
        imago.open(disk, "vmdk-nonexistent")
    assert "imago-vmdk-nonexistent" in str(info.value)
    assert info.value.name == "vmdk-nonexistent"
    assert info.value.kind == "format"


def test_open_format_must_be_a_name(disk: pathlib.Path) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.open(disk, Raw)  # type: ignore[arg-type]
    assert info.value.option == "format"


def test_open_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.img"):
        imago.open(tmp_path / "missing.img", "raw")
    with pytest.raises(FileNotFoundError):
        imago.open(tmp_path / "missing.img", "raw", gate=PermissiveImplicitOpenGate())


def test_open_read_only_rejects_writes(disk: pathlib.Path) -> None:
    before = disk.read_bytes()
    with imago.open(disk, "raw", write=False) as image:
        for call in (
            lambda: image.write(b"x", 0),
            lambda: image.writev([b"x"], 0),
            lambda: image.write_zeroes(0, 512),
            lambda: image.discard_to_zero(0, 512),
            lambda: image.discard_to_any(0, 512),
            lambda: image.discard_to_backing(0, 512),
            lambda: image.resize(512),
        ):
            with pytest.raises(imago.ReadOnlyError) as info:
                call()
            assert isinstance(info.value, PermissionError)
            assert str(disk) in str(info.value)
        image.flush()  # allowed: nothing to do
    assert disk.read_bytes() == before


def test_open_writable(disk: pathlib.Path) -> None:
    with imago.open(disk, "raw", write=True) as image:
        assert image.writable
        image.write(b"hello", 100)
    assert disk.read_bytes()[100:105] == b"hello"


def test_open_writable_on_read_only_file(disk: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so the OS's refusal is injected: it must pass through unchanged.
    import errno

    import imago_file.storage

    real_open = os.open

    def refuse_writable(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(imago_file.storage.os, "open", refuse_writable)
    with pytest.raises(PermissionError) as info:
        imago.open(disk, "raw", write=True)
    assert type(info.value) is PermissionError
    assert info.value.filename == str(disk)
    with imago.open(disk, "raw") as image:
        assert not image.writable


def _overlay(directory: pathlib.Path, backing: str, name: str = "top.qcow2") -> pathlib.Path:
    """A qcow2 image in *directory* whose header names the raw *backing* file."""
    top = directory / name
    imago.create(top, "qcow2", 16384, backing_file=backing, backing_format="raw", unsafe=True)
    return top


def test_default_gate_is_sandbox_of_image_directory(disk: pathlib.Path, tmp_path: pathlib.Path) -> None:
    seen: list[tuple[SandboxImplicitOpenGate, str | None]] = []
    real_open_storage = SandboxImplicitOpenGate.open_storage

    async def spy(self: SandboxImplicitOpenGate, options: StorageOpenOptions) -> imago.Storage:
        seen.append((self, options.filename))
        return await real_open_storage(self, options)

    top = _overlay(tmp_path, "disk.img")
    mp = pytest.MonkeyPatch()
    mp.setattr(SandboxImplicitOpenGate, "open_storage", spy)
    try:
        imago.open(disk, "raw").close()
        imago.open(disk).close()
        # The files the caller names are opened without the gate (probing included) ...
        assert seen == []
        with imago.open(top, "qcow2") as image:
            assert image.driver.backing is not None
        with imago.open(top) as image:
            assert image.format_name == "qcow2"
    finally:
        mp.undo()
    # ... the backing file the image names goes through the sandbox of the image's directory.
    assert [name for _, name in seen] == [str(disk), str(disk)]
    for gate, _ in seen:
        assert gate.directories == (os.path.realpath(tmp_path),)


def test_default_gate_refuses_backing_outside_image_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "base.img").write_bytes(bytes(16384))
    images = tmp_path / "images"
    images.mkdir()
    top = _overlay(images, "../base.img")
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2")
    assert "base.img" in str(info.value)
    with imago.open(top, "qcow2", gate=SandboxImplicitOpenGate([tmp_path])) as image:
        assert image.driver.backing is not None


def test_default_gate_follows_symlinked_image(disk: pathlib.Path, tmp_path: pathlib.Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / "link.img"
    link.symlink_to(disk)
    with imago.open(link, "raw") as image:
        assert image.size == 16384
        assert image.filename == str(disk)


def test_open_relative_path(disk: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(disk.parent)
    with imago.open("disk.img", "raw") as image:
        assert image.size == 16384
    with imago.open("disk.img") as image:
        assert image.format_name == "raw"


def test_open_with_deny_gate(disk: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # The image the caller names is opened; only the files it names are refused.
    with imago.open(disk, "raw", gate=DenyImplicitOpenGate()) as image:
        assert image.size == 16384
    with imago.open(disk, gate=DenyImplicitOpenGate(), write=True) as image:
        image.write(b"deny", 0)
    assert disk.read_bytes()[:4] == b"deny"
    top = _overlay(tmp_path, "disk.img")
    for format in ("qcow2", None):
        with pytest.raises(imago.ImplicitOpenDeniedError) as info:
            imago.open(top, format, gate=DenyImplicitOpenGate())
        assert info.value.filename == str(disk)


def test_open_with_sandbox_elsewhere(disk: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with imago.open(disk, "raw", gate=SandboxImplicitOpenGate([other])) as image:
        assert image.size == 16384
    with imago.open(disk, gate=SandboxImplicitOpenGate([other])) as image:
        assert image.format_name == "raw"
    top = _overlay(tmp_path, "disk.img")
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2", gate=SandboxImplicitOpenGate([other]))
    assert "outside the allowed directories" in str(info.value)


def test_open_with_permissive_gate(disk: pathlib.Path) -> None:
    with imago.open(disk, "raw", gate=PermissiveImplicitOpenGate()) as image:
        assert image.size == 16384


def test_open_protocol_like_name_is_a_file_name(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A name the caller gives is handed to the storage driver as it is: the file driver opens
    # the file of that name, and interprets no protocol. Only names written as URIs
    # (scheme://...) go to the storage driver claiming the scheme (test_uri_open.py).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        imago.open('json:{"driver": "null-co"}', "raw", gate=PermissiveImplicitOpenGate())
    with pytest.raises(imago.UnsupportedFeatureError, match="no installed storage driver"):
        imago.open("gopher://localhost/x")
    pathlib.Path("nbd:x").write_bytes(bytes(512))
    with imago.open("nbd:x", "raw") as image:
        assert image.size == 512
        assert image.filename == str(tmp_path / "nbd:x")


def test_open_protocol_name_of_a_backing_file_refused(tmp_path: pathlib.Path) -> None:
    # Names recorded in an image stay local file names, whatever the gate.
    (tmp_path / "nbd:x").write_bytes(bytes(512))
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "nbd:x", "-F", "raw", str(top), "512"], check=True
    )
    with pytest.raises(imago.ImplicitOpenDeniedError) as info:
        imago.open(top, "qcow2", gate=PermissiveImplicitOpenGate())
    assert "nbd:x" in str(info.value)


def test_open_bad_file_names(tmp_path: pathlib.Path) -> None:
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.open(str(tmp_path / "a\0b"), "raw")
    assert info.value.option == "filename"
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.open(b"disk.img", "raw")  # type: ignore[arg-type]
    assert info.value.option == "filename"
    with pytest.raises(imago.InvalidOptionError) as info:
        imago.open("", "raw")
    assert info.value.option == "filename"


def test_open_storage_driver_null(tmp_path: pathlib.Path) -> None:
    with imago.open("anything", "raw", gate=PermissiveImplicitOpenGate(), storage_driver_name="null") as image:
        assert isinstance(image.driver.storage, Null)
        assert image.size == 0
    # The storage the caller asks for is used whatever the gate (the sandbox gate opens only
    # local files, for implicit opens).
    for gate in (None, DenyImplicitOpenGate(), SandboxImplicitOpenGate([tmp_path])):
        with imago.open(tmp_path / "x", "raw", gate=gate, storage_driver_name="null") as image:
            assert isinstance(image.driver.storage, Null)


def test_open_unknown_storage_driver(disk: pathlib.Path) -> None:
    with pytest.raises(imago.DriverNotFoundError) as info:
        imago.open(disk, "raw", gate=PermissiveImplicitOpenGate(), storage_driver_name="s3-nonexistent")
    assert "imago-s3-nonexistent" in str(info.value)
    assert info.value.kind == "storage"


def test_open_directory_refused(tmp_path: pathlib.Path) -> None:
    # As qemu-img refuses it; the OS's error passes through, naming the directory.
    with pytest.raises(IsADirectoryError) as info:
        imago.open(tmp_path, "raw")
    assert info.value.filename == str(tmp_path)
    with pytest.raises(IsADirectoryError):
        imago.open(tmp_path)


def test_open_async(disk: pathlib.Path) -> None:
    async def main() -> bytes:
        image = await imago.open_async(disk, "raw", write=True)
        assert isinstance(image, FormatAccess)
        async with image:
            await image.write(b"async", 0)
            buf = bytearray(8)
            await image.read(buf, 0)
        assert image.closed
        return bytes(buf)

    assert asyncio.run(main()) == b"async\x05\x06\x07"
    assert disk.read_bytes()[:5] == b"async"


def test_open_async_probe_and_default_read_only(disk: pathlib.Path) -> None:
    async def main() -> None:
        image = await imago.open_async(disk)
        assert image.format_name == "raw"
        with pytest.raises(imago.ReadOnlyError):
            await image.write(b"x", 0)
        await image.close()

    asyncio.run(main())


def test_open_async_unknown_format(disk: pathlib.Path) -> None:
    with pytest.raises(imago.DriverNotFoundError, match="imago-nope"):
        asyncio.run(imago.open_async(disk, "nope"))


def test_open_inside_a_running_loop(disk: pathlib.Path) -> None:
    async def main() -> bytes:
        with imago.open(disk, "raw", write=True) as image:
            image.write(b"loop", 0)
            buf = bytearray(4)
            image.read(buf, 0)
            return bytes(buf)

    assert asyncio.run(main()) == b"loop"
    assert disk.read_bytes()[:4] == b"loop"


def test_create_then_open_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "rt.img"
    imago.create(path, "raw", 1 << 20)
    with imago.open(path, "raw", write=True) as image:
        image.write(b"x" * 4096, 8192)
        mapping, length = image.get_mapping(0, image.size)
        assert isinstance(mapping, imago.Mapping.Raw)
        assert length == 1 << 20
    data = path.read_bytes()
    assert data[8192 : 8192 + 4096] == b"x" * 4096
    assert data[:8192] == bytes(8192)
    assert len(data) == 1 << 20


# --- probe ------------------------------------------------------------------------------------


def test_probe_sync_file(disk: pathlib.Path) -> None:
    storage = File.open_sync(StorageOpenOptions(filename=disk))
    assert imago.probe_sync(storage) is Raw
    # Probing only looks.
    assert storage.size == 16384
    imago.runtime.run_sync(storage.close())
    assert disk.read_bytes() == bytes(range(256)) * 64


def test_probe_sync_null() -> None:
    assert imago.probe_sync(Null(4096)) is Raw
    assert imago.probe_sync(Null(0)) is Raw


def test_probe_async() -> None:
    async def main() -> type[imago.FormatDriver]:
        return await imago.probe(Null(512))

    assert asyncio.run(main()) is Raw


def test_probe_prefers_non_fallback_drivers() -> None:
    class Magic(imago.FormatDriver):
        name = "magic-test-format"

        @classmethod
        async def probe(cls, storage: imago.Storage) -> bool:
            buf = bytearray(5)
            await storage.readv([memoryview(buf)], 0)
            return buf == b"MAGIC"

    class Plugin:
        @imago.hookimpl
        def imago_register_format_drivers(self, register: object) -> None:
            register(Magic)  # type: ignore[operator]

    imago.register_plugin("magic-test", Plugin())
    try:
        assert imago.probe_sync(Null(512)) is Raw

        class MagicStorage(Null):
            async def readv(self, bufs: object, offset: int) -> None:
                views = list(bufs)  # type: ignore[call-overload]
                views[0][:5] = b"MAGIC"

        assert imago.probe_sync(MagicStorage(512)) is Magic
    finally:
        imago.unregister_plugin("magic-test")
    assert "magic-test-format" not in imago.format_drivers()


@pytest.mark.parametrize(
    ("function", "words"),
    [
        (imago.open, ["format", "write", "gate", "direct", "no_flush", "storage_driver_name", "Example"]),
        (imago.create, ["format", "size", "options", "preallocation", "cluster_size", "InvalidOptionError"]),
    ],
)
def test_the_first_functions_users_call_document_their_parameters(function: object, words: list[str]) -> None:
    doc = getattr(function, "__doc__", None) or ""
    assert len(doc.splitlines()) > 10
    for word in words:
        assert word in doc, word
