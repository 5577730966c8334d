"""Smoke test of bench/bench_vmdk.py: every case runs and every image read or written checks out.

Timing figures are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

from pathlib import Path

from .bench_run import run_quick


def test_bench_vmdk_quick(tmp_path: Path) -> None:
    summary = run_quick("bench_vmdk.py", tmp_path)
    assert summary["failures"] == []
    (figures,) = summary["dirs"]
    assert figures["dir"] == str(tmp_path)
    assert figures["read"]["imago_seconds"] > 0
    assert figures["read"]["bare_seconds"] > 0
    stream = figures["stream"]
    for key in ("imago_seconds", "qemu_seconds", "library_seconds"):
        assert stream[key] > 0, key
    assert stream["library_bytes"] < 16 << 20  # compressed
    # The work directory is removed.
    assert list(tmp_path.iterdir()) == []
