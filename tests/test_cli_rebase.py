"""``imago rebase`` against ``qemu-img rebase`` 7.2 on identical copies of the same chains.

Each case builds the images twice (``q/`` for qemu-img, ``i/`` for imago), runs both tools with
the same arguments and compares: exit status and output, the rebased image's content
(``qemu-img compare`` of both results, and in safe mode of the result against what the image
showed before), its allocation (``qemu-img map``: depth, presence and data), ``qemu-img check``
clean, and the backing file names ``qemu-img info`` shows.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

import imago
import imago.cli.rebase
from imago.cli.common import OperationInterrupted

from . import cli_run

KiB, MiB = 1 << 10, 1 << 20


make = cli_run.make_image


def chain(d: Path) -> None:
    """base.raw <- mid.qcow2 <- top.qcow2, and new.qcow2 / new.raw / alone.qcow2 to rebase onto."""
    make(d, "base.raw", MiB, "write -P 1 0 512k", fmt="raw")
    make(d, "mid.qcow2", 2 * MiB, "write -P 2 64k 64k", "write -z 300k 64k", "write -P 5 1500k 4k", backing="base.raw")
    make(d, "top.qcow2", None, "write -P 3 100000 1000", backing="mid.qcow2")
    make(d, "new.qcow2", 2 * MiB, "write -P 1 0 100k", "write -P 9 1M 4k", "write -P 2 64k 64k")
    make(d, "new.raw", 3 * MiB, "write -P 1 0 1M", fmt="raw")
    make(d, "alone.qcow2", 2 * MiB, "write -P 6 1M 64k")


def info(directory: Path, name: str) -> dict[str, Any]:
    result = cli_run.qemu_img("info", "--output=json", name, cwd=directory)
    assert result.status == 0, result
    data: dict[str, Any] = json.loads(result.out)
    return data


def allocation(directory: Path, name: str) -> list[tuple[object, ...]]:
    """The image's own allocation: ``qemu-img map`` runs at depth 0 by (present, data).

    Host offsets, sparseness inside clusters and the backing files' allocation (their copies
    need not keep holes) aside.
    """
    result = cli_run.qemu_img("map", "--output=json", name, cwd=directory)
    assert result.status == 0, result
    runs: list[tuple[object, ...]] = []
    for entry in json.loads(result.out):
        if entry["depth"] != 0:
            continue
        key = (entry["depth"], entry["present"], entry["data"])
        if runs and runs[-1][:3] == key and runs[-1][3] + runs[-1][4] == entry["start"]:
            runs[-1] = (*key, runs[-1][3], runs[-1][4] + entry["length"])
        else:
            runs.append((*key, entry["start"], entry["length"]))
    return runs


def view(directory: Path, name: str, out: str, *args: str) -> bytes:
    result = cli_run.qemu_img("convert", *args, "-O", "raw", name, out, cwd=directory)
    assert result.status == 0, result
    return (directory / out).read_bytes()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images of :func:`chain`, made once per module (each test works on copies)."""
    directory = tmp_path_factory.mktemp("template")
    chain(directory)
    return directory


@pytest.fixture
def pair(tmp_path: Path, template: Path) -> tuple[Path, Path]:
    """Two copies of the template: ``q/`` for qemu-img, ``i/`` for imago."""
    q, i = tmp_path / "q", tmp_path / "i"
    shutil.copytree(template, q)
    shutil.copytree(template, i)
    return q, i


