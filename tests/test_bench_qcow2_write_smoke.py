"""Smoke test of bench/bench_qcow2_write.py: it runs, verifies its images and prints its report.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_qcow2_write.py"

RATIO_LINES = {
    "sequential write vs qemu-img convert": "sequential_write",
    "flushing write vs -t writeback": "sequential_writeback",
    "zlib compressed vs convert -c": "zlib_compressed_write",
    "zlib compressed vs convert -c -W": "zlib_compressed_write_w",
    "zstd compressed vs convert -c": "zstd_compressed_write",
}

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is the reference and the checker")


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_bench_qcow2_write_quick(tmp_path: Path) -> None:
    result = run_bench(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for label in RATIO_LINES:
        assert any(line.strip().startswith(label) for line in lines), f"no {label!r} line in:\n{result.stdout}"
    assert "correctness: OK" in lines
    assert any(line.startswith("load average") for line in lines), result.stdout

    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "imago-qcow2-write"
    assert summary["correct"] is True
    assert summary["failures"] == []
    assert summary["config"]["quick"] is True
    for key in RATIO_LINES.values():
        entry = summary["ratios"][key]
        assert set(entry) >= {"ratio", "median_ratio", "target", "meets_target", "imago_seconds", "reference_seconds"}
        assert entry["ratio"] > 0
    assert summary["ratios"]["sequential_write"]["target"] == 1.25
    assert summary["ratios"]["zlib_compressed_write"]["target"] == 0.70
    for group in ("sequential", "zlib", "zstd"):
        image = summary["images"][group]
        assert image["sha256_imago_read_back"] == image["sha256_source"]
        assert image["qemu_img_compare"] == "Images are identical."
        assert image["qemu_img_check"]["check-errors"] == 0
        assert len(summary["results"][group]["imago"]["seconds"]) == summary["config"]["repeat"]
    # imago runs twice in the sequential group: without flushes (as qemu-img) and with them.
    assert len(summary["results"]["sequential"]["imago flushing"]["seconds"]) == summary["config"]["repeat"]
    for compression in ("zlib", "zstd"):
        check = summary["images"][compression]["qemu_img_check"]
        assert check["compressed-clusters"] == check["allocated-clusters"] > 0
    # The temporary files are removed again.
    assert list(tmp_path.iterdir()) == []


def test_bench_qcow2_write_no_qemu(tmp_path: Path) -> None:
    small = ["--size", "4M", "--compressed-size", "2M", "--compressed-request", "1M", "--repeat", "1", "--no-sync"]
    result = run_bench(tmp_path, "--no-qemu", *small)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "correctness: OK" in lines
    assert any(line.startswith("NOTE: qemu-img reference runs skipped") for line in lines), result.stdout
    summary = json.loads(lines[-1])
    assert summary["correct"] is True
    assert summary["ratios"]["sequential_write"] is None
    assert summary["images"]["zlib"]["sha256_imago_read_back"] == summary["images"]["zlib"]["sha256_source"]
    assert list(tmp_path.iterdir()) == []
