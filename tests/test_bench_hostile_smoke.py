"""Smoke test of bench/bench_hostile.py: it opens every kind of image and reports only acceptable outcomes.

Figures (memory, time) are never asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_hostile.py"


def test_bench_hostile_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["failures"] == []
    assert summary["images"] == len(summary["rows"]) >= 5
    kinds = {row["format"] for row in summary["rows"]}
    assert kinds == {"qcow2", "raw"}
    for row in summary["rows"]:
        assert row["imago"]["rss_kib"] > 0
        assert row["imago"]["outcome"] == "ok" or row["imago"]["outcome"].endswith("Error")
    assert summary["imago"]["max_rss_mib"] > summary["python_import_imago"]["rss_kib"] / 1024 / 2
    assert "qemu-img create" in summary["rows"][-1]["image"]
    assert any(row["image"].startswith("malformed/") for row in summary["rows"])
