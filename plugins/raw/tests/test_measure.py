"""``Raw.create_builder(...).measure()``: qemu-img measure -O raw's numbers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import imago
from imago import Measurement, Storage, StorageCreateOptions
from imago_raw import Raw


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    """A storage for the builder (measuring never writes to it)."""
    created = imago.storage_driver("file").create_sync(
        StorageCreateOptions(filename=tmp_path / "unused", overwrite=True)
    )
    yield created
    imago.runtime.run_sync(created.close())


@pytest.mark.parametrize("size", [0, 1, 511, 1000, 1 << 20, (3 << 40) + 5])
def test_measure_matches_qemu(storage: Storage, size: int) -> None:
    done = subprocess.run(
        ["qemu-img", "measure", "--output=json", "-O", "raw", "--size", str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    builder = Raw.create_builder(storage).size(size)
    assert builder.measure(None).to_json() == json.loads(done.stdout)
    # A source's data does not change it: a raw file holds every byte of the disk.
    assert (
        builder.measure([(0, 1)]) == builder.measure(None) == Measurement(-(-size // 512) * 512, -(-size // 512) * 512)
    )
