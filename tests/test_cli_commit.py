"""``imago commit`` against ``qemu-img commit`` 7.2 on identical copies of the same chains.

Each case builds a chain twice (``q/`` for qemu-img, ``i/`` for imago) with qemu-img/qemu-io,
runs both tools with the same arguments and compares: exit status and output, every file's
content (``qemu-img compare``) and allocation (``qemu-img map``), ``qemu-img check`` clean, and
the base's content against what the image showed before the commit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import imago
import imago.cli.commit
from imago.cli.common import OperationInterrupted

from . import cli_run

KiB, MiB = 1 << 10, 1 << 20


make = cli_run.make_image


def two_levels(d: Path) -> None:
    make(d, "base.qcow2", MiB, "write -P 1 0 1M")
    make(d, "top.qcow2", None, "write -P 3 100000 1000", "write -z 512k 64k", backing="base.qcow2")


def three_levels(d: Path) -> None:
    make(d, "base.raw", MiB, fmt="raw")
    make(d, "mid.qcow2", 2 * MiB, "write -P 2 64k 64k", "write -z 300k 64k", "write -P 5 1500k 4k", backing="base.raw")
    make(d, "top.qcow2", None, "write -P 3 100000 1000", backing="mid.qcow2")


def grows_base(d: Path) -> None:
    make(d, "base.qcow2", MiB, "write -P 1 0 64k")
    make(d, "top.qcow2", 3 * MiB, "write -P 3 2M 64k", "write -P 4 0 4k", backing="base.qcow2")


def short_middle(d: Path) -> None:
    """The middle layer is shorter than the base: past its end the image reads zeroes, not the base."""
    make(d, "base.qcow2", 2 * MiB, "write -P 1 0 2M")
    make(d, "mid.qcow2", MiB, "write -P 2 0 64k", backing="base.qcow2")
    make(d, "top.qcow2", 2 * MiB, "write -P 3 1536k 64k", backing="mid.qcow2")


CHAINS: dict[str, Callable[[Path], None]] = {
    "two": two_levels,
    "three": three_levels,
    "grows": grows_base,
    "short": short_middle,
}
FILES = {
    "two": ["base.qcow2", "top.qcow2"],
    "three": ["base.raw", "mid.qcow2", "top.qcow2"],
    "grows": ["base.qcow2", "top.qcow2"],
    "short": ["base.qcow2", "mid.qcow2", "top.qcow2"],
}


def fmt_of(name: str) -> str:
    return "raw" if name.endswith(".raw") else "qcow2"


def qemu_map(directory: Path, name: str) -> list[dict[str, object]]:
    result = cli_run.qemu_img("map", "-f", fmt_of(name), "--output=json", name, cwd=directory)
    assert result.status == 0, result
    entries: list[dict[str, object]] = json.loads(result.out)
    if name.endswith(".qcow2"):
        for entry in entries:
            entry.pop("offset", None)  # host offsets may differ; allocation may not
    return entries


def view(directory: Path, name: str, out: str) -> Path:
    result = cli_run.qemu_img("convert", "-f", fmt_of(name), "-O", "raw", name, out, cwd=directory)
    assert result.status == 0, result
    return directory / out


@pytest.mark.parametrize(
    ("chain", "args"),
    [
        ("two", []),
        ("two", ["-d"]),
        ("two", ["-q"]),
        ("three", []),
        ("three", ["-b", "base.raw"]),
        ("three", ["-b", "mid.qcow2"]),
        ("grows", []),
        ("short", ["-b", "base.qcow2"]),
    ],
)
def test_same_as_qemu(tmp_path: Path, chain: str, args: list[str]) -> None:
    q, i = tmp_path / "q", tmp_path / "i"
    for directory in (q, i):
        directory.mkdir()
        CHAINS[chain](directory)
    before = view(i, "top.qcow2", "before.raw")
    ours = cli_run.imago("commit", *args, "top.qcow2", cwd=i)
    theirs = cli_run.qemu_img("commit", *args, "top.qcow2", cwd=q)
    cli_run.same_text_as_qemu(ours, theirs)
    assert ours.status == 0
    for name in FILES[chain]:
        same = cli_run.qemu_img(
            "compare", "-f", fmt_of(name), "-F", fmt_of(name), os.fspath(q / name), os.fspath(i / name)
        )
        assert (same.status, same.out) == (0, "Images are identical.\n"), (name, same)
        assert qemu_map(i, name) == qemu_map(q, name), name
        if name.endswith(".qcow2"):
            checked = cli_run.qemu_img("check", name, cwd=i)
            assert checked.status == 0, checked
    # The base now holds what the image showed, up to the image's size.
    base = args[args.index("-b") + 1] if "-b" in args else FILES[chain][-2]
    after = view(i, base, "after.raw").read_bytes()
    assert after[: before.stat().st_size] == before.read_bytes()
    if "-d" not in args and "-b" not in args:
        # Emptied: the image reads its backing file again, so it shows the same disk.
        assert view(i, "top.qcow2", "again.raw").read_bytes() == before.read_bytes()


def test_progress(tmp_path: Path) -> None:
    two_levels(tmp_path)
    result = cli_run.imago("commit", "-p", "top.qcow2", cwd=tmp_path)
    assert result.status == 0, result
    assert result.out.endswith("Image committed.\n")
    assert "(100.00/100%)" in result.out


@pytest.fixture(scope="module")
def misuse_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chain and two images without a backing file, made once (each test works on a copy)."""
    directory = tmp_path_factory.mktemp("misuse")
    two_levels(directory)
    make(directory, "alone.qcow2", MiB, "write -P 1 0 64k")
    make(directory, "alone.raw", MiB, fmt="raw")
    return directory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["alone.qcow2"], "imago: Image does not have a backing file\n"),
        (["-f", "raw", "alone.raw"], "imago: Image does not have a backing file\n"),
        (["-f", "raw", "top.qcow2"], "imago: Image does not have a backing file\n"),
        (["-b", "nothere", "top.qcow2"], "imago: Did not find 'nothere' in the backing chain of 'top.qcow2'\n"),
        (["-b", "top.qcow2", "top.qcow2"], "imago: Did not find 'top.qcow2' in the backing chain of 'top.qcow2'\n"),
        (["missing.qcow2"], "imago: Could not open 'missing.qcow2': "),
        (["-t", "bogus", "top.qcow2"], "imago: Invalid cache option: bogus\n"),
        ([], "imago: Expecting one image file name\n"),
        (["-f", "vmdk", "top.qcow2"], "imago: Could not open 'top.qcow2': "),
    ],
    ids=[
        "no-backing",
        "raw",
        "wrong-format",
        "base-not-in-chain",
        "base-is-top",
        "missing",
        "bad-cache",
        "no-file",
        "unknown-format",
    ],
)
def test_errors_as_qemu(tmp_path: Path, misuse_template: Path, args: list[str], message: str) -> None:
    shutil.copytree(misuse_template, tmp_path, dirs_exist_ok=True)
    files = {name: (tmp_path / name).read_bytes() for name in ("base.qcow2", "top.qcow2", "alone.qcow2")}
    ours = cli_run.imago("commit", *args, cwd=tmp_path)
    assert ours.status == 1
    assert ours.out == ""
    assert ours.err.startswith(message), ours.err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files  # nothing changed
    theirs = cli_run.qemu_img("commit", *args, cwd=tmp_path)
    assert theirs.status == 1
    if message.endswith("\n"):
        assert theirs.err.splitlines()[0] == message.replace("imago:", "qemu-img:").rstrip("\n")


