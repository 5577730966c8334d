"""Writing stream-optimized VMDKs: checked by qemu-img, read back by imago, laid out as VMware does.

Sources are raw images made by qemu-img/qemu-io (holes, full, sizes not a multiple of the grain,
empty); every image written must be ``qemu-img check`` clean, ``qemu-img info``'s
streamOptimized, ``qemu-img compare`` equal to its source, and read back identically by imago.
The layout test walks the file marker by marker, independently of the writer.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import threading
from pathlib import Path

import pytest

from imago import (
    CorruptImageError,
    InvalidOptionError,
    InvalidRequestError,
    ReadOnlyError,
    StorageCreateOptions,
    StorageOpenOptions,
    UnsupportedFeatureError,
    open_async,
    runtime,
    storage_driver,
)
from imago_vmdk.stream import create_stream_image, write_stream
from imago_vmdk.stream_append import StreamAppender

from ._vmdk import MiB, qemu_img, qemu_json, read_all, run

GRAIN = 64 * 1024


def _raw(path: Path, size: int, *writes: str) -> Path:
    qemu_img("create", "-q", "-f", "raw", path, str(size))
    if writes:
        argv: list[str | Path] = ["qemu-io", "-f", "raw"]
        for command in writes:
            argv += ["-c", command]
        run([*argv, path])
    return path


def _pattern(path: Path, size: int) -> Path:
    """A full disk of compressible but varied data."""
    block = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(GRAIN)) + os.urandom(GRAIN)[: GRAIN // 8]
    data = (block * (size // len(block) + 1))[:size]
    path.write_bytes(data)
    return path


def _write(source: Path, target: Path, **options: object) -> int:
    async def go() -> int:
        access = await open_async(str(source), "raw")
        try:
            with target.open("wb") as out:
                return await write_stream(access, out, extent_name=target.name, **options)  # type: ignore[arg-type]
        finally:
            await access.close()

    return asyncio.run(go())


def _check_against(source: Path, image: Path) -> None:
    qemu_img("check", "-f", "vmdk", image)
    info = qemu_json("info", "--output=json", "-f", "vmdk", image)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == -(-source.stat().st_size // 512) * 512
    qemu_img("compare", "-f", "raw", "-F", "vmdk", source, image)
    expected = source.read_bytes()
    assert read_all(image)[: len(expected)] == expected


CASES = {
    "holes": (5 * MiB + 512, ("write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -P 7 5M 512")),
    "unaligned": (3 * MiB + 7 * 512, ("write -P 0x5a 0 3M", "write -P 0x33 3M 3584")),
    "one-sector": (512, ("write -P 1 0 512",)),
    "all-zero": (40 * MiB, ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_equals_source(tmp_path: Path, case: str) -> None:
    size, writes = CASES[case]
    source = _raw(tmp_path / "src.raw", size, *writes)
    image = tmp_path / "out.vmdk"
    written = _write(source, image)
    assert written == image.stat().st_size
    _check_against(source, image)


def test_zero_sized_disk_refused(tmp_path: Path) -> None:
    # Neither qemu-img nor imago opens a zero-sized VMDK (not even qemu-img's own): none is streamed.
    with pytest.raises(InvalidOptionError, match="size"):
        _write(_raw(tmp_path / "src.raw", 0), tmp_path / "out.vmdk")


def test_full_source_with_options(tmp_path: Path) -> None:
    source = _pattern(tmp_path / "src.raw", 9 * MiB + 3 * 512)
    image = tmp_path / "out.vmdk"
    # A small window: several compression batches, a grain table boundary (32 MiB) not reached.
    _write(source, image, adapter_type="lsilogic", hwversion="13", toolsversion="12345", window=GRAIN * 3)
    _check_against(source, image)
    descriptor = image.read_bytes()[512 : 21 * 512].rstrip(b"\0").decode()
    assert 'createType="streamOptimized"' in descriptor
    assert 'ddb.adapterType = "lsilogic"' in descriptor
    assert 'ddb.virtualHWVersion = "13"' in descriptor
    assert 'ddb.toolsVersion = "12345"' in descriptor
    assert 'ddb.geometry.heads = "255"' in descriptor
    assert 'ddb.geometry.sectors = "63"' in descriptor
    assert f'RW {-(-source.stat().st_size // 512)} SPARSE "out.vmdk"' in descriptor


def _walk(image: bytes) -> list[tuple[str, int, int]]:
    """The markers of a stream-optimized file in order: (kind, value, file offset)."""
    header = struct.unpack_from("<4sIIQQQQIQQQB4sH", image)
    overhead = header[10] * 512
    found: list[tuple[str, int, int]] = []
    at = overhead
    while at < len(image):
        value, size = struct.unpack_from("<QI", image, at)
        if size:
            found.append(("grain", value, at))
            at += -(-(12 + size) // 512) * 512
            continue
        kind = struct.unpack_from("<I", image, at + 12)[0]
        name = {0: "eos", 1: "gt", 2: "gd", 3: "footer"}[kind]
        found.append((name, value, at))
        at += 512 + value * 512
    assert at == len(image)
    return found


def test_layout_is_vmwares(tmp_path: Path) -> None:
    # Grains in three grain tables (each covers 32 MiB), the middle one empty.
    source = _raw(tmp_path / "src.raw", 100 * MiB, "write -P 1 0 128k", "write -P 2 31M 2M", "write -P 3 99M 64k")
    image = tmp_path / "out.vmdk"
    _write(source, image)
    data = image.read_bytes()
    header = struct.unpack_from("<4sIIQQQQIQQQB4sH", data)
    magic, version, flags, capacity, grain, desc_offset, desc_size, gtes, rgd, gd, overhead, _, check, algo = header
    assert (magic, version, flags, grain, desc_offset, gtes, rgd, gd, check, algo) == (
        b"KDMV",
        3,
        0x30001,
        128,
        1,
        512,
        0,
        0xFFFFFFFFFFFFFFFF,
        b"\n \r\n",
        1,
    )
    assert capacity == 100 * MiB // 512
    assert overhead == 128
    assert desc_size >= 20
    markers = _walk(data)
    kinds = [kind for kind, _, _ in markers]
    assert kinds[-3:] == ["gd", "footer", "eos"]
    grains = [value for kind, value, _ in markers if kind == "grain"]
    assert grains == sorted(grains)
    assert len(grains) == 2 + 32 + 1
    # Each table follows the grains it covers: grains of table 0, its table, table 1's, its table, ...
    assert kinds[:-3] == ["grain"] * 2 + ["grain"] * 16 + ["gt"] + ["grain"] * 16 + ["gt"] + ["grain", "gt"]
    # The footer is the header with the grain directory's sector.
    footer_at = markers[-2][2] + 512
    footer = struct.unpack_from("<4sIIQQQQIQQQB4sH", data, footer_at)
    assert footer[:9] == header[:9]
    assert footer[10:] == header[10:]
    assert footer[9] * 512 == markers[-3][2] + 512
    directory = struct.unpack_from("<4I", data, footer[9] * 512)
    tables = [at for kind, _, at in markers if kind == "gt"]
    assert directory == ((tables[0] + 512) // 512, (tables[1] + 512) // 512, 0, (tables[2] + 512) // 512)
    assert len(data) == markers[-1][2] + 512


def test_written_to_a_pipe(tmp_path: Path) -> None:
    source = _raw(tmp_path / "src.raw", 6 * MiB, "write -P 0x41 1M 2M", "write -P 0x42 5M 4k")
    image = tmp_path / "piped.vmdk"
    read_fd, write_fd = os.pipe()

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as pipe, image.open("wb") as out:
            while chunk := pipe.read(1 << 16):
                out.write(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with os.fdopen(write_fd, "wb") as pipe:
            _write_to(source, pipe)
    finally:
        reader.join(timeout=60)
    assert not reader.is_alive()
    _check_against(source, image)


def _write_to(source: Path, out: io.BufferedWriter) -> None:
    async def go() -> None:
        access = await open_async(str(source), "raw")
        try:
            await write_stream(access, out)
        finally:
            await access.close()

    asyncio.run(go())


def test_image_source(tmp_path: Path) -> None:
    """Any image is a source: a qcow2 with data, zero clusters and a 40 MiB hole (skipped unread)."""
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "50M")
    writes = ["-c", "write -P 0x61 0 70k", "-c", "write -z 1M 1M", "-c", "write -P 2 49M 8k"]
    run(["qemu-io", "-f", "qcow2", *writes, image])
    target = tmp_path / "out.vmdk"

    async def go() -> None:
        access = await open_async(str(image), "qcow2")
        try:
            with target.open("wb") as out:
                await write_stream(access, out, window=4 * MiB)
        finally:
            await access.close()

    asyncio.run(go())
    qemu_img("check", "-f", "vmdk", target)
    qemu_img("compare", "-f", "qcow2", "-F", "vmdk", image, target)


def test_file_source(tmp_path: Path) -> None:
    source = _raw(tmp_path / "src.raw", 2 * MiB + 512, "write -P 9 64k 1M")
    image = tmp_path / "out.vmdk"
    with source.open("rb") as data, image.open("wb") as out:
        asyncio.run(write_stream(data, out, size=source.stat().st_size))
    _check_against(source, image)


def test_misuse(tmp_path: Path) -> None:
    source = _raw(tmp_path / "src.raw", MiB)
    sink = io.BytesIO()
    with pytest.raises(InvalidOptionError, match="adapter_type"):
        _write(source, tmp_path / "a.vmdk", adapter_type="scsi")
    with pytest.raises(InvalidOptionError, match="hwversion"):
        _write(source, tmp_path / "b.vmdk", hwversion='4"\nx')
    with pytest.raises(InvalidOptionError, match="window"):
        _write(source, tmp_path / "c.vmdk", window=4096)
    with source.open("rb") as data:
        with pytest.raises(InvalidOptionError, match="size"):
            asyncio.run(write_stream(data, sink))
        # A file source shorter than the size it is said to have.
        with pytest.raises(InvalidRequestError, match="ended at byte 1048576"):
            asyncio.run(write_stream(data, sink, size=2 * MiB))


# --- the appender the driver fills new images through -----------------------------------------


async def _new_image(path: Path, size: int) -> StreamAppender:
    storage = await storage_driver("file").create(StorageCreateOptions(filename=str(path)))
    try:
        await create_stream_image(storage, size, adapter_type="buslogic", hwversion="7")
    finally:
        await storage.close()
    storage = await storage_driver("file").open(StorageOpenOptions(filename=str(path), writable=True))
    return await StreamAppender.open(storage)


def test_created_image_is_empty_and_valid(tmp_path: Path) -> None:
    image = tmp_path / "new.vmdk"
    appender = asyncio.run(_new_image(image, 70 * MiB + 512))
    asyncio.run(appender.storage.close())
    qemu_img("check", "-f", "vmdk", image)
    info = qemu_json("info", "--output=json", image)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == 70 * MiB + 512
    assert b'ddb.adapterType = "buslogic"' in image.read_bytes()[:4096]
    assert read_all(image) == bytes(70 * MiB + 512)


def test_appender_writes_in_order_concurrently(tmp_path: Path) -> None:
    size = 3 * MiB + 1024
    expected = bytearray(size)
    chunks = [(0, b"\x01" * GRAIN * 4), (MiB, b"\x02" * MiB), (2 * MiB, bytes(GRAIN) + b"\x03" * GRAIN)]
    tail = b"\x04" * 1024

    async def go() -> None:
        appender = await _new_image(tmp_path / "out.vmdk", size)
        try:
            assert appender.cluster_size == GRAIN
            # Started in order, compressed side by side, appended in order.
            await asyncio.gather(*(appender.write_compressed(memoryview(data), at) for at, data in chunks))
            await appender.flush()  # a trailer mid-way is overwritten by what follows
            appender.zero(3 * MiB, 1024)  # nothing written there yet: reads as zero
            await appender.write_compressed(memoryview(tail), 3 * MiB)
            with pytest.raises(UnsupportedFeatureError, match="increasing order"):
                await appender.write_compressed(memoryview(bytes(GRAIN)), 0)
            with pytest.raises(UnsupportedFeatureError, match="zeroing"):
                appender.zero(0, GRAIN)
            with pytest.raises(InvalidRequestError, match="whole grains"):
                await appender.write_compressed(memoryview(bytes(100)), 3 * MiB)
            await appender.flush()
        finally:
            await appender.storage.close()

    asyncio.run(go())
    for at, data in chunks:
        expected[at : at + len(data)] = data
    expected[3 * MiB :] = tail
    source = tmp_path / "expected.raw"
    source.write_bytes(expected)
    _check_against(source, tmp_path / "out.vmdk")


def test_appender_refuses_filled_and_foreign_images(tmp_path: Path) -> None:
    filled = tmp_path / "filled.vmdk"
    _write(_raw(tmp_path / "src.raw", MiB, "write -P 1 0 64k"), filled)
    sparse = tmp_path / "sparse.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", sparse, "1M")

    async def go(path: Path) -> None:
        storage = await storage_driver("file").open(StorageOpenOptions(filename=str(path), writable=True))
        try:
            await StreamAppender.open(storage)
        finally:
            await storage.close()

    with pytest.raises(UnsupportedFeatureError, match="already holds data"):
        asyncio.run(go(filled))
    with pytest.raises(CorruptImageError, match="not a stream-optimized"):
        asyncio.run(go(sparse))


def test_appender_stops_after_a_failed_append(tmp_path: Path) -> None:
    image = tmp_path / "new.vmdk"
    asyncio.run(asyncio.run(_new_image(image, MiB)).storage.close())
    before = image.read_bytes()

    async def go() -> None:
        # Opened read-only: the first append fails, and nothing may follow it.
        storage = await storage_driver("file").open(StorageOpenOptions(filename=str(image)))
        appender = await StreamAppender.open(storage)
        try:
            with pytest.raises(ReadOnlyError):
                await appender.write_compressed(memoryview(b"\x01" * GRAIN), 0)
            with pytest.raises(UnsupportedFeatureError, match="after an append failed"):
                await appender.write_compressed(memoryview(b"\x01" * GRAIN), GRAIN)
        finally:
            await storage.close()

    asyncio.run(go())
    assert image.read_bytes() == before


def test_runtime_inline_use(tmp_path: Path) -> None:
    """The writer also runs without an event loop of the caller's (imago's sync mode)."""
    source = _raw(tmp_path / "src.raw", MiB, "write -P 5 0 256k")
    image = tmp_path / "out.vmdk"
    with source.open("rb") as data, image.open("wb") as out:
        runtime.run_sync(write_stream(data, out, size=MiB))
    _check_against(source, image)
