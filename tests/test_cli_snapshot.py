"""``imago snapshot`` against ``qemu-img snapshot`` 7.2 on copies of the same images.

``-l`` runs both tools on the same image, so the tables must be equal byte for byte (the dates
are the image's, printed in local time by both). ``-c``/``-a``/``-d`` run on two copies; the
results are compared with ``qemu-img snapshot -l`` (the DATE column aside for ``-c``, which
stamps the time of the run), ``qemu-img compare`` and ``qemu-img check``. qemu-img 7.2 has no
``-f`` for ``snapshot``: its side runs with the format probed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import imago
import imago.cli
from imago import SnapshotRecord
from imago.cli.snapshot import format_size, format_table

from . import cli_run
from .cli_run import Result

MiB = 1 << 20


def build(directory: Path, *, snapshots: tuple[str, ...] = ("first", "a name longer than sixteen")) -> Path:
    """A 4 MiB qcow2 image; data, then each snapshot, then more data (so snapshots differ)."""
    image = directory / "base.qcow2"
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", image, "4M").status == 0
    for number, name in enumerate(snapshots, 1):
        assert cli_run.qemu_io(image, f"write -P {number} {number}M 64k").status == 0
        assert cli_run.qemu_img("snapshot", "-c", name, image).status == 0
    assert cli_run.qemu_io(image, "write -P 0x77 0 128k").status == 0
    return image


def pair(directory: Path, image: Path) -> tuple[Path, Path]:
    """Copies of *image* with the same name (so messages naming them match): ``q/`` and ``i/``."""
    copies = []
    for side in ("q", "i"):
        (directory / side).mkdir()
        copies.append(Path(shutil.copyfile(image, directory / side / "disk.qcow2")))
    return copies[0], copies[1]


def both(args: list[str], qemu: Path, mine: Path) -> tuple[Result, Result]:
    """``snapshot ARGS`` with FILE in place of the image: qemu-img on *qemu*, imago on *mine*."""
    reference = cli_run.qemu_img("snapshot", *[qemu.name if a == "FILE" else a for a in args], cwd=qemu.parent)
    result = cli_run.imago("snapshot", *[mine.name if a == "FILE" else a for a in args], cwd=mine.parent)
    return result, reference


def listing(image: Path, *, dates: bool = True) -> str:
    """``qemu-img snapshot -l`` of *image* (without the DATE column unless *dates*)."""
    done = cli_run.qemu_img("snapshot", "-l", image)
    assert done.status == 0, done.err
    return done.out if dates else re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<date>", done.out)


def assert_clean(image: Path) -> None:
    done = cli_run.qemu_img("check", image)
    assert done.status == 0, done.out + done.err


def assert_same_content(a: Path, b: Path) -> None:
    done = cli_run.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b)
    assert done.status == 0, done.out + done.err


# --- -l -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compat", "args"),
    [("1.1", ["-l"]), ("0.10", ["-l"]), ("1.1", ["-l", "-q"]), ("1.1", ["-U", "-l"]), ("1.1", ["-l", "-f", "qcow2"])],
)
def test_list_equals_qemu_img(tmp_path: Path, compat: str, args: list[str]) -> None:
    image = build(tmp_path)
    if compat == "0.10":
        assert cli_run.qemu_img("amend", "-f", "qcow2", "-o", "compat=0.10", image).status == 0
    result = cli_run.imago("snapshot", *args, image.name, cwd=tmp_path)
    reference = cli_run.qemu_img("snapshot", *[a for a in args if a not in ("-f", "qcow2")], image.name, cwd=tmp_path)
    cli_run.same_text_as_qemu(result, reference)
    assert result.out.count("\n") == 4


def test_list_without_snapshots_prints_nothing(tmp_path: Path) -> None:
    image = build(tmp_path, snapshots=())
    result, reference = both(["-l", "FILE"], *pair(tmp_path, image))
    cli_run.same_text_as_qemu(result, reference)
    assert result == Result(0, "", "")


def test_overlay_without_its_backing_file(tmp_path: Path) -> None:
    """No snapshot operation reads the backing file: imago does not open it (qemu-img 7.2 does)."""
    build(tmp_path)
    overlay = tmp_path / "overlay.qcow2"
    created = cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay, cwd=tmp_path)
    assert created.status == 0
    assert cli_run.qemu_io(overlay, "write -P 9 0 64k").status == 0
    assert cli_run.qemu_img("snapshot", "-c", "top", overlay).status == 0
    (tmp_path / "base.qcow2").rename(tmp_path / "away.qcow2")
    result = cli_run.imago("snapshot", "-l", "overlay.qcow2", cwd=tmp_path)
    assert result.status == 0, result.err
    assert result.out.splitlines()[2].split()[:2] == ["1", "top"]
    for args in (["-c", "second"], ["-a", "top"], ["-d", "top"]):
        done = cli_run.imago("snapshot", *args, "overlay.qcow2", cwd=tmp_path)
        assert done == Result(0, "", ""), args
    (tmp_path / "away.qcow2").rename(tmp_path / "base.qcow2")
    assert_clean(overlay)
    assert listing(overlay).splitlines()[2].split()[:2] == ["2", "second"]
    assert "top" not in listing(overlay)
    done = cli_run.qemu_io(overlay, "read -P 9 0 64k", "read -P 0x77 64k 64k")
    assert "Pattern verification failed" not in done.out, done.out


class _Record:
    """A snapshot as a plugin driver might list it (no icount, a VM state, a running clock)."""

    def __init__(self, facts: dict[str, object]) -> None:
        self._facts = facts
        self.id = str(facts["id"])
        self.name = str(facts["name"])
        self.disk_size = 0

    def describe(self) -> dict[str, object]:
        return self._facts


def test_table_columns() -> None:
    record: SnapshotRecord = _Record(
        {
            "id": "12",
            "name": "x",
            "vm-state-size": 1536 * 1024,
            "date-sec": 0,
            "vm-clock-sec": 3 * 3600 + 25 * 60 + 7,
            "vm-clock-nsec": 123_456_789,
        }
    )
    row = format_table([record]).splitlines()[2]
    assert row.startswith("12        x                 1.5 MiB")
    assert row.endswith(" 03:25:07.123" + " " * 11)  # no icount: an empty column


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1023, "0.999 KiB"),
        (1000 * 1024, "0.977 MiB"),
        (1 << 30, "1 GiB"),
        (123456789, "118 MiB"),
    ],
)
def test_sizes_as_qemu_prints_them(size: int, text: str) -> None:
    assert format_size(size) == text


# --- -c / -a / -d ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["new", "first", "with spaces and a long name"])
def test_create_like_qemu_img(tmp_path: Path, name: str) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path))
    result, reference = both(["-c", name, "FILE"], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert result == Result(0, "", "")
    assert listing(mine, dates=False) == listing(qemu, dates=False)
    assert_clean(mine)
    assert_same_content(qemu, mine)
    # The new snapshot (ID 3) holds the disk as it was, as qemu-img's does.
    for image in (qemu, mine):
        done = cli_run.qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.id=3", image, f"{image}.raw")
        assert done.status == 0, done.err
    assert Path(f"{mine}.raw").read_bytes() == Path(f"{qemu}.raw").read_bytes()


@pytest.mark.parametrize("target", ["first", "1", "2", "a name longer than sixteen"])
def test_apply_like_qemu_img(tmp_path: Path, target: str) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path))
    result, reference = both(["-a", target, "FILE"], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert result == Result(0, "", "")
    assert_same_content(qemu, mine)
    assert listing(mine) == listing(qemu)
    assert_clean(mine)
    done = cli_run.qemu_io(mine, "read -P 0 0 64k")  # the later write is gone
    assert "Pattern verification failed" not in done.out


@pytest.mark.parametrize("target", ["first", "a name longer than sixteen"])
def test_delete_like_qemu_img(tmp_path: Path, target: str) -> None:
    qemu, mine = pair(tmp_path, build(tmp_path))
    result, reference = both(["-d", target, "FILE"], qemu, mine)
    cli_run.same_text_as_qemu(result, reference)
    assert result == Result(0, "", "")
    assert listing(mine) == listing(qemu)
    assert target not in listing(mine)
    assert_same_content(qemu, mine)
    assert_clean(mine)


# --- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "same_text"),
    [
        pytest.param(["-a", "nosuch", "FILE"], True, id="apply-unknown"),
        pytest.param(["-d", "nosuch", "FILE"], True, id="delete-unknown"),
        pytest.param(["-d", "1", "FILE"], True, id="delete-by-id"),  # qemu-img deletes by name only
        pytest.param(["-U", "-c", "x", "FILE"], True, id="force-share-create"),
        pytest.param(["-U", "-a", "first", "FILE"], True, id="force-share-apply"),
        pytest.param(["-U", "-d", "first", "FILE"], True, id="force-share-delete"),
        pytest.param(["-l", "-c", "x", "FILE"], False, id="list-and-create"),
        pytest.param(["-a", "first", "-d", "first", "FILE"], False, id="apply-and-delete"),
        pytest.param(["-c"], False, id="no-name"),
        pytest.param(["-c", "x"], False, id="no-file"),
        pytest.param(["-l", "FILE", "extra"], False, id="two-files"),
        pytest.param(["-x", "FILE"], False, id="unknown-option"),
    ],
)
def test_misuse_like_qemu_img(tmp_path: Path, args: list[str], same_text: bool) -> None:
    image = build(tmp_path)
    qemu, mine = pair(tmp_path, image)
    result, reference = both(args, qemu, mine)
    if same_text:
        cli_run.same_text_as_qemu(result, reference)
    assert (result.status, result.out) == (reference.status, reference.out) == (1, "")
    assert result.err.startswith("imago")
    assert result.err.count("\n") == 1
    assert mine.read_bytes() == image.read_bytes()


def test_missing_file(tmp_path: Path) -> None:
    for args in (["-l"], ["-c", "x"]):
        result = cli_run.imago("snapshot", *args, "missing.qcow2", cwd=tmp_path)
        reference = cli_run.qemu_img("snapshot", *args, "missing.qcow2", cwd=tmp_path)
        assert result.status == reference.status == 1
        assert result.err.startswith("imago: Could not open 'missing.qcow2': ")
        assert "No such file or directory" in result.err
    assert not (tmp_path / "missing.qcow2").exists()


@pytest.mark.parametrize("args", [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]])
def test_raw_has_no_snapshots(tmp_path: Path, args: list[str]) -> None:
    """Probed as raw on both sides; qemu-img also warns about the probe: its last line is compared."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * 65536)
    result = cli_run.imago("snapshot", *args, image.name, cwd=tmp_path)
    reference = cli_run.qemu_img("snapshot", *args, image.name, cwd=tmp_path)
    assert (result.status, result.out) == (reference.status, reference.out)
    assert result.err.replace("imago:", "qemu-img:").splitlines()[-1:] == reference.err.splitlines()[-1:]
    assert image.read_bytes() == b"\x5a" * 65536


def test_image_in_use_by_another_writer(tmp_path: Path) -> None:
    image = build(tmp_path)
    before = image.read_bytes()
    with imago.open(image, format="qcow2", write=True):
        result = cli_run.imago("snapshot", "-c", "x", image)
        reference = cli_run.qemu_img("snapshot", "-c", "x", image)
        listed = cli_run.imago("snapshot", "-U", "-l", image)
    assert result.status == reference.status == 1
    assert result.err.startswith(f"imago: Could not open '{image}': ")
    assert listed.status == 0
    assert "first" in listed.out
    assert image.read_bytes() == before


def test_empty_name_is_refused(tmp_path: Path) -> None:
    """qemu-img creates a snapshot without a name; imago refuses it (nothing could name it later)."""
    image = build(tmp_path)
    before = image.read_bytes()
    result = cli_run.imago("snapshot", "-c", "", image)
    assert result.status == 1
    assert result.err.startswith("imago: Could not create snapshot '': ")
    assert image.read_bytes() == before


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        imago.cli.main(["snapshot", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("-l", "-c NAME", "-a NAME", "-d NAME", "-f FMT", "-U", "-q", "FILE"):
        assert option in out
