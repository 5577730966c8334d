"""Reading VHDX images made by qemu-img/qemu-io: bytes and sizes as QEMU reports them, and the CLI.

The matrix: both subformats qemu-img creates (dynamic with and without ZERO blocks, fixed),
empty, shuffled writes with zeroes on a disk whose size is not a multiple of the block, full,
1 MiB and 32 MiB blocks, 4 MiB logs, and a > 2 GiB dynamic disk kept sparse on disk. qemu-img
does not map VHDX (it reports every byte as data), so maps are compared with the data imago
reads instead: every mapped run reads as what QEMU's conversion holds there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from imago import ShallowRaw, ShallowZero, StorageOpenOptions, probe_sync, runtime, storage_driver

from ._vhdx import MiB, imago_cli, open_vhdx, qemu_img, qemu_io, qemu_json, qemu_raw, read_all

ODD = 5 * MiB + 1536


def _shuffled(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    commands = []
    for _ in range(16):
        length = rng.choice((512, 4096, 65536, 300 * 1024, MiB + 512))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if rng.random() < 0.25:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    commands.append(f"write -P 0x77 {size - 512} 512")
    return commands


def _make(directory: Path, name: str, size: int, commands: list[str], options: str) -> Path:
    image = directory / f"{name}.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", options, image, str(size))
    if commands:
        qemu_io(image, *commands)
    return image


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> image, for every image of the matrix."""
    directory = tmp_path_factory.mktemp("vhdx-matrix")
    images: dict[str, Path] = {}
    for subformat, options in (
        ("dynamic", "subformat=dynamic"),
        ("dynamic-nonzero", "subformat=dynamic,block_state_zero=off"),
        ("dynamic-1m", "subformat=dynamic,block_size=1M,log_size=4M"),
        ("fixed", "subformat=fixed,block_size=1M"),
        ("fixed-zero-state", "subformat=fixed"),
    ):
        images[f"{subformat}-empty"] = _make(directory, f"{subformat}-empty", 3 * MiB, [], options)
        images[f"{subformat}-shuffled"] = _make(directory, f"{subformat}-shuffled", ODD, _shuffled(ODD, 7), options)
        images[f"{subformat}-full"] = _make(directory, f"{subformat}-full", 2 * MiB, ["write -P 0x5a 0 2M"], options)
    images["dynamic-32m"] = _make(
        directory, "dynamic-32m", 40 * MiB, ["write -P 1 31M 2M", "write -z 32M 64k"], "block_size=32M"
    )
    return images


NAMES = [
    f"{s}-{k}"
    for s in ("dynamic", "dynamic-nonzero", "dynamic-1m", "fixed", "fixed-zero-state")
    for k in ("empty", "shuffled", "full")
] + ["dynamic-32m"]


@pytest.mark.parametrize("name", NAMES)
def test_reads_and_sizes_match_qemu(matrix: dict[str, Path], name: str) -> None:
    image = matrix[name]
    expected = qemu_raw(image)
    assert read_all(image) == expected
    info = qemu_json("info", "-f", "vhdx", image)
    with open_vhdx(image) as disk:
        assert disk.size == info["virtual-size"] == len(expected)
        assert disk.driver.info()["cluster-size"] == info["cluster-size"]
        # Every run the driver maps holds QEMU's bytes there: zero runs zeroes, data runs the file's bytes.
        file_bytes = image.read_bytes()
        position = 0
        while position < disk.size:
            mapping, length = runtime.run_sync(disk.driver.get_mapping(position, disk.size - position))
            length = min(length, disk.size - position)
            assert length > 0
            want = expected[position : position + length]
            if isinstance(mapping, ShallowZero):
                assert want == bytes(length)
            else:
                assert isinstance(mapping, ShallowRaw)
                assert file_bytes[mapping.offset : mapping.offset + length] == want
            position += length


def test_large_sparse_disk_stays_sparse(tmp_path: Path) -> None:
    size = 2 * 1024 * MiB + 5 * MiB
    image = tmp_path / "big.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", image, str(size))
    qemu_io(image, "write -P 0x11 0 64k", f"write -P 0x22 {2048 * MiB} 1M", f"write -P 0x33 {size - 4096} 4096")
    assert image.stat().st_blocks * 512 < 64 * MiB
    with open_vhdx(image) as disk:
        assert disk.size == qemu_json("info", image)["virtual-size"] == size
        for offset, length, byte in ((0, 65536, 0x11), (2048 * MiB, MiB, 0x22), (size - 4096, 4096, 0x33)):
            buf = bytearray(length + 512)
            disk.read(buf, offset - 512 if offset else offset)
            data = buf[512:] if offset else buf[:length]
            assert data == bytes([byte]) * length
        buf = bytearray(MiB)
        disk.read(buf, 1024 * MiB)
        assert buf == bytes(MiB)
    target = tmp_path / "big.raw"
    status, _, err = imago_cli("convert", "-f", "vhdx", "-O", "raw", image, target)
    assert status == 0, err
    assert target.stat().st_blocks * 512 < 64 * MiB
    status, out, err = imago_cli("compare", "-f", "vhdx", "-F", "raw", image, target)
    assert status == 0, err + out


def test_cli_info_map_convert_compare(matrix: dict[str, Path], tmp_path: Path) -> None:
    image = matrix["dynamic-shuffled"]
    status, out, err = imago_cli("info", "--output=json", image)
    assert status == 0, err
    info = json.loads(out)
    qemu = qemu_json("info", image)
    for key in ("virtual-size", "cluster-size", "format", "actual-size"):
        assert info[key] == qemu[key], key
    status, out, err = imago_cli("map", "--output=json", "-f", "vhdx", image)
    assert status == 0, err
    runs = json.loads(out)
    assert sum(run["length"] for run in runs) == ODD
    data = qemu_raw(image)
    for run in runs:
        if run["zero"]:
            assert data[run["start"] : run["start"] + run["length"]] == bytes(run["length"])
    target = tmp_path / "out.raw"
    status, _, err = imago_cli("convert", "-f", "vhdx", "-O", "raw", image, target)
    assert status == 0, err
    assert target.read_bytes() == data
    status, out, err = imago_cli("compare", "-f", "vhdx", "-F", "raw", image, target)
    assert status == 0, out + err
    qemu_img("compare", "-f", "vhdx", "-F", "raw", image, target)
    storage = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=str(image))))
    try:
        assert probe_sync(storage).name == "vhdx"
    finally:
        runtime.run_sync(storage.close())
