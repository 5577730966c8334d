"""Smoke test of bench/bench_qcow2.py: it runs, checks correctness and prints its report.

Timing and memory figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_qcow2.py"

RATIO_LINES = (
    "qcow2 1M sequential QD1",
    "qcow2 4K random QD1",
    "qcow2 async 4K random QD16",
    "qcow2 async 4K random QD16 vs qemu-img bench -d 16",
    "qcow2 async 1M sequential",
    "zlib all cores vs 1 thread",
    "zstd all cores vs 1 thread",
)
RATIO_KEYS = {
    "sync_1m_sequential": "bare",
    "sync_4k_random": "bare",
    "async_4k_random_qd16": "bare",
    "async_4k_random_qd16_qemu": "qemu-img",
    "async_1m_sequential": "bare",
    "zlib_parallel": "one-thread",
    "zstd_parallel": "one-thread",
}

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io create the benchmark's images",
)


def test_bench_qcow2_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for label in RATIO_LINES:
        assert any(line.strip().startswith(label) for line in lines), f"no {label!r} line in:\n{result.stdout}"
    assert any("sparse read peak RSS" in line for line in lines), result.stdout
    assert "correctness: OK" in lines

    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["failures"] == []
    assert summary["config"]["quick"] is True
    for key, reference in RATIO_KEYS.items():
        entry = summary["ratios"][key]
        assert set(entry) >= {"ratio", "target", "imago", "reference", "meets_target"}
        assert entry["reference_name"] == reference
    for compression in ("zlib", "zstd"):
        image = summary["compressed_images"][compression]
        assert image["sha256_imago"] == image["sha256_source"]
    memory = summary["memory"]
    assert memory["errors"] == []
    assert memory["peak_rss_mib"] > 0
    # The temporary images are removed again.
    assert list(tmp_path.iterdir()) == []


def test_bench_qcow2_skip_big(tmp_path: Path) -> None:
    small = ["--repeat", "1", "--ops", "2000", "--ops-1m", "20", "--compressed-size", "4M", "--request-size", "1M"]
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--skip-big", "--no-qemu", *small, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("sparse read peak RSS" in line and "skipped" in line for line in lines), result.stdout
    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["memory"] is None
    assert summary["ratios"]["qemu_4k_sequential"] is None
    assert summary["ratios"]["async_4k_random_qd16_qemu"] is None
    assert summary["ratios"]["async_1m_sequential"]["reference_name"] == "bare"
    assert list(tmp_path.iterdir()) == []
