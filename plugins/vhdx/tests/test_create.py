"""Creating VHDX images: qemu-img's options and validation; the results checked and read by QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

import imago
from imago import InvalidOptionError
from imago_vhdx import Vhdx
from imago_vhdx.create import default_block_size

from ._vhdx import MiB, imago_cli, open_vhdx, qemu_img, qemu_io, qemu_json, qemu_raw, read_all

GiB = 1024 * MiB


@pytest.mark.parametrize(
    "options",
    [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,block_size=1M,log_size=2M",
        "subformat=dynamic,block_state_zero=off",
        "subformat=fixed,block_size=2M",
        "block_size=512K,log_size=1536K",
    ],
)
def test_created_images_check_clean_and_match_qemu(tmp_path: Path, options: str) -> None:
    size = 5 * MiB + 1000
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    status, _, err = imago_cli("create", "-f", "vhdx", "-o", options, ours, str(size))
    assert status == 0, err
    qemu_img("create", "-q", "-f", "vhdx", "-o", options, theirs, str(size))
    qemu_img("check", "-f", "vhdx", ours)
    info, reference = qemu_json("info", ours), qemu_json("info", theirs)
    assert info["virtual-size"] == reference["virtual-size"]
    assert info["cluster-size"] == reference["cluster-size"]
    assert qemu_raw(ours) == bytes(info["virtual-size"])
    assert read_all(ours) == bytes(info["virtual-size"])
    # QEMU writes into what imago made, and both read it back the same.
    qemu_io(ours, "write -P 0x41 1M 1M", f"write -P 0x42 {info['virtual-size'] - 512} 512")
    qemu_img("check", "-f", "vhdx", ours)
    assert read_all(ours) == qemu_raw(ours)


def test_block_size_defaults_follow_qemu() -> None:
    assert default_block_size(GiB) == 8 * MiB
    assert default_block_size(GiB + 512) == 16 * MiB
    assert default_block_size(100 * GiB + 512) == 32 * MiB
    assert default_block_size(32 * 1024 * GiB + 512) == 64 * MiB


def test_large_dynamic_image_is_small(tmp_path: Path) -> None:
    image = tmp_path / "big.vhdx"
    imago.create(image, "vhdx", size=3 * 1024 * GiB)
    assert image.stat().st_size < 16 * MiB
    info = qemu_json("info", image)
    assert info["virtual-size"] == 3 * 1024 * GiB
    assert info["cluster-size"] == 32 * MiB
    with open_vhdx(image) as disk:
        assert disk.size == 3 * 1024 * GiB


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("block_size", 3 * MiB),
        ("log_size", 0),
        ("log_size", 4 * 1024 * GiB),
        ("subformat", "differencing"),
        ("block_state_zero", "maybe"),
        ("size", 65 * 1024 * 1024 * GiB),
        ("block_size", -1),
    ],
)
def test_bad_options_refused(tmp_path: Path, option: str, value: object) -> None:
    options: dict[str, object] = {"size": MiB, option: value}
    with pytest.raises(InvalidOptionError, match=option):
        imago.create(tmp_path / "x.vhdx", "vhdx", **options)


def test_preallocation_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="preallocation"):
        imago.create(tmp_path / "x.vhdx", "vhdx", size=MiB, preallocation="full")


def test_empty_disk(tmp_path: Path) -> None:
    image = tmp_path / "empty.vhdx"
    imago.create(image, "vhdx", size=0)
    qemu_img("check", "-f", "vhdx", image)
    assert qemu_json("info", image)["virtual-size"] == 0
    with open_vhdx(image) as disk:
        assert disk.size == 0
    assert Vhdx.name == "vhdx"
