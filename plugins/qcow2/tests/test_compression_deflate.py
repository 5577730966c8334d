"""Deflate implementations of compressed clusters: ISA-L, zlib-ng and zlib, all readable by QEMU.

Each implementation installed writes compressed clusters through the driver; ``qemu-img
compare`` against the data as a raw image then proves QEMU inflates them (QEMU inflates with a
4 KiB window, so back-references further than that would break it: the data repeats at
distances between 4 KiB and 32 KiB on purpose). Each implementation also reads what QEMU
compressed, and reports damaged data as :class:`~imago.CorruptImageError`.
"""

from __future__ import annotations

import importlib
import os
import zlib
from pathlib import Path
from types import ModuleType

import pytest

import imago
from imago_qcow2 import compression

from . import _qemu

CLUSTER = 65536


def _implementations() -> list[str]:
    return ["isal.isal_zlib", "zlib_ng.zlib_ng", "zlib"]


@pytest.fixture(params=_implementations())
def deflate(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Make the codec use one deflate implementation (skipped only for optional ones not installed)."""
    name: str = request.param
    try:
        module = importlib.import_module(name)
    except ImportError:
        if name == "isal.isal_zlib":
            pytest.fail("isal is a dependency of imago-qcow2 and must be installed")
        pytest.skip(f"{name} is not installed (an optional speed-up)")
    level = zlib.Z_DEFAULT_COMPRESSION if module is zlib else 1
    errors = (module.error, zlib.error)
    monkeypatch.setattr(compression, "DEFLATE", module)
    monkeypatch.setattr(compression, "_LEVEL", level)
    monkeypatch.setattr(compression, "_DEFLATE_ERRORS", errors)
    return module


def _data() -> bytes:
    """Clusters QEMU must inflate with a 4 KiB window: repeats 8 KiB and 20 KiB apart, text, zeroes."""
    block = os.urandom(8192)
    repeats = (block * 8)[:CLUSTER]
    far = (os.urandom(20480) * 4)[:CLUSTER]
    return repeats + far + _qemu.text_bytes(2 * CLUSTER, 7) + bytes(CLUSTER) + os.urandom(CLUSTER)


def test_isal_is_preferred() -> None:
    assert importlib.reload(compression).DEFLATE.__name__ == "isal.isal_zlib"


def test_qemu_reads_what_each_implementation_writes(tmp_path: Path, deflate: ModuleType) -> None:
    data = _data()
    image = tmp_path / "c.qcow2"
    _qemu.create(image, len(data))
    with imago.open(image, "qcow2", write=True) as disk:
        disk.write_compressed(data, 0)
    raw = tmp_path / "c.raw"
    raw.write_bytes(data)
    _qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", image, raw)
    assert _qemu.check(image)["check-errors"] == 0
    # Text and zeroes shrink; repeats further apart than the 4 KiB window cannot, so they are
    # stored as plain clusters (a wider window would shrink them, and QEMU could not read them).
    compressed = [(e["start"], e["length"]) for e in _qemu.qemu_map(image) if e["data"] and "offset" not in e]
    assert compressed == [(2 * CLUSTER, 3 * CLUSTER)]
    with imago.open(image, "qcow2") as disk:
        back = bytearray(len(data))
        disk.read(back, 0)
    assert back == data


def test_each_implementation_reads_what_qemu_writes(tmp_path: Path, deflate: ModuleType) -> None:
    data = _data()
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    image = tmp_path / "q.qcow2"
    _qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, image)
    with imago.open(image, "qcow2") as disk:
        back = bytearray(len(data))
        disk.read(back, 0)
        part = bytearray(1000)
        disk.read(part, 3 * CLUSTER + 5)
    assert back == data
    assert part == data[3 * CLUSTER + 5 : 3 * CLUSTER + 1005]


def test_damaged_data_is_corrupt_image_error(deflate: ModuleType) -> None:
    blob = compression.compress_cluster(_qemu.text_bytes(CLUSTER, 3), 0)
    with pytest.raises(imago.CorruptImageError, match=r"cannot be decompressed|instead of"):
        compression.decompress_cluster(b"\xff" * 64 + blob[64:], CLUSTER, 0, "x.qcow2", 4096)
    with pytest.raises(imago.CorruptImageError, match="instead of"):
        compression.decompress_cluster(blob[: len(blob) // 2], CLUSTER, 0, "x.qcow2", 4096)
