"""Differencing VHDs (built from the specification's rules: qemu-img cannot create them).

QEMU 7.2 reads a differencing image's parent blocks as zeroes; imago reads the parent's data,
so the reference is a model: the parent's bytes (read by qemu-img) with the child's present
sectors over them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from imago import (
    BackingChainError,
    CorruptImageError,
    ImagoError,
    ImplicitOpenDeniedError,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    UnsupportedFeatureError,
)

from ._vpc import MiB, craft_vhd, footer_uuid, imago_cli, qemu_img, qemu_io, qemu_json, qemu_raw, read_all

SIZE = 6 * MiB


def _parent(directory: Path) -> tuple[Path, int, bytearray]:
    parent = directory / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", parent, str(SIZE))
    qemu_io(parent, "write -P 0x51 0 3M", "write -P 0x52 5M 64k")
    size = qemu_json("info", "-f", "vpc", parent)["virtual-size"]
    return parent, size, bytearray(qemu_raw(parent))


def _overlay(model: bytearray, block: int, data: bytes, present: set[int] | None) -> None:
    start = block * 2 * MiB
    for sector in range(4096) if present is None else present:
        at = start + sector * 512
        if at < len(model):
            model[at : at + 512] = data[sector * 512 : sector * 512 + 512]


def test_two_level_chain_reads_the_parents_data(tmp_path: Path) -> None:
    parent, size, model = _parent(tmp_path)
    rng = random.Random(1)
    mid_blocks = {0: (rng.randbytes(2 * MiB), set(range(0, 4096, 3))), 2: (rng.randbytes(2 * MiB), None)}
    mid = tmp_path / "mid.vhd"
    mid_uuid = craft_vhd(mid, size, mid_blocks, disk_type=4, parent=("base.vhd", footer_uuid(parent)))
    for block, (data, present) in mid_blocks.items():
        _overlay(model, block, data, present)
    assert read_all(mid) == bytes(model)
    top_blocks = {1: (rng.randbytes(2 * MiB), {5, 6, 7, 4095})}
    top = tmp_path / "top.vhd"
    craft_vhd(top, size, top_blocks, disk_type=4, parent=("mid.vhd", mid_uuid), locator_code=b"W2ku")
    _overlay(model, 1, *top_blocks[1])
    assert read_all(top) == bytes(model)
    # The CLI follows the chain too, and maps the parent's data at depth 1 and 2.
    target = tmp_path / "top.raw"
    status, _, err = imago_cli("convert", "-f", "vpc", "-O", "raw", top, target)
    assert status == 0, err
    assert target.read_bytes() == bytes(model)
    status, out, err = imago_cli("info", "-f", "vpc", "--output=json", top)
    assert status == 0, err
    assert '"backing-filename": "mid.vhd"' in out


def test_uuid_mismatch_is_refused(tmp_path: Path) -> None:
    _, size, _ = _parent(tmp_path)
    child = tmp_path / "child.vhd"
    craft_vhd(child, size, {}, disk_type=4, parent=("base.vhd", bytes(16)))
    with pytest.raises(CorruptImageError, match="UUID"):
        read_all(child)


def test_parent_loop_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "loop.vhd"
    own = bytes(range(16))
    craft_vhd(image, SIZE, {}, disk_type=4, parent=("loop.vhd", own), uuid=own)
    with pytest.raises(BackingChainError):
        read_all(image)
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    ua, ub = bytes([1]) * 16, bytes([2]) * 16
    craft_vhd(a, SIZE, {}, disk_type=4, parent=("b.vhd", ub), uuid=ua)
    craft_vhd(b, SIZE, {}, disk_type=4, parent=("a.vhd", ua), uuid=ub)
    with pytest.raises(BackingChainError):
        read_all(a)


@pytest.mark.parametrize("name", ["../base.vhd", "sub/../../base.vhd"])
def test_traversal_is_refused(tmp_path: Path, name: str) -> None:
    parent, size, _ = _parent(tmp_path)
    directory = tmp_path / "sub"
    directory.mkdir()
    child = directory / "child.vhd"
    craft_vhd(child, size, {}, disk_type=4, parent=(name, footer_uuid(parent)))
    with pytest.raises(ImplicitOpenDeniedError):
        read_all(child)


def test_absolute_locators_are_not_used(tmp_path: Path) -> None:
    parent, size, _ = _parent(tmp_path)
    child = tmp_path / "child.vhd"
    for name, code in ((str(parent), b"W2ku"), ("C:\\disks\\base.vhd", b"W2ku"), (f"file://{parent}", b"MacX")):
        craft_vhd(child, size, {}, disk_type=4, parent=(name, footer_uuid(parent)), locator_code=code)
        with pytest.raises(UnsupportedFeatureError, match="no relative locator"):
            read_all(child)


def test_the_gate_decides(tmp_path: Path) -> None:
    """A sandbox gate confined elsewhere refuses the parent, and the refusal names the child."""
    parent, size, _ = _parent(tmp_path)
    child = tmp_path / "child.vhd"
    craft_vhd(child, size, {}, disk_type=4, parent=("base.vhd", footer_uuid(parent)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ImagoError):
        read_all(child, gate=SandboxImplicitOpenGate([elsewhere]))
    assert read_all(child, gate=PermissiveImplicitOpenGate())
