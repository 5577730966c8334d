"""Smoke test of bench/bench_formats.py: every case runs and every image read or written checks out.

Only VDI is measured here (its plugin is always installed); timing figures are never asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .bench_run import BENCH_DIR, run_quick


def test_bench_formats_quick_vdi(tmp_path: Path) -> None:
    summary = run_quick("bench_formats.py", tmp_path, "--format", "vdi")
    assert summary["failures"] == []
    assert summary["formats"] == ["vdi"]
    assert summary["skipped"] == []
    (figures,) = summary["dirs"]
    assert figures["dir"] == str(tmp_path)
    vdi = figures["formats"]["vdi"]
    assert vdi["read"]["imago_seconds"] > 0
    assert vdi["read"]["bare_seconds"] > 0
    convert = vdi["convert"]
    for key in ("imago_seconds", "qemu_seconds"):
        assert convert[key] > 0, key
    assert "imago_error" not in convert
    # The work directory is removed.
    assert list(tmp_path.iterdir()) == []


def test_bench_formats_refuses_an_unknown_format(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_formats.py"), "--quick", "--dir", str(tmp_path), "--format", "qcow2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--format" in result.stderr
    assert "qcow2" in result.stderr
    assert list(tmp_path.iterdir()) == []
