"""qcow2 creation: images made by imago, judged by qemu-img and qemu-io.

Each image of the matrix is created twice, by imago (through the builder or ``imago.create``)
and by ``qemu-img create`` with the same options, then:

* ``qemu-img check`` finds no errors and no leaks;
* ``qemu-img info`` reports the requested options (and exactly what it reports for qemu's image);
* the header matches qemu's field by field (sizes, L1 size, features, refcount order, names),
  while the layout (table offsets) may differ; the file size is within a few clusters of qemu's;
* the disk reads as zeroes (or as its backing file), through ``qemu-img compare`` and imago;
* ``qemu-img map`` shows the same allocation as for qemu's image, and preallocated space is
  really reserved in the file that holds the data.

Then qemu-io writes to imago-made images, existing files are emptied, and bad options raise
:class:`imago.InvalidOptionError` without touching an existing file. qemu-img and qemu-io are
required: without them these tests fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import (
    DenyImplicitOpenGate,
    InvalidOptionError,
    PermissiveImplicitOpenGate,
    PreallocateMode,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
)
from imago_file import File
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB

KiB = 1 << 10
GiB = 1 << 30
TiB = 1 << 40
IMAGE = "img.qcow2"
DATA = "img.data"
# Larger disks are checked by samples (start, middle, end) instead of read whole through imago.
FULL_READ_LIMIT = 64 * MiB
SAMPLE = 1 * MiB


# --- the cases -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One image to create.

    *options* use ``qemu-img create -o`` names; *backing* is the format of a backing file
    (``base.<format>``, *base_size* bytes of data) or None. *api* says how imago creates it:
    ``builder`` (the builder's methods), ``create`` (``imago.create`` with qemu-img's names) or
    ``names`` (``imago.create`` with the builder's method names where they differ).
    """

    id: str
    size: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    backing: str | None = None
    base_size: int = 0
    api: str = "builder"

    @property
    def cluster_size(self) -> int:
        return int(self.options.get("cluster_size", 64 * KiB))

    @property
    def extended_l2(self) -> bool:
        return bool(self.options.get("extended_l2", False))

    @property
    def v3(self) -> bool:
        return self.options.get("compat", "1.1") in ("1.1", "v3")

    @property
    def preallocation(self) -> str:
        return str(self.options.get("preallocation", "off"))

    @property
    def data_file(self) -> str | None:
        return self.options.get("data_file")

    @property
    def backing_name(self) -> str | None:
        return None if self.backing is None else f"base.{self.backing}"


_APIS = ("builder", "create")


def _case(id: str, size: int, *, backing: str | None = None, base_size: int = 0, **options: Any) -> Case:
    return Case(id=id, size=size, options=options, backing=backing, base_size=base_size)


