"""Smoke test of bench/bench_nbd_server.py: every row runs against both servers (figures never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_nbd_server.py"


def test_bench_nbd_server_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--size", "8M", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a ratio below the goal
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["quick"] is True
    assert summary["correct"] is True
    rows = summary["directories"][str(tmp_path)]
    assert set(rows) == {"raw nbdcopy", "raw qemu-img convert", "qcow2 nbdcopy", "qcow2 qemu-img convert"}
    for row in rows.values():
        assert row["imago_mib_s"] > 0
        assert row["qemu_nbd_mib_s"] > 0
