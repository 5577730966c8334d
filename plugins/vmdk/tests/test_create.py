"""Creating VMDK images: qemu-img 7.2's options, defaults, layout and validation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import InvalidOptionError, UnsupportedFeatureError

from ._vmdk import (
    WRITABLE_SUBFORMATS,
    MiB,
    assert_qemu_clean_and_equal,
    descriptor_of,
    imago_cli,
    qemu_img,
    qemu_io,
    qemu_json,
    qemu_raw,
    run,
)

SIZE = 3 * MiB + 1536


@pytest.mark.parametrize("subformat", WRITABLE_SUBFORMATS)
def test_new_image_is_what_qemu_img_reports(tmp_path: Path, subformat: str) -> None:
    image = tmp_path / "disk.vmdk"
    imago.create(image, "vmdk", SIZE, subformat=subformat, adapter_type="lsilogic", hwversion="7", toolsversion="10")
    assert_qemu_clean_and_equal(image, bytes(SIZE))
    info = qemu_json("info", image)
    assert info["virtual-size"] == SIZE
    data = info["format-specific"]["data"]
    assert data["create-type"] == subformat
    assert data["parent-cid"] == 0xFFFFFFFF
    kind = "FLAT" if "Flat" in subformat else "SPARSE"
    assert [e["format"] for e in data["extents"]] == ([""] if subformat == "monolithicSparse" else [kind])
    text = descriptor_of(image)
    assert 'ddb.adapterType = "lsilogic"' in text
    assert 'ddb.virtualHWVersion = "7"' in text
    assert 'ddb.toolsVersion = "10"' in text
    # Geometry as QEMU computes it: 255 heads for SCSI adapters, 63 sectors, cylinders rounded down.
    assert 'ddb.geometry.heads = "255"' in text
    assert f'ddb.geometry.cylinders = "{SIZE // (63 * 255 * 512)}"' in text
    with imago.open(image, "vmdk", gate=imago.PermissiveImplicitOpenGate()) as disk:
        assert disk.driver.info()["format-specific"]["data"]["create-type"] == subformat


def test_monolithic_sparse_layout_is_qemus(tmp_path: Path) -> None:
    """Same bytes as qemu-img's file but for the CID and the file name in the descriptor."""
    ours, theirs = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    imago.create(ours, "vmdk", 300 * MiB, zeroed_grain=True)
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", theirs, str(300 * MiB))
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    assert a[:512] == b[:512]  # header: version 2, flags, directories, overhead
    assert a[21 * 512 :] == b[21 * 512 :]  # grain directories and tables
    cid = re.compile(r"CID=[0-9a-f]+\n")
    assert cid.sub("", descriptor_of(ours)).replace('"a.vmdk"', "") == cid.sub("", descriptor_of(theirs)).replace(
        '"b.vmdk"', ""
    )


def test_defaults_and_split_extents(tmp_path: Path) -> None:
    image = tmp_path / "split.vmdk"
    imago.create(image, "vmdk", 5 << 30, subformat="twoGbMaxExtentSparse")
    text = descriptor_of(image)
    assert re.findall(r'RW (\d+) SPARSE "([^"]+)"', text) == [
        ("4194304", "split-s001.vmdk"),
        ("4194304", "split-s002.vmdk"),
        ("2097152", "split-s003.vmdk"),
    ]
    for line in ('adapterType = "ide"', 'heads = "16"', 'virtualHWVersion = "4"', 'toolsVersion = "2147483647"'):
        assert line in text
    assert (tmp_path / "split-s001.vmdk").stat().st_size == 327680  # QEMU's size for a 2 GiB extent
    qemu_img("check", "-q", image)
    flat = tmp_path / "f.vmdk"
    imago.create(flat, "vmdk", MiB, subformat="monolithicFlat", compat6=True)
    assert 'RW 2048 FLAT "f-flat.vmdk" 0' in descriptor_of(flat)
    assert 'ddb.virtualHWVersion = "6"' in descriptor_of(flat)
    assert (tmp_path / "f-flat.vmdk").stat().st_size == MiB