@pytest.mark.parametrize(
    ("image", "args"),
    [
        ("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"]),
        ("top.qcow2", ["-b", "new.raw", "-F", "raw"]),
        ("top.qcow2", ["-b", "base.raw", "-F", "raw"]),  # a file deeper in the old chain
        ("top.qcow2", ["-b", ""]),  # flatten
        ("top.qcow2", ["-q", "-b", "", "-F", "raw"]),
        ("mid.qcow2", ["-b", "new.qcow2", "-F", "qcow2"]),
        ("alone.qcow2", ["-b", "new.qcow2", "-F", "qcow2"]),  # no backing file before
        ("top.qcow2", ["-u", "-b", "new.qcow2", "-F", "qcow2"]),
        ("top.qcow2", ["-u", "-b", "missing.qcow2", "-F", "qcow2"]),  # -u: need not exist
        ("top.qcow2", ["-u"]),  # -u without -b: no backing file any more
    ],
)
def test_same_as_qemu(pair: tuple[Path, Path], image: str, args: list[str]) -> None:
    q, i = pair
    before = view(i, image, "before.raw")
    ours = cli_run.imago("rebase", *args, image, cwd=i)
    theirs = cli_run.qemu_img("rebase", *args, image, cwd=q)
    cli_run.same_text_as_qemu(ours, theirs)
    assert ours.status == 0
    keys = ("backing-filename", "backing-filename-format")
    assert {k: info(i, image).get(k) for k in keys} == {k: info(q, image).get(k) for k in keys}
    if "missing" in " ".join(args):
        return  # (qemu-img check would open the backing file)
    checked = cli_run.qemu_img("check", image, cwd=i)
    assert checked.status == 0, checked
    assert allocation(i, image) == allocation(q, image)
    assert view(i, image, "after.raw") == view(q, image, "after.raw")
    if "-u" not in args:
        assert view(i, image, "after.raw") == before


