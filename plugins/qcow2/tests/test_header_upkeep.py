"""What writing does to the header: autoclear bits and unknown header extensions.

The specification asks a writer to clear the autoclear bits of features it does not maintain,
and only once it has accepted the image for writing; header extensions it does not know must
survive. Read-only opens and refused opens change nothing.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imago import ImagoError, PermissiveImplicitOpenGate
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB
from .test_write import check_clean, open_ro, open_rw, set_incompatible_bit, sha256

UNKNOWN_EXTENSION = 0x1A2B3C4D
UNKNOWN_AUTOCLEAR = 1 << 7
DATA_FILE_RAW = 1 << 1


def extensions(path: Path) -> list[tuple[int, bytes]]:
    """The header extensions, in order (up to the end marker)."""
    data = path.read_bytes()[:65536]
    offset = struct.unpack_from(">I", data, 100)[0]  # header_length
    found = []
    while True:
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == 0:
            return found
        found.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 8 + (length + 7) // 8 * 8


def autoclear(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[88:96], "big")


def prepare(path: Path, options: dict[str, object] | None = None) -> None:
    """A qemu-made image with an unknown header extension and an unknown autoclear bit."""
    _qemu.create(path, 4 * MiB, options=options, cwd=path.parent)
    _qemu.qemu_io(path, "write -P 0x11 0 65536", cwd=path.parent)
    data = bytearray(path.read_bytes())
    offset = struct.unpack_from(">I", data, 100)[0]
    while struct.unpack_from(">I", data, offset)[0]:
        offset += 8 + (struct.unpack_from(">I", data, offset + 4)[0] + 7) // 8 * 8
    payload = b"not imago's to understand"
    ext = struct.pack(">II", UNKNOWN_EXTENSION, len(payload)) + payload + bytes(-len(payload) % 8)
    data[offset : offset + 8 + len(ext)] = ext + bytes(8)  # the new extension, then the end marker
    struct.pack_into(">Q", data, 88, struct.unpack_from(">Q", data, 88)[0] | UNKNOWN_AUTOCLEAR)
    path.write_bytes(data)
    check_clean(path, cwd=path.parent)


@pytest.mark.parametrize("data_file_raw", [False, True], ids=["plain", "data-file-raw"])
def test_writing_clears_unknown_autoclear_bits_keeps_extensions(tmp_path: Path, data_file_raw: bool) -> None:
    path = tmp_path / "disk.qcow2"
    options: dict[str, object] = {"data_file": "disk.data", "data_file_raw": True} if data_file_raw else {}
    prepare(path, options)
    before = extensions(path)
    assert (UNKNOWN_EXTENSION, b"not imago's to understand") in before
    kept = DATA_FILE_RAW if data_file_raw else 0
    assert autoclear(path) == UNKNOWN_AUTOCLEAR | kept

    with open_ro(path):
        pass
    assert autoclear(path) == UNKNOWN_AUTOCLEAR | kept  # reading changes nothing

    with open_rw(path) as image:
        assert autoclear(path) == kept  # cleared once accepted, before any write
        image.write(b"\x22" * 70000, 100000)
        qcow2 = image.driver
        assert isinstance(qcow2, Qcow2)
        if not data_file_raw:
            qcow2.create_snapshot_sync("s")
        image.resize(8 * MiB)
    assert autoclear(path) == kept
    assert extensions(path) == before
    check_clean(path, cwd=tmp_path)
    _qemu.qemu_io(path, "read -P 0x11 0 65536", "read -P 0x22 100000 70000", cwd=tmp_path)


def test_a_refused_open_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    prepare(path)
    set_incompatible_bit(path, 1)  # corrupt: refused for writing
    digest = sha256(path)
    with pytest.raises(ImagoError, match="corrupt"):
        Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    assert sha256(path) == digest
