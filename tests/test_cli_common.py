"""The pieces every subcommand shares: sizes, -o lists, cache modes, gates, progress, JSON, Ctrl-C."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

import imago
from imago.cli import common, progress, qjson

from . import cli_run

# Sizes as qemu-img create reads them: each is checked against qemu-img itself.
SIZES = [
    "0",
    "512",
    " 12",
    "12b",
    "12B",
    "1k",
    "1K",
    "1.5k",
    "0.5M",
    "1.0000000001k",
    "64M",
    "3G",
    "2T",
    "0x1000",
    "1P",
    "1e",
    "7E",
    "8E",
    "1.5",
    "-5",
    "12x",
    "k",
    "",
    "1kk",
    "1 k",
    ".5k",
]


def _qemu_size(tmp_path: Path, text: str) -> int | None:
    result = cli_run.qemu_img("create", "-f", "raw", str(tmp_path / "x.raw"), "--", text)
    match = re.search(r"size=(\d+)", result.out)
    if result.status == 0 and match:
        return int(match.group(1))
    if "too large for file format" in result.err:  # a valid size raw cannot hold
        return int(text[:-1]) << {"p": 50, "e": 60}[text[-1].lower()]
    return None


@pytest.mark.parametrize("text", SIZES)
def test_sizes_are_read_as_qemu_img_reads_them(tmp_path: Path, text: str) -> None:
    expected = _qemu_size(tmp_path, text)
    if expected is None:
        with pytest.raises(common.CliError, match="Invalid image size specified"):
            common.parse_size(text, what="image size")
    else:
        assert common.parse_size(text, what="image size") == expected


def test_option_lists_follow_qemus_syntax() -> None:
    assert common.parse_options(["cluster_size=64k,lazy_refcounts=on", "compat=1.1"]) == {
        "cluster_size": "64k",
        "lazy_refcounts": "on",
        "compat": "1.1",
    }
    assert common.parse_options(["backing_file=a,,b.qcow2,backing_fmt=qcow2"]) == {
        "backing_file": "a,b.qcow2",
        "backing_fmt": "qcow2",
    }
    assert common.parse_options(["lazy_refcounts"]) == {"lazy_refcounts": "on"}
    assert common.parse_options(["compat=0.10,compat=1.1"]) == {"compat": "1.1"}
    assert common.parse_options(["a=1,,", ""]) == {"a": "1,"}
    assert common.wants_help(["cluster_size=4k,help"])
    assert common.wants_help(["?"])
    assert not common.wants_help(["cluster_size=4k"])
    with pytest.raises(common.CliError, match="no name"):
        common.parse_options(["=5"])


def test_cache_modes_map_to_direct_io_and_flushes() -> None:
    assert common.cache_flags("none") == (True, False)
    assert common.cache_flags("directsync") == (True, False)
    assert common.cache_flags("writeback") == (False, False)
    assert common.cache_flags("unsafe") == (False, True)
    with pytest.raises(common.CliError, match="Invalid source cache option: fast"):
        common.cache_flags("fast", option="source cache")


def _gate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_gate_options(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", ["json:{}", "nbd://host/x", "a" * 300, "x/" + "b" * 256])
def test_names_no_gate_opens_get_no_hint_to_widen_the_gate(tmp_path: Path, name: str) -> None:
    top = tmp_path / "top.qcow2"  # qemu-img records any name (imago.create refuses protocol names)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", top, "1M"], check=True)
    for gate in (common.gate_for(_gate_args(), [top]), common.gate_for(_gate_args("--allow-any"), [top])):
        with pytest.raises(imago.ImplicitOpenDeniedError) as refused:
            imago.open(top, "qcow2", gate=gate).close()
        assert refused.value.allowable is False
        message = common.describe_error(refused.value)
        assert "denied" in message
        assert "--allow" not in message


def test_the_gate_covers_the_command_lines_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    gate = common.gate_for(_gate_args(), [tmp_path / "a" / "x.qcow2"])
    assert isinstance(gate, imago.SandboxImplicitOpenGate)
    imago.create(tmp_path / "b" / "base.raw", "raw", 1 << 20)
    imago.create(
        tmp_path / "a" / "top.qcow2", "qcow2", 1 << 20, backing_file="../b/base.raw", backing_format="raw", unsafe=True
    )
    with pytest.raises(imago.ImplicitOpenDeniedError) as refused:
        imago.open(tmp_path / "a" / "top.qcow2", "qcow2", gate=gate).close()
    message = common.describe_error(refused.value)
    assert "base.raw" in message
    assert "--allow-dir" in message
    assert "--allow-any" in message
    allowed = common.gate_for(_gate_args("--allow-dir", str(tmp_path / "b")), [tmp_path / "a" / "top.qcow2"])
    imago.open(tmp_path / "a" / "top.qcow2", "qcow2", gate=allowed).close()
    anything = common.gate_for(_gate_args("--allow-any"), [tmp_path / "c" / "other"])
    assert isinstance(anything, imago.PermissiveImplicitOpenGate)
    imago.open(tmp_path / "a" / "top.qcow2", "qcow2", gate=anything).close()


def test_os_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(FileNotFoundError) as error:
        open(missing, "rb")  # noqa: SIM115 - only the error is wanted
    assert common.describe_error(error.value) == f"{missing}: No such file or directory"


def _progress_args(mode: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    progress.add_progress(parser)
    return parser.parse_args([] if mode is None else ["--progress", mode])


def test_json_progress_is_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress.progress_for(_progress_args("json"), "copy", 1000) as report:
        report.update(10)
        report.advance(990)
        report.start("flush", 1)
        report.update(1)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0] == {"phase": "copy", "done": 0, "total": 1000}
    assert {"phase": "copy", "done": 1000, "total": 1000} in records
    assert records[-1] == {"phase": "flush", "done": 1, "total": 1}
    assert len(records) == len({(r["phase"], r["done"]) for r in records})  # no repeats


def test_dash_p_off_a_terminal_prints_qemus_percentages(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    parser = argparse.ArgumentParser()
    progress.add_progress(parser)
    with progress.progress_for(parser.parse_args(["-p"]), "copy", 200) as report:
        report.update(100)
        report.update(200)
    assert out.getvalue() == "    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n"


def test_no_progress_option_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.progress_for(_progress_args(None), "copy", 10) as report:
        report.update(10)
    assert capsys.readouterr() == ("", "")


def test_json_is_printed_as_qemu_img_prints_it(tmp_path: Path) -> None:
    assert cli_run.qemu_img("create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=tmp_path).status == 0
    assert (
        cli_run.qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "ü.qcow2", cwd=tmp_path).status
        == 0
    )
    assert cli_run.qemu_img("snapshot", "-c", "s1", "ü.qcow2", cwd=tmp_path).status == 0
    reference = cli_run.qemu_img("info", "--output=json", "--backing-chain", "ü.qcow2", cwd=tmp_path).out
    assert qjson.dumps(json.loads(reference)) + "\n" == reference
    assert qjson.dumps({}) == "{\n}"
    assert qjson.dumps([]) == "[\n]"
    assert qjson.string('a\x01"\\\U0001f600') == '"a\\u0001\\"\\\\\\uD83D\\uDE00"'


def test_the_first_ctrl_c_is_reported_at_a_safe_point_the_second_at_once() -> None:
    with common.interruptible():
        common.check_interrupt()
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(common.OperationInterrupted):
            common.check_interrupt()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    common.check_interrupt()  # the flag does not outlive the operation
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_subcommand_runs_without_importing_the_others() -> None:
    code = (
        "import sys, imago.cli; status = imago.cli.main(['plugins']); "
        "print(sorted(m for m in sys.modules if m.startswith('imago.cli.')))"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = done.stdout.splitlines()[-1]
    assert "imago.cli.plugins" in loaded
    for other in ("imago.cli.check", "imago.cli.convert", "imago.cli.info"):
        assert other not in loaded
    assert os.path.exists(sys.executable)


@pytest.mark.parametrize("name", sorted(__import__("imago.cli", fromlist=["COMMANDS"]).COMMANDS))
def test_every_subcommands_help_lists_every_option(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    import imago.cli

    parser = imago.cli.build_parser(name)
    with pytest.raises(SystemExit) as done:
        parser.parse_args([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[name]
    options = [option for action in sub._actions for option in action.option_strings]
    assert "--help" in options
    for option in options:
        assert option in text, (name, option)
    assert f"    {name} " in parser.format_help()  # listed in `imago --help`
