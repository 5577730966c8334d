"""Smoke test of bench/bench_compressed.py: every case runs and imago's outputs match their source.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

from pathlib import Path

from .bench_run import run_quick


def test_bench_compressed_quick(tmp_path: Path) -> None:
    summary = run_quick("bench_compressed.py", tmp_path)
    assert set(summary) >= {"codec", "write-zlib", "read-zlib", "write-zstd", "read-zstd"}
    for case in ("write-zlib", "read-zlib", "write-zstd", "read-zstd"):
        assert summary[case]["same_content"] is True
        assert summary[case]["seconds"] > 0
    assert summary["codec"]["deflate_module"] in {"isal.isal_zlib", "zlib_ng.zlib_ng", "zlib"}
    # The work directory is removed.
    assert list(tmp_path.iterdir()) == []
