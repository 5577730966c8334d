"""Running a benchmark script's quick mode for its smoke test (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def run_quick(script: str, directory: Path, *options: str) -> dict[str, Any]:
    """``bench/SCRIPT --quick --dir DIRECTORY OPTIONS``: checks it succeeded and found its results correct.

    Returns the JSON summary it prints last.
    """
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--quick", "--dir", str(directory), *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "correctness: OK" in lines
    summary: dict[str, Any] = json.loads(lines[-1])
    assert summary["correct"] is True
    return summary
