"""``File.map_read`` and ``File.data_extent``: views of the file's pages, and its holes."""

from __future__ import annotations

import os
from pathlib import Path

from imago import StorageOpenOptions, runtime
from imago_file import File


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
