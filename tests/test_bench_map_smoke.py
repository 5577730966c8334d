"""Smoke test of bench/bench_map.py: it runs, imago and qemu-img print the same map, it reports.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

from pathlib import Path

from .bench_run import run_quick


def test_bench_map_quick(tmp_path: Path) -> None:
    summary = run_quick("bench_map.py", tmp_path)
    assert summary["quick"] is True
    assert set(summary["results"]) == {f"sparse@{tmp_path}", f"full@{tmp_path}"}
    for entry in summary["results"].values():
        assert entry["same_output"] is True
        assert entry["entries"] > 0
        assert entry["imago_seconds"] > 0
        assert entry["qemu_img_seconds"] > 0
    assert list(tmp_path.iterdir()) == []  # the images are removed again
