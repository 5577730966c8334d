"""Smoke test of bench/bench_qcow2_check.py: it runs, checks that imago and qemu-img agree, reports.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

from pathlib import Path

from .bench_run import run_quick


def test_bench_qcow2_check_quick(tmp_path: Path) -> None:
    summary = run_quick("bench_qcow2_check.py", tmp_path)
    assert summary["quick"] is True
    assert set(summary["results"]) == {"preallocated", "sparse", "compressed"}
    for entry in summary["results"].values():
        assert entry["imago_seconds"] > 0
        assert entry["qemu_img_seconds"] > 0
        assert entry["allocated_clusters"] > 0
    assert list(tmp_path.iterdir()) == []  # the images are removed again
