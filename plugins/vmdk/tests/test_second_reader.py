"""A second, independent reader: libvmdk (``pyvmdk``, PyPI ``libvmdk-python``) reads what imago wrote."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

# Imported plainly: a missing second reader fails these tests rather than skipping them.
import pyvmdk  # type: ignore[import-not-found]

import imago
import imago.cli

from ._vmdk import WRITABLE_SUBFORMATS, MiB, open_writable, qemu_raw

SIZE = 3 * MiB + 1536


def _libvmdk_read(image: Path, parent: Path | None = None) -> bytes:
    handle = pyvmdk.handle()
    handle.open(str(image))
    handle.open_extent_data_files()
    handles = [handle]
    if parent is not None:
        base = pyvmdk.handle()
        base.open(str(parent))
        base.open_extent_data_files()
        handle.set_parent(base)
        handles.append(base)
    try:
        return bytes(handle.read_buffer_at_offset(handle.get_media_size(), 0))
    finally:
        for opened in handles:
            opened.close()


def _fill(image: Path, seed: int) -> None:
    rng = random.Random(seed)
    with open_writable(image) as disk:
        for _ in range(12):
            offset = rng.randrange(SIZE)
            length = min(rng.randrange(1, 300_000), SIZE - offset)
            disk.write(rng.randbytes(length), offset)
        disk.write_zeroes(rng.randrange(SIZE // 2), 200_000)


@pytest.mark.parametrize("subformat", WRITABLE_SUBFORMATS)
def test_libvmdk_reads_what_imago_wrote(tmp_path: Path, subformat: str) -> None:
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", SIZE, subformat=subformat, adapter_type="lsilogic")
    _fill(image, 5)
    expected = qemu_raw(image)
    assert _libvmdk_read(image) == expected


def test_libvmdk_reads_an_imago_delta(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    imago.create(base, "vmdk", SIZE)
    _fill(base, 6)
    top = tmp_path / "top.vmdk"
    imago.create(top, "vmdk", backing_file="base.vmdk", backing_fmt="vmdk")
    _fill(top, 7)
    with imago.open(base, "vmdk", gate=imago.PermissiveImplicitOpenGate()) as parent:
        cid = parent.driver.info()["format-specific"]["data"]["cid"]
    handle = pyvmdk.handle()
    handle.open(str(top))
    try:
        assert handle.get_parent_content_identifier() == cid
    finally:
        handle.close()
    assert _libvmdk_read(top, base) == qemu_raw(top)


def test_libvmdk_reads_an_imago_stream_optimized_image(tmp_path: Path) -> None:
    # VMware's layout (grain directory in the footer, markers): libvmdk reads it as qemu-img does.
    source = tmp_path / "source.raw"
    rng = random.Random(8)
    data = bytearray(SIZE)
    for _ in range(10):
        offset = rng.randrange(SIZE)
        chunk = rng.randbytes(min(rng.randrange(1, 200_000), SIZE - offset))
        data[offset : offset + len(chunk)] = chunk
    source.write_bytes(bytes(data))
    image = tmp_path / "stream.vmdk"
    argv = ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source), str(image)]
    assert imago.cli.main(argv) == 0
    assert qemu_raw(image) == bytes(data)
    assert _libvmdk_read(image) == bytes(data)
