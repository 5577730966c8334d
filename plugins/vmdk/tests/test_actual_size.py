"""``actual-size`` of multi-file images: every extent file counted, nothing outside the gate touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._vmdk import MiB, descriptor_text, imago_cli, qemu_img, qemu_json


def _actual(image: Path) -> int:
    status, out, err = imago_cli("info", "--output=json", image)
    assert status == 0, err
    return int(json.loads(out)["actual-size"])


def test_every_extent_file_is_counted(tmp_path: Path) -> None:
    image = tmp_path / "split.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", image, str(5 * 1024 * MiB))
    assert _actual(image) == qemu_json("info", image)["actual-size"]
    assert _actual(image) > os.stat(image).st_blocks * 512  # the extents are more than the descriptor


def test_a_linked_or_nested_flat_extent_file_is_not_looked_at(tmp_path: Path) -> None:
    # `imago info` opens a flat extent's file neither through the gate nor at all: its size is
    # taken (lstat) only for a regular file beside the descriptor, never through a link.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.raw").write_bytes(os.urandom(4 * MiB))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "link-flat.vmdk").symlink_to(outside / "big.raw")
    (images / "sub" / "nested-flat.vmdk").write_bytes(os.urandom(MiB))
    lines = ['RW 8192 FLAT "link-flat.vmdk" 0', 'RW 2048 FLAT "sub/nested-flat.vmdk" 0']
    descriptor = images / "d.vmdk"
    descriptor.write_text(descriptor_text(lines, create_type="monolithicFlat"))
    assert _actual(descriptor) == os.stat(descriptor).st_blocks * 512
