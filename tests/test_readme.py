"""The README's code blocks run as written: the Python ones top to bottom in an empty directory."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(README.read_text()) if lang == language]


def test_readme_has_python_and_shell_blocks() -> None:
    assert len(_blocks("python")) >= 5
    assert _blocks("sh")


def test_readme_links_stay_inside_the_repository() -> None:
    for target in re.findall(r"\]\(([^)]+)\)", README.read_text()):
        assert "://" not in target, target
        assert not target.startswith(".."), target
        assert (ROOT / target).exists(), target


def test_python_blocks_run_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    output = io.StringIO()
    for number, block in enumerate(_blocks("python"), 1):
        code = compile(block, f"README.md python block {number}", "exec")
        with contextlib.redirect_stdout(output):
            exec(code, namespace)
    printed = output.getvalue()
    assert "before-upgrade" in printed  # the snapshot list
    assert "vm.qcow2 no-such-snapshot" in printed  # the error's data
    assert "qcow2" in printed.splitlines()[-1]  # the missing-driver hint names the right one
    assert (tmp_path / "vm.qcow2").exists()
    assert (tmp_path / "copy.qcow2").exists()


def test_shell_blocks_other_than_make_run_as_written() -> None:
    commands = [
        line.split("#")[0].strip()
        for block in _blocks("sh")
        for line in block.splitlines()
        if line.strip() and not line.startswith("make ")  # make run/test: what CI itself runs
    ]
    assert commands
    for command in commands:
        argv = shlex.split(command)
        if argv[0].startswith(".venv/bin/"):
            # The test may run from another virtual environment: use this interpreter's scripts.
            argv[0] = os.path.join(os.path.dirname(sys.executable), os.path.basename(argv[0]))
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout


def test_architecture_document_maps_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    sources = [ROOT / "core" / "src", *sorted((ROOT / "plugins").glob("*/src"))]
    missing = []
    for source in sources:
        for module in sorted(source.rglob("*.py")):
            relative = module.relative_to(source).as_posix()
            if module.name in ("__init__.py", "__main__.py") and relative != "imago/__init__.py":
                continue
            if f"`{relative}`" not in text:
                missing.append(relative)
    assert missing == []
