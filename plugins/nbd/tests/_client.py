"""Helpers for the client tests: opening the ``nbd`` driver, reading everything, maps compared with nbdinfo."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

from imago import StorageOpenOptions, runtime
from imago_nbd.client import Nbd

from ._peers import tool


def open_nbd(uri: str, *, writable: bool = False, **driver_options: Any) -> Nbd:
    """The ``nbd`` storage for *uri*."""
    return Nbd.open_sync(
        StorageOpenOptions(filename=uri, writable=writable, driver="nbd", driver_options=driver_options)
    )


def read_all(storage: Nbd) -> bytes:
    """Every byte of the export, through the blocking path."""
    buf = bytearray(storage.size)
    storage.readv_inline([memoryview(buf)], 0)
    return bytes(buf)


def extents(storage: Nbd) -> list[tuple[int, int, bool]]:
    """The export as (start, end, is_data) runs from ``data_extent``, adjacent runs merged."""
    runs: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < storage.size:
        is_data, run = runtime.run_sync(storage.data_extent(offset, storage.size - offset))
        assert 1 <= run <= storage.size - offset
        if runs and runs[-1][2] == is_data:
            runs[-1] = (runs[-1][0], offset + run, is_data)
        else:
            runs.append((offset, offset + run, is_data))
        offset += run
    return runs


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    """``nbdinfo --map`` of *uri* as (start, end, is_data) runs: a hole is "hole,zero" (flags 3)."""
    done = subprocess.run(
        [tool("nbdinfo"), "--map", "--json", uri], capture_output=True, text=True, check=True, timeout=20
    )
    runs: list[tuple[int, int, bool]] = []
    for entry in json.loads(done.stdout):
        start, end = entry["offset"], entry["offset"] + entry["length"]
        is_data = entry["type"] & 3 != 3
        if runs and runs[-1][2] == is_data:
            runs[-1] = (runs[-1][0], end, is_data)
        else:
            runs.append((start, end, is_data))
    return runs


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """*data* in pieces of *size* bytes."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
