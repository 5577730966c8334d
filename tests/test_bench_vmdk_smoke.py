"""Smoke test of bench/bench_vmdk.py: every case runs and every image read or written checks out.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_vmdk.py"


def test_bench_vmdk_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "correctness: OK" in lines
    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["failures"] == []
    (figures,) = summary["dirs"]
    assert figures["dir"] == str(tmp_path)
    assert figures["read"]["imago_seconds"] > 0
    assert figures["read"]["bare_seconds"] > 0
    stream = figures["stream"]
    for key in ("imago_seconds", "qemu_seconds", "library_seconds"):
        assert stream[key] > 0, key
    assert stream["library_bytes"] < 16 << 20  # compressed
    # The work directory is removed.
    assert list(tmp_path.iterdir()) == []
