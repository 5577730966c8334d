"""``imago info/map/convert/compare`` on VMDK images, printed as qemu-img prints them."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from ._vmdk import MiB, craft_stream, imago_cli, qemu_img, qemu_io

SIZE = 2 * MiB + 512


@pytest.fixture(params=["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """An image with data, zeroes and holes (qemu-img made; stream-optimized: by qemu-img convert)."""
    subformat: str = request.param
    path = tmp_path / f"{subformat}.vmdk"
    if subformat == "streamOptimized":
        source = tmp_path / "source.raw"
        data = bytearray(SIZE)
        data[70000:300000] = random.Random(1).randbytes(230000)
        data[SIZE - 512 :] = b"\xee" * 512
        source.write_bytes(bytes(data))
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, path)
        return path
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, str(SIZE))
    qemu_io(path, "write -P 0x41 70000 230000", "write -z 1M 64k", f"write -P 0x42 {SIZE - 512} 512")
    return path


def test_info(image: Path) -> None:
    for output in ("json", "human"):
        status, out, err = imago_cli("info", "--output", output, image)
        assert status == 0, err
        expected = qemu_img("info", "--output", output, image)
        assert out == expected


def test_map(image: Path) -> None:
    for output in ("json", "human"):
        status, out, err = imago_cli("map", "-f", "vmdk", "--output", output, image)
        done = subprocess.run(
            ["qemu-img", "map", "-f", "vmdk", "--output", output, image], capture_output=True, text=True, check=False
        )
        assert (status, out) == (done.returncode, done.stdout)
        if status:
            # (the human table cannot show compressed data, in either tool)
            assert err.removeprefix("imago: ") == done.stderr.removeprefix("qemu-img: ")


def test_convert_and_compare(image: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    status, _, err = imago_cli("convert", "-f", "vmdk", "-O", "raw", image, ours)
    assert status == 0, err
    qemu_img("convert", "-f", "vmdk", "-O", "raw", image, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    qcow2 = tmp_path / "ours.qcow2"
    status, _, err = imago_cli("convert", "-f", "vmdk", "-O", "qcow2", image, qcow2)
    assert status == 0, err
    qemu_img("compare", "-f", "vmdk", "-F", "qcow2", image, qcow2)
    status, out, _ = imago_cli("compare", "-f", "vmdk", "-F", "raw", image, theirs)
    assert (status, out) == (0, "Images are identical.\n")
    with theirs.open("r+b") as f:
        f.seek(SIZE - 100)
        f.write(b"\x01")
    status, out, _ = imago_cli("compare", "-f", "vmdk", "-F", "raw", image, theirs)
    expected = "Content mismatch at offset 2097152!\n"
    assert (status, out) == (1, expected)


def test_probed_by_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    craft_stream(path, MiB, {0: b"a" * 65536})
    status, out, err = imago_cli("info", "--output=json", path)
    assert status == 0, err
    assert '"format": "vmdk"' in out


def test_refused_extent_through_the_cli(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.img").write_bytes(bytes(4096))
    descriptor = inner / "d.vmdk"
    descriptor.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        'RW 8 FLAT "../secret.img" 0\n'
    )
    status, _, err = imago_cli("info", descriptor)
    assert status == 1
    assert "line 6 of the descriptor" in err
    assert "'..'" in err


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentFlat", "twoGbMaxExtentSparse"])
def test_info_and_map_name_extent_files_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subformat: str
) -> None:
    # qemu-img names extent files from the name the user gave (a relative one stays relative).
    (tmp_path / "rel").mkdir()
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", tmp_path / "rel" / "t.vmdk", "10M")
    monkeypatch.chdir(tmp_path)
    for command in (["info", "--output=json"], ["info"], ["map", "--output=json"], ["map"]):
        status, out, err = imago_cli(*command, "rel/t.vmdk")
        assert status == 0, err
        assert out == qemu_img(*command, "rel/t.vmdk", cwd=tmp_path)
        if command[0] == "info":
            assert "rel/t-" in out
