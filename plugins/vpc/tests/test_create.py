"""Creating VHDs: the same sizes, layout and footer as ``qemu-img create -f vpc``, and the Azure rule.

(``qemu-img check`` does not check vpc images, so the check is ``qemu-img compare`` with
qemu-img's own image of the same options, and the files' metadata compared field by field.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

import imago
from imago import InvalidOptionError

from ._vpc import SECTOR, MiB, imago_cli, qemu_img, qemu_json, read_all

# Field offsets of the footer that differ between any two images: timestamp, checksum, UUID.
_VOLATILE = [(24, 28), (64, 84)]


def _masked(footer: bytes) -> bytes:
    data = bytearray(footer)
    for start, end in _VOLATILE:
        data[start:end] = bytes(end - start)
    return bytes(data)


@pytest.mark.parametrize(
    ("subformat", "size", "force"),
    [
        ("dynamic", MiB, False),
        ("dynamic", 100_000_000, False),
        ("dynamic", 3 << 30, False),
        ("dynamic", 3 * MiB + 512, True),
        ("fixed", 5 * MiB, False),
        ("fixed", 7 * MiB, True),
        ("fixed", 1536 * 1024 + 4096, False),
    ],
)
def test_like_qemu_img(tmp_path: Path, subformat: str, size: int, force: bool) -> None:
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    options = f"subformat={subformat},force_size={'on' if force else 'off'}"
    status, _, err = imago_cli("create", "-q", "-f", "vpc", "-o", options, ours, str(size))
    assert status == 0, err
    qemu_img("create", "-q", "-f", "vpc", "-o", options, theirs, str(size))
    assert ours.stat().st_size == theirs.stat().st_size
    info = qemu_json("info", "-f", "vpc", ours)
    assert info["virtual-size"] == qemu_json("info", "-f", "vpc", theirs)["virtual-size"]
    with ours.open("rb") as a, theirs.open("rb") as b:
        a.seek(-SECTOR, 2)
        b.seek(-SECTOR, 2)
        assert _masked(a.read(SECTOR)) == _masked(b.read(SECTOR))
        if subformat == "dynamic":
            a.seek(0)
            b.seek(0)
            head_a, head_b = a.read(3 * SECTOR), b.read(3 * SECTOR)
            assert _masked(head_a[:SECTOR]) == _masked(head_b[:SECTOR])
            assert head_a[SECTOR:] == head_b[SECTOR:]  # (the dynamic header: no volatile fields)
    qemu_img("compare", "-f", "vpc", "-F", "vpc", ours, theirs)
    with imago.open(ours, "vpc") as disk:
        assert disk.size == info["virtual-size"]


def test_azure_sizes(tmp_path: Path) -> None:
    """A fixed image with force_size must be a whole number of MiB; convert refuses others, naming size."""
    source = tmp_path / "odd.raw"
    source.write_bytes(b"\x42" * (5 * MiB + 4096))
    target = tmp_path / "azure.vhd"
    status, _, err = imago_cli("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size", source, target)
    assert status != 0
    assert "'size'" in err
    assert "whole number of MiB" in err
    with pytest.raises(InvalidOptionError) as caught:
        imago.create(tmp_path / "x.vhd", "vpc", size=5 * MiB + 4096, subformat="fixed", force_size=True)
    assert caught.value.option == "size"
    # A whole number of MiB converts, and keeps its exact size (creator qem2).
    source.write_bytes(b"\x42" * (6 * MiB))
    status, _, err = imago_cli("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size", source, target)
    assert status == 0, err
    assert qemu_json("info", "-f", "vpc", target)["virtual-size"] == 6 * MiB
    assert target.stat().st_size == 6 * MiB + SECTOR
    assert target.read_bytes()[-SECTOR:][28:32] == b"qem2"
    assert read_all(target) == source.read_bytes()


@pytest.mark.parametrize(
    ("option", "value"), [("subformat", "streamOptimized"), ("force_size", "maybe"), ("preallocate", "full")]
)
def test_bad_options(tmp_path: Path, option: str, value: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        imago.create(tmp_path / "x.vhd", "vpc", size=MiB, **{option: value})
    assert caught.value.option in (option, "preallocation")
