"""Fixtures shared by the ``file`` storage driver's tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imago import StorageCreateOptions, StorageOpenOptions, runtime
from imago_file import File


@pytest.fixture
def storages() -> Iterator[list[File]]:
    """Storages to close after the test (closing twice is harmless)."""
    opened: list[File] = []
    yield opened
    for storage in opened:
        runtime.run_sync(storage.close())


@pytest.fixture
def open_file(storages: list[File]) -> Callable[..., File]:
    """``open_file(path, writable=..., direct=..., force_share=...)``: ``File.open_sync``, closed after the test."""

    def open_(
        path: str | os.PathLike[str], *, writable: bool = False, direct: bool = False, force_share: bool = False
    ) -> File:
        options = StorageOpenOptions(filename=path, writable=writable, direct=direct, force_share=force_share)
        storage = File.open_sync(options)
        storages.append(storage)
        return storage

    return open_


@pytest.fixture
def create_file(storages: list[File]) -> Callable[..., File]:
    """``create_file(path, **create_options)``: ``File.create_sync``, closed after the test."""

    def create(path: str | os.PathLike[str], **options: object) -> File:
        storage = File.create_sync(StorageCreateOptions(filename=path, **options))  # type: ignore[arg-type]
        storages.append(storage)
        return storage

    return create


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(data, name="image.bin")``: write *data* to a new file in ``tmp_path``."""

    def make(data: bytes, name: str = "image.bin") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make