def _cases() -> list[Case]:
    single = [
        _case("defaults", 4 * MiB),
        _case("size-0", 0),
        _case("size-odd-clusters", 5 * MiB + 512),
        *(_case(f"cluster-{size}", 4 * MiB, cluster_size=size) for size in (512, 4 * KiB, 64 * KiB)),
        _case("cluster-2m", 16 * MiB, cluster_size=2 * MiB),
        *(_case(f"refcount-{bits}", 4 * MiB, refcount_bits=bits) for bits in (1, 2, 4, 8, 16, 32, 64)),
        *(_case(f"compat-{level}", 4 * MiB, compat=level) for level in ("0.10", "v2", "1.1", "v3")),
        _case("lazy-refcounts", 4 * MiB, lazy_refcounts=True),
        _case("lazy-refcounts-off", 4 * MiB, lazy_refcounts=False),
        _case("zlib", 4 * MiB, compression_type="zlib"),
        _case("zstd", 4 * MiB, compression_type="zstd"),
        _case("extended-l2", 4 * MiB, extended_l2=True),
        _case("extended-l2-off", 4 * MiB, extended_l2=False),
        *(_case(f"prealloc-{mode}", 8 * MiB, preallocation=mode) for mode in ("off", "metadata", "falloc", "full")),
        _case("backing-qcow2", 4 * MiB, backing="qcow2", base_size=4 * MiB),
        _case("backing-raw-shorter", 4 * MiB, backing="raw", base_size=3 * MiB),
        _case("data-file", 4 * MiB, data_file=DATA),
        _case("data-file-raw", 4 * MiB, data_file=DATA, data_file_raw=True),
        _case("data-file-raw-off", 4 * MiB, data_file=DATA, data_file_raw=False),
    ]
    combos = [
        # Many refcount blocks: 1-bit refcounts of 512-byte clusters cover 2 MiB per block.
        _case("c512-rc1-metadata", 16 * MiB, cluster_size=512, refcount_bits=1, preallocation="metadata"),
        _case("c512-rc64-full", 4 * MiB, cluster_size=512, refcount_bits=64, preallocation="full"),
        _case("c2m-rc1-falloc", 16 * MiB, cluster_size=2 * MiB, refcount_bits=1, preallocation="falloc"),
        _case("c2m-rc64-metadata", 16 * MiB, cluster_size=2 * MiB, refcount_bits=64, preallocation="metadata"),
        _case("c4k-rc2-metadata-64m", 64 * MiB, cluster_size=4 * KiB, refcount_bits=2, preallocation="metadata"),
        _case(
            "c16k-l2ext-rc4-metadata",
            8 * MiB,
            cluster_size=16 * KiB,
            extended_l2=True,
            refcount_bits=4,
            preallocation="metadata",
        ),
        _case("v2-c4k-metadata", 8 * MiB, compat="0.10", cluster_size=4 * KiB, preallocation="metadata"),
        _case("v2-c2m-full", 16 * MiB, compat="0.10", cluster_size=2 * MiB, preallocation="full"),
        _case("v2-c512-backing", 4 * MiB, compat="0.10", cluster_size=512, backing="qcow2", base_size=4 * MiB),
        # Preallocation under a backing file: host clusters reserved, subclusters unallocated.
        _case(
            "l2ext-backing-metadata",
            4 * MiB,
            extended_l2=True,
            preallocation="metadata",
            backing="qcow2",
            base_size=4 * MiB,
        ),
        _case(
            "l2ext-c32k-backing-falloc",
            4 * MiB,
            extended_l2=True,
            cluster_size=32 * KiB,
            preallocation="falloc",
            backing="raw",
            base_size=2 * MiB,
        ),
        _case("l2ext-falloc", 4 * MiB, extended_l2=True, preallocation="falloc"),
        _case("l2ext-backing-full", 4 * MiB, extended_l2=True, preallocation="full", backing="raw", base_size=4 * MiB),
        _case(
            "lazy-zstd-rc32-c4k-falloc",
            8 * MiB,
            lazy_refcounts=True,
            compression_type="zstd",
            refcount_bits=32,
            cluster_size=4 * KiB,
            preallocation="falloc",
        ),
        _case("data-file-metadata", 8 * MiB, data_file=DATA, preallocation="metadata"),
        _case("data-file-raw-full", 8 * MiB, data_file=DATA, data_file_raw=True, preallocation="full"),
        _case("data-file-falloc-c4k", 8 * MiB, data_file=DATA, preallocation="falloc", cluster_size=4 * KiB),
        _case(
            "data-file-raw-l2ext-lazy-zstd-rc8-c16k",
            4 * MiB,
            data_file=DATA,
            data_file_raw=True,
            extended_l2=True,
            lazy_refcounts=True,
            compression_type="zstd",
            refcount_bits=8,
            cluster_size=16 * KiB,
        ),
        _case("data-file-backing", 4 * MiB, data_file=DATA, backing="qcow2", base_size=2 * MiB),
        _case("metadata-odd-size", 6 * MiB + 512, preallocation="metadata"),
        _case("full-odd-size-c4k", 3 * MiB + 1536, cluster_size=4 * KiB, preallocation="full"),
        # The largest disk 512-byte clusters allow (an L1 table of 32 MiB), and a big sparse one.
        _case("c512-max-size", 128 * GiB, cluster_size=512),
        _case("l2ext-c16k-1t", TiB, cluster_size=16 * KiB, extended_l2=True),
    ]
    # Alternate between the builder and imago.create (qemu-img's option names).
    cases = [dataclasses.replace(case, api=_APIS[i % 2]) for i, case in enumerate([*single, *combos])]
    # imago.create with the builder's method names (refcount_width, preallocate).
    names = [
        _case("rc8-metadata", 4 * MiB, refcount_bits=8, preallocation="metadata"),
        _case("rc1-c512-full", 2 * MiB, refcount_bits=1, cluster_size=512, preallocation="full"),
    ]
    return cases + [dataclasses.replace(case, api="names") for case in names]


CASES = _cases()


def case_param(case: Case) -> Any:
    return pytest.param(case, id=f"{case.api}-{case.id}")


def find_case(name: str) -> Case:
    return next(case for case in CASES if case.id == name)


# --- creating ------------------------------------------------------------------------------------


def _builder_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    renames = {"refcount_bits": "refcount_width", "preallocation": "preallocate"}
    return {renames.get(key, key): value for key, value in options.items()}


def close_storage(storage: imago.Storage) -> None:
    imago.runtime.run_sync(storage.close())


