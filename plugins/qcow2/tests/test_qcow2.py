"""qcow2 reading: the read conformance suite on qemu-made images, and the driver's own API."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path

import pytest

import imago
from imago import (
    DenyImplicitOpenGate,
    FormatAccess,
    FormatDriver,
    PermissiveImplicitOpenGate,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
)
from imago.testing import FormatConformance, ReadOnlyFormatConformance
from imago_file import File
from imago_qcow2 import Qcow2

from . import _qemu


def qemu(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, cwd=cwd).stdout


def reference(path: Path, *extra: str) -> bytes:
    out = path.with_suffix(".ref")
    # In the image's directory: QEMU 7.2 resolves relative data file names against the working
    # directory (imago, like for backing files, against the image's directory).
    qemu("qemu-img", "convert", *extra, "-O", "raw", str(path), str(out), cwd=path.parent)
    return out.read_bytes()


def make_layered(directory: Path) -> Path:
    """raw base (shorter) <- qcow2 mid <- extended-L2 qcow2 top, with data, zeroes and discards."""
    base = directory / "base.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", str(base), "3M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 3M", str(base))
    mid = directory / "mid.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "5M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 192k", "-c", "write -z 1M 64k", str(mid))
    top = directory / "top.qcow2"
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        str(top),
        "6M",
    )
    qemu(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 70k 5k",
        "-c",
        "write -z 200k 4k",
        "-c",
        "write -P 0x44 4M 100k",
        str(top),
    )
    return top


def make_compressed(directory: Path, compression: str, cluster_size: str) -> Path:
    text = directory / "text.raw"
    text.write_bytes(b"".join(b"line %d of some compressible text\n" % i for i in range(100000))[: 3 << 20])
    image = directory / f"{compression}.qcow2"
    qemu(
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={compression},cluster_size={cluster_size}",
        str(text),
        str(image),
    )
    return image


class TestLayeredChain(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        top = make_layered(directory)
        return Qcow2.builder_path(top).open_sync(PermissiveImplicitOpenGate()), reference(top)


class TestCompressedZstd(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        image = make_compressed(directory, "zstd", "4k")
        storage = File.open_sync(StorageOpenOptions(filename=image))
        return Qcow2.builder(storage).open_sync(DenyImplicitOpenGate()), reference(image)


class TestCompressedZlibV2(ReadOnlyFormatConformance):
    def make_image(self, directory: Path) -> tuple[FormatDriver, bytes]:
        image = make_compressed(directory, "zlib", "64k")
        qemu("qemu-img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(image))
        return Qcow2.builder(File.open_sync(StorageOpenOptions(filename=image))).open_sync(
            DenyImplicitOpenGate()
        ), reference(image)


def test_header_facts_and_info(tmp_path: Path) -> None:
    top = make_layered(tmp_path)
    image = Qcow2.builder_path(top).open_sync(PermissiveImplicitOpenGate())
    assert image.implicit_backing_file == "mid.qcow2"
    assert image.implicit_backing_format == "qcow2"
    assert not image.requires_external_data_file
    info = image.info()
    theirs = json.loads(qemu("qemu-img", "info", "--output=json", str(top)))
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert info["cluster-size"] == theirs["cluster-size"]
    for key in ("compat", "refcount-bits", "compression-type", "corrupt", "extended-l2", "lazy-refcounts"):
        assert info["format-specific"]["data"][key] == theirs["format-specific"]["data"][key], key
    assert info["virtual-size"] == theirs["virtual-size"]
    assert info["backing-filename"] == theirs["backing-filename"]
    assert info["backing-filename-format"] == theirs["backing-filename-format"]
    assert image.backing is not None
    assert image.backing.format_name == "qcow2"
    assert image.backing.driver.backing is not None
    assert image.backing.driver.backing.format_name == "raw"
    SyncFormatAccess(image).close()


def test_backing_none_and_explicit(tmp_path: Path) -> None:
    top = make_layered(tmp_path)
    storage = File.open_sync(StorageOpenOptions(filename=top))
    alone = SyncFormatAccess(Qcow2.builder(storage).backing(None).open_sync(DenyImplicitOpenGate()))
    buf = bytearray(4096)
    alone.read(buf, 0)  # unallocated, and no backing: zero
    assert buf == bytes(4096)
    alone.read(buf, 4 << 20)
    assert buf == b"\x44" * 4096
    alone.close()
    mid = FormatAccess(
        Qcow2.builder(File.open_sync(StorageOpenOptions(filename=tmp_path / "mid.qcow2")))
        .backing(None)
        .open_sync(DenyImplicitOpenGate())
    )
    layered = SyncFormatAccess(
        Qcow2.builder(File.open_sync(StorageOpenOptions(filename=top))).backing(mid).open_sync(DenyImplicitOpenGate())
    )
    layered.read(buf, 64 << 10)
    assert buf == b"\x22" * 4096
    layered.read(buf, 0)
    assert buf == bytes(4096)  # mid has no backing here
    layered.close()
    with pytest.raises(imago.InvalidOptionError):
        Qcow2.builder(storage).backing("mid.qcow2")  # type: ignore[arg-type]


def test_deny_gate_refuses_the_backing_file(tmp_path: Path) -> None:
    top = make_layered(tmp_path)
    with pytest.raises(imago.ImplicitOpenDeniedError, match=r"mid\.qcow2"):
        Qcow2.builder(File.open_sync(StorageOpenOptions(filename=top))).open_sync(DenyImplicitOpenGate())


def test_default_open_probes_and_follows_chain(tmp_path: Path) -> None:
    top = make_layered(tmp_path)
    with imago.open(top) as image:
        assert image.format_name == "qcow2"
        buf = bytearray(6 << 20)
        image.read(buf, 0)
    assert bytes(buf) == reference(top)


def test_snapshots(tmp_path: Path) -> None:
    image_path = tmp_path / "snap.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image_path), "2M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(image_path))
    qemu("qemu-img", "snapshot", "-c", "first", str(image_path))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 512k 1M", str(image_path))
    qemu("qemu-img", "snapshot", "-c", "second", str(image_path))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -z 0 64k", str(image_path))
    image = Qcow2.builder_path(image_path).open_sync(PermissiveImplicitOpenGate())
    theirs = json.loads(qemu("qemu-img", "info", "--output=json", str(image_path)))["snapshots"]
    ours = image.info()["snapshots"]
    assert [snapshot["disk-size"] for snapshot in ours] == [2 << 20, 2 << 20]
    for mine, qemus in zip(ours, theirs, strict=True):
        for key in ("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"):
            assert mine[key] == qemus[key], key
    for name in ("first", "second"):
        view = SyncFormatAccess(image.read_snapshot_sync(name))
        got = bytearray(view.size)
        view.read(got, 0)
        assert bytes(got) == reference(image_path, "-l", f"snapshot.name={name}")
        view.close()
    by_id = asyncio.run(image.read_snapshot("1"))
    assert by_id.size == 2 << 20
    with pytest.raises(imago.ImagoError, match="no snapshot"):
        image.read_snapshot_sync("third")
    active = SyncFormatAccess(image)
    got = bytearray(active.size)
    active.read(got, 0)
    assert bytes(got) == reference(image_path)
    active.close()


def test_writing_dirty_images_repairs_them_first(tmp_path: Path) -> None:
    dirty = tmp_path / "dirty.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(dirty), "1M")
    with dirty.open("r+b") as f:
        f.seek(79)
        f.write(b"\x01")  # incompatible bit 0: dirty
    SyncFormatAccess(Qcow2.builder_path(dirty).open_sync(PermissiveImplicitOpenGate())).close()  # reading is fine
    assert dirty.read_bytes()[79] == 1
    # Opening for writing repairs it first (qemu-img check -r all), as QEMU does.
    SyncFormatAccess(Qcow2.builder_path(dirty).write(True).open_sync(PermissiveImplicitOpenGate())).close()
    assert dirty.read_bytes()[79] == 0
    _qemu.check(dirty)


class TestQcow2WriteConformance(FormatConformance):
    def create_image(self, directory: Path, size: int) -> FormatDriver:
        path = directory / "conformance.qcow2"
        storage = File.create_sync(StorageCreateOptions(filename=path, overwrite=True))
        Qcow2.create_builder(storage).size(size).cluster_size(4096).create_sync()
        imago.runtime.run_sync(storage.close())
        return Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())

    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        path = image.storage.filename
        assert path is not None
        SyncFormatAccess(image).close()
        _qemu.check(path)  # clean, and imago's own check agrees
        return Qcow2.builder_path(path).write(writable).open_sync(PermissiveImplicitOpenGate())


def test_external_data_file(tmp_path: Path) -> None:
    image_path = tmp_path / "ext.qcow2"
    # Relative to the working directory for qemu-img, to the image's directory when opened.
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "ext.qcow2", "2M", cwd=tmp_path)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 100k 300k", str(image_path), cwd=tmp_path)
    image = Qcow2.builder_path(image_path).open_sync(PermissiveImplicitOpenGate())
    assert image.requires_external_data_file
    assert image.info()["format-specific"]["data"]["data-file"] == "ext.data"
    access = SyncFormatAccess(image)
    got = bytearray(access.size)
    access.read(got, 0)
    assert bytes(got) == reference(image_path)
    mapping, _ = access.get_mapping(128 << 10, 4096)
    assert isinstance(mapping, imago.Mapping.Raw)
    assert mapping.storage.filename == str(tmp_path / "ext.data")
    access.close()
    storage = File.open_sync(StorageOpenOptions(filename=image_path))
    with pytest.raises(imago.ImagoError, match="external data file"):
        Qcow2.builder(storage).data_file(None).open_sync(DenyImplicitOpenGate())
    data = File.open_sync(StorageOpenOptions(filename=tmp_path / "ext.data"))
    explicit = SyncFormatAccess(Qcow2.builder(storage).data_file(data).open_sync(DenyImplicitOpenGate()))
    explicit.read(got, 0)
    assert bytes(got) == reference(image_path)
    explicit.close()


@pytest.mark.parametrize("refcount_bits", [1, 2, 16])
def test_compressed_clusters_are_packed_as_tightly_as_refcounts_allow(tmp_path: Path, refcount_bits: int) -> None:
    path = tmp_path / "packed.qcow2"
    imago.create(path, format="qcow2", size=1 << 20, cluster_size=4096, refcount_bits=refcount_bits)
    text = b"".join(b"line %d of compressible text\n" % i for i in range(60000))[: 1 << 20]
    with imago.open(path, format="qcow2", write=True) as image:
        image.write_compressed(text, 0)
    check = _qemu.check(path)  # clean, and imago's own check agrees
    assert check["compressed-clusters"] == 256
    assert reference(path) == text
    # Compressed data that straddles host clusters references both: a host cluster holds at
    # most as many compressed clusters as its refcount counts (1 for 1-bit refcounts).
    host_clusters = -(-path.stat().st_size // 4096) - 5  # less header, refcount table and block, L1, L2
    if refcount_bits == 1:
        assert host_clusters >= 256
    elif refcount_bits == 2:
        assert 256 // 3 <= host_clusters < 256
    else:
        assert host_clusters < 256 // 3


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [512, 65536, 2 << 20])
def test_write_compressed(tmp_path: Path, compression: str, cluster_size: int) -> None:
    path = tmp_path / "compressed.qcow2"
    size = 8 << 20 if cluster_size < 2 << 20 else 16 << 20
    imago.create(path, format="qcow2", size=size, cluster_size=cluster_size, compression_type=compression)
    text = b"".join(b"line %d of compressible text\n" % i for i in range(size // 20))[:size]
    noise = bytes(random.Random(1).randbytes(cluster_size))
    with imago.open(path, format="qcow2", write=True) as image:
        image.write_compressed(text, 0)
        image.write_compressed(noise, cluster_size)  # does not shrink: stored as is
        image.write(b"overwritten", 3 * cluster_size + 5)  # copy-on-write out of a compressed cluster
        image.flush()
        image.write_compressed(text[: 2 * cluster_size][::-1], 4 * cluster_size)  # replaces compressed clusters
    expected = bytearray(text)
    expected[cluster_size : 2 * cluster_size] = noise
    expected[3 * cluster_size + 5 : 3 * cluster_size + 16] = b"overwritten"
    expected[4 * cluster_size : 6 * cluster_size] = text[: 2 * cluster_size][::-1]
    _qemu.check(path)  # clean, and imago's own check agrees
    assert reference(path) == bytes(expected)
    runs = json.loads(qemu("qemu-img", "map", "--output=json", str(path)))
    compressed = [run for run in runs if run["data"] and "offset" not in run]  # qemu 7.2: no offset
    assert compressed
    assert compressed[0]["start"] == 0
    if cluster_size <= 65536:  # with 2 MiB clusters, the metadata alone takes 10 MiB
        assert path.stat().st_size < size // 2


def test_write_compressed_misuse(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    imago.create(path, format="qcow2", size=1 << 20)
    with imago.open(path, format="qcow2", write=True) as image:
        with pytest.raises(imago.InvalidRequestError, match="whole clusters"):
            image.write_compressed(bytes(65536), 512)
        with pytest.raises(imago.InvalidRequestError, match="whole clusters"):
            image.write_compressed(bytes(1000), 0)
    with imago.open(path, format="qcow2") as image, pytest.raises(imago.ReadOnlyError):
        image.write_compressed(bytes(65536), 0)
    raw = tmp_path / "r.img"
    imago.create(raw, format="raw", size=1 << 20)
    with imago.open(raw, format="raw", write=True) as image, pytest.raises(imago.UnsupportedFeatureError):
        image.write_compressed(bytes(65536), 0)
    ext = tmp_path / "ext.qcow2"
    imago.create(ext, format="qcow2", size=1 << 20, data_file="ext.data")
    with imago.open(ext, format="qcow2", write=True) as image, pytest.raises(imago.UnsupportedFeatureError):
        image.write_compressed(bytes(65536), 0)
