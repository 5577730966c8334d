"""``Qcow2.create_builder(...).measure()``: qemu-img measure's numbers for every option combination."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import InvalidOptionError, Measurement, Storage, StorageCreateOptions
from imago_qcow2.measure import data_clusters_touched

_SIZES = (0, 1000, 10 << 20, 5 << 40)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    """A storage for the builders (measuring never writes to it)."""
    created = imago.storage_driver("file").create_sync(
        StorageCreateOptions(filename=tmp_path / "unused", overwrite=True)
    )
    yield created
    imago.runtime.run_sync(created.close())


def _builder(storage: Storage, size: int, options: dict[str, Any]) -> imago.FormatCreateBuilder[Any]:
    builder = imago.format_driver("qcow2").create_builder(storage)
    builder.size(size)
    for name, value in options.items():
        builder.set_option(name, value)
    return builder


def _qemu(size: int, options: dict[str, Any]) -> dict[str, Any] | None:
    """qemu-img measure's JSON, or ``None`` when it refuses the options."""
    text = ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in options.items())
    args: Sequence[str] = ("qemu-img", "measure", "--output=json", "-O", "qcow2", "--size", str(size))
    done = subprocess.run([*args, *(("-o", text) if text else ())], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        assert "too large" in done.stderr, done.stderr
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _imago(storage: Storage, size: int, options: dict[str, Any]) -> dict[str, Any] | None:
    """imago's JSON, or ``None`` when it refuses the size (the only refusal these options meet)."""
    builder = _builder(storage, size, options)
    try:
        return builder.measure(None).to_json()
    except InvalidOptionError as error:
        if error.option != "size":
            raise
        return None


@pytest.mark.parametrize(
    ("cluster_size", "extended_l2"), [(512, False), (4096, False), (16384, True), (65536, False), (2 << 20, True)]
)
def test_size_only_matches_qemu(storage: Storage, cluster_size: int, extended_l2: bool) -> None:
    for size, refcount_bits, preallocation in itertools.product(_SIZES, (1, 16, 64), ("off", "metadata", "full")):
        options = {
            "cluster_size": cluster_size,
            "extended_l2": extended_l2,
            "refcount_bits": refcount_bits,
            "preallocation": preallocation,
        }
        assert _imago(storage, size, options) == _qemu(size, options), options


def test_backing_file_and_compat(storage: Storage) -> None:
    for options in ({"backing_file": "b.qcow2"}, {"compat": "0.10"}, {"compat": "1.1", "lazy_refcounts": True}):
        assert _imago(storage, 3 << 20, options) == _qemu(3 << 20, options)


def test_data_ranges_count_each_target_cluster_once(storage: Storage) -> None:
    builder = _builder(storage, 1 << 20, {"cluster_size": 65536})
    base = builder.measure(None)
    # Two ranges in one cluster, one straddling two clusters, one at the very end.
    data = [(0, 10), (100, 10), (65536 * 3 - 1, 2), ((1 << 20) - 1, 1)]
    assert data_clusters_touched(data, 65536) == 4 * 65536
    measured = builder.measure(data)
    assert measured == Measurement(base.required + 4 * 65536, base.fully_allocated, 0)
    with_backing = _builder(storage, 1 << 20, {"backing_file": "b.qcow2"}).measure([(0, 1)])
    assert with_backing.required == with_backing.fully_allocated


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"cluster_size": 4096, "extended_l2": True}, "extended_l2"),
        ({"compat": "0.10", "refcount_bits": 8}, "refcount_bits"),
        ({"cluster_size": 512}, "size"),
    ],
)
def test_invalid_combinations_name_the_option(storage: Storage, options: dict[str, Any], option: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        _builder(storage, 1 << 62, options).measure(None)
    assert caught.value.option == option