def apply_builder(builder: Any, size: int | None, options: dict[str, Any]) -> Any:
    """Set *options* (qemu-img names) through the builder's methods where one fits."""
    options = dict(options)
    if size is not None:
        builder = builder.size(size)
    methods = {
        "cluster_size": "cluster_size",
        "refcount_bits": "refcount_width",
        "compat": "compat",
        "lazy_refcounts": "lazy_refcounts",
        "compression_type": "compression_type",
        "extended_l2": "extended_l2",
    }
    for key, method in methods.items():
        if key in options:
            builder = getattr(builder, method)(options.pop(key))
    if "backing_file" in options and "backing_format" in options:
        builder = builder.backing(options.pop("backing_file"), options.pop("backing_format"))
    if "data_file" in options:
        builder = builder.data_file(options.pop("data_file"), raw=options.pop("data_file_raw", False))
    if "preallocation" in options:
        value = options.pop("preallocation")
        with contextlib.suppress(InvalidOptionError):  # a bad name goes to the builder as it is
            value = PreallocateMode.parse(value)
        builder = builder.preallocate(value)
    for key, value in options.items():  # what no single-argument method expresses
        builder = builder.set_option(key, value)
    return builder


def create_with_imago(path: Path, case: Case) -> None:
    options = dict(case.options)
    if case.backing is not None:
        options["backing_file"] = case.backing_name
        options["backing_format"] = case.backing
    if case.api == "builder":
        storage = File.create_sync(StorageCreateOptions(filename=path, overwrite=True))
        try:
            apply_builder(Qcow2.create_builder(storage), case.size, options).create_sync()
        finally:
            close_storage(storage)
    elif case.api == "create":
        imago.create(path, format="qcow2", size=case.size, **options)
    else:
        imago.create(path, "qcow2", case.size, **_builder_kwargs(options))


def create_with_qemu(path: Path, case: Case) -> None:
    _qemu.create(
        path.name,
        case.size,
        options=case.options,
        backing=case.backing_name,
        backing_fmt=case.backing,
        cwd=path.parent,
    )


