"""A disk whose format was probed keeps it: writes that would make it probe as another format are refused.

The attack (CVE-2008-2004 class): a guest writes a qcow2 header naming a host file as its backing
file into the first sector of its raw disk; the next probing open reads the disk as qcow2 and
exposes the host file. imago, as QEMU, refuses such writes on disks opened with a probed format,
and only there.
"""

from __future__ import annotations

import asyncio
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import imago
from imago.format.probe_guard import PROBE_BYTES

SIZE = 1 << 20


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "guest.raw"
    path.write_bytes(b"\xaa" * SIZE)
    return path


@pytest.fixture
def header(tmp_path: Path) -> bytes:
    """The first sector of a qcow2 image whose backing file is a host file."""
    qcow2 = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(qcow2), "1M"], check=True
    )
    return qcow2.read_bytes()[:PROBE_BYTES]


def test_qcow2_header_in_a_probed_raw_disk_is_refused(raw: Path, header: bytes) -> None:
    with imago.open(raw, write=True) as disk:
        assert disk.format_name == "raw"
        with pytest.raises(imago.InvalidRequestError) as caught:
            disk.write(header, 0)
        message = str(caught.value)
        assert str(raw) in message
        assert "offset 0" in message
        assert "'qcow2'" in message
        disk.write(b"ordinary data", 0)  # the disk stays writable
    assert raw.read_bytes()[:13] == b"ordinary data"
    assert raw.read_bytes()[PROBE_BYTES:] == b"\xaa" * (SIZE - PROBE_BYTES)
    with imago.open(raw) as disk:
        assert disk.format_name == "raw"


def test_a_header_written_in_pieces_is_refused_at_the_piece_that_completes_it(raw: Path, header: bytes) -> None:
    with imago.open(raw, write=True) as disk:
        disk.write(header[4:], 4)  # without the magic: still no qcow2 image
        with pytest.raises(imago.InvalidRequestError):
            disk.write(header[:4], 0)
        with pytest.raises(imago.InvalidRequestError):  # a vector straddling the magic too
            disk.writev([header[:2], header[2:6]], 0)
    assert raw.read_bytes()[:4] == b"\xaa" * 4


def test_headers_beyond_the_first_sector_and_named_formats_are_written(raw: Path, header: bytes) -> None:
    with imago.open(raw, write=True) as disk:
        disk.write(header, PROBE_BYTES)  # not where probing looks
    with imago.open(raw, "raw", write=True) as disk:  # the caller knows the format: no guess to protect
        disk.write(header, 0)
    assert raw.read_bytes()[:PROBE_BYTES] == header


def test_the_asynchronous_api_and_file_objects_are_guarded(raw: Path, header: bytes) -> None:
    async def write_async() -> None:
        access = await imago.open_async(raw, write=True)
        try:
            with pytest.raises(imago.InvalidRequestError):
                await access.write(header, 0)
        finally:
            await access.close()

    asyncio.run(write_async())
    with imago.open(raw, write=True) as disk, disk.as_file() as file, pytest.raises(imago.InvalidRequestError):
        file.write(header)
    assert raw.read_bytes()[:4] == b"\xaa" * 4


class Tagged(imago.FormatDriver):
    """A format (never opened) whose images start with ``TAG!`` and four zero bytes."""

    name = "tagged"

    @classmethod
    async def probe(cls, storage: imago.Storage) -> bool:
        head = bytearray(8)
        await storage.readv([memoryview(head)], 0)
        return bytes(head) == b"TAG!\0\0\0\0"


def test_zeroing_and_discards_that_would_complete_a_header_are_refused(
    raw: Path, register_plugin: Callable[[str, object], None]
) -> None:
    @imago.hookimpl
    def imago_register_format_drivers(register: imago.FormatRegistrar) -> None:
        register(Tagged)

    register_plugin("tagged", types.SimpleNamespace(imago_register_format_drivers=imago_register_format_drivers))
    with imago.open(raw, write=True) as disk:
        disk.write(b"TAG!\xff\xff\xff\xff", 0)
        for zero in (disk.write_zeroes, disk.discard_to_zero, disk.discard_to_any, disk.discard_to_backing):
            with pytest.raises(imago.InvalidRequestError, match="'tagged'"):
                zero(4, 4)
        disk.write_zeroes(8, 4096)  # zeroes that leave the first bytes alone
        with pytest.raises(imago.InvalidRequestError, match="'tagged'"):
            disk.write(b"TAG!\0\0\0\0", 0)
    assert raw.read_bytes()[:8] == b"TAG!\xff\xff\xff\xff"


def test_probed_qcow2_images_are_not_guarded(tmp_path: Path) -> None:
    # Only the fallback format (raw) is guarded: a probed qcow2 image's guest data lies elsewhere.
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    with imago.open(image, write=True) as disk:
        disk.write(image.read_bytes()[:PROBE_BYTES], 0)
    assert subprocess.run(["qemu-img", "check", "-q", str(image)], check=False).returncode == 0
