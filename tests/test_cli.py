"""The ``imago`` command line: ``imago plugins``, plugin subcommands, misuse and errors."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import imago
import imago.cli

RegisterPlugin = Callable[[str, object], None]
RunPython = Callable[..., subprocess.CompletedProcess[str]]

IN_REPO = {"file": "imago-file", "null": "imago-null", "raw": "imago-raw"}


def cli_plugin(*commands: tuple[str, str, Any, Any]) -> types.SimpleNamespace:
    """A plugin registering the given ``(name, help, configure, run)`` subcommands."""

    @imago.hookimpl
    def imago_register_cli_commands(register: Callable[..., None]) -> None:
        for command in commands:
            register(*command)

    return types.SimpleNamespace(imago_register_cli_commands=imago_register_cli_commands)


def no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def plugin_blocks(output: str) -> dict[str, list[str]]:
    """``imago plugins`` human output: heading line -> indented lines below it."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith(" "):
            current.append(line.strip())
        else:
            current = blocks.setdefault(line, [])
    return blocks


# --- imago plugins ---------------------------------------------------------------------------


def test_plugins_human(capsys: pytest.CaptureFixture[str]) -> None:
    assert imago.cli.main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    blocks = plugin_blocks(out)
    for name, distribution in IN_REPO.items():
        assert f"{name} ({distribution} {importlib.metadata.version(distribution)})" in blocks
    assert blocks[f"file (imago-file {importlib.metadata.version('imago-file')})"] == ["storage drivers: file"]
    assert blocks[f"null (imago-null {importlib.metadata.version('imago-null')})"] == ["storage drivers: null"]
    assert blocks[f"raw (imago-raw {importlib.metadata.version('imago-raw')})"] == ["format drivers:  raw"]
    assert "ERROR" not in out
    headings = list(blocks)
    assert headings == sorted(headings)


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert imago.cli.main(["plugins", "--output", "json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    entries = {entry["name"]: entry for entry in json.loads(out)}
    for name, distribution in IN_REPO.items():
        entry = entries[name]
        assert entry["distribution"] == distribution
        assert entry["version"] == importlib.metadata.version(distribution)
        assert entry["error"] is None
        assert entry["cli-commands"] == []
    assert entries["file"]["storage-drivers"] == ["file"]
    assert entries["null"]["storage-drivers"] == ["null"]
    assert entries["raw"]["format-drivers"] == ["raw"]
    assert entries["raw"]["storage-drivers"] == []


def test_plugins_shows_a_broken_plugin(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    @imago.hookimpl
    def imago_register_format_drivers(register: Callable[..., None]) -> None:
        raise OSError("cannot read my tables")

    register_plugin("broken", types.SimpleNamespace(imago_register_format_drivers=imago_register_format_drivers))
    assert imago.cli.main(["plugins"]) == 1
    out, err = capsys.readouterr()
    blocks = plugin_blocks(out)
    assert blocks["broken (registered in-process)"] == ["ERROR: OSError: cannot read my tables"]
    assert blocks[f"raw (imago-raw {importlib.metadata.version('imago-raw')})"] == ["format drivers:  raw"]
    assert "Traceback" not in out + err

    assert imago.cli.main(["plugins", "--output", "json"]) == 1
    entries = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert entries["broken"]["distribution"] is None
    assert entries["broken"]["error"] == "plugin 'broken' failed to load: OSError: cannot read my tables"
    assert entries["null"]["error"] is None


def test_console_script(venv_bin: Path) -> None:
    script = venv_bin / "imago"
    assert script.is_file()
    result = subprocess.run([str(script), "plugins"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, distribution in IN_REPO.items():
        assert f"{name} ({distribution} " in result.stdout

    as_json = subprocess.run([str(script), "plugins", "--output", "json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    assert IN_REPO.keys() <= {entry["name"] for entry in json.loads(as_json.stdout)}


def test_python_dash_m(run_python: RunPython) -> None:
    result = run_python(["-m", "imago.cli", "plugins", "--output", "json"])
    assert result.returncode == 0, result.stderr
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert {name: entries[name]["distribution"] for name in IN_REPO} == IN_REPO


# --- misuse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-subcommand"),
        pytest.param(["no-such-command"], id="unknown-subcommand"),
        pytest.param(["plugins", "--output", "xml"], id="bad-choice"),
        pytest.param(["plugins", "extra"], id="extra-argument"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        imago.cli.main(argv)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: imago")


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_usage_errors_exit_2_from_the_console_script(venv_bin: Path, argv: list[str]) -> None:
    result = subprocess.run([str(venv_bin / "imago"), *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "usage: imago" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_core_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        imago.cli.main(["--help"])
    assert caught.value.code == 0
    assert "plugins" in capsys.readouterr().out


# --- subcommands from plugins ----------------------------------------------------------------


def test_plugin_subcommand_in_help_and_runs(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[argparse.Namespace] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("image")
        parser.add_argument("--times", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        print(f"greeting {args.image} x{args.times}")
        return 3

    register_plugin("greeter", cli_plugin(("greet", "greet an image, a unique help text", configure, run)))

    with pytest.raises(SystemExit) as caught:
        imago.cli.main(["--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "greet" in help_text
    assert "greet an image, a unique help text" in help_text

    assert imago.cli.main(["greet", "disk.img", "--times", "2"]) == 3
    assert capsys.readouterr().out == "greeting disk.img x2\n"
    assert len(seen) == 1
    assert (seen[0].image, seen[0].times) == ("disk.img", 2)

    # The plugin's command is listed by `imago plugins` as well.
    assert imago.cli.main(["plugins", "--output", "json"]) == 0
    entries = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert entries["greeter"]["cli-commands"] == ["greet"]
    assert entries["greeter"]["distribution"] is None
    assert imago.cli.main(["plugins"]) == 0
    assert plugin_blocks(capsys.readouterr().out)["greeter (registered in-process)"] == ["commands:        greet"]


def test_plugin_subcommand_returning_none_exits_0(register_plugin: RegisterPlugin) -> None:
    register_plugin("quiet", cli_plugin(("quiet", "do nothing", no_arguments, lambda args: None)))
    assert imago.cli.main(["quiet"]) == 0


def test_plugin_subcommand_usage_error(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("count", type=int)

    register_plugin("counter", cli_plugin(("count", "count", configure, lambda args: 0)))
    with pytest.raises(SystemExit) as caught:
        imago.cli.main(["count", "not-a-number"])
    assert caught.value.code == 2
    assert "usage: imago count" in capsys.readouterr().err


def test_duplicate_cli_command(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    register_plugin("cli-first", cli_plugin(("same", "first", no_arguments, lambda args: print("first"))))
    register_plugin("cli-second", cli_plugin(("same", "second", no_arguments, lambda args: print("second"))))

    infos = {info.name: info for info in imago.plugins()}
    assert infos["cli-first"].error is None
    assert infos["cli-first"].cli_commands == ("same",)
    error = infos["cli-second"].error
    assert isinstance(error, imago.PluginLoadError)
    assert isinstance(error.__cause__, imago.DuplicateDriverError)
    assert error.__cause__.plugins == ("cli-first", "cli-second")
    assert "'same' is registered twice" in str(error)
    assert infos["cli-second"].cli_commands == ()

    # The first registration wins and runs; `imago plugins` reports the second's error.
    assert imago.cli.main(["same"]) == 0
    assert capsys.readouterr().out == "first\n"
    assert imago.cli.main(["plugins"]) == 1
    blocks = plugin_blocks(capsys.readouterr().out)
    assert len(blocks["cli-second (registered in-process)"]) == 1
    assert blocks["cli-second (registered in-process)"][0].startswith("ERROR: CLI command driver 'same'")


def test_cli_command_with_the_name_of_a_core_command(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    register_plugin("hijack", cli_plugin(("plugins", "not the real one", no_arguments, lambda args: 99)))
    infos = {info.name: info for info in imago.plugins()}
    assert isinstance(infos["hijack"].error, imago.PluginLoadError)
    assert infos["hijack"].cli_commands == ()
    # `imago plugins` is still the core's command and reports the plugin's error.
    assert imago.cli.main(["plugins"]) == 1
    blocks = plugin_blocks(capsys.readouterr().out)
    assert blocks["hijack (registered in-process)"][0].startswith("ERROR: ")
    assert "'plugins'" in blocks["hijack (registered in-process)"][0]


@pytest.mark.parametrize("name", ["", None])
def test_cli_command_without_a_name(register_plugin: RegisterPlugin, name: Any) -> None:
    register_plugin("nameless", cli_plugin((name, "help", no_arguments, lambda args: 0)))
    error = {info.name: info for info in imago.plugins()}["nameless"].error
    assert isinstance(error, imago.PluginLoadError)
    assert isinstance(error.__cause__, imago.InvalidDriverError)
    assert imago.cli.main(["plugins", "--output", "json"]) == 1


def test_imago_error_is_one_line(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    def run(args: argparse.Namespace) -> int:
        raise imago.CorruptImageError("disk.qcow2", 0x30000, "L2 table entry points past the end of the file")

    register_plugin("failing", cli_plugin(("fail", "always fails", no_arguments, run)))
    assert imago.cli.main(["fail"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "imago: disk.qcow2 at offset 0x30000: L2 table entry points past the end of the file\n"


def test_missing_driver_in_a_subcommand_is_one_line(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    register_plugin("needs-qed", cli_plugin(("qed-in", "x", no_arguments, lambda args: imago.format_driver("qed"))))
    assert imago.cli.main(["qed-in"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("imago: no format driver named 'qed' is installed")
    assert "'imago-qed'" in err
    assert "Traceback" not in err


def test_plugin_whose_configure_raises_does_not_break_the_tool(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        raise RuntimeError("cannot configure")

    register_plugin("fragile", cli_plugin(("fragile", "breaks while configuring", configure, lambda args: 0)))
    assert imago.cli.main(["plugins"]) == 0
    capsys.readouterr()
    assert imago.cli.main(["fragile"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "fragile" in err
    assert "cannot configure" in err


def test_cli_register_takes_keywords(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    @imago.hookimpl
    def imago_register_cli_commands(register: Callable[..., None]) -> None:
        register(name="kw", help="registered by keywords", configure=no_arguments, run=lambda args: 7)

    register_plugin("keywords", types.SimpleNamespace(imago_register_cli_commands=imago_register_cli_commands))
    assert imago.cli.main(["kw"]) == 7


# --- the CLI registrar -----------------------------------------------------------------------


def test_cli_hook_receives_a_registrar(register_plugin: RegisterPlugin) -> None:
    received: list[object] = []

    @imago.hookimpl
    def imago_register_cli_commands(register: imago.CliRegistrar) -> None:
        received.append(register)
        register.command(name="typed-cmd", help="typed", configure=no_arguments, run=lambda args: 5)

    register_plugin("typed-cli", types.SimpleNamespace(imago_register_cli_commands=imago_register_cli_commands))
    assert imago.cli.main(["typed-cmd"]) == 5
    assert len(received) == 1
    assert isinstance(received[0], imago.CliRegistrar)
    assert received[0].closed


def test_cli_registrar_command_takes_keywords_only(register_plugin: RegisterPlugin) -> None:
    @imago.hookimpl
    def imago_register_cli_commands(register: imago.CliRegistrar) -> None:
        register.command("positional", "help", no_arguments, lambda args: 0)  # type: ignore[misc]

    register_plugin("positional", types.SimpleNamespace(imago_register_cli_commands=imago_register_cli_commands))
    error = {info.name: info for info in imago.plugins()}["positional"].error
    assert isinstance(error, imago.PluginLoadError)
    assert isinstance(error.__cause__, TypeError)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param(("-x", "help", no_arguments, print), "must not start with '-'", id="option-like-name"),
        pytest.param(("two words", "help", no_arguments, print), "contain white space", id="name-with-space"),
        pytest.param((42, "help", no_arguments, print), "has no name", id="name-not-a-string"),
        pytest.param(("cmd", None, no_arguments, print), "help must be a string", id="help-none"),
        pytest.param(("cmd", "help", "configure", print), "configure must be callable", id="configure-str"),
        pytest.param(("cmd", "help", no_arguments, None), "run must be callable", id="run-none"),
    ],
)
def test_invalid_cli_command_is_a_load_error(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str], command: tuple[Any, ...], message: str
) -> None:
    register_plugin("bad-cli", cli_plugin(command))  # type: ignore[arg-type]
    error = {info.name: info for info in imago.plugins()}["bad-cli"].error
    assert isinstance(error, imago.PluginLoadError)
    assert isinstance(error.__cause__, imago.InvalidDriverError)
    assert message in str(error)
    assert imago.cli.main(["plugins"]) == 1
    blocks = plugin_blocks(capsys.readouterr().out)
    assert blocks["bad-cli (registered in-process)"][0].startswith("ERROR: ")
    assert message in blocks["bad-cli (registered in-process)"][0]


def test_plugins_shows_an_unknown_hook(register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    @imago.hookimpl
    def imago_register_cli_command(register: imago.CliRegistrar) -> None:
        raise AssertionError("must not be called")

    register_plugin("typo", types.SimpleNamespace(imago_register_cli_command=imago_register_cli_command))
    assert imago.cli.main(["plugins"]) == 1
    blocks = plugin_blocks(capsys.readouterr().out)
    (line,) = blocks["typo (registered in-process)"]
    assert line.startswith("ERROR: PluginValidationError: unknown hook 'imago_register_cli_command'")
    assert "did you mean 'imago_register_cli_commands'?" in line

    assert imago.cli.main(["plugins", "--output", "json"]) == 1
    entries = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert "unknown hook 'imago_register_cli_command'" in entries["typo"]["error"]
    assert entries["typo"]["cli-commands"] == []
    assert entries["raw"]["error"] is None


def test_debug_anywhere_shows_the_traceback(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    register_plugin("needs-qed", cli_plugin(("qed-in", "x", no_arguments, lambda args: imago.format_driver("qed"))))
    assert imago.cli.main(["qed-in"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["--debug", "qed-in"], ["qed-in", "--debug"]):
        assert imago.cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.rstrip("\n").splitlines()[-1].startswith("imago: no format driver named 'qed'")


@pytest.mark.parametrize("name", ["plugins", "convert", "info", "check"])
def test_a_plugin_cannot_take_a_core_subcommands_name(
    register_plugin: RegisterPlugin, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    register_plugin("shadow", cli_plugin((name, "x", no_arguments, lambda args: 42)))
    assert imago.cli.main(["plugins"]) == 1  # the plugin failed to load
    blocks = plugin_blocks(capsys.readouterr().out)
    shadow = next(lines for heading, lines in blocks.items() if heading.startswith("shadow"))
    assert any(line.startswith("ERROR:") and repr(name) in line for line in shadow)