def make_base(directory: Path, case: Case) -> bytes:
    """``base.<format>`` in *directory*: *base_size* bytes of data (with a hole of zeroes)."""
    assert case.backing is not None
    content = bytearray(_qemu.random_bytes(case.base_size, seed=case.base_size))
    content[case.base_size // 3 : case.base_size // 3 + 192 * KiB] = bytes(192 * KiB)
    raw = directory / "base.raw"
    raw.write_bytes(content)
    if case.backing == "qcow2":
        _qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", "base.raw", "base.qcow2", cwd=directory)
        raw.unlink()
    return bytes(content)


# --- checking ------------------------------------------------------------------------------------


def check_clean(image: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` (in the image's directory): no errors, no leaks."""
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", image.name],
        capture_output=True,
        text=True,
        cwd=image.parent,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"qemu-img check {image}: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    for key in ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed"):
        assert result.get(key, 0) == 0, f"qemu-img check {image}: {key} = {result[key]}\n{proc.stdout}"
    # The second oracle: imago's own check says the same.
    _qemu.assert_imago_check_agrees(image, result, proc.returncode, proc.stderr)
    return result


def expected_format_data(case: Case) -> dict[str, Any]:
    """``format-specific.data`` of ``qemu-img info`` for the requested options."""
    data: dict[str, Any] = {
        "compat": "1.1" if case.v3 else "0.10",
        "compression-type": case.options.get("compression_type", "zlib"),
        "refcount-bits": case.options.get("refcount_bits", 16),
    }
    if case.v3:
        data["lazy-refcounts"] = bool(case.options.get("lazy_refcounts", False))
        data["corrupt"] = False
        data["extended-l2"] = case.extended_l2
        if case.data_file is not None:
            data["data-file"] = case.data_file
            data["data-file-raw"] = bool(case.options.get("data_file_raw", False))
    return data


def assert_info(ours: Path, theirs: Path, case: Case) -> None:
    mine = _qemu.info(ours.name, cwd=ours.parent)
    reference = _qemu.info(theirs.name, cwd=theirs.parent)
    expected = {
        "virtual-size": case.size,
        "cluster-size": case.cluster_size,
        "format": "qcow2",
        "dirty-flag": False,
        "backing-filename": case.backing_name,
        "backing-filename-format": case.backing,
    }
    for key, value in expected.items():
        assert reference.get(key) == value, f"test expectation for {key} is wrong: qemu says {reference.get(key)!r}"
        assert mine.get(key) == value, f"{key}: qemu-img info says {mine.get(key)!r}, requested {value!r}"
    assert mine["format-specific"]["type"] == "qcow2"
    data = expected_format_data(case)
    assert reference["format-specific"]["data"] == data, "test expectation is wrong"
    assert mine["format-specific"]["data"] == data


@dataclasses.dataclass(frozen=True)
class RawHeader:
    """The header fields of a qcow2 file, read without imago."""

    fields: dict[str, int]
    backing_file: bytes
    extensions: dict[int, bytes]


EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
_V2_FIELDS = [
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
]


def read_raw_header(path: Path) -> RawHeader:
    with path.open("rb") as f:
        data = f.read(2 * MiB)
    magic = data[:4]
    assert magic == b"QFI\xfb", f"{path}: bad magic {magic!r}"
    values = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
    fields = dict(zip(_V2_FIELDS, values, strict=True))
    if fields["version"] >= 3:
        incompat, compat, autoclear, refcount_order, header_length = struct.unpack_from(">QQQII", data, 72)
        compression = data[104] if header_length > 104 else 0
    else:
        incompat = compat = autoclear = 0
        refcount_order, header_length, compression = 4, 72, 0
    fields.update(
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        compression_type=compression,
    )
    cluster_size = 1 << fields["cluster_bits"]
    extensions: dict[int, bytes] = {}
    offset = header_length
    while True:
        assert offset + 8 <= cluster_size, f"{path}: header extensions run past the first cluster"
        ext_type, length = struct.unpack_from(">II", data, offset)
        if ext_type == 0:
            break
        assert ext_type not in extensions, f"{path}: header extension {ext_type:#x} twice"
        extensions[ext_type] = data[offset + 8 : offset + 8 + length]
        offset += 8 + (length + 7) // 8 * 8
    backing = b""
    if fields["backing_file_offset"]:
        start = fields["backing_file_offset"]
        assert start >= offset + 8, f"{path}: backing file name overlaps the header extensions"
        assert start + fields["backing_file_size"] <= cluster_size, f"{path}: backing file name past cluster 0"
        backing = data[start : start + fields["backing_file_size"]]
    return RawHeader(fields, backing, extensions)


def expected_l1_size(case: Case) -> int:
    entries_per_l2 = case.cluster_size // (16 if case.extended_l2 else 8)
    return -(-case.size // (entries_per_l2 * case.cluster_size))


def assert_header_like_qemu(ours: Path, theirs: Path, case: Case) -> None:
    mine, reference = read_raw_header(ours), read_raw_header(theirs)
    assert mine.fields["l1_size"] == expected_l1_size(case)
    compared = [
        "version",
        "backing_file_size",
        "cluster_bits",
        "size",
        "crypt_method",
        "l1_size",
        "nb_snapshots",
        "snapshots_offset",
        "incompatible_features",
        "compatible_features",
        "autoclear_features",
        "refcount_order",
        "compression_type",
    ]
    differences = {
        name: (mine.fields[name], reference.fields[name])
        for name in compared
        if mine.fields[name] != reference.fields[name]
    }
    assert not differences, f"header fields (imago, qemu) differ: {differences}"
    assert mine.backing_file == reference.backing_file
    for ext in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
        assert mine.extensions.get(ext) == reference.extensions.get(ext), f"header extension {ext:#x}"
    cluster_size = case.cluster_size
    for name in ("l1_table_offset", "refcount_table_offset"):
        offset = mine.fields[name]
        assert offset > 0 or (name == "l1_table_offset" and mine.fields["l1_size"] == 0), name
        assert offset % cluster_size == 0, f"{name} {offset:#x} is not cluster-aligned"


def file_sizes(directory: Path, case: Case) -> list[tuple[str, int]]:
    names = [IMAGE] + ([case.data_file] if case.data_file else [])
    return [(name, (directory / name).stat().st_size) for name in names]


def assert_file_sizes_like_qemu(ours: Path, theirs: Path, case: Case) -> None:
    # Layouts may differ (where the tables go, how many refcount blocks are reserved), not by much.
    slack = 8 * case.cluster_size
    for (name, mine), (_, reference) in zip(
        file_sizes(ours.parent, case), file_sizes(theirs.parent, case), strict=True
    ):
        assert abs(mine - reference) <= slack, f"{name}: {mine} bytes, qemu-img makes {reference}"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_allocation(ours: Path, theirs: Path, case: Case) -> None:
    """falloc/full reserve the disk's space where the data goes; off/metadata do not."""
    data_name = case.data_file or IMAGE
    mine, reference = allocated(ours.parent / data_name), allocated(theirs.parent / data_name)
    if case.preallocation in ("falloc", "full"):
        assert reference >= case.size, "test expectation is wrong"
        assert mine >= case.size, f"{data_name}: {mine} bytes allocated for a {case.preallocation} disk of {case.size}"
    for name in {IMAGE, data_name}:
        mine, reference = allocated(ours.parent / name), allocated(theirs.parent / name)
        slack = 4 * case.cluster_size + 64 * KiB
        assert mine <= reference + slack, f"{name}: {mine} bytes allocated, qemu-img's image {reference}"


def map_runs(image: Path, *, zero_flags: bool) -> list[tuple[int, int, int, bool, bool, bool | None]]:
    """``qemu-img map`` as merged ``(start, end, depth, present, data, zero)`` runs, offsets ignored."""
    runs: list[tuple[int, int, int, bool, bool, bool | None]] = []
    for e in _qemu.qemu_map(image.name, cwd=image.parent):
        run = (
            e["start"],
            e["start"] + e["length"],
            e["depth"],
            e["present"],
            e["data"],
            e["zero"] if zero_flags else None,
        )
        if runs and runs[-1][1] == run[0] and runs[-1][2:] == run[2:]:
            runs[-1] = (runs[-1][0], *run[1:])
        else:
            runs.append(run)
    return runs


def assert_map_like_qemu(ours: Path, theirs: Path, case: Case) -> None:
    # qemu reports host holes as zero at the file system's block size (4 KiB): smaller clusters
    # share blocks with metadata, and a last partial cluster may end the file, so there the zero
    # flags depend on the layout. So they do for external data files: qemu writes the first block
    # of a data file it creates (to probe its alignment), and its map then reports no zeroes.
    zero_flags = case.cluster_size >= 4 * KiB and case.size % case.cluster_size == 0 and case.data_file is None
    mine = map_runs(ours, zero_flags=zero_flags)
    reference = map_runs(theirs, zero_flags=zero_flags)
    assert mine == reference, f"qemu-img map of imago's image:\n{mine}\nof qemu-img's:\n{reference}"


def assert_same_disk_by_qemu(image: Path, case: Case) -> None:
    """``qemu-img compare`` with a raw disk of zeroes, or with the backing file."""
    if case.backing is not None:
        _qemu.qemu_img(
            "compare", "-f", "qcow2", "-F", case.backing, image.name, case.backing_name or "", cwd=image.parent
        )
        return
    zeros = image.parent / "zeros.raw"
    with zeros.open("wb") as f:
        f.truncate(case.size)
    _qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", image.name, str(zeros), cwd=image.parent)
    zeros.unlink()


def ranges_to_read(size: int) -> Iterator[tuple[int, int]]:
    if size <= FULL_READ_LIMIT:
        step = 4 * MiB
        for offset in range(0, size, step):
            yield offset, min(step, size - offset)
    else:
        middle = size // 2 // SAMPLE * SAMPLE
        yield from ((0, SAMPLE), (middle - 4096, SAMPLE), (size - SAMPLE, SAMPLE))


def expected_disk(case: Case, base: bytes | None) -> bytes | None:
    """The whole disk's content (None for disks too large to build: they read as zeroes)."""
    if case.size > FULL_READ_LIMIT:
        assert base is None
        return None
    content = bytearray(case.size)
    if base is not None:
        n = min(len(base), case.size)
        content[:n] = base[:n]
    return bytes(content)


def assert_imago_reads(image: Path, expected: bytes | None, size: int) -> None:
    with imago.open(image, format="qcow2", gate=PermissiveImplicitOpenGate()) as disk:
        assert disk.size == size
        for offset, length in ranges_to_read(size):
            got = bytearray(length)
            disk.read(got, offset)
            want = bytes(length) if expected is None else expected[offset : offset + length]
            if got != want:
                first = next(i for i in range(length) if got[i] != want[i])
                raise AssertionError(
                    f"imago reads {bytes(got[first : first + 16]).hex()} at {offset + first:#x}, "
                    f"expected {want[first : first + 16].hex()}"
                )


def prepare(tmp_path: Path, case: Case) -> tuple[Path, Path, bytes | None]:
    """Create the image with imago (``ours/``) and with qemu-img (``theirs/``)."""
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    base = None
    if case.backing is not None:
        base = make_base(ours_dir, case)
        assert case.backing_name is not None
        shutil.copyfile(ours_dir / case.backing_name, theirs_dir / case.backing_name)
    ours, theirs = ours_dir / IMAGE, theirs_dir / IMAGE
    create_with_imago(ours, case)
    create_with_qemu(theirs, case)
    return ours, theirs, base


# --- 1. the matrix -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [case_param(case) for case in CASES])
def test_create_matches_qemu_img(tmp_path: Path, case: Case) -> None:
    ours, theirs, base = prepare(tmp_path, case)
    check_clean(ours)
    assert_info(ours, theirs, case)
    assert_header_like_qemu(ours, theirs, case)
    assert_file_sizes_like_qemu(ours, theirs, case)
    assert_same_disk_by_qemu(ours, case)
    assert_imago_reads(ours, expected_disk(case, base), case.size)
    assert_map_like_qemu(ours, theirs, case)
    assert_allocation(ours, theirs, case)


# --- 2. qemu-io writes to imago's images ----------------------------------------------------------

WRITTEN = [
    "defaults",
    "cluster-512",
    "refcount-1",
    "refcount-64",
    "compat-0.10",
    "lazy-refcounts",
    "extended-l2",
    "prealloc-metadata",
    "prealloc-falloc",
    "backing-raw-shorter",
    "data-file",
    "data-file-raw",
    "c512-rc1-metadata",
    "c2m-rc64-metadata",
    "c16k-l2ext-rc4-metadata",
    "v2-c512-backing",
    "l2ext-backing-metadata",
    "data-file-raw-full",
    "data-file-backing",
    "metadata-odd-size",
]


@pytest.mark.parametrize("case", [case_param(find_case(name)) for name in WRITTEN])
def test_qemu_io_writes_to_created_image(tmp_path: Path, case: Case) -> None:
    ours, _, base = prepare(tmp_path, case)
    size = case.size
    expected = bytearray(expected_disk(case, base) or b"")
    writes = [
        (0, 4 * KiB + 512, 0x11),
        (size // 2 - 1536, 72 * KiB + 1024, 0x22),  # across cluster (and L2 table) boundaries
        (size - 1024, 1024, 0x33),
    ]
    zeroed = (size // 4, 96 * KiB)
    commands = [f"write -P {value:#x} {offset} {length}" for offset, length, value in writes]
    commands.append(f"write -z {zeroed[0]} {zeroed[1]}")
    _qemu.qemu_io(ours.name, *commands, cwd=ours.parent)
    for offset, length, value in writes:
        expected[offset : offset + length] = bytes([value]) * length
    expected[zeroed[0] : zeroed[0] + zeroed[1]] = bytes(zeroed[1])
    reads = [f"read -P {value:#x} {offset} {length}" for offset, length, value in writes]
    reads.append(f"read -P 0 {zeroed[0]} {zeroed[1]}")
    _qemu.qemu_io(ours.name, *reads, cwd=ours.parent)
    check_clean(ours)
    got = _qemu.convert_to_raw(ours, ours.parent / "out.raw", cwd=ours.parent)
    assert got == bytes(expected), "qemu-img convert does not see what qemu-io wrote"
    assert_imago_reads(ours, bytes(expected), size)


# --- 3. existing files are emptied ----------------------------------------------------------------

JUNK = 10 * MiB


def write_junk(path: Path) -> bytes:
    junk = _qemu.random_bytes(JUNK, seed=7)
    path.write_bytes(junk)
    return junk


def test_create_empties_an_existing_file(tmp_path: Path) -> None:
    image = tmp_path / IMAGE
    write_junk(image)
    imago.create(image, format="qcow2", size=1 * MiB)
    check_clean(image)
    assert image.stat().st_size < 1 * MiB
    assert_same_disk_by_qemu(image, Case(id="junk", size=1 * MiB))
    assert_imago_reads(image, bytes(1 * MiB), 1 * MiB)


def test_builder_empties_an_open_storage(tmp_path: Path) -> None:
    image = tmp_path / IMAGE
    write_junk(image)
    storage = File.open_sync(StorageOpenOptions(filename=image, writable=True))
    try:
        Qcow2.create_builder(storage).size(2 * MiB).cluster_size(4096).create_sync()
    finally:
        close_storage(storage)
    check_clean(image)
    assert image.stat().st_size < 1 * MiB
    assert_same_disk_by_qemu(image, Case(id="junk", size=2 * MiB))
    assert_imago_reads(image, bytes(2 * MiB), 2 * MiB)


@pytest.mark.parametrize("raw", [False, True], ids=["data-file", "data-file-raw"])
def test_create_empties_an_existing_data_file(tmp_path: Path, raw: bool) -> None:
    image, data = tmp_path / IMAGE, tmp_path / DATA
    write_junk(image)
    write_junk(data)
    imago.create(image, format="qcow2", size=2 * MiB, data_file=DATA, data_file_raw=raw)
    check_clean(image)
    # qemu-img leaves the data file as long as the disk, zeroes only.
    assert data.stat().st_size == 2 * MiB
    assert data.read_bytes() == bytes(2 * MiB)
    assert_same_disk_by_qemu(image, Case(id="junk", size=2 * MiB, options={"data_file": DATA}))
    assert_imago_reads(image, bytes(2 * MiB), 2 * MiB)


# --- names only, explicit data storages ----------------------------------------------------------


def test_backing_file_is_recorded_not_opened(tmp_path: Path) -> None:
    image = tmp_path / IMAGE
    storage = File.create_sync(StorageCreateOptions(filename=image, overwrite=True))
    try:
        Qcow2.create_builder(storage).size(2 * MiB).backing("later.qcow2", "qcow2").create_sync()
    finally:
        close_storage(storage)
    header = read_raw_header(image)
    assert header.backing_file == b"later.qcow2"
    assert header.extensions[EXT_BACKING_FORMAT] == b"qcow2"
    assert not (tmp_path / "later.qcow2").exists()
    # The backing file appears afterwards; the image then reads through to it.
    _qemu.create(tmp_path / "later.qcow2", 2 * MiB)
    _qemu.qemu_io(tmp_path / "later.qcow2", "write -P 0x5c 64k 64k")
    check_clean(image)
    expected = bytearray(2 * MiB)
    expected[64 * KiB : 128 * KiB] = b"\x5c" * (64 * KiB)
    assert_imago_reads(image, bytes(expected), 2 * MiB)
    _qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", IMAGE, "later.qcow2", cwd=tmp_path)


@pytest.mark.parametrize(
    ("raw", "mode"),
    [(False, PreallocateMode.NONE), (True, PreallocateMode.FULL), (False, PreallocateMode.METADATA)],
    ids=["plain", "raw-full", "metadata"],
)
def test_data_file_on_a_given_storage(tmp_path: Path, raw: bool, mode: PreallocateMode) -> None:
    image = tmp_path / IMAGE
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    size = 4 * MiB
    storage = File.create_sync(StorageCreateOptions(filename=image, overwrite=True))
    data = File.create_sync(StorageCreateOptions(filename=elsewhere / "d.raw", overwrite=True))
    try:
        (
            Qcow2.create_builder(storage)
            .size(size)
            .data_file("d.raw", data_storage=data, raw=raw)
            .preallocate(mode)
            .create_sync()
        )
    finally:
        close_storage(storage)
        close_storage(data)
    assert not (tmp_path / "d.raw").exists(), "a data file was created next to the image besides the given one"
    assert read_raw_header(image).extensions[EXT_DATA_FILE] == b"d.raw"
    if mode is PreallocateMode.FULL:
        assert allocated(elsewhere / "d.raw") >= size
    # Opened with the data storage given explicitly ...
    image_storage = File.open_sync(StorageOpenOptions(filename=image))
    data_storage = File.open_sync(StorageOpenOptions(filename=elsewhere / "d.raw"))
    with SyncFormatAccess(
        Qcow2.builder(image_storage).data_file(data_storage).open_sync(DenyImplicitOpenGate())
    ) as disk:
        got = bytearray(size)
        disk.read(got, 0)
        assert got == bytes(size)
    # ... and by qemu once the data file sits where the header says.
    (elsewhere / "d.raw").rename(tmp_path / "d.raw")
    check_clean(image)
    info = _qemu.info(IMAGE, cwd=tmp_path)["format-specific"]["data"]
    assert (info["data-file"], info["data-file-raw"]) == ("d.raw", raw)
    assert_same_disk_by_qemu(image, Case(id="given", size=size, options={"data_file": "d.raw"}))


# --- 4. misuse -----------------------------------------------------------------------------------

_REFCOUNT = {"refcount_bits", "refcount_width"}
_PREALLOC = {"preallocation", "preallocate"}
_BACKING = {"backing_file", "backing_format", "backing_fmt", "backing"}

# (id, options by qemu-img's names, the names an error may give: the option at fault)
INVALID: list[tuple[str, dict[str, Any], set[str]]] = [
    ("cluster-256", {"cluster_size": 256}, {"cluster_size"}),
    ("cluster-3000", {"cluster_size": 3000}, {"cluster_size"}),
    ("cluster-4m", {"cluster_size": 4 * MiB}, {"cluster_size"}),
    ("cluster-0", {"cluster_size": 0}, {"cluster_size"}),
    ("cluster-negative", {"cluster_size": -65536}, {"cluster_size"}),
    ("refcount-0", {"refcount_bits": 0}, _REFCOUNT),
    ("refcount-3", {"refcount_bits": 3}, _REFCOUNT),
    ("refcount-65", {"refcount_bits": 65}, _REFCOUNT),
    ("refcount-128", {"refcount_bits": 128}, _REFCOUNT),
    ("refcount-8-v2", {"refcount_bits": 8, "compat": "0.10"}, {*_REFCOUNT, "compat"}),
    ("refcount-1-v2", {"compat": "0.10", "refcount_bits": 1}, {*_REFCOUNT, "compat"}),
    ("refcount-64-v2", {"compat": "v2", "refcount_bits": 64}, {*_REFCOUNT, "compat"}),
    ("compat-1.0", {"compat": "1.0"}, {"compat"}),
    ("compat-0.9", {"compat": "0.9"}, {"compat"}),
    ("compat-v4", {"compat": "v4"}, {"compat"}),
    ("compat-empty", {"compat": ""}, {"compat"}),
    ("lazy-v2", {"compat": "0.10", "lazy_refcounts": True}, {"lazy_refcounts", "compat"}),
    ("lazy-v2-alias", {"lazy_refcounts": True, "compat": "v2"}, {"lazy_refcounts", "compat"}),
    ("lazy-not-a-flag", {"lazy_refcounts": "maybe"}, {"lazy_refcounts"}),
    ("l2ext-v2", {"compat": "0.10", "extended_l2": True}, {"extended_l2", "compat"}),
    ("l2ext-cluster-8k", {"extended_l2": True, "cluster_size": 8 * KiB}, {"extended_l2", "cluster_size"}),
    ("l2ext-cluster-512", {"cluster_size": 512, "extended_l2": True}, {"extended_l2", "cluster_size"}),
    ("l2ext-not-a-flag", {"extended_l2": "sometimes"}, {"extended_l2"}),
    ("zstd-v2", {"compat": "0.10", "compression_type": "zstd"}, {"compression_type", "compat"}),
    ("compression-lz4", {"compression_type": "lz4"}, {"compression_type"}),
    ("compression-empty", {"compression_type": ""}, {"compression_type"}),
    ("data-file-v2", {"compat": "0.10", "data_file": DATA}, {"data_file", "compat"}),
    ("data-file-raw-alone", {"data_file_raw": True}, {"data_file_raw", "data_file"}),
    (
        "data-file-raw-v2",
        {"compat": "0.10", "data_file": DATA, "data_file_raw": True},
        {"data_file", "data_file_raw", "compat"},
    ),
    ("size-negative", {"size": -512}, {"size"}),
    ("size-too-large-c512", {"size": 128 * GiB + 512, "cluster_size": 512}, {"size", "cluster_size"}),
    ("size-too-large-c64k", {"size": 2 * (1 << 50) + 64 * KiB}, {"size"}),
    ("prealloc-zero", {"preallocation": "zero"}, _PREALLOC),
    ("prealloc-bogus", {"preallocation": "bogus"}, _PREALLOC),
    ("backing-no-format", {"backing_file": "base.qcow2"}, _BACKING),
    ("backing-format-no-file", {"backing_format": "qcow2"}, _BACKING),
    *(
        (
            f"backing-prealloc-{mode}",
            {"backing_file": "base.qcow2", "backing_format": "qcow2", "preallocation": mode},
            {*_BACKING, *_PREALLOC, "extended_l2"},
        )
        for mode in ("metadata", "falloc", "full")
    ),
    (
        "backing-data-file-raw",
        {"backing_file": "base.qcow2", "backing_format": "qcow2", "data_file": DATA, "data_file_raw": True},
        {*_BACKING, "data_file_raw", "data_file"},
    ),
]


def _split_size(options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    options = dict(options)
    return options.pop("size", 1 * MiB), options


@pytest.mark.parametrize(("options", "names"), [pytest.param(o, n, id=i) for i, o, n in INVALID])
def test_invalid_option_with_builder(tmp_path: Path, options: dict[str, Any], names: set[str]) -> None:
    size, options = _split_size(options)
    storage = File.create_sync(StorageCreateOptions(filename=tmp_path / IMAGE, overwrite=True))
    try:
        with pytest.raises(InvalidOptionError) as error:
            apply_builder(Qcow2.create_builder(storage), size, options).create_sync()
    finally:
        close_storage(storage)
    assert error.value.option in names, f"the error names {error.value.option!r}, not one of {sorted(names)}"


@pytest.mark.parametrize(
    ("options", "names"),
    [
        *(pytest.param(o, n, id=i) for i, o, n in INVALID),
        pytest.param({"encryption": True}, {"encryption"}, id="unknown-option"),
        pytest.param({"refcount_width": 3}, _REFCOUNT, id="builder-name-refcount-width"),
        pytest.param({"preallocate": "zero"}, _PREALLOC, id="builder-name-preallocate"),
    ],
)
def test_invalid_option_leaves_existing_files(tmp_path: Path, options: dict[str, Any], names: set[str]) -> None:
    size, options = _split_size(options)
    image, data = tmp_path / IMAGE, tmp_path / DATA
    junk = write_junk(image)
    data_junk = _qemu.random_bytes(64 * KiB, seed=8)
    data.write_bytes(data_junk)
    with pytest.raises(InvalidOptionError) as error:
        imago.create(image, format="qcow2", size=size, **options)
    assert error.value.option in names, f"the error names {error.value.option!r}, not one of {sorted(names)}"
    assert image.read_bytes() == junk, "the existing image file was changed"
    assert data.read_bytes() == data_junk, "the existing data file was changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATA, IMAGE]


def test_qemu_refuses_what_imago_refuses(tmp_path: Path) -> None:
    """The misuse list is qemu-img's: it refuses each of them too (except sizes it rounds up)."""
    accepted = []
    for name, options, _ in INVALID:
        size, options = _split_size(options)
        options = dict(options)
        backing = options.pop("backing_file", None)
        backing_fmt = options.pop("backing_format", None)
        argv: list[str] = ["qemu-img", "create", "-q", "-f", "qcow2", *_qemu.options_arg(options)]
        if backing is not None:
            argv += ["-u", "-b", backing]
        if backing_fmt is not None:
            argv += ["-F", backing_fmt]
        argv += ["x.qcow2", str(size)]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, check=False, timeout=60)
        if proc.returncode == 0:
            accepted.append(name)
    assert accepted == []


def test_sizes_round_up_to_whole_sectors_as_qemu_img_does(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    imago.create(ours, format="qcow2", size=1000)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(theirs), "1000"], check=True)
    info = [
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(p)], capture_output=True, text=True, check=True
            ).stdout
        )["virtual-size"]
        for p in (ours, theirs)
    ]
    assert info == [1024, 1024]
    with imago.open(ours, format="qcow2") as disk:
        assert disk.size == 1024