def test_progress(pair: tuple[Path, Path]) -> None:
    _, i = pair
    before = view(i, "top.qcow2", "before.raw")
    result = cli_run.imago("rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=i)
    assert result.status == 0, result
    assert "(100.00/100%)" in result.out
    assert view(i, "top.qcow2", "after.raw") == before


@pytest.mark.parametrize(
    ("image", "args", "message"),
    [
        ("top.qcow2", [], "imago: Must specify backing file (-b) or use unsafe mode (-u)\n"),
        ("top.qcow2", ["-b", "new.qcow2"], "imago: Could not change the backing file to 'new.qcow2': "),
        ("top.qcow2", ["-u", "-b", "new.qcow2"], "imago: Could not change the backing file to 'new.qcow2': "),
        ("top.qcow2", ["-b", "missing.qcow2", "-F", "qcow2"], "imago: Could not open new backing file 'missing"),
        ("top.qcow2", ["-b", "new.qcow2", "-F", "bogus"], "imago: Invalid format name: 'bogus'\n"),
        ("missing.qcow2", ["-b", "new.qcow2", "-F", "qcow2"], "imago: Could not open 'missing.qcow2': "),
        ("new.raw", ["-f", "raw", "-b", "new.qcow2", "-F", "qcow2"], "imago: Could not change the backing file to"),
        ("new.raw", ["-u", "-f", "raw", "-b", "new.qcow2", "-F", "qcow2"], "imago: Could not change the backing"),
        ("top.qcow2", ["-t", "bogus", "-b", "new.qcow2", "-F", "qcow2"], "imago: Invalid cache option: bogus\n"),
        ("top.qcow2", ["-T", "bogus", "-b", "new.qcow2", "-F", "qcow2"], "imago: Invalid source cache option: bogus\n"),
        ("", ["-b", "new.qcow2", "-F", "qcow2"], "imago: Expecting one image file name\n"),
    ],
    ids=[
        "no-b",
        "no-format",
        "unsafe-no-format",
        "missing-backing",
        "bad-format",
        "missing-image",
        "raw-image",
        "raw-image-unsafe",
        "bad-cache",
        "bad-source-cache",
        "no-file",
    ],
)
def test_errors_as_qemu(pair: tuple[Path, Path], image: str, args: list[str], message: str) -> None:
    q, i = pair
    files = {path.name: path.read_bytes() for path in i.iterdir()}
    names = [image] if image else []
    ours = cli_run.imago("rebase", *args, *names, cwd=i)
    theirs = cli_run.qemu_img("rebase", *args, *names, cwd=q)
    assert ours.status == theirs.status == 1, (ours, theirs)
    assert ours.out == ""
    assert ours.err.startswith(message), ours.err
    first = ours.err.splitlines()[0].replace("imago:", "qemu-img:")
    if "Could not open" not in first:
        assert first == theirs.err.splitlines()[0]
    assert {path.name: path.read_bytes() for path in i.iterdir()} == files  # nothing changed


def test_backing_outside_the_sandbox(tmp_path: Path) -> None:
    elsewhere, work = tmp_path / "elsewhere", tmp_path / "work"
    elsewhere.mkdir()
    work.mkdir()
    make(elsewhere, "old.qcow2", MiB, "write -P 1 0 1M")
    make(elsewhere, "new.qcow2", MiB, "write -P 1 0 512k")
    make(work, "top.qcow2", None, "write -P 3 0 64k", backing=os.fspath(elsewhere / "old.qcow2"))
    before = view(work, "top.qcow2", "before.raw")
    untouched = (work / "top.qcow2").read_bytes()

    # The old backing file, outside the image's directory, is refused; the image is unchanged.
    refused = cli_run.imago("rebase", "-b", "", "top.qcow2", cwd=work)
    assert refused.status == 1
    for needed in ("Could not open 'top.qcow2'", "old.qcow2", "--allow-dir", "--allow-any"):
        assert needed in refused.err
    assert (work / "top.qcow2").read_bytes() == untouched

    # A new backing file named on the command line may be opened (its directory is allowed).
    new = os.fspath(elsewhere / "new.qcow2")
    done = cli_run.imago("rebase", "--allow-dir", os.fspath(elsewhere), "-b", new, "-F", "qcow2", "top.qcow2", cwd=work)
    assert (done.status, done.out, done.err) == (0, "", "")
    assert view(work, "top.qcow2", "after.raw") == before
    assert info(work, "top.qcow2")["backing-filename"] == new

    done = cli_run.imago("rebase", "--allow-any", "-b", "", "top.qcow2", cwd=work)
    assert done.status == 0, done
    assert "backing-filename" not in info(work, "top.qcow2")
    assert view(work, "top.qcow2", "flat.raw") == before


def test_image_in_use_is_refused(pair: tuple[Path, Path]) -> None:
    _, i = pair
    files = {path.name: path.read_bytes() for path in i.iterdir()}
    with imago.open(i / "top.qcow2", "qcow2", backing=False):  # a reader that does not share writing
        refused = cli_run.imago("rebase", "-b", "", "top.qcow2", cwd=i)
    assert refused.status == 1
    assert refused.err.startswith("imago: Could not open 'top.qcow2': ")
    assert "lock" in refused.err
    assert {path.name: path.read_bytes() for path in i.iterdir()} == files


def test_interrupted_rebase_leaves_the_image_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between pieces: status 130, the old backing file still named, the same disk shown, check clean."""
    make(tmp_path, "base.qcow2", 4 * MiB, *(f"write -P {n + 1} {n}M 64k" for n in range(4)))
    make(
        tmp_path, "top.qcow2", None, *(f"write -P 9 {n * MiB + 512 * KiB} 64k" for n in range(4)), backing="base.qcow2"
    )
    before = view(tmp_path, "top.qcow2", "before.raw")
    allocated = allocation(tmp_path, "top.qcow2")
    calls = iter(range(100))

    def interrupt_on_fourth() -> None:
        if next(calls) == 4:
            raise OperationInterrupted()

    monkeypatch.setattr(imago.cli.rebase, "check_interrupt", interrupt_on_fourth)
    result = cli_run.imago("rebase", "-b", "", "top.qcow2", cwd=tmp_path)
    assert result.status == 130
    assert info(tmp_path, "top.qcow2")["backing-filename"] == "base.qcow2"
    assert cli_run.qemu_img("check", "top.qcow2", cwd=tmp_path).status == 0
    assert view(tmp_path, "top.qcow2", "after.raw") == before
    # Some of the old backing file's data was copied before the interruption.
    assert allocation(tmp_path, "top.qcow2") != allocated


@pytest.mark.parametrize("block", [512, 4096, 65536])
def test_differing_blocks_finds_every_difference(block: int) -> None:
    """The block comparison agrees with a byte-by-byte one on scattered, adjacent and edge differences."""
    rng = random.Random(block)
    old = bytearray(rng.randbytes(1 << 20))
    new = bytearray(old)
    for position in [0, (1 << 20) - 1, 5000, 5001, 70000, *rng.sample(range(1 << 20), 40)]:
        new[position] ^= 0xFF
    length = (1 << 20) - 3000  # a partial last block, and differences past the length ignored
    expected: list[tuple[int, int]] = []
    for start in range(0, length, block):
        end = min(length, start + block)
        if any(old[i] != new[i] for i in range(start, end)):
            if expected and expected[-1][1] == start:
                expected[-1] = (expected[-1][0], end)
            else:
                expected.append((start, end))
    assert imago.cli.rebase.differing_blocks(old, new, block, length) == expected
    assert imago.cli.rebase.differing_blocks(old, bytearray(old), block) == []
