"""``imago amend`` side by side with ``qemu-img amend``: same images afterwards, same refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from . import cli_run

# Scenarios: (qemu-img create arguments, qemu-io commands, amend options).
_SCENARIOS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("-f", "qcow2"), ("write 0 64k",), "lazy_refcounts=on"),
    (("-f", "qcow2", "-o", "lazy_refcounts=on"), ("write 0 64k", "write 1M 4k"), "lazy_refcounts=off"),
    (("-f", "qcow2"), ("write 0 128k",), "size=4M"),
    (("-f", "qcow2"), ("write 0 128k",), "size=512k"),
    (("-f", "qcow2"), ("write 0 64k", "write -z 128k 64k", "write -z 1M 1M"), "compat=0.10"),
    (("-f", "qcow2"), ("write 0 192k", "write -z 64k 64k", "write -z 1M 1M"), "compat=0.10"),
    (("-f", "qcow2", "-o", "compat=0.10"), ("write 0 64k",), "compat=1.1"),
    (("-f", "qcow2", "-o", "compat=0.10"), ("write 0 64k",), "compat=v3,lazy_refcounts=on,size=3M"),
    (("-f", "qcow2", "-o", "lazy_refcounts=on"), ("write 4k 4k",), "compat=0.10,lazy_refcounts=off"),
    (("-f", "qcow2", "-o", "compression_type=zstd"), ("write 0 64k",), "compat=0.10"),
    (("-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on"), ("write 0 64k",), "data_file_raw=off"),
    (("-f", "qcow2", "-o", "data_file=data.raw"), ("write 0 64k",), "data_file=data.raw"),
    (("-f", "qcow2", "-o", "refcount_bits=16"), (), "refcount_bits=16,lazy_refcounts=on"),
    # (4 KiB clusters: qemu-img's own refcount width change takes seconds on 64 KiB ones)
    (("-f", "qcow2", "-o", "cluster_size=4k"), ("write 0 64k", "write 1M 64k"), "refcount_bits=64"),
    (("-f", "qcow2", "-o", "refcount_bits=8,cluster_size=4k"), ("write 0 64k",), "refcount_bits=1"),
    (("-f", "qcow2", "-o", "refcount_bits=2,cluster_size=4k"), ("write 0 64k",), "compat=0.10,refcount_bits=16"),
]

# Refusals: (create arguments, qemu-io commands, amend options, what the message names).
_REFUSALS: list[tuple[tuple[str, ...], tuple[str, ...], str, str]] = [
    (("-f", "qcow2"), (), "cluster_size=4k", "cluster_size"),
    (("-f", "qcow2"), (), "extended_l2=on", "extended_l2"),
    (("-f", "qcow2"), (), "foo=bar", "Invalid parameter 'foo' (valid options: backing_file,"),
    (("-f", "qcow2"), (), "compat=2", "does not accept value '2'"),
    (("-f", "qcow2"), (), "compat=0.10,lazy_refcounts=on", "Lazy refcounts"),
    (("-f", "qcow2"), (), "refcount_bits=3", "Refcount width must be a power of two"),
    (("-f", "qcow2"), (), "lazy_refcounts=maybe", "expects 'on' or 'off'"),
    (("-f", "qcow2"), (), "size=1Q", "Parameter 'size' expects"),
    (("-f", "qcow2"), (), "size=1000,lazy_refcounts=on", "The new size must be a multiple of 512"),
    (("-f", "qcow2"), (), "backing_file=other.qcow2", "Cannot amend the backing file"),
    (("-f", "qcow2"), (), "data_file=x.raw", "data-file can only be set for images that use an external data file"),
    (("-f", "qcow2"), (), "data_file_raw=on", "data-file-raw cannot be set on existing images"),
    (
        ("-f", "qcow2", "-o", "extended_l2=on"),
        (),
        "compat=0.10",
        "Cannot downgrade an image with incompatible features",
    ),
    (("-f", "qcow2", "-o", "refcount_bits=8"), (), "compat=0.10", "compat=0.10 requires refcount_bits=16"),
    (("-f", "qcow2", "-o", "data_file=d.raw"), (), "compat=0.10", "Cannot downgrade an image with a data file"),
    (
        ("-f", "qcow2", "-o", "compression_type=zstd"),
        ("write -c 0 64k",),
        "compat=0.10",
        "zstd compression type and existing compressed clusters",
    ),
]


def _info(image: Path) -> dict[str, Any]:
    result = cli_run.qemu_img("info", "-U", "--output=json", image.name, cwd=image.parent)
    assert result.status == 0, result
    info: dict[str, Any] = json.loads(result.out)
    info.pop("actual-size", None)
    return info


def _map(image: Path) -> Any:
    result = cli_run.qemu_img("map", "-U", "--output=json", image.name, cwd=image.parent)
    assert result.status == 0, result
    return json.loads(result.out)


def _image(directory: Path, create: tuple[str, ...], commands: tuple[str, ...]) -> Path:
    directory.mkdir()
    image = directory / "disk.qcow2"
    assert cli_run.qemu_img("create", "-q", *create, image.name, "2M", cwd=directory).status == 0
    if commands:
        assert cli_run.qemu_io(image.name, *commands, cwd=directory).status == 0
    return image


@pytest.mark.parametrize(("create", "commands", "options"), _SCENARIOS)
def test_same_image_as_qemu_img(
    tmp_path: Path, create: tuple[str, ...], commands: tuple[str, ...], options: str
) -> None:
    mine = _image(tmp_path / "imago", create, commands)
    theirs = _image(tmp_path / "qemu", create, commands)
    before = tmp_path / "before.qcow2"
    shutil.copy(mine, before)
    for data in ("data.raw",):
        if (mine.parent / data).exists():
            shutil.copy(mine.parent / data, tmp_path / data)
    result = cli_run.imago("amend", "-o", options, mine.name, cwd=mine.parent)
    reference = cli_run.qemu_img("amend", "-o", options, theirs.name, cwd=theirs.parent)
    cli_run.same_text_as_qemu(result, reference)
    assert _info(mine) == _info(theirs)
    assert _map(mine) == _map(theirs)
    check = cli_run.qemu_img("check", mine.name, cwd=mine.parent)
    assert check.status == 0, check
    # Content unchanged (within the old size): compare against the copy taken before.
    size = min(_info(mine)["virtual-size"], _info(before)["virtual-size"])
    same = cli_run.qemu_img("compare", "-U", mine.name, theirs, cwd=mine.parent)
    assert same.status == 0, same
    if size == _info(mine)["virtual-size"] == _info(before)["virtual-size"] and "data_file" not in options:
        assert cli_run.qemu_img("compare", "-U", mine.name, before, cwd=mine.parent).status == 0


@pytest.mark.parametrize(("create", "commands", "options", "message"), _REFUSALS)
def test_refusals_change_nothing(
    tmp_path: Path, create: tuple[str, ...], commands: tuple[str, ...], options: str, message: str
) -> None:
    image = _image(tmp_path / "imago", create, commands)
    before = image.read_bytes()
    result = cli_run.imago("amend", "-o", options, image.name, cwd=image.parent)
    assert image.read_bytes() == before  # (qemu-img may have changed some options when it fails)
    reference = cli_run.qemu_img("amend", "-o", options, image.name, cwd=image.parent)
    assert result.status == reference.status == 1, (result, reference)
    assert message in result.err
    assert len(result.err.splitlines()) == 1


def test_raw_image_has_no_amend(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    assert cli_run.qemu_img("create", "-q", "-f", "raw", image, "1M").status == 0
    for args in (("-f", "raw", "-o", "size=2M", image), ("-f", "raw", "-o", "help")):
        result = cli_run.imago("amend", *args)
        reference = cli_run.qemu_img("amend", *args)
        cli_run.same_text_as_qemu(result, reference)
    assert image.stat().st_size == 1 << 20


def test_option_help_and_usage(tmp_path: Path) -> None:
    image = _image(tmp_path / "d", ("-f", "qcow2"), ())
    listing = cli_run.imago("amend", "-o", "help", image)
    assert listing.status == 0
    assert listing.out.startswith("Amend options for 'qcow2':\n")
    reference = cli_run.qemu_img("amend", "-o", "help", image).out.splitlines()
    # Every line imago prints is qemu-img's (qemu-img also lists encryption options).
    names = {line.split("=")[0] for line in reference}
    assert all(line.split("=")[0] in names for line in listing.out.splitlines())
    for args in (("-f", "qcow2", image), ("-o", "lazy_refcounts=on"), ("-o", "size=1M", tmp_path / "missing")):
        result = cli_run.imago("amend", *args)
        assert cli_run.qemu_img("amend", *args).status == result.status == 1
        assert len(result.err.splitlines()) == 1


def test_read_only_target(tmp_path: Path) -> None:
    """A file without write permission: refused as qemu-img refuses it (root may write anyway)."""
    mine = _image(tmp_path / "imago", ("-f", "qcow2"), ())
    theirs = _image(tmp_path / "qemu", ("-f", "qcow2"), ())
    for image in (mine, theirs):
        image.chmod(0o444)
    before = mine.read_bytes()
    result = cli_run.imago("amend", "-o", "lazy_refcounts=on", mine)
    reference = cli_run.qemu_img("amend", "-o", "lazy_refcounts=on", theirs)
    assert result.status == reference.status
    if result.status:
        assert "disk.qcow2" in result.err
        assert mine.read_bytes() == before
    else:
        assert _info(mine) == _info(theirs)


def test_zero_clusters_over_a_backing_file(tmp_path: Path) -> None:
    directories = []
    for name in ("imago", "qemu"):
        directory = tmp_path / name
        directory.mkdir()
        assert cli_run.qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=directory).status == 0
        assert cli_run.qemu_io("base.qcow2", "write -P 9 0 1M", cwd=directory).status == 0
        top = ("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
        assert cli_run.qemu_img(*top, cwd=directory).status == 0
        assert cli_run.qemu_io("top.qcow2", "write -z 64k 128k", "write -P 3 512k 4k", cwd=directory).status == 0
        directories.append(directory)
    mine, theirs = directories
    cli_run.same_text_as_qemu(
        cli_run.imago("amend", "-o", "compat=0.10", "top.qcow2", cwd=mine),
        cli_run.qemu_img("amend", "-o", "compat=0.10", "top.qcow2", cwd=theirs),
    )
    assert _info(mine / "top.qcow2") == _info(theirs / "top.qcow2")
    assert _map(mine / "top.qcow2") == _map(theirs / "top.qcow2")
    assert cli_run.qemu_img("check", "top.qcow2", cwd=mine).status == 0
    assert cli_run.qemu_img("compare", "top.qcow2", theirs / "top.qcow2", cwd=mine).status == 0


def test_backing_file_outside_sandbox(tmp_path: Path) -> None:
    base_dir, top_dir = tmp_path / "base", tmp_path / "top"
    base_dir.mkdir()
    top_dir.mkdir()
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", base_dir / "base.qcow2", "1M").status == 0
    top = top_dir / "top.qcow2"
    create = ("create", "-q", "-f", "qcow2", "-b", base_dir / "base.qcow2", "-F", "qcow2", top)
    assert cli_run.qemu_img(*create).status == 0
    before = top.read_bytes()
    refused = cli_run.imago("amend", "-o", "lazy_refcounts=on", top)
    assert refused.status == 1
    assert "--allow-dir" in refused.err
    assert top.read_bytes() == before
    assert cli_run.imago("amend", "--allow-dir", base_dir, "-o", "lazy_refcounts=on", top).status == 0
    assert _info(top)["format-specific"]["data"]["lazy-refcounts"] is True
