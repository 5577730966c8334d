"""The main job, ``examples/tour.py`` (``make run``), runs end to end and its verdicts are clean.

The tour runs in-process in ``tmp_path`` (so each step's exit status is checked), then its
results are checked independently with qemu-img; once more as ``make run`` runs it (a
subprocess), with qemu-img hidden, to check the path that skips QEMU's verdicts.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from . import cli_run

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "examples" / "tour.py"


def load_tour() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imago_tour", TOUR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_tour_end_to_end(tmp_path: Path) -> None:
    tour_module = load_tour()
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None, "qemu-img is required (Debian package qemu-utils; `make test` installs it)"
    out = io.StringIO()
    tour = tour_module.run_tour(tmp_path, out, qemu_img=qemu_img)
    text = out.getvalue()

    # Every step ran and exited as it must; the subcommands are the ones the tour promises.
    assert [(step.argv[0], step.status) for step in tour.steps if step.status != step.expected] == []
    subcommands = [step.argv[1] for step in tour.steps if step.argv[0] == "imago"]
    assert subcommands == [
        *("convert", "info", "bench", "create", "snapshot", "snapshot"),
        *("info", "map", "check", "commit", "check", "compare"),
    ]
    assert [step.argv[1] for step in tour.steps if step.argv[0] == "qemu-img"] == ["check", "check", "compare"]
    assert tour.ok
    assert text.rstrip().endswith("Every step succeeded.")
    assert "Traceback" not in text
    assert "imago: " not in text
    for step in tour.steps:
        assert f"$ {' '.join(step.argv)}\n" in text
    assert text.count("Images are identical.") == 2  # imago compare, then qemu-img compare
    assert text.count("No errors were found on the image.") == 4

    # Independently: the base holds the disk plus the overlay's writes, compressed, and is clean.
    checked = cli_run.qemu_img("check", "--output=json", tmp_path / "disk.qcow2")
    assert checked.status == 0, checked.out
    assert json.loads(checked.out)["compressed-clusters"] > 0
    compared = cli_run.qemu_img("compare", "-f", "raw", "-F", "qcow2", "expected.raw", "disk.qcow2", cwd=tmp_path)
    assert compared.status == 0, compared.out
    expected = bytearray((tmp_path / "disk.raw").read_bytes())
    for offset, data in tour_module.OVERLAY_WRITES:
        expected[offset : offset + len(data)] = data
    assert (tmp_path / "expected.raw").read_bytes() == expected
    # Real text (no NUL bytes), then random bytes, then zeroes.
    assert b"\0" not in expected[: tour_module.TEXT_SIZE]
    assert expected[:65536].decode("utf-8")
    assert expected[tour_module.RANDOM_AT : tour_module.RANDOM_AT + 65536].count(0) < 1024
    assert not any(expected[tour_module.RANDOM_AT + tour_module.RANDOM_SIZE : 40 << 20])
    # The overlay: its snapshot is listed by qemu-img, and it still reads as its base.
    listed = cli_run.qemu_img("snapshot", "-l", tmp_path / "overlay.qcow2")
    assert listed.status == 0
    assert "after-writes" in listed.out
    compared = cli_run.qemu_img("compare", "overlay.qcow2", "disk.qcow2", cwd=tmp_path)
    assert compared.status == 0, compared.out


def test_make_run_command_without_qemu_img(tmp_path: Path) -> None:
    """``python examples/tour.py DIR`` as ``make run`` runs it; without qemu-img it says so and succeeds."""
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    environment = {**os.environ, "PATH": str(no_tools)}
    done = subprocess.run(
        [sys.executable, str(TOUR), str(tmp_path / "tour")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "qemu-img is not installed: skipping" in done.stdout
    assert "$ imago commit -p overlay.qcow2" in done.stdout
    assert done.stdout.rstrip().endswith("Every step succeeded.")
    assert (tmp_path / "tour" / "disk.qcow2").exists()


def test_tour_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(TOUR), "a", "b"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "usage:" in done.stderr
