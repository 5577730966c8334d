"""``File.map_read`` and ``File.data_extent``: views of the file's pages, and its holes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from imago import StorageOpenOptions, runtime
from imago_file import File
from imago_file import storage as storage_module


def test_a_mapped_range_shows_the_file(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    with_storage = File.open_sync(StorageOpenOptions(filename=str(tmp_path / "f")))
    try:
        view = with_storage.map_read(70_000, 100_000)
        assert view is not None
        assert view.readonly
        assert bytes(view) == data[70_000:170_000]
        assert with_storage.map_read(len(data) - 10, 11) is None
        assert with_storage.map_read(-1, 5) is None
    finally:
        runtime.run_sync(with_storage.close())


def test_files_others_may_change_are_not_mapped(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 8192)
    shared = File.open_sync(StorageOpenOptions(filename=str(tmp_path / "f"), force_share=True))
    try:
        assert shared.map_read(0, 4096) is None  # a writer could shrink it under the map: SIGBUS
    finally:
        runtime.run_sync(shared.close())


def test_data_extents_follow_the_files_holes(tmp_path: Path) -> None:
    block = 1 << 20
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(8 * block)
        f.seek(2 * block)
        f.write(b"d" * block)
        f.seek(5 * block)
        f.write(b"e" * block)
    storage = File.open_sync(StorageOpenOptions(filename=str(tmp_path / "sparse")))
    try:
        assert runtime.run_sync(storage.data_extent(0, 8 * block)) == (False, 2 * block)
        assert runtime.run_sync(storage.data_extent(2 * block, 8 * block)) == (True, block)
        assert runtime.run_sync(storage.data_extent(2 * block + 5, 10)) == (True, 10)
        assert runtime.run_sync(storage.data_extent(3 * block, 5 * block)) == (False, 2 * block)
        assert runtime.run_sync(storage.data_extent(6 * block, 2 * block)) == (False, 2 * block)  # hole to EOF
    finally:
        runtime.run_sync(storage.close())


def test_ranges_come_from_a_window_that_moves_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential ranges share one mapped window; ranges behind it, across it or past a shrink still read right."""
    monkeypatch.setattr(storage_module, "_WINDOW", 64 << 10)
    data = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(data)
    storage = File.open_sync(StorageOpenOptions(filename=str(tmp_path / "f"), writable=True))
    try:
        for offset, length in (
            (0, 4096),
            (5000, 30_000),  # the same window
            (200_000, 10_000),  # a window further on
            (100_000, 8192),  # behind the window: a map of its own
            (300_000, 200_000),  # longer than a window
            (260_000, 70_000),  # across a window's end
        ):
            view = storage.map_read(offset, length)
            assert view is not None, (offset, length)
            assert bytes(view) == data[offset : offset + length], (offset, length)
        runtime.run_sync(storage.resize(200_000))
        assert storage.map_read(150_000, 60_000) is None  # past the new end
        view = storage.map_read(150_000, 50_000)
        assert view is not None
        assert bytes(view) == data[150_000:200_000]
        runtime.run_sync(storage.writev([memoryview(b"grown" * 1000)], 200_000))
        view = storage.map_read(195_000, 10_000)  # the file grew past the window it had
        assert view is not None
        assert bytes(view) == data[195_000:200_000] + b"grown" * 1000
    finally:
        runtime.run_sync(storage.close())


def test_threads_map_ranges_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``imago convert`` maps and scans on I/O threads: concurrent callers each get their own bytes."""
    monkeypatch.setattr(storage_module, "_WINDOW", 64 << 10)
    data = os.urandom(4 << 20)
    (tmp_path / "f").write_bytes(data)
    storage = File.open_sync(StorageOpenOptions(filename=str(tmp_path / "f")))
    wrong: list[int] = []

    def read(first: int) -> None:
        for offset in range(first, len(data) - 40_000, 37_000 * 4):
            view = storage.map_read(offset, 40_000)
            if view is None or bytes(view) != data[offset : offset + 40_000]:
                wrong.append(offset)

    try:
        threads = [threading.Thread(target=read, args=(37_000 * k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not wrong
    finally:
        runtime.run_sync(storage.close())