def test_base_outside_the_sandbox(tmp_path: Path) -> None:
    elsewhere, work = tmp_path / "elsewhere", tmp_path / "work"
    elsewhere.mkdir()
    work.mkdir()
    make(elsewhere, "base.qcow2", MiB, "write -P 1 0 1M")
    make(work, "top.qcow2", None, "write -P 3 0 64k", backing=os.fspath(elsewhere / "base.qcow2"))
    before = view(work, "top.qcow2", "before.raw").read_bytes()
    untouched = (elsewhere / "base.qcow2").read_bytes()

    refused = cli_run.imago("commit", "top.qcow2", cwd=work)
    assert refused.status == 1
    for needed in ("Could not open 'top.qcow2'", "base.qcow2", "--allow-dir", "--allow-any"):
        assert needed in refused.err
    assert (elsewhere / "base.qcow2").read_bytes() == untouched

    done = cli_run.imago("commit", "--allow-dir", os.fspath(elsewhere), "top.qcow2", cwd=work)
    assert (done.status, done.out) == (0, "Image committed.\n"), done
    assert view(elsewhere, "base.qcow2", "after.raw").read_bytes() == before
    assert cli_run.qemu_img("check", "base.qcow2", cwd=elsewhere).status == 0


def test_base_in_use_is_refused(tmp_path: Path) -> None:
    """A base that cannot be opened for writing (another user holds it) stops the commit, changing nothing."""
    two_levels(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in ("base.qcow2", "top.qcow2")}
    with imago.open(tmp_path / "base.qcow2", "qcow2"):  # a reader that does not share writing
        refused = cli_run.imago("commit", "top.qcow2", cwd=tmp_path)
    assert refused.status == 1
    assert refused.err.startswith("imago: Could not open 'top.qcow2': ")
    assert "lock" in refused.err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_interrupted_commit_leaves_consistent_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between pieces: status 130, both images clean, the image shows the same disk and is not emptied."""
    make(tmp_path, "base.qcow2", 4 * MiB, "write -P 1 0 4M")
    make(tmp_path, "top.qcow2", None, *(f"write -P {n} {n}M 64k" for n in range(4)), backing="base.qcow2")
    before = view(tmp_path, "top.qcow2", "before.raw").read_bytes()
    calls = iter(range(100))

    def interrupt_on_third() -> None:
        if next(calls) == 3:
            raise OperationInterrupted()

    monkeypatch.setattr(imago.cli.commit, "check_interrupt", interrupt_on_third)
    result = cli_run.imago("commit", "top.qcow2", cwd=tmp_path)
    assert result.status == 130
    assert result.out == ""
    for name in ("base.qcow2", "top.qcow2"):
        assert cli_run.qemu_img("check", name, cwd=tmp_path).status == 0
    assert view(tmp_path, "top.qcow2", "after.raw").read_bytes() == before
