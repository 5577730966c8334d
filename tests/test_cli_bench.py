"""``imago bench`` against ``qemu-img bench`` 7.2: the same report, the same writes, the same refusals.

The report lines must equal qemu-img's except the time of the run; ``-w`` runs on two copies of
an image (one per tool) must leave equal images (``qemu-img compare``, ``qemu-img map``) that
``qemu-img check`` finds clean. Misuse gets qemu-img's message and status. No timing is checked.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import imago
import imago.cli

from . import cli_run
from .cli_run import Result

MiB = 1 << 20
_TIME = re.compile(r"Run completed in \d+\.\d{3} seconds\.\n\Z")


def build(directory: Path, fmt: str = "qcow2") -> Path:
    image = directory / f"disk.{fmt}"
    assert cli_run.qemu_img("create", "-q", "-f", fmt, image, "1M").status == 0
    assert cli_run.qemu_io(image, "write -P 0x33 64k 64k", fmt=fmt).status == 0
    return image


def pair(directory: Path, image: Path) -> tuple[Path, Path]:
    """Copies of *image* with the same name (so messages naming them match): ``q/`` and ``i/``."""
    copies = []
    for side in ("q", "i"):
        (directory / side).mkdir()
        copies.append(Path(shutil.copyfile(image, directory / side / image.name)))
    return copies[0], copies[1]


def both(args: list[str], qemu: Path, mine: Path) -> tuple[Result, Result]:
    reference = cli_run.qemu_img("bench", *[qemu.name if a == "FILE" else a for a in args], cwd=qemu.parent)
    result = cli_run.imago("bench", *[mine.name if a == "FILE" else a for a in args], cwd=mine.parent)
    return result, reference


def report(result: Result) -> str:
    """The report without its last line, after checking that line's form (the time differs)."""
    assert _TIME.search(result.out), result.out
    return _TIME.sub("", result.out)


def allocation(image: Path, fmt: str) -> list[dict[str, object]]:
    done = cli_run.qemu_img("map", "-f", fmt, "--output=json", image)
    assert done.status == 0, done.err
    return [{k: v for k, v in entry.items() if k != "offset"} for entry in json.loads(done.out)]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-c", "100"], id="reads"),
        pytest.param(["-c", "0"], id="no-requests"),
        pytest.param(["-c", "300", "-d", "1", "-s", "512", "-S", "0"], id="small-serial"),
        pytest.param(["-c", "600", "-d", "0x8", "-o", "1020k"], id="wrap-around"),
        pytest.param(["-c", "50", "-s", "0"], id="empty-requests"),
        pytest.param(["-q", "-c", "10", "-t", "none", "-f", "qcow2", "-i", "threads"], id="quiet-cache-aio"),
        pytest.param(["-c", "10", "-U"], id="force-share"),
    ],
)
def test_report_like_qemu_img(tmp_path: Path, args: list[str]) -> None:
    image = build(tmp_path)
    result, reference = both([*args, "FILE"], *pair(tmp_path, image))
    assert (result.status, result.err) == (reference.status, reference.err) == (0, "")
    assert report(result) == report(reference)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-c", "40", "-d", "4", "-S", "12k", "-o", "4k", "--pattern=0xa5"], id="stepped"),
        pytest.param(["-c", "300", "-d", "16", "-s", "8k", "--pattern=7"], id="wrap-around"),
        pytest.param(
            ["-c", "50", "-d", "4", "--flush-interval=8", "--pattern=0x11", "-t", "unsafe"], id="flush-interval"
        ),
        pytest.param(["-c", "50", "-d", "4", "--flush-interval=4", "--no-drain", "--pattern=1"], id="no-drain"),
    ],
)
def test_writes_like_qemu_img(tmp_path: Path, fmt: str, args: list[str]) -> None:
    image = build(tmp_path, fmt)
    qemu, mine = pair(tmp_path, image)
    result, reference = both(["-w", "-f", fmt, *args, "FILE"], qemu, mine)
    assert (result.status, result.err) == (reference.status, reference.err) == (0, "")
    assert report(result) == report(reference)
    done = cli_run.qemu_img("compare", "-f", fmt, "-F", fmt, qemu, mine)
    assert done.status == 0, done.out
    assert allocation(mine, fmt) == allocation(qemu, fmt)
    assert mine.read_bytes() != image.read_bytes()  # the writes did happen
    if fmt == "qcow2":
        checked = cli_run.qemu_img("check", mine)
        assert checked.status == 0, checked.out


