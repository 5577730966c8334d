"""Creating VDI images: the bytes qemu-img writes (UUIDs aside), its options and its checks."""

from __future__ import annotations

from pathlib import Path

import pytest

import imago
from imago import InvalidOptionError

from ._vdi import MiB, imago_cli, qemu_img, qemu_json, run

_UUIDS = slice(0x188, 0x1A8)


def _without_uuids(data: bytes) -> bytes:
    return data[: _UUIDS.start] + data[_UUIDS.stop :]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("size", [0, 512, 3_000_000, 5 * MiB, 40 * MiB + 1])
def test_created_as_qemu_img_creates(tmp_path: Path, static: bool, size: int) -> None:
    mine, theirs = tmp_path / "mine.vdi", tmp_path / "theirs.vdi"
    option = f"static={'on' if static else 'off'}"
    status, out, err = imago_cli("create", "-f", "vdi", "-o", option, mine, str(size))
    assert status == 0, err
    qemu_out = qemu_img("create", "-f", "vdi", "-o", option, theirs, str(size))
    assert out == qemu_out.replace("theirs.vdi", "mine.vdi")
    assert mine.stat().st_size == theirs.stat().st_size
    assert _without_uuids(mine.read_bytes()) == _without_uuids(theirs.read_bytes())
    assert mine.read_bytes()[_UUIDS] != theirs.read_bytes()[_UUIDS]
    qemu_img("check", "-f", "vdi", mine)
    info = qemu_json("info", "-f", "vdi", mine)
    assert info["virtual-size"] == qemu_json("info", "-f", "vdi", theirs)["virtual-size"]
    with imago.open(mine) as disk:  # (probed)
        assert disk.driver.name == "vdi"
        assert disk.size == info["virtual-size"]


def test_static_image_is_sparse_on_disk(tmp_path: Path) -> None:
    image = tmp_path / "static.vdi"
    imago.create(image, "vdi", 64 * MiB, static=True)
    assert image.stat().st_size == 1024 + 64 * MiB
    assert image.stat().st_blocks * 512 < MiB


def test_create_options_checked(tmp_path: Path) -> None:
    image = tmp_path / "x.vdi"
    with pytest.raises(InvalidOptionError, match="size"):
        imago.create(image, "vdi", (0x3FFFFFFF << 20) + MiB)
    with pytest.raises(InvalidOptionError, match="preallocation"):
        imago.create(image, "vdi", MiB, preallocation="full")
    with pytest.raises(InvalidOptionError, match="static"):
        imago.create(image, "vdi", MiB, static="maybe")
    with pytest.raises(InvalidOptionError, match="cluster_size"):
        imago.create(image, "vdi", MiB, cluster_size=65536)
    status, out, _ = imago_cli("create", "-f", "vdi", "-o", "help")
    assert status == 0
    assert "static=<bool (on/off)>" in out
    assert "size=<size>" in out


def test_measure_unsupported_as_in_qemu(tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(b"\1" * MiB)
    qemu = run(["qemu-img", "measure", "-O", "vdi", source])
    status, _, err = imago_cli("measure", "-O", "vdi", source)
    assert qemu.returncode == status == 1
    assert "vdi" in err
