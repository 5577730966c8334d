"""Smoke test of bench/bench_write_cpu.py, with this tree as its own baseline.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_write_cpu.py"


def test_bench_write_cpu_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--baseline", str(ROOT), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert set(summary["ratios"]) == {"allocating 1M", "rewrite 4K"}
    for tree in ("this", "baseline"):
        assert all(seconds > 0 for seconds in summary["seconds_per_request"][tree].values())
    assert list(tmp_path.iterdir()) == []


def test_bench_write_cpu_refuses_a_baseline_that_is_no_tree(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--baseline", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "is not an imago source tree" in result.stderr
