"""Smoke test of bench/bench_startup.py: it runs every command and prints its report (one round).

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_startup.py"

ROWS = (
    "python -c pass",
    "import typing,argparse,pluggy",
    "import imago",
    "imago --help",
    "imago info raw",
    "imago info qcow2",
    "imago info -f raw",
    "imago info -f qcow2",
    "qemu-img info raw",
    "qemu-img info qcow2",
)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, check=False)


def load_bench() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("bench_startup", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_startup_options() -> None:
    bench = load_bench()
    assert bench.parse_args(["--quick"]).runs == 3
    assert bench.parse_args([]).runs == 30
    assert bench.parse_args(["--quick", "--runs", "5"]).runs == 5


def test_bench_startup_one_round(tmp_path: Path) -> None:
    result = run_bench("--runs", "1", "--breakdown", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "PYTHONDONTWRITEBYTECODE unset" in lines[0]
    for row in ROWS:
        assert any(line.startswith(row + " ") for line in lines), f"no {row!r} line in:\n{result.stdout}"

    summary = json.loads(lines[-1])
    assert summary["config"] == {"runs": 1, "quick": False, "python": sys.version.split()[0], "baseline": None}
    assert list(summary["results"]) == list(ROWS)
    assert summary["results"]["python -c pass"]["best_ratio"] == 1.0
    for row in ROWS:
        entry = summary["results"][row]
        assert 0 < entry["best_ms"] <= entry["median_ms"]
        assert 0 <= entry["best_cpu_ms"] <= entry["median_cpu_ms"]
        assert {"best_ratio", "median_ratio", "best_cpu_ratio"} <= set(entry)
        assert ("target" in entry) == row.startswith("imago info")
    assert {"module", "self_ms", "cumulative_ms"} <= set(summary["breakdown"][0])
    # The temporary images are removed again.
    assert list(tmp_path.iterdir()) == []


def test_bench_startup_rejects_no_runs() -> None:
    result = run_bench("--runs", "0")
    assert result.returncode == 2
    assert "--runs must be at least 1" in result.stderr


def test_bench_startup_against_a_baseline_tree(tmp_path: Path) -> None:
    tree = BENCH.parent.parent  # this tree as its own baseline: the rows are there, the figures untested
    result = run_bench("--runs", "1", "--no-qemu", "--baseline", str(tree), "--dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["config"]["baseline"] == str(tree)
    imago_rows = [row for row in ROWS if "imago" in row and not row.startswith("qemu-img")]
    floor = ["python -c pass", "import typing,argparse,pluggy"]
    assert list(summary["results"]) == [*floor, *imago_rows, *(f"{row} [baseline]" for row in imago_rows)]


def test_bench_startup_rejects_a_baseline_that_is_no_tree(tmp_path: Path) -> None:
    result = run_bench("--baseline", str(tmp_path))
    assert result.returncode == 2
    assert "is not an imago source tree" in result.stderr
