"""Smoke test of bench/bench_map.py: it runs, imago and qemu-img print the same map, it reports.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_map.py"


def test_bench_map_quick(tmp_path: Path) -> None:
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
    assert summary["quick"] is True
    assert set(summary["results"]) == {f"sparse@{tmp_path}", f"full@{tmp_path}"}
    for entry in summary["results"].values():
        assert entry["same_output"] is True
        assert entry["entries"] > 0
        assert entry["imago_seconds"] > 0
        assert entry["qemu_img_seconds"] > 0
    assert list(tmp_path.iterdir()) == []  # the images are removed again
