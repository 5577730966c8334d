"""Smoke test of bench/bench_raw.py: it runs, checks correctness and prints its report.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_raw.py"

RATIO_LINES = (
    "sync 4K random QD1",
    "sync 1M sequential QD1",
    "async 4K random QD16",
    "async 4K random QD16 vs qemu-img bench -d 16",
    "async 1M sequential",
)
RATIO_KEYS = {
    "sync_4k_random": "bare",
    "sync_1m_sequential": "bare",
    "async_4k_random_qd16": "bare",
    "async_4k_random_qd16_qemu": "qemu-img",
    "async_1m_sequential": "bare",
}


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
    assert summary["config"]["loop"] == "asyncio"
    for key, reference in RATIO_KEYS.items():
        entry = summary["ratios"][key]
        assert set(entry) >= {"ratio", "target", "imago", "reference", "meets_target"}
        assert entry["reference_name"] == reference
    assert summary["ratios"]["async_4k_random_qd16_qemu"]["target"] == 1.0
    # The temporary image is removed again.
    assert list(tmp_path.iterdir()) == []


def test_bench_raw_on_uvloop(tmp_path: Path) -> None:
    """``--loop uvloop`` runs the async rows on uvloop (a dev dependency: missing, this fails)."""
    small = ["--ops", "2000", "--ops-1m", "20", "--repeat", "1", "--no-qemu"]
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *small, "--loop", "uvloop", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("async rows on the uvloop loop" in line for line in lines), result.stdout
    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["config"]["loop"] == "uvloop"
    assert summary["ratios"]["async_1m_sequential"]["reference_name"] == "bare"
    assert summary["ratios"]["async_4k_random_qd16_qemu"] is None  # --no-qemu
    assert any(line.strip().startswith("async 4K random QD16 vs qemu-img") and "n/a" in line for line in lines)


def test_bench_raw_refuses_an_unknown_loop(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--loop", "trio", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--loop" in result.stderr
    assert list(tmp_path.iterdir()) == []
