"""Smoke test of bench/bench_raw.py: it runs, checks correctness and prints its report.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_raw.py"

RATIO_LINES = ("sync 4K random QD1", "sync 1M sequential QD1", "async 4K random QD16")
RATIO_KEYS = ("sync_4k_random", "sync_1m_sequential", "async_4k_random_qd16")


def test_bench_raw_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for label in RATIO_LINES:
        assert any(line.strip().startswith(label) for line in lines), f"no {label!r} line in:\n{result.stdout}"
    assert "correctness: OK" in lines

    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["config"]["quick"] is True
    for key in RATIO_KEYS:
        entry = summary["ratios"][key]
        assert set(entry) >= {"ratio", "target", "imago", "reference", "meets_target"}
        assert entry["reference_name"] == "bare"
    # The temporary image is removed again.
    assert list(tmp_path.iterdir()) == []
