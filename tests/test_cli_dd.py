"""``imago dd`` against ``qemu-img dd`` 7.2: the same output bytes, sizes and errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import cli_run


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.raw"
    path.write_bytes(os.urandom(5000) + bytes(3000) + os.urandom(1234))
    return path


def _both(tmp_path: Path, *args: str, fmt: str = "raw") -> tuple[cli_run.Result, cli_run.Result]:
    ours = cli_run.imago("dd", "-O", fmt, *args, "of=imago.out", cwd=tmp_path)
    theirs = cli_run.qemu_img("dd", "-O", fmt, *args, "of=qemu.out", cwd=tmp_path)
    return ours, theirs


@pytest.mark.parametrize(
    "operands",
    [
        [],
        ["bs=1024", "skip=2", "count=3"],
        ["bs=1k", "count=2"],
        ["bs=1.5k"],
        ["bs=1000", "skip=3"],
        ["bs=4096", "count=100"],
        ["count=0"],
        ["bs=1k", "bs=2k", "skip=1"],
        ["bs=3000", "skip=100"],
        ["bs=1000", "skip=9"],
    ],
)
def test_same_output_as_qemu(tmp_path: Path, source: Path, operands: list[str]) -> None:
    ours, theirs = _both(tmp_path, "if=in.raw", *operands)
    assert (ours.status, ours.out) == (theirs.status, theirs.out)
    assert ours.err.replace("imago:", "qemu-img:") == theirs.err
    assert (tmp_path / "imago.out").read_bytes() == (tmp_path / "qemu.out").read_bytes()


def test_qcow2_in_and_out(tmp_path: Path) -> None:
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "in.qcow2", "1M", cwd=tmp_path)
    cli_run.qemu_io("in.qcow2", "write -P 3 64k 100k", cwd=tmp_path)
    ours, theirs = _both(tmp_path, "-f", "qcow2", "if=in.qcow2", "bs=64k", "skip=1", fmt="qcow2")
    assert ours.status == theirs.status == 0, ours.err
    mine, reference = tmp_path / "imago.out", tmp_path / "qemu.out"
    assert cli_run.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", mine, reference).status == 0
    assert cli_run.qemu_img("check", mine).status == 0
    maps = [cli_run.qemu_img("map", "--output=json", path).out for path in (mine, reference)]
    assert maps[0] == maps[1]


@pytest.mark.parametrize(
    "operands",
    [
        ["if=in.raw", "bs=x"],
        ["if=in.raw", "count=x"],
        ["if=in.raw", "skip=x"],
        ["if=in.raw", "bs=-1"],
        ["if=in.raw", "bs=0"],
        ["if=in.raw", "bs=3G"],
        ["if=in.raw", "foo=1"],
        ["if=in.raw", "extra"],
        ["if=in.raw", "conv=notrunc"],
    ],
)
def test_bad_operands_as_qemu(tmp_path: Path, source: Path, operands: list[str]) -> None:
    ours, theirs = _both(tmp_path, *operands)
    assert ours.status == theirs.status == 1
    assert ours.err.replace("imago:", "qemu-img:") == theirs.err.replace(" for\nqemu-img: ", " for ")
    assert not (tmp_path / "imago.out").exists()


@pytest.mark.parametrize("operands", [["if=in.raw"], ["of=x.out"], []])
def test_missing_files(tmp_path: Path, source: Path, operands: list[str]) -> None:
    ours = cli_run.imago("dd", *operands, cwd=tmp_path)
    theirs = cli_run.qemu_img("dd", *operands, cwd=tmp_path)
    assert ours.status == theirs.status == 1
    assert ours.err == "imago: Must specify both input and output files\n" == theirs.err.replace("qemu-img", "imago")


def test_missing_input_and_wrong_format(tmp_path: Path, source: Path) -> None:
    done = cli_run.imago("dd", "if=missing", "of=x.out", cwd=tmp_path)
    assert done.status == 1
    assert "missing" in done.err
    assert len(done.err.splitlines()) == 1
    assert not (tmp_path / "x.out").exists()
    done = cli_run.imago("dd", "-f", "qcow2", "if=in.raw", "of=x.out", cwd=tmp_path)
    assert done.status == 1
    assert "in.raw" in done.err
    assert len(done.err.splitlines()) == 1
    done = cli_run.imago("dd", "-O", "nosuchfmt", "if=in.raw", "of=x.out", cwd=tmp_path)
    assert done.status == 1
    assert done.err == "imago: Unknown file format 'nosuchfmt'\n"


def test_existing_output_is_replaced(tmp_path: Path, source: Path) -> None:
    (tmp_path / "imago.out").write_bytes(b"z" * 100_000)
    (tmp_path / "qemu.out").write_bytes(b"z" * 100_000)
    ours, theirs = _both(tmp_path, "if=in.raw", "bs=4k", "count=1")
    assert ours.status == theirs.status == 0
    assert (tmp_path / "imago.out").read_bytes() == (tmp_path / "qemu.out").read_bytes()


def test_the_source_may_not_open_what_lies_next_to_the_target(tmp_path: Path) -> None:
    uploads, store = tmp_path / "uploads", tmp_path / "store"
    uploads.mkdir()
    store.mkdir()
    cli_run.qemu_img("create", "-q", "-f", "raw", store / "secret.raw", "64k")
    evil = uploads / "evil.qcow2"
    cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", str(store / "secret.raw"), "-F", "raw", evil)
    done = cli_run.imago("dd", "-f", "qcow2", "-O", "raw", f"if={evil}", f"of={store / 'out.raw'}")
    assert done.status == 1
    assert "secret.raw" in done.err
    assert "--allow-dir" in done.err
    done = cli_run.imago("dd", "-f", "qcow2", "-O", "raw", "--allow-dir", store, f"if={evil}", f"of={store / 'x.raw'}")
    assert done.status == 0, done.err
