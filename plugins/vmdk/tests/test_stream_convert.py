"""``imago convert -O vmdk -o subformat=streamOptimized``: the copier's compressed, in-order writes.

The target's driver says it takes data only compressed and in order (``writes_compressed``), so
convert writes it as with ``-c``; the result must be VMware's layout, qemu-img clean and equal to
its source, for sparse and full sources and sizes not a multiple of the grain.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from ._vmdk import MiB, imago_cli, qemu_img, qemu_json, read_all, run


def _raw(path: Path, size: int, *writes: str) -> Path:
    qemu_img("create", "-q", "-f", "raw", path, str(size))
    if writes:
        argv: list[str | Path] = ["qemu-io", "-f", "raw"]
        for command in writes:
            argv += ["-c", command]
        run([*argv, path])
    return path


@pytest.mark.parametrize(
    ("size", "writes", "extra"),
    [
        (5 * MiB + 3 * 512, ("write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -P 7 5M 1536"), []),
        (3 * MiB, (), ["-S", "0"]),  # all zero, and -S 0 asks for zeroes written
        (2 * MiB, (), ["-W"]),  # out-of-order writes asked: the target still gets them in order
    ],
    ids=["holes-unaligned", "zero-S0", "W"],
)
def test_convert_to_stream(tmp_path: Path, size: int, writes: tuple[str, ...], extra: list[str]) -> None:
    source = _raw(tmp_path / "src.raw", size, *writes)
    target = tmp_path / "out.vmdk"
    options = "subformat=streamOptimized,adapter_type=lsilogic,hwversion=11"
    status, out, err = imago_cli("convert", *extra, "-f", "raw", "-O", "vmdk", "-o", options, source, target)
    assert status == 0, out + err
    qemu_img("check", "-f", "vmdk", target)
    info = qemu_json("info", "-f", "vmdk", target)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    qemu_img("compare", "-f", "raw", "-F", "vmdk", source, target)
    assert read_all(target) == source.read_bytes()
    data = target.read_bytes()
    assert b'ddb.adapterType = "lsilogic"' in data[:16384]
    assert b'ddb.virtualHWVersion = "11"' in data[:16384]
    # VMware's layout: the header says the directory is in the footer; the file ends with it.
    assert struct.unpack_from("<Q", data, 56)[0] == 0xFFFFFFFFFFFFFFFF
    assert struct.unpack_from("<QII", data, len(data) - 512) == (0, 0, 0)
    assert struct.unpack_from("<QII", data, len(data) - 1536) == (1, 0, 3)


def test_convert_full_source(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes((os.urandom(4096) + bytes(range(256)) * 48) * 300 + b"tail")  # 5 MiB and 4 bytes
    target = tmp_path / "out.vmdk"
    status, out, err = imago_cli(
        "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, target
    )
    assert status == 0, out + err
    qemu_img("check", "-f", "vmdk", target)
    qemu_img("compare", "-f", "raw", "-F", "vmdk", source, target)
