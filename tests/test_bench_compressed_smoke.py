"""Smoke test of bench/bench_compressed.py: every case runs and imago's outputs match their source.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_compressed.py"


def test_bench_compressed_quick(tmp_path: Path) -> None:
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
    assert set(summary) >= {"codec", "write-zlib", "read-zlib", "write-zstd", "read-zstd"}
    for case in ("write-zlib", "read-zlib", "write-zstd", "read-zstd"):
        assert summary[case]["same_content"] is True
        assert summary[case]["seconds"] > 0
    assert summary["codec"]["deflate_module"] in {"isal.isal_zlib", "zlib_ng.zlib_ng", "zlib"}
    # The work directory is removed.
    assert list(tmp_path.iterdir()) == []