def test_delta_records_the_parents_cid(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", base, str(2 * MiB))
    qemu_io(base, "write -P 0x5a 0 2M")
    top = tmp_path / "top.vmdk"
    imago.create(top, "vmdk", backing_file="base.vmdk", backing_fmt="vmdk")
    info = qemu_json("info", "--backing-chain", top)
    assert info[0]["format-specific"]["data"]["parent-cid"] == info[1]["format-specific"]["data"]["cid"]
    assert info[0]["virtual-size"] == 2 * MiB
    assert info[0]["backing-filename"] == "base.vmdk"
    assert_qemu_clean_and_equal(top, b"\x5a" * 2 * MiB)


@pytest.mark.parametrize("subformat", WRITABLE_SUBFORMATS)
def test_convert_to_each_subformat(tmp_path: Path, subformat: str) -> None:
    source = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, str(SIZE))
    commands = ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -z 2M 128k", f"write -P 0x33 {SIZE - 512} 512"]
    run(["qemu-io", "-f", "qcow2", *(arg for command in commands for arg in ("-c", command)), source])
    target = tmp_path / "out.vmdk"
    status, _, err = imago_cli("convert", "-O", "vmdk", "-o", f"subformat={subformat}", source, target)
    assert status == 0, err
    qemu_img("compare", source, target)
    qemu_img("check", "-q", target)
    assert qemu_json("info", target)["format-specific"]["data"]["create-type"] == subformat
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\x77" * MiB)
    status, _, err = imago_cli("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, target)
    assert status == 0, err
    assert qemu_raw(target) == b"\x77" * MiB


def test_cli_create_with_options(tmp_path: Path) -> None:
    image = tmp_path / "c.vmdk"
    status, _, err = imago_cli(
        "create", "-f", "vmdk", "-o", "subformat=monolithicFlat,adapter_type=buslogic,hwversion=8", image, "1M"
    )
    assert status == 0, err
    assert 'ddb.adapterType = "buslogic"' in image.read_text()
    assert qemu_json("info", image)["format-specific"]["data"]["create-type"] == "monolithicFlat"


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({"subformat": "monolithicDense"}, "subformat", "monolithicSparse"),
        ({"adapter_type": "scsi"}, "adapter_type", "lsilogic"),
        ({"compat6": True, "hwversion": "7"}, "compat6", "hwversion set"),
        ({"subformat": "monolithicFlat", "zeroed_grain": True}, "zeroed_grain", "flat"),
        ({"subformat": "twoGbMaxExtentFlat", "backing_file": "b.vmdk"}, "backing_file", "flat"),
        ({"backing_file": "b.vmdk", "backing_fmt": "qcow2"}, "backing_fmt", "vmdk"),
        ({"compat6": "maybe"}, "compat6", "on or off"),
        ({"preallocation": "metadata"}, "preallocation", "falloc"),
        ({"hwversion": 'x"y'}, "hwversion", "quotes"),
        ({"cluster_size": 65536}, "cluster_size", "not an option"),
        ({"backing_file": "nbd://host/x"}, "backing_file", "nbd"),
    ],
)
def test_option_misuse_names_the_option(tmp_path: Path, options: dict[str, Any], option: str, message: str) -> None:
    image = tmp_path / "bad.vmdk"
    image.write_bytes(b"keep")
    with pytest.raises(InvalidOptionError, match=message) as caught:
        imago.create(image, "vmdk", MiB, **options)
    assert caught.value.option == option
    assert image.read_bytes() == b"keep"  # (validated before the file is touched)


def test_backing_file_must_be_vmdk(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "1M")
    with pytest.raises(InvalidOptionError) as caught:
        imago.create(tmp_path / "top.vmdk", "vmdk", backing_file="q.qcow2")
    assert caught.value.option == "backing_file"


def test_oversized_sparse_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="size"):
        imago.create(tmp_path / "huge.vmdk", "vmdk", 1 << 51)


def test_stream_optimized_is_delegated(tmp_path: Path) -> None:
    """streamOptimized is written by the stream writer, with the adapter and versions asked for."""
    image = tmp_path / "s.vmdk"
    imago.create(image, "vmdk", MiB, subformat="streamOptimized", adapter_type="lsilogic", hwversion="9")
    assert qemu_json("info", image)["format-specific"]["data"]["create-type"] == "streamOptimized"
    qemu_img("check", "-q", image)
    assert 'ddb.virtualHWVersion = "9"' in image.read_bytes().decode("latin-1")
    with pytest.raises(UnsupportedFeatureError, match="backing file"):
        imago.create(tmp_path / "t.vmdk", "vmdk", MiB, subformat="streamOptimized", backing_file="s.vmdk")


def test_flat_preallocation_reserves_the_extent(tmp_path: Path) -> None:
    image = tmp_path / "p.vmdk"
    imago.create(image, "vmdk", 4 * MiB, subformat="monolithicFlat", preallocation="full")
    extent = tmp_path / "p-flat.vmdk"
    assert extent.stat().st_size == 4 * MiB
    assert extent.stat().st_blocks * 512 >= 4 * MiB
    assert_qemu_clean_and_equal(image, bytes(4 * MiB))
