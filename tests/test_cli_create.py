"""``imago create`` side by side with ``qemu-img create``: stdout, the image qemu-img sees, misuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from . import cli_run


def _info(path: Path, cwd: Path) -> dict[str, Any]:
    result = cli_run.qemu_img("info", "--output=json", path.name, cwd=cwd)
    assert result.status == 0, result
    info: dict[str, Any] = json.loads(result.out)
    info.pop("actual-size", None)
    return info


def _both(tmp_path: Path, *args: str, setup: tuple[str, ...] = ()) -> tuple[Path, Path, cli_run.Result, cli_run.Result]:
    """Run ``create ARGS`` with imago in one directory and qemu-img in another (same names)."""
    mine, theirs = tmp_path / "imago", tmp_path / "qemu"
    for directory in (mine, theirs):
        directory.mkdir()
        for command in setup:
            done = cli_run.qemu_img(*command.split(), cwd=directory)
            assert done.status == 0, done
    return mine, theirs, cli_run.imago("create", *args, cwd=mine), cli_run.qemu_img("create", *args, cwd=theirs)


@pytest.mark.parametrize(
    "args",
    [
        ("disk.img", "1M"),
        ("-f", "raw", "-o", "preallocation=falloc", "disk.img", "64k"),
        ("-f", "raw", "disk.img", "1.5k"),
        ("-f", "qcow2", "disk.qcow2", "1G"),
        ("-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=8,lazy_refcounts=on", "disk.qcow2", "3M"),
        ("-f", "qcow2", "-o", "compat=0.10", "disk.qcow2", "0x100000"),
        ("-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k,preallocation=metadata", "disk.qcow2", "5M"),
        ("-f", "qcow2", "-o", "compression_type=zstd", "-o", "lazy_refcounts", "disk.qcow2", "1M"),
        ("-f", "qcow2", "-o", "preallocation=full,cluster_size=512", "disk.qcow2", "100k"),
        ("-f", "qcow2", "-o", "size=2M,lazy_refcounts=true", "disk.qcow2"),
        ("-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "disk.qcow2", "1M"),
        ("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2"),
        ("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2", "8M"),
        ("-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "disk.qcow2", "1M"),
        ("-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=16k", "disk.qcow2"),
        ("-q", "-f", "qcow2", "disk.qcow2", "1M"),
    ],
)
def test_same_as_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    mine, theirs, result, reference = _both(tmp_path, *args, setup=("create -q -f qcow2 base.qcow2 4M",))
    cli_run.same_text_as_qemu(result, reference)
    name = next(a for a in args if a.startswith("disk"))
    assert _info(mine / name, mine) == _info(theirs / name, theirs)
    if "missing.qcow2" in args:
        return  # -u: the backing file does not exist, so qemu-img cannot open the image to check it
    if name.endswith(".qcow2"):
        assert cli_run.qemu_img("check", name, cwd=mine).status == 0
    assert cli_run.qemu_img("compare", mine / name, theirs / name, cwd=mine).status == 0


def test_existing_file_replaced_only_after_validation(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"keep me")
    bad = cli_run.imago("create", "-f", "qcow2", "-o", "cluster_size=1000", target, "1M")
    assert bad.status == 1
    assert "cluster_size" in bad.err
    assert target.read_bytes() == b"keep me"
    assert cli_run.imago("create", "-q", "-f", "qcow2", target, "1M").status == 0
    assert json.loads(cli_run.qemu_img("info", "--output=json", target).out)["format"] == "qcow2"


def test_option_help(tmp_path: Path) -> None:
    result = cli_run.imago("create", "-f", "qcow2", "-o", "help")
    reference = cli_run.qemu_img("create", "-f", "qcow2", "-o", "help")
    assert result.status == reference.status == 0
    mine = result.out.splitlines()
    # Same shape and the same lines for every option imago has (qemu-img also lists encryption).
    assert mine[0] == reference.out.splitlines()[0] == "Supported qcow2 options:"
    assert mine[-3:] == reference.out.splitlines()[-3:]
    names = {line.split("=")[0].strip() for line in reference.out.splitlines()[1:-3] if line}
    for line in mine[1:-3]:
        if line:
            name, _, rest = line.strip().partition("=")
            assert name in names
            kind = rest.split(">")[0] + ">"
            assert any(ref.strip().startswith(f"{name}={kind}") for ref in reference.out.splitlines())
    raw = cli_run.imago("create", "-f", "raw", "-o", "help", tmp_path / "x.img")
    assert raw.status == 0
    assert raw.out.startswith("Supported options:\n  preallocation=<str>")
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-f", "qcow2", "disk", "1Q"), "Invalid image size specified. You may use k, M, G, T, P or E suffixes"),
        (("-f", "qcow2", "disk", "1.5"), "Invalid image size specified"),
        (("disk", "99999999999999999999"), "Must be between 0 and 9223372036854775807"),
        (("-f", "qcow2", "disk"), "disk: Image creation needs a size parameter"),
        (("-f", "qcow2"), "Expecting image file name"),
        (("-f", "nonsense", "disk", "1M"), "disk: Unknown file format 'nonsense'"),
        (("-f", "qcow2", "-o", "foo=bar", "disk", "1M"), "Invalid parameter 'foo' (valid options: backing_file,"),
        (("-f", "raw", "-o", "cluster_size=4k", "disk", "1M"), "valid options: preallocation, size"),
        (("-f", "qcow2", "-o", "lazy_refcounts=maybe", "disk", "1M"), "'lazy_refcounts' expects 'on' or 'off'"),
        (("-f", "qcow2", "-o", "cluster_size=4x", "disk", "1M"), "Parameter 'cluster_size' expects"),
        (("-f", "qcow2", "-o", "refcount_bits=abc", "disk", "1M"), "Parameter 'refcount_bits' expects a number"),
        (("-f", "qcow2", "-o", "compat=2", "disk", "1M"), "does not accept value '2'"),
        (("-f", "qcow2", "-o", "refcount_bits=3", "disk", "1M"), "refcount_bits"),
        (("-f", "qcow2", "-o", "size=2M", "disk", "1M"), "The image size must be specified only once"),
        (("-f", "qcow2", "-b", "base.qcow2", "disk"), "Backing file specified without backing format"),
        (("-f", "qcow2", "-b", "missing", "-F", "qcow2", "disk", "1M"), "Could not open 'missing'"),
        (("-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", "disk", "1M"), "--allow-dir DIR or --allow-any"),
    ],
)
def test_misuse(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path).status == 0
    result = cli_run.imago("create", *args, cwd=tmp_path)
    reference = cli_run.qemu_img("create", *args, cwd=tmp_path)
    # qemu-img has no sandbox: only imago refuses a backing file outside the image's directory.
    assert result.status == 1
    assert reference.status != 0 or "--allow-dir" in message
    assert message in result.err
    assert len(result.err.splitlines()) == 1
    # qemu-img prints the Formatting line before some checks fail: so does imago, the same line.
    assert result.out in ("", reference.out)
    if reference.status:
        assert not (tmp_path / "disk").exists()


def test_backing_outside_sandbox_allowed_explicitly(tmp_path: Path) -> None:
    base_dir, image_dir = tmp_path / "base", tmp_path / "images"
    base_dir.mkdir()
    image_dir.mkdir()
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", base_dir / "base.qcow2", "2M").status == 0
    args = ("-q", "-f", "qcow2", "-b", base_dir / "base.qcow2", "-F", "qcow2", image_dir / "top.qcow2")
    denied = cli_run.imago("create", *args)
    assert denied.status == 1
    assert "--allow-dir" in denied.err
    assert not (image_dir / "top.qcow2").exists()
    assert cli_run.imago("create", "--allow-dir", base_dir, *args).status == 0
    info = json.loads(cli_run.qemu_img("info", "--output=json", image_dir / "top.qcow2").out)
    assert info["virtual-size"] == 2 << 20
    assert info["backing-filename"] == str(base_dir / "base.qcow2")
