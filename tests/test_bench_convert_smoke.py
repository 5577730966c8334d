"""Smoke test of bench/bench_convert.py: it runs every case, imago's outputs match their sources.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

from pathlib import Path

from .bench_run import run_quick


def test_bench_convert_quick(tmp_path: Path) -> None:
    summary = run_quick("bench_convert.py", tmp_path)
    assert summary["quick"] is True
    results = summary["directories"][str(tmp_path)]
    assert set(results) == {
        "qcow2-to-raw",
        "raw-to-qcow2",
        "compress-zlib",
        "compress-zstd",
        "read-compressed",
        "sparse-1t-to-raw",
    }
    for entry in results.values():
        assert entry["same_content"] is True
        assert entry["imago_seconds"] > 0
        assert entry["qemu_img_seconds"] > 0
    assert results["read-compressed"]["qemu_img_bench_bytes_per_second"] > 0
    for case in ("qcow2-to-raw", "raw-to-qcow2"):  # the bare copy runs beside the copy cases
        assert results[case]["floor_seconds"] > 0
        assert results[case]["floor_ratio"] > 0
    assert list(tmp_path.iterdir()) == []  # the images are removed again


def test_bench_convert_selected_cases(tmp_path: Path) -> None:
    """``--case`` runs only the cases named (and the sparse case's reference, qcow2-to-raw)."""
    summary = run_quick("bench_convert.py", tmp_path, "--case", "sparse-1t-to-raw")
    results = summary["directories"][str(tmp_path)]
    assert set(results) == {"qcow2-to-raw", "sparse-1t-to-raw"}
    assert results["sparse-1t-to-raw"]["vs_imago_full"] > 0
    assert list(tmp_path.iterdir()) == []
