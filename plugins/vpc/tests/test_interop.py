"""Reading VHD images made by qemu-img/qemu-io: bytes, sizes, maps and info as QEMU reports them.

The matrix: each subformat qemu-img creates (dynamic, fixed), empty, with shuffled writes
(patterns, zeroes, overwrites) at an odd size, full; a > 2 GiB sparse image of each subformat
kept sparse on disk; and the CLI's info, map, convert and compare on them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from imago import (
    FormatDriver,
    PermissiveImplicitOpenGate,
    StorageOpenOptions,
    UnsupportedFeatureError,
    probe_sync,
    storage_driver,
)
from imago_vpc import Vpc

from ._vpc import MiB, imago_cli, qemu_img, qemu_io, qemu_json, qemu_raw, read_all

SUBFORMATS = ("dynamic", "fixed")


def _shuffled_commands(size: int, seed: int) -> list[str]:
    """qemu-io writes in random order: patterns at unaligned offsets, zeroes, overwrites."""
    rng = random.Random(seed)
    commands = []
    for _ in range(24):
        length = rng.choice((512, 4096, 65536, 70000 // 512 * 512, 3 << 20))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if offset < 4 << 20 and offset + length > 2 << 20:
            continue  # (the second block stays unallocated)
        if rng.random() < 0.2:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    commands.append(f"write -P 0x77 {size - 512} 512")
    return commands


def _make(directory: Path, name: str, subformat: str, size: int, commands: list[str], **options: str) -> Path:
    image = directory / f"{name}.vhd"
    opts = ",".join([f"subformat={subformat}", *(f"{k}={v}" for k, v in options.items())])
    qemu_img("create", "-q", "-f", "vpc", "-o", opts, image, str(size))
    if commands:
        qemu_io(image, *commands)
    return image


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> image, for every image of the matrix."""
    directory = tmp_path_factory.mktemp("vpc-matrix")
    images: dict[str, Path] = {}
    odd = 7 * MiB + 1536
    for subformat in SUBFORMATS:
        images[f"{subformat}-empty"] = _make(directory, f"{subformat}-empty", subformat, 3 * MiB, [])
        images[f"{subformat}-shuffled"] = _make(
            directory, f"{subformat}-shuffled", subformat, odd, _shuffled_commands(odd, 7)
        )
        images[f"{subformat}-full"] = _make(directory, f"{subformat}-full", subformat, 4 * MiB, ["write -P 0x5a 0 4M"])
        images[f"{subformat}-forced"] = _make(
            directory, f"{subformat}-forced", subformat, 3 * MiB + 512, ["write -P 0x11 1M 8k"], force_size="on"
        )
    return images


def _check_map(image: Path) -> None:
    expected = qemu_json("map", "-f", "vpc", image)
    status, out, err = imago_cli("map", "-f", "vpc", "--output=json", image)
    assert status == 0, err
    assert json.loads(out) == expected


def _check_info(image: Path) -> None:
    expected = qemu_json("info", "-f", "vpc", image)
    status, out, err = imago_cli("info", "-f", "vpc", "--output=json", image)
    assert status == 0, err
    assert json.loads(out) == expected


def test_matrix_reads_maps_info(matrix: dict[str, Path]) -> None:
    for name, image in matrix.items():
        try:
            assert read_all(image) == qemu_raw(image)
            _check_map(image)
            _check_info(image)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_matrix_covers_what_it_claims(matrix: dict[str, Path]) -> None:
    """The shuffled dynamic image has allocated and unallocated blocks; the forced ones keep their odd size."""
    entries = qemu_json("map", "-f", "vpc", matrix["dynamic-shuffled"])
    assert {e["data"] for e in entries} == {True, False}
    for subformat in SUBFORMATS:
        assert qemu_json("info", "-f", "vpc", matrix[f"{subformat}-forced"])["virtual-size"] == 3 * MiB + 512


def _read_range(image: Path, offset: int, length: int) -> bytes:
    import imago

    with imago.open(image, "vpc", gate=PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(length)
        disk.read(buf, offset)
        return bytes(buf)


def test_big_sparse_images(tmp_path: Path) -> None:
    """> 2 GiB: sizes, maps and the written ranges as QEMU reads them; the files stay sparse."""
    size = 2 * 1024 * MiB + 5 * MiB
    for subformat in SUBFORMATS:
        image = _make(
            tmp_path, subformat, subformat, size, ["write -P 0x41 0 64k", "write -P 0x42 2G 1M", "write -P 0x43 1G 4k"]
        )
        assert image.stat().st_blocks * 512 < 64 * MiB
        _check_map(image)
        _check_info(image)
        # The written ranges and what surrounds them: as the writes made them, and as QEMU reads them.
        for offset, pattern, length in ((0, 0x41, 64 << 10), (1 << 30, 0x43, 4096), (2 << 30, 0x42, MiB)):
            qemu_io(image, f"read -P {pattern} {offset} {length}", f"read -P 0 {offset + length} 64k")
            expected = bytes([pattern]) * length + bytes(64 << 10)
            assert _read_range(image, offset, length + (64 << 10)) == expected


def test_cli_convert_and_compare(matrix: dict[str, Path], tmp_path: Path) -> None:
    for name in ("dynamic-shuffled", "fixed-shuffled"):
        image = matrix[name]
        target = tmp_path / f"{name}.raw"
        status, _, err = imago_cli("convert", "-f", "vpc", "-O", "raw", image, target)
        assert status == 0, err
        assert target.read_bytes() == qemu_raw(image)
        status, out, err = imago_cli("compare", "-f", "vpc", "-F", "raw", image, target)
        assert status == 0, out + err
        qemu_img("compare", "-f", "vpc", "-F", "raw", image, target)


def _probe(path: Path) -> type[FormatDriver] | None:
    from imago import runtime

    storage = runtime.run_sync(storage_driver("file").open(StorageOpenOptions(filename=str(path))))
    try:
        return probe_sync(storage)
    finally:
        runtime.run_sync(storage.close())


def test_probe_as_qemu(matrix: dict[str, Path]) -> None:
    """Dynamic images are probed; fixed ones are not (their footer follows guest data), as with QEMU."""
    assert _probe(matrix["dynamic-shuffled"]) is Vpc
    assert _probe(matrix["fixed-shuffled"]) is not Vpc
    assert qemu_json("info", matrix["fixed-shuffled"])["format"] == "raw"


def test_dynamic_image_without_its_end_footer(tmp_path: Path) -> None:
    """A dynamic image whose end lost its footer opens from the copy at offset 0, as QEMU opens it (read-only)."""
    image = _make(tmp_path, "cut", "dynamic", 4 * MiB, ["write -P 0x19 1M 64k"])
    with image.open("r+b") as f:
        f.truncate(image.stat().st_size - 512)
    assert read_all(image) == qemu_raw(image)
    with pytest.raises(UnsupportedFeatureError, match="without a footer"):
        Vpc.builder_path(image).write().open_sync(PermissiveImplicitOpenGate())