def test_reads_go_through_the_async_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests are coroutines of imago.FormatAccess on a running loop, DEPTH at most in flight."""
    image = build(tmp_path)
    in_flight = [0, 0]  # now, most
    read = imago.FormatAccess.read

    async def counting_read(self: imago.FormatAccess, buf: object, offset: int) -> None:
        import asyncio

        asyncio.get_running_loop()  # raises without a loop
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(0)
            await read(self, buf, offset)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(imago.FormatAccess, "read", counting_read)
    result = cli_run.imago("bench", "-c", "64", "-d", "5", image)
    assert result.status == 0, result.err
    assert in_flight == [0, 5]


@pytest.mark.parametrize(
    ("args", "same_text"),
    [
        pytest.param(["-c", "x"], True, id="bad-count"),
        pytest.param(["-c", "-1"], True, id="negative-count"),
        pytest.param(["-c", "10x"], True, id="count-with-garbage"),
        pytest.param(["-d", "x"], True, id="bad-depth"),
        pytest.param(["-d", "2147483648"], True, id="depth-too-large"),
        pytest.param(["-s", "3G"], True, id="buffer-too-large"),
        pytest.param(["-s", "1x"], False, id="bad-buffer-size"),
        pytest.param(["-S", "1.5"], False, id="bad-step"),
        pytest.param(["-o", "x"], False, id="bad-offset"),
        pytest.param(["-o", "-1"], False, id="negative-offset"),
        pytest.param(["--pattern=256"], True, id="pattern-too-large"),
        pytest.param(["--pattern=x"], True, id="bad-pattern"),
        pytest.param(["-t", "bogus"], True, id="bad-cache"),
        pytest.param(["-i", "bogus"], True, id="bad-aio"),
        pytest.param(["--flush-interval=4"], True, id="flush-interval-for-reads"),
        pytest.param(["-w", "--flush-interval=1"], True, id="flush-interval-below-depth"),
        pytest.param(["-w", "--flush-interval=x"], True, id="bad-flush-interval"),
        pytest.param(["-w", "-U"], True, id="force-share-write"),
        pytest.param(["-f", "no-such-format"], False, id="unknown-format"),
        pytest.param(["-x"], False, id="unknown-option"),
    ],
)
def test_misuse_like_qemu_img(tmp_path: Path, args: list[str], same_text: bool) -> None:
    image = build(tmp_path)
    qemu, mine = pair(tmp_path, image)
    result, reference = both([*args, "FILE"], qemu, mine)
    if same_text:
        cli_run.same_text_as_qemu(result, reference)
    assert (result.status, result.out) == (reference.status, reference.out) == (1, "")
    assert result.err.startswith("imago")
    assert result.err.count("\n") == 1
    assert mine.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("args", [["-c", "3", "-o", "1M"], ["-c", "2", "-d", "1", "-s", "1M", "-o", "512k"]])
def test_request_past_the_end(tmp_path: Path, args: list[str]) -> None:
    image = build(tmp_path)
    result, reference = both([*args, "FILE"], *pair(tmp_path, image))
    assert (result.status, result.out) == (reference.status, reference.out)
    assert result.status == 1
    assert result.out.startswith("Sending ")
    assert result.err.startswith("imago: Failed request: ")
    assert result.err.count("\n") == 1


def test_missing_file_and_no_file(tmp_path: Path) -> None:
    result = cli_run.imago("bench", "-c", "3", "missing", cwd=tmp_path)
    assert result.status == 1
    assert result.err.startswith("imago: Could not open 'missing': ")
    assert not (tmp_path / "missing").exists()
    result = cli_run.imago("bench", "-c", "3", cwd=tmp_path)
    assert result.status == cli_run.qemu_img("bench", "-c", "3", cwd=tmp_path).status == 1


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    """SIGINT during a write run: status 130, the image closed consistently (qemu-img check clean)."""
    image = build(tmp_path)
    script = Path(sys.executable).parent / "imago"
    with subprocess.Popen(
        [script, "bench", "-w", "-c", "2000000000", "-d", "8", image],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("Sending 2000000000 write requests")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "imago: interrupted: the images were closed consistently\n"
    assert out == ""
    checked = cli_run.qemu_img("check", image)
    assert checked.status == 0, checked.out


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        imago.cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "-c COUNT",
        "-d DEPTH",
        "-f FMT",
        "--flush-interval",
        "--no-drain",
        "-n ",
        "ignored",
        "-o OFFSET",
        "--pattern",
        "-q",
        "-s BUFFER_SIZE",
        "-S STEP_SIZE",
        "-t CACHE",
        "-w",
        "-U",
    ):
        assert option in out
