"""VDI images qemu-img and qemu-io make, read by imago: bytes, sizes and maps as QEMU reports them."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from ._vdi import MiB, imago_cli, open_vdi, qemu_img, qemu_io, qemu_json, qemu_raw, read_all

GiB = 1 << 30


def _empty(image: Path, options: str, size: int) -> None:
    qemu_img("create", "-q", "-f", "vdi", "-o", options, image, str(size))


def _shuffled(image: Path, options: str, size: int) -> None:
    qemu_img("create", "-q", "-f", "vdi", "-o", options, image, str(size))
    rng = random.Random(size)
    writes = [f"write -P {0x10 + i} {(i * 700 * 1024) % (size - 70_000) // 512 * 512} 65536" for i in range(8)]
    rng.shuffle(writes)
    qemu_io(image, *writes, f"write -P 0x7e {size - 512} 512", "write -z 1200k 64k")


def _full(image: Path, options: str, size: int) -> None:
    qemu_img("create", "-q", "-f", "vdi", "-o", options, image, str(size))
    qemu_io(image, f"write -P 0x5a 0 {size}")


# (name, how, options, size): each subformat qemu-img makes, odd sizes among them.
IMAGES: list[tuple[str, Callable[[Path, str, int], None], str, int]] = [
    ("dynamic-empty", _empty, "static=off", 3 * MiB),
    ("dynamic-shuffled", _shuffled, "static=off", 5 * MiB + 1536),
    ("dynamic-full", _full, "static=off", 4 * MiB),
    ("dynamic-odd", _shuffled, "static=off", 3_000_000),
    ("static-empty", _empty, "static=on", 2 * MiB),
    ("static-shuffled", _shuffled, "static=on", 3 * MiB + 7 * 512),
    ("static-full", _full, "static=on", 2 * MiB),
]


@pytest.fixture(params=IMAGES, ids=[i[0] for i in IMAGES])
def qemu_image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    name, make, options, size = request.param
    image = tmp_path / f"{name}.vdi"
    make(image, options, size)
    return image


def test_reads_sizes_and_maps_match_qemu(qemu_image: Path) -> None:
    assert read_all(qemu_image) == qemu_raw(qemu_image)
    info = qemu_json("info", "-f", "vdi", qemu_image)
    with open_vdi(qemu_image) as disk:
        assert disk.size == info["virtual-size"]
    status, out, err = imago_cli("map", "-f", "vdi", "--output=json", qemu_image)
    assert status == 0, err
    assert json.loads(out) == qemu_json("map", "-f", "vdi", qemu_image)


def test_cli_info_convert_compare(qemu_image: Path, tmp_path: Path) -> None:
    status, out, err = imago_cli("info", "-f", "vdi", "--output=json", qemu_image)
    assert status == 0, err
    mine, theirs = json.loads(out), qemu_json("info", "-f", "vdi", qemu_image)
    for key in ("virtual-size", "cluster-size", "format", "dirty-flag", "filename"):
        assert mine[key] == theirs[key], key
    status, out, _ = imago_cli("info", "-f", "vdi", qemu_image)
    assert out == qemu_img("info", "-f", "vdi", qemu_image)
    raw = tmp_path / "out.raw"
    status, _, err = imago_cli("convert", "-f", "vdi", "-O", "raw", qemu_image, raw)
    assert status == 0, err
    assert raw.read_bytes() == qemu_raw(qemu_image)
    status, out, err = imago_cli("compare", "-f", "vdi", "-F", "raw", qemu_image, raw)
    assert (status, out) == (0, "Images are identical.\n"), err
    status, out, err = imago_cli("check", "-f", "vdi", qemu_image)
    assert (status, out, err) == (0, "No errors were found on the image.\n", "")
    assert out == qemu_img("check", "-f", "vdi", qemu_image)


def test_sparse_image_over_2_gib_stays_sparse(tmp_path: Path) -> None:
    image = tmp_path / "big.vdi"
    size = 3 * GiB + 5 * MiB
    qemu_img("create", "-q", "-f", "vdi", image, str(size))
    qemu_io(image, "write -P 0x41 0 64k", f"write -P 0x42 {2 * GiB + 300 * 1024} 1M", f"write -P 0x43 {size - 4096} 4k")
    assert image.stat().st_blocks * 512 < 16 * MiB
    with open_vdi(image) as disk:
        assert disk.size == qemu_json("info", "-f", "vdi", image)["virtual-size"] == size
        buf = bytearray(2 * MiB)
        disk.read(buf, 2 * GiB)
        expected = bytes(300 * 1024) + b"\x42" * MiB + bytes(MiB - 300 * 1024)
        assert buf == expected
        tail = bytearray(4096)
        disk.read(tail, size - 4096)
        assert tail == b"\x43" * 4096
    status, out, err = imago_cli("map", "-f", "vdi", "--output=json", image)
    assert status == 0, err
    assert json.loads(out) == qemu_json("map", "-f", "vdi", image)
    raw = tmp_path / "big.raw"
    status, _, err = imago_cli("convert", "-f", "vdi", "-O", "raw", image, raw)
    assert status == 0, err
    assert raw.stat().st_size == size
    assert raw.stat().st_blocks * 512 < 16 * MiB
    qemu_img("compare", "-f", "vdi", "-F", "raw", image, raw)
    # Converted by imago to a new VDI image: kept sparse, clean and equal for both tools.
    copy = tmp_path / "copy.vdi"
    status, _, err = imago_cli("convert", "-f", "vdi", "-O", "vdi", image, copy)
    assert status == 0, err
    assert copy.stat().st_blocks * 512 < 16 * MiB
    qemu_img("check", "-f", "vdi", copy)
    qemu_img("compare", "-f", "vdi", "-F", "vdi", image, copy)
    status, out, err = imago_cli("compare", "-f", "vdi", "-F", "vdi", image, copy)
    assert (status, out) == (0, "Images are identical.\n"), err
