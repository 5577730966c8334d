"""qcow2 writing, checked against qemu-img and qemu-io.

Images start out made by QEMU's tools (so imago writes into layouts it did not choose: zero
clusters with and without host clusters, shared clusters of internal snapshots, compressed
clusters, backing chains, external data files). After imago wrote, QEMU is the judge:
``qemu-img check`` must find no errors and no leaked clusters, and ``qemu-img convert`` /
``qemu-img compare`` / ``qemu-io read -P`` must see what a plain bytearray model
(:class:`imago.testing.model.DiskModel`) says the disk holds. Backing files never change;
internal snapshots keep their content.

* A hypothesis state machine runs random writes, vectored and partial writes, zeroing,
  discards, flushes and reopens over a matrix of image options.
* Directed tests pin down single properties (contiguous allocation, copy-on-write from a
  backing file, zero clusters, freed space, snapshots, qemu-io interleaving, refusals).
* Misuse: out-of-bounds requests, read-only images, resizing (not in this cut).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import imago
from imago import FormatAccess, PermissiveImplicitOpenGate, SyncFormatAccess
from imago.testing.model import DiskModel
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB, Run

KiB = 1 << 10


# --- helpers ------------------------------------------------------------------------------------


def open_rw(path: str | os.PathLike[str]) -> SyncFormatAccess:
    """The qcow2 image at *path*, opened for writing (following its backing file and data file)."""
    return SyncFormatAccess(Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate()))


def open_ro(path: str | os.PathLike[str]) -> SyncFormatAccess:
    return SyncFormatAccess(Qcow2.builder_path(path).open_sync(PermissiveImplicitOpenGate()))


def read_all(image: SyncFormatAccess) -> bytes:
    buf = bytearray(image.size)
    image.read(buf, 0)
    return bytes(buf)


def write_concurrently(path: str | os.PathLike[str], chunks: dict[int, bytes]) -> bytes:
    """Write every chunk (offset: data) at once through the async API; the disk read back after."""

    async def main() -> bytes:
        driver = await Qcow2.builder_path(path).write(True).open(PermissiveImplicitOpenGate())
        access = FormatAccess(driver)
        await asyncio.gather(*(access.write(data, offset) for offset, data in chunks.items()))
        buf = bytearray(access.size)
        await access.read(buf, 0)
        await access.close()
        return bytes(buf)

    return asyncio.run(main())


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def noise(rng: random.Random, length: int) -> bytes:
    """Random bytes without zeroes (so that zeroing is always visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def check_clean(path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``qemu-img check --output=json``: no errors, no corruptions, no leaked clusters."""
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", os.fspath(path)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"qemu-img check {path} (exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        ) from None
    problems = {
        key: result.get(key, 0)
        for key in ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed")
        if result.get(key, 0)
    }
    assert not problems, f"qemu-img check {path}: {problems}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == 0, (
        f"qemu-img check {path}: exit status {proc.returncode}, {problems}\n{proc.stdout}{proc.stderr}"
    )
    # The second oracle: imago's own check says the same.
    _qemu.assert_imago_check_agrees(path, result, proc.returncode, proc.stderr, cwd=cwd)
    return result


def convert(
    path: str | os.PathLike[str],
    scratch: Path,
    *,
    snapshot: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> bytes:
    out = scratch / f"convert-{os.getpid()}.raw"
    try:
        return _qemu.convert_to_raw(path, out, snapshot=snapshot, cwd=cwd)
    finally:
        out.unlink(missing_ok=True)


def first_difference(got: bytes, expected: bytes) -> str:
    if len(got) != len(expected):
        return f"lengths differ: {len(got)} != {len(expected)}"
    # Narrow down in C-speed slices first: the disks are megabytes long.
    lo, hi = 0, len(got)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if got[lo:mid] == expected[lo:mid] else (lo, mid)
    first = next(i for i in range(lo, hi) if got[i] != expected[i])
    lo, hi = first, len(got)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if got[mid:hi] == expected[mid:hi] else (mid, hi)
    last = next(i for i in range(hi - 1, lo - 1, -1) if got[i] != expected[i])
    return (
        f"differs in [{first:#x}, {last + 1:#x}); at {first:#x}: {got[first : first + 16].hex()} "
        f"instead of {expected[first : first + 16].hex()}"
    )


def assert_same(got: bytes, expected: bytes, what: str) -> None:
    assert got == expected, f"{what}: {first_difference(got, expected)}"


def check_model(model: DiskModel, actual: bytes | bytearray, offset: int = 0) -> None:
    """``model.check``, fast when the model has undefined ranges (compares whole runs in C)."""
    end = offset + len(actual)
    expected = bytearray(model.data[offset:end])
    for match in re.finditer(b"\x01+", model.undefined[offset:end]):
        expected[match.start() : match.end()] = actual[match.start() : match.end()]
    if bytes(actual) != expected:
        model.check(actual, offset)  # names the first difference
        raise AssertionError("DiskModel.check disagrees")  # pragma: no cover


def set_incompatible_bit(path: Path, bit: int) -> None:
    """Set an incompatible feature bit in a v3 header (a big-endian u64 at offset 72)."""
    with open(path, "r+b") as f:
        f.seek(72)
        value = int.from_bytes(f.read(8), "big") | (1 << bit)
        f.seek(72)
        f.write(value.to_bytes(8, "big"))


def runs_over(runs: list[Run], start: int, end: int) -> list[Run]:
    """The runs that intersect ``[start, end)``."""
    return [r for r in runs if r.start < end and r.end > start]


# --- the option matrix --------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """How to make the starting image of a workload."""

    name: str
    size: int = 4 * MiB
    options: dict[str, object] = dataclasses.field(default_factory=dict)
    backing: str | None = None  # "raw", or "qcow2" (qcow2 over raw)
    data_file: bool = False
    snapshots: int = 0
    compression: str | None = None

    @property
    def cluster_size(self) -> int:
        value = self.options.get("cluster_size", 65536)
        assert isinstance(value, int)
        return value


CONFIGS = [
    Config("cluster-512", options={"cluster_size": 512}),
    # Refcount blocks cover 32 KiB of the file, the table 2 MiB: it grows again and again.
    Config("cluster-512-refcount-64", options={"cluster_size": 512, "refcount_bits": 64}),
    Config("cluster-64k"),
    Config("size-not-cluster-aligned", size=3 * MiB + 5 * 512, options={"cluster_size": 16384}),
    Config("cluster-2m", size=12 * MiB, options={"cluster_size": 2 * MiB}),
    Config("refcount-1", options={"refcount_bits": 1}),
    Config("refcount-16-v3-4k", options={"cluster_size": 4096, "refcount_bits": 16}),
    Config("refcount-64-4k", options={"cluster_size": 4096, "refcount_bits": 64}),
    Config("compat-0.10", options={"compat": "0.10"}),
    Config("compat-0.10-4k", options={"compat": "0.10", "cluster_size": 4096}),
    Config("lazy-refcounts", options={"lazy_refcounts": True, "cluster_size": 32768}),
    Config("preallocated-metadata", options={"preallocation": "metadata", "cluster_size": 16384}),
    Config("preallocated-falloc-v2", options={"preallocation": "falloc", "compat": "0.10"}),
    Config("backing-raw", backing="raw"),
    Config("backing-qcow2-v2", options={"compat": "0.10", "cluster_size": 16384}, backing="qcow2"),
    Config("data-file", options={"cluster_size": 8192}, data_file=True),
    Config("data-file-raw", options={"data_file_raw": True}, data_file=True),
    Config("snapshots", snapshots=2),
    Config("snapshot-refcount-2", options={"refcount_bits": 2, "cluster_size": 4096}, snapshots=2),
    Config("snapshot-v2", options={"compat": "0.10", "cluster_size": 8192}, snapshots=1),
    Config("compressed-zlib", options={"compression_type": "zlib", "cluster_size": 4096}, compression="zlib"),
    Config("compressed-zstd", options={"compression_type": "zstd"}, compression="zstd"),
    Config("compressed-over-backing", options={"cluster_size": 16384}, backing="raw", compression="zlib"),
    Config("extended-l2", options={"extended_l2": True}),
    Config("extended-l2-backing-qcow2", options={"extended_l2": True, "cluster_size": 32768}, backing="qcow2"),
    Config("extended-l2-data-file", options={"extended_l2": True, "cluster_size": 16384}, data_file=True),
    Config("extended-l2-snapshots", options={"extended_l2": True}, snapshots=1),
    Config("extended-l2-compressed", options={"extended_l2": True, "compression_type": "zstd"}, compression="zstd"),
]


@dataclasses.dataclass
class Template:
    """A qemu-made starting image (in *directory*, named ``disk.qcow2``) and what it holds."""

    config: Config
    directory: Path
    content: bytes  # the disk as qemu reads it
    backing_content: bytes  # what discard_to_backing brings back (zero without a backing file)
    snapshots: dict[str, bytes]  # snapshot name -> its content
    frozen: dict[str, str]  # file name -> sha256 of files that must never change (backing files)


def build_template(config: Config, directory: Path, scratch: Path) -> Template:
    size = config.size
    top = directory / "disk.qcow2"
    options = dict(config.options)
    backing_content = bytes(size)
    frozen: list[str] = []
    backing: str | None = None
    backing_fmt: str | None = None
    if config.backing is not None:
        # Random data, not cluster aligned, shorter than the overlay.
        base = directory / "base.raw"
        base.write_bytes(noise(random.Random(7), size * 3 // 4 + 1536))
        frozen.append(base.name)
        backing, backing_fmt = base.name, "raw"
        if config.backing == "qcow2":
            mid = directory / "mid.qcow2"
            _qemu.create(
                mid, size * 7 // 8, options={"cluster_size": 4096}, backing=backing, backing_fmt="raw", cwd=directory
            )
            _qemu.qemu_io(
                mid,
                f"write -P 0x55 {size // 16} {size // 8}",
                f"write -z {size * 5 // 16} {size // 16}",
                f"write -P 0x56 {size * 13 // 16 - 4096} 8192",
                cwd=directory,
            )
            frozen.append(mid.name)
            backing, backing_fmt = mid.name, "qcow2"
        below = convert(directory / backing, scratch, cwd=directory) if backing_fmt == "qcow2" else base.read_bytes()
        backing_content = below[:size] + bytes(max(0, size - len(below)))
    if config.data_file:
        options["data_file"] = "disk.data"
    _qemu.create(top, size, options=options, backing=backing, backing_fmt=backing_fmt, cwd=directory)

    # Every kind of cluster: data, zero clusters with and without a host cluster, discarded
    # ranges, unaligned data, untouched ranges.
    _qemu.qemu_io(
        top,
        f"write -P 0x11 0 {size // 8}",
        f"write -z {size // 8} {size // 16}",
        f"write -P 0x22 {size // 4} {size // 8}",
        f"write -z {size // 4 + size // 32} {size // 32}",
        f"discard {size // 4 + size // 16} {size // 32}",
        f"write -P 0x33 {size // 2 + 12345} 100000",
        cwd=directory,
    )
    if config.compression is not None:
        # Compressed clusters last (qemu 7.2 may otherwise reuse freed host clusters wrongly,
        # see _qemu.Plan) and into clusters nothing else wrote.
        cs = config.cluster_size
        start = (size * 5 // 8) // cs * cs
        length = (size // 4) // cs * cs
        source = scratch / "compressible.bin"
        source.write_bytes(_qemu.text_bytes(length, 3))
        _qemu.qemu_io(top, f"write -c -s {source} {start} {length}", cwd=directory)
        source.unlink()
        assert list(_qemu.qcow2_layout(top).compressed_ranges()), "the image has no compressed clusters"
    snapshots: dict[str, bytes] = {}
    for index in range(config.snapshots):
        name = f"s{index + 1}"
        _qemu.qemu_img("snapshot", "-c", name, top, cwd=directory)
        snapshots[name] = convert(top, scratch, snapshot=f"snapshot.name={name}", cwd=directory)
        _qemu.qemu_io(
            top,
            f"write -P {0x66 + index:#x} {size // 16 + index * 4096} {size // 4}",
            f"write -z {size * 3 // 4} {size // 16}",
            cwd=directory,
        )
    check_clean(top, cwd=directory)
    return Template(
        config=config,
        directory=directory,
        content=convert(top, scratch, cwd=directory),
        backing_content=backing_content,
        snapshots=snapshots,
        frozen={name: sha256(directory / name) for name in frozen},
    )


# --- the random workload ------------------------------------------------------------------------

_grains = st.sampled_from(["byte", "sector", "cluster"])
_positions = st.integers(min_value=0, max_value=1 << 30)
_lengths = st.one_of(st.integers(min_value=1, max_value=4096), st.integers(min_value=1, max_value=1 << 20))


class _WriteWorkload(RuleBasedStateMachine):
    """Random changes through imago and a DiskModel side by side; QEMU judges the result."""

    template: ClassVar[Template]
    resizing: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        template = self.template
        self.config = template.config
        self.tmp = tempfile.TemporaryDirectory(prefix="imago-qcow2-write-")
        self.directory = Path(self.tmp.name)
        shutil.copytree(template.directory, self.directory, dirs_exist_ok=True)
        self.path = self.directory / "disk.qcow2"
        self.model = DiskModel(self.config.size)
        self.model.write(0, template.content)
        self.rng = random.Random(0)
        self.image = open_rw(self.path)

    @initialize(seed=st.integers(0, 1 << 32))
    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _extent(self, grain: str, position: int, length: int) -> tuple[int, int]:
        size = self.model.size
        cs = self.config.cluster_size
        unit = {"byte": 1, "sector": 512, "cluster": cs}[grain]
        offset = position % (size // unit) * unit
        if grain == "cluster":
            length = (1 + length % 3) * cs if cs > 65536 else max(1, length // cs) * cs
        elif grain == "sector":
            length = -(-length // 512) * 512
        return offset, min(length, size - offset)

    @rule(grain=_grains, position=_positions, length=_lengths, pieces=st.integers(1, 4))
    def write(self, grain: str, position: int, length: int, pieces: int) -> None:
        offset, length = self._extent(grain, position, length)
        data = noise(self.rng, length)
        if pieces == 1:
            self.image.write(data, offset)
        else:
            cuts = sorted(self.rng.randrange(length + 1) for _ in range(pieces - 1))
            bounds = [0, *cuts, length]
            self.image.writev([memoryview(data)[a:b] for a, b in itertools.pairwise(bounds)], offset)
        self.model.write(offset, data)

    @rule(
        grain=_grains,
        position=_positions,
        length=_lengths,
        how=st.sampled_from(["write_zeroes", "discard_to_zero"]),
    )
    def zero(self, grain: str, position: int, length: int, how: str) -> None:
        offset, length = self._extent(grain, position, length)
        getattr(self.image, how)(offset, length)
        self.model.zero(offset, length)

    @rule(grain=_grains, position=_positions, length=_lengths)
    def discard_to_any(self, grain: str, position: int, length: int) -> None:
        offset, length = self._extent(grain, position, length)
        self.image.discard_to_any(offset, length)
        self.model.forget(offset, length)

    @rule(grain=_grains, position=_positions, length=_lengths)
    def discard_to_backing(self, grain: str, position: int, length: int) -> None:
        offset, length = self._extent(grain, position, length)
        self.image.discard_to_backing(offset, length)
        below = self.template.backing_content[offset : offset + length]
        self.model.write(offset, below + bytes(length - len(below)))  # zero past the backing file

    @rule(position=_positions, length=_lengths)
    def read(self, position: int, length: int) -> None:
        offset, length = self._extent("byte", position, length)
        buf = bytearray(length)
        self.image.read(buf, offset)
        check_model(self.model, buf, offset)

    @rule()
    def flush(self) -> None:
        self.image.flush()

    @rule()
    def flush_and_inspect(self) -> None:
        # After a flush the files alone hold the disk (as after a crash): a copy taken while
        # the image is still open must be consistent and read as the model.
        self.image.flush()
        copy = self.directory / "crash"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.directory, copy, ignore=shutil.ignore_patterns("crash"))
        try:
            check_clean(copy / "disk.qcow2", cwd=copy)
            check_model(self.model, convert(copy / "disk.qcow2", copy, cwd=copy))
        finally:
            shutil.rmtree(copy)

    @rule(how=st.sampled_from(["builder", "imago.open"]))
    def reopen(self, how: str) -> None:
        self.image.close()
        if how == "builder":
            self.image = open_rw(self.path)
        else:
            self.image = imago.open(self.path, format="qcow2", write=True)

    @invariant()
    def size_matches(self) -> None:
        assert self.image.size == self.model.size

    @precondition(lambda self: self.resizing)
    @rule(size=st.integers(min_value=0, max_value=1 << 30))
    def resize(self, size: int) -> None:
        # Sizes in [size / 2, 3 * size / 2), in sectors (qemu insists); never below a snapshot.
        base = self.config.size
        new_size = (base // 2 + size % base) // 512 * 512
        if self.template.snapshots:
            new_size = max(new_size, base)
        self.image.resize(new_size, shrink=True)
        self.model.resize(new_size)

    def teardown(self) -> None:
        try:
            self._judge()
        finally:
            self.tmp.cleanup()

    def _judge(self) -> None:
        template = self.template
        directory = self.directory
        ours = read_all(self.image)
        check_model(self.model, ours)
        self.image.close()

        check_clean(self.path, cwd=directory)

        # qemu must see the model, and in ranges whose content is undefined what imago read.
        expected = bytearray(self.model.data)
        for match in re.finditer(b"\x01+", self.model.undefined):
            expected[match.start() : match.end()] = ours[match.start() : match.end()]
        (directory / "expected.raw").write_bytes(expected)
        _qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", self.path, directory / "expected.raw", cwd=directory)
        theirs = convert(self.path, directory, cwd=directory)
        check_model(self.model, theirs)
        assert_same(theirs, bytes(expected), "qemu-img convert")

        # What imago wrote is on disk (a fresh open reads the same).
        with open_ro(self.path) as again:
            assert_same(read_all(again), theirs, "imago after reopening")

        if template.snapshots:
            image = Qcow2.builder_path(self.path).open_sync(PermissiveImplicitOpenGate())
            for name, content in template.snapshots.items():
                got = convert(self.path, directory, snapshot=f"snapshot.name={name}", cwd=directory)
                # qemu-img reads a snapshot at the active disk's size (zero past the snapshot's own).
                assert_same(got[: len(content)], content, f"snapshot {name}")
                assert got[len(content) :] == bytes(len(got) - len(content)), f"snapshot {name} past its end"
                view = SyncFormatAccess(image.read_snapshot_sync(name))
                assert_same(read_all(view), content, f"snapshot {name} through imago")
                view.close()
            SyncFormatAccess(image).close()
        for name, digest in template.frozen.items():
            assert sha256(directory / name) == digest, f"{name} changed"
        if self.config.options.get("data_file_raw"):
            # The spec: the data file is a consistent raw image of the disk.
            data = (directory / "disk.data").read_bytes()[: self.model.size]
            data += bytes(self.model.size - len(data))
            assert_same(data, theirs, "the raw external data file")


def run_workload(config: Config, tmp_path: Path, *, resizing: bool, max_examples: int) -> None:
    directory = tmp_path / "template"
    directory.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    class Workload(_WriteWorkload):
        template = build_template(config, directory, scratch)

    Workload.resizing = resizing
    Workload.TestCase.settings = settings(
        max_examples=max_examples,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    Workload.TestCase().runTest()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_random_workload_matches_model(config: Config, tmp_path: Path) -> None:
    run_workload(config, tmp_path, resizing=False, max_examples=8)


RESIZE_CONFIGS = [
    c
    for c in CONFIGS
    if c.name
    in {
        "cluster-512",
        "cluster-64k",
        "size-not-cluster-aligned",
        "refcount-1",
        "compat-0.10-4k",
        "backing-raw",
        "backing-qcow2-v2",
        "data-file",
        "data-file-raw",
        "snapshots",
        "compressed-zstd",
        "extended-l2",
        "extended-l2-backing-qcow2",
    }
]


@pytest.mark.parametrize("config", RESIZE_CONFIGS, ids=lambda c: c.name)
def test_random_workload_with_resize_matches_model(config: Config, tmp_path: Path) -> None:
    run_workload(config, tmp_path, resizing=True, max_examples=7)


# --- directed tests -----------------------------------------------------------------------------


def test_sequential_writes_allocate_contiguous_clusters(tmp_path: Path) -> None:
    path = tmp_path / "seq.qcow2"
    _qemu.create(path, 8 * MiB)
    data = _qemu.random_bytes(8 * MiB, 1)
    with open_rw(path) as image:
        for offset in range(0, 8 * MiB, MiB):
            image.write(data[offset : offset + MiB], offset)
    check_clean(path)
    runs = _qemu.qemu_runs(_qemu.qemu_map(path))
    assert len(runs) == 1, f"not one contiguous data run: {runs}"
    assert (runs[0].start, runs[0].length, runs[0].kind, runs[0].depth) == (0, 8 * MiB, "data", 0), runs
    assert_same(convert(path, tmp_path), data, "disk")


def test_imago_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "api.qcow2"
    _qemu.create(path, MiB)
    with imago.open(path, format="qcow2", write=True) as image:
        assert image.writable
        image.write(b"through imago.open", 4096)
    _qemu.qemu_io(path, "read -v 4096 18")
    assert convert(path, tmp_path)[4096 : 4096 + 18] == b"through imago.open"
    check_clean(path)


def make_backed(directory: Path, base_size: int, size: int, *, options: dict[str, object] | None = None) -> bytes:
    """``base.raw`` (random data) under ``top.qcow2``; returns the base's content padded to *size*."""
    base = noise(random.Random(5), base_size)
    (directory / "base.raw").write_bytes(base)
    _qemu.create(directory / "top.qcow2", size, options=options, backing="base.raw", backing_fmt="raw", cwd=directory)
    return base[:size] + bytes(max(0, size - base_size))


def test_partial_cluster_writes_over_backing_file(tmp_path: Path) -> None:
    size, cs = 2 * MiB, 65536
    below = make_backed(tmp_path, MiB + 1536, size)
    digest = sha256(tmp_path / "base.raw")
    path = tmp_path / "top.qcow2"
    model = DiskModel(size)
    model.write(0, below)
    rng = random.Random(9)
    writes = [
        (cs + 5000, 1000),  # inside one cluster
        (3 * cs - 100, 300),  # across a cluster boundary
        (MiB + 1000, 2000),  # across the end of the backing file
        (5 * cs, 1),  # the first byte of a cluster
        (7 * cs - 1, 1),  # the last byte of a cluster
    ]
    with open_rw(path) as image:
        backing = image.driver.backing
        assert backing is not None
        assert not backing.writable, "the backing file is open for writing"
        for offset, length in writes:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
            got = bytearray(3 * cs)
            start = max(0, offset - cs)
            image.read(got, start)
            assert_same(bytes(got), bytes(model.data[start : start + 3 * cs]), f"around the write at {offset:#x}")
        assert_same(read_all(image), bytes(model.data), "imago, before closing")
    check_clean(path)
    assert_same(convert(path, tmp_path), bytes(model.data), "qemu")
    assert sha256(tmp_path / "base.raw") == digest, "the backing file changed"
    # Only the clusters written to were allocated in the overlay.
    touched = {c for offset, length in writes for c in range(offset // cs, (offset + length - 1) // cs + 1)}
    allocated = {
        c
        for r in _qemu.qemu_runs(_qemu.qemu_map(path))
        if r.depth == 0 and r.kind == "data"
        for c in range(r.start // cs, r.end // cs)
    }
    assert allocated == touched


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "backing"])
def test_write_zeroes(tmp_path: Path, compat: str, with_backing: bool) -> None:
    size, cs = 2 * MiB, 65536
    path = tmp_path / "top.qcow2"
    model = DiskModel(size)
    if with_backing:
        model.write(0, make_backed(tmp_path, size, size, options={"compat": compat}))
    else:
        _qemu.create(path, size, options={"compat": compat})
    _qemu.qemu_io(path, f"write -P 0x11 0 {MiB}", cwd=tmp_path)
    model.write(0, _qemu.fill_bytes(MiB, 0x11))
    zeroed = [(cs, 4 * cs), (8 * cs + 100, 1000), (MiB - cs, 2 * cs), (MiB + 2 * cs, 2 * cs)]
    with open_rw(path) as image:
        for offset, length in zeroed:
            image.write_zeroes(offset, length)
            model.zero(offset, length)
        assert_same(read_all(image), bytes(model.data), "imago")
    check_clean(path, cwd=tmp_path)
    assert_same(convert(path, tmp_path, cwd=tmp_path), bytes(model.data), "qemu")
    if compat == "1.1":
        runs = _qemu.qemu_runs(_qemu.qemu_map(path, cwd=tmp_path))
        for offset, length in zeroed:
            if offset % cs or length % cs:
                continue
            over = runs_over(runs, offset, offset + length)
            assert over, (offset, runs)
            assert all(r.kind == "zero" and r.depth == 0 and r.present for r in over), (
                f"[{offset:#x}, {offset + length:#x}) is not a zero cluster range: {over}"
            )


@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "backing"])
def test_partial_writes_into_zero_clusters(tmp_path: Path, with_backing: bool) -> None:
    # Zero clusters that keep their host cluster still hold the old data there: a partial
    # write must fill the rest of the cluster with zeroes, neither with that nor the backing.
    size, cs = MiB, 65536
    path = tmp_path / "top.qcow2"
    model = DiskModel(size)
    if with_backing:
        model.write(0, make_backed(tmp_path, size, size))
    else:
        _qemu.create(path, size)
    _qemu.qemu_io(
        path, f"write -P 0x22 0 {8 * cs}", f"write -z 0 {4 * cs}", f"write -z -u {4 * cs} {2 * cs}", cwd=tmp_path
    )
    model.write(0, _qemu.fill_bytes(8 * cs, 0x22))
    model.zero(0, 6 * cs)
    assert _qemu.qcow2_layout(path).allocated_zero_clusters() == 4
    rng = random.Random(10)
    with open_rw(path) as image:
        for offset, length in [(1000, 100), (cs + cs // 2, cs), (3 * cs - 1, 2), (4 * cs + 77, 500), (6 * cs - 9, 9)]:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        assert_same(read_all(image), bytes(model.data), "imago")
    check_clean(path, cwd=tmp_path)
    assert_same(convert(path, tmp_path, cwd=tmp_path), bytes(model.data), "qemu")


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_discard_to_zero_frees_space(tmp_path: Path, compat: str) -> None:
    size = 8 * MiB
    path = tmp_path / "d.qcow2"
    _qemu.create(path, size, options={"compat": compat})
    with open_rw(path) as image:
        image.write(_qemu.random_bytes(size, 2), 0)
    check_clean(path)
    full = path.stat().st_blocks * 512
    assert full >= size
    with open_rw(path) as image:
        image.discard_to_zero(0, size)
        image.flush()
        after_flush = path.stat().st_blocks * 512
        assert read_all(image) == bytes(size)
    after_close = path.stat().st_blocks * 512
    assert after_flush < full // 4, f"{full} bytes allocated before discarding, {after_flush} after a flush"
    assert after_close < full // 4, f"{full} bytes allocated before discarding, {after_close} after closing"
    check_clean(path)
    assert convert(path, tmp_path) == bytes(size)
    assert not [r for r in _qemu.qemu_runs(_qemu.qemu_map(path)) if r.kind == "data"]


def test_discard_to_backing_reveals_backing(tmp_path: Path) -> None:
    size, cs = 2 * MiB, 65536
    below = make_backed(tmp_path, MiB + 512, size)
    path = tmp_path / "top.qcow2"
    _qemu.qemu_io(path, f"write -P 0x11 0 {size}", f"write -z {MiB} {cs}", cwd=tmp_path)
    model = DiskModel(size)
    model.write(0, _qemu.fill_bytes(size, 0x11))
    model.zero(MiB, cs)
    with open_rw(path) as image:
        for offset, length in [(0, 2 * cs), (4 * cs + 7, 3 * cs), (MiB - cs, 3 * cs), (size - 1000, 1000)]:
            image.discard_to_backing(offset, length)
            model.write(offset, below[offset : offset + length])
        assert_same(read_all(image), bytes(model.data), "imago")
    check_clean(path, cwd=tmp_path)
    assert_same(convert(path, tmp_path, cwd=tmp_path), bytes(model.data), "qemu")


def test_writes_leave_snapshots_intact(tmp_path: Path) -> None:
    size = 4 * MiB
    path = tmp_path / "snap.qcow2"
    _qemu.create(path, size, options={"cluster_size": 16384})
    _qemu.qemu_io(path, f"write -P 0x11 0 {3 * MiB}", f"write -z {MiB} 65536")
    _qemu.qemu_img("snapshot", "-c", "before", path)
    before = convert(path, tmp_path, snapshot="snapshot.name=before")
    model = DiskModel(size)
    model.write(0, before)
    rng = random.Random(4)
    with open_rw(path) as image:
        for offset, length in [(0, 16384), (20000, 50000), (MiB - 100, 200000), (2 * MiB, MiB), (3 * MiB - 5, 10)]:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        image.write_zeroes(1536 * KiB, 100 * KiB)
        model.zero(1536 * KiB, 100 * KiB)
        image.discard_to_zero(2560 * KiB, 64 * KiB)
        model.zero(2560 * KiB, 64 * KiB)
        image.discard_to_backing(300 * KiB, 32 * KiB)
        model.zero(300 * KiB, 32 * KiB)
    check_clean(path)
    assert_same(convert(path, tmp_path, snapshot="snapshot.name=before"), before, "the snapshot")
    assert_same(convert(path, tmp_path), bytes(model.data), "the active disk")
    # Reverting to the snapshot gives its content back; deleting it leaks nothing.
    reverted = tmp_path / "reverted.qcow2"
    shutil.copy(path, reverted)
    _qemu.qemu_img("snapshot", "-a", "before", reverted)
    assert_same(convert(reverted, tmp_path), before, "the reverted disk")
    _qemu.qemu_img("snapshot", "-d", "before", path)
    check_clean(path)
    assert_same(convert(path, tmp_path), bytes(model.data), "the active disk after deleting the snapshot")


def test_qemu_io_reads_imago_writes(tmp_path: Path) -> None:
    path = tmp_path / "q.qcow2"
    _qemu.create(path, 4 * MiB, options={"cluster_size": 4096})
    writes = [(0, 4096, 0x5A), (4096 + 17, 10000, 0x6B), (MiB - 3, 7, 0x7C), (2 * MiB, MiB + 512, 0x8D)]
    with open_rw(path) as image:
        for offset, length, pattern in writes:
            image.write(_qemu.fill_bytes(length, pattern), offset)
    check_clean(path)
    _qemu.qemu_io(path, *(f"read -P {pattern:#x} {offset} {length}" for offset, length, pattern in writes))
    _qemu.qemu_io(path, "read -P 0 4096 17", f"read -P 0 {MiB + 4} {MiB - 4}")


def test_interleaved_sessions_with_qemu_io(tmp_path: Path) -> None:
    size = 4 * MiB
    path = tmp_path / "i.qcow2"
    _qemu.create(path, size, options={"cluster_size": 4096})
    model = DiskModel(size)
    _qemu.qemu_io(path, "write -P 0x11 0 100k")
    model.write(0, _qemu.fill_bytes(100 * KiB, 0x11))
    for index in range(4):
        ours = 0x40 + index
        offset = index * 700 * KiB + 3000
        with open_rw(path) as image:
            assert_same(read_all(image), bytes(model.data), f"imago in session {index}")
            image.write(_qemu.fill_bytes(300 * KiB, ours), offset)
            model.write(offset, _qemu.fill_bytes(300 * KiB, ours))
            image.write_zeroes(offset + 100 * KiB, 64 * KiB)
            model.zero(offset + 100 * KiB, 64 * KiB)
        check_clean(path)
        _qemu.qemu_io(
            path,
            f"read -P {ours:#x} {offset} {100 * KiB}",
            f"read -P 0 {offset + 100 * KiB} {64 * KiB}",
            f"read -P {ours:#x} {offset + 164 * KiB} {136 * KiB}",
        )
        theirs = 0x80 + index
        qemu_offset = offset + 250 * KiB
        _qemu.qemu_io(path, f"write -P {theirs:#x} {qemu_offset} {200 * KiB}", f"write -z {offset} 8k")
        model.write(qemu_offset, _qemu.fill_bytes(200 * KiB, theirs))
        model.zero(offset, 8 * KiB)
        check_clean(path)
    with open_ro(path) as image:
        assert_same(read_all(image), bytes(model.data), "imago at the end")
    assert_same(convert(path, tmp_path), bytes(model.data), "qemu at the end")


def test_concurrent_writes_into_shared_clusters(tmp_path: Path) -> None:
    size = 2 * MiB
    below = make_backed(tmp_path, size, size)
    path = tmp_path / "top.qcow2"
    rng = random.Random(6)
    # Many small writes, many to each cluster, none overlapping: copy-on-write from the
    # backing file and cluster allocation race with each other.
    chunks = {index * 3000 + 100: noise(rng, 2000) for index in range(200)}
    model = DiskModel(size)
    model.write(0, below)
    for offset, data in chunks.items():
        model.write(offset, data)

    assert_same(write_concurrently(path, chunks), bytes(model.data), "imago")
    check_clean(path, cwd=tmp_path)
    assert_same(convert(path, tmp_path, cwd=tmp_path), bytes(model.data), "qemu")


@pytest.mark.parametrize("compressed", [False, True], ids=["data", "compressed"])
def test_shrink_releases_every_cluster_past_the_end(tmp_path: Path, compressed: bool) -> None:
    # Neither size cluster-aligned: the old last (partial) cluster lies wholly past the new
    # end and must be released too, or its data comes back when the disk grows again.
    cs = 65536
    old_size, new_size = 41 * cs + 42496, 39 * cs + 51712
    path = tmp_path / "shrink.qcow2"
    _qemu.create(path, old_size)
    _qemu.qemu_io(path, f"write {'-c ' if compressed else ''}-P 0x11 {39 * cs} {old_size - 39 * cs}")
    with open_rw(path) as image:
        image.resize(new_size, shrink=True)
        assert read_all(image) == bytes(39 * cs) + _qemu.fill_bytes(new_size - 39 * cs, 0x11)
    check_clean(path)
    past_the_end = [e for e in _qemu.qcow2_layout(path).entries if e.guest_cluster >= 40]
    assert not past_the_end, f"L2 entries past the new end: {past_the_end}"
    expected = bytes(39 * cs) + _qemu.fill_bytes(new_size - 39 * cs, 0x11) + bytes(old_size - new_size)
    with open_rw(path) as image:
        image.resize(old_size)
        assert_same(read_all(image), expected, "imago after growing again")
    check_clean(path)
    assert_same(convert(path, tmp_path), expected, "qemu after growing again")


# --- refusals -----------------------------------------------------------------------------------


def make_small(path: Path, options: dict[str, object] | None = None) -> bytes:
    _qemu.create(path, MiB, options=options)
    _qemu.qemu_io(path, "write -P 0x11 0 64k")
    return _qemu.fill_bytes(64 * KiB, 0x11) + bytes(MiB - 64 * KiB)


def test_dirty_image_is_repaired_when_opened_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    content = make_small(path)
    set_incompatible_bit(path, 0)
    digest = sha256(path)
    with open_ro(path) as image:  # reading needs no refcounts, and changes nothing
        assert read_all(image) == content
    assert sha256(path) == digest, "a read-only open changed the image"
    with imago.open(path, format="qcow2", write=True) as image:  # repaired first, as QEMU does
        assert image.driver.info()["dirty-flag"] is False
        image.write(b"\x22" * 512, 0)
    check_clean(path)
    with open_ro(path) as image:
        assert read_all(image) == b"\x22" * 512 + content[512:]


def test_corrupt_image_is_refused_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.qcow2"
    make_small(path)
    set_incompatible_bit(path, 1)
    digest = sha256(path)
    with pytest.raises(imago.CorruptImageError):
        open_rw(path)
    assert sha256(path) == digest, "a refused open changed the image"


# --- misuse -------------------------------------------------------------------------------------


def _changes(image: SyncFormatAccess, offset: int, length: int) -> Iterator[tuple[str, Callable[[], None]]]:
    yield "write", lambda: image.write(b"x" * length, offset)
    yield "writev", lambda: image.writev([b"x", b"y" * (length - 1)], offset)
    yield "write_zeroes", lambda: image.write_zeroes(offset, length)
    yield "discard_to_zero", lambda: image.discard_to_zero(offset, length)
    yield "discard_to_any", lambda: image.discard_to_any(offset, length)
    yield "discard_to_backing", lambda: image.discard_to_backing(offset, length)


def test_requests_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "bounds.qcow2"
    size = MiB
    content = bytearray(make_small(path))
    with open_rw(path) as image:
        for offset, length in [(size - 1, 2), (size, 1), (size - 4096, 8192), (size + 65536, 4096)]:
            for name, call in _changes(image, offset, length):
                with pytest.raises(imago.InvalidRequestError):
                    call()
                assert image.size == size, name
        with pytest.raises(imago.InvalidRequestError):
            image.write(b"x", -1)
        with pytest.raises(imago.InvalidRequestError):
            image.write_zeroes(-512, 512)
        image.write(b"the end", size - 7)  # still usable
        content[size - 7 :] = b"the end"
        assert read_all(image) == content
    check_clean(path)
    assert _qemu.info(path)["virtual-size"] == size
    assert convert(path, tmp_path) == content


def test_read_only_open_refuses_changes(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    content = make_small(path)
    digest = sha256(path)
    with open_ro(path) as image:
        assert not image.writable
        for name, call in _changes(image, 0, 4096):
            with pytest.raises(imago.ReadOnlyError):
                call()
            assert read_all(image) == content, name
        with pytest.raises(imago.ReadOnlyError):
            image.resize(2 * MiB)
    assert sha256(path) == digest


@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "backing"])
def test_resize_grows_and_shrinks(tmp_path: Path, with_backing: bool) -> None:
    # Resizing came after the first cut of writing: grow (the new area reads zero, even over
    # a larger backing file), shrink (clusters past the end are released: no leaks).
    size = MiB
    path = tmp_path / "top.qcow2"
    model = DiskModel(size)
    if with_backing:
        model.write(0, make_backed(tmp_path, 4 * MiB, size, options={"cluster_size": 4096})[:size])
    else:
        _qemu.create(path, size, options={"cluster_size": 4096})
    rng = random.Random(8)
    with open_rw(path) as image:
        data = noise(rng, 200 * KiB + 5)
        image.write(data, size - len(data))  # up to the last byte
        model.write(size - len(data), data)
        for new_size in (3 * MiB + 512, 512 * KiB, 2 * MiB):
            image.resize(new_size, shrink=True)
            model.resize(new_size)
            assert image.size == new_size
            assert_same(read_all(image), bytes(model.data), f"imago after resizing to {new_size}")
        tail = noise(rng, 4096)
        image.write(tail, 2 * MiB - 4096)
        model.write(2 * MiB - 4096, tail)
    check_clean(path, cwd=tmp_path)
    assert _qemu.info(path, cwd=tmp_path)["virtual-size"] == 2 * MiB
    assert_same(convert(path, tmp_path, cwd=tmp_path), bytes(model.data), "qemu")


@pytest.mark.parametrize("new_size", [12345, 4 * MiB + 1, 2 * MiB - 511])
def test_resize_refuses_sizes_qemu_cannot_record(tmp_path: Path, new_size: int) -> None:
    # qemu-img refuses them too ("The new size must be a multiple of 512"), with --shrink or not.
    path = tmp_path / "odd.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, "write -P 0x5a 0 1M")
    reference = subprocess.run(
        ["qemu-img", "resize", "--shrink", "-f", "qcow2", str(tmp_path / "odd.qcow2"), str(new_size)],
        capture_output=True,
        text=True,
    )
    assert reference.returncode != 0
    assert "multiple of 512" in reference.stderr
    before = path.read_bytes()
    with open_rw(path) as image:
        with pytest.raises(imago.InvalidRequestError, match="multiple of 512") as info:
            image.resize(new_size, shrink=True)
        assert str(path) in str(info.value)
        assert image.size == 4 * MiB
    assert path.read_bytes() == before
    check_clean(path)


def test_resize_shrinks_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "shrink.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, "write -P 0x5a 3M 1M")
    refused = subprocess.run(["qemu-img", "resize", "-f", "qcow2", str(path), "2M"], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "--shrink" in refused.stderr
    with open_rw(path) as image:
        with pytest.raises(imago.InvalidRequestError, match="shrink=True"):
            image.resize(2 * MiB)
        assert image.size == 4 * MiB
        assert read_all(image)[3 * MiB :] == b"\x5a" * MiB  # nothing was lost
        image.resize(2 * MiB, shrink=True)
        assert image.size == 2 * MiB
    check_clean(path)
    assert _qemu.info(path)["virtual-size"] == 2 * MiB


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_preallocated_growth_over_freed_clusters_reads_zero(tmp_path: Path, prealloc: str) -> None:
    # Found by fuzzing (qcow2_write): growing with metadata preallocation bound clusters a discard
    # had freed inside the file, and the new area read their old bytes. Clusters inside the file
    # are zeroed now; past its end they read zero by themselves.
    path = tmp_path / "freed.qcow2"
    _qemu.create(path, MiB, options={"cluster_size": 4096})
    _qemu.qemu_io(path, "write -P 0xaa 0 256k")
    # The L2 entries dropped (as a crash of a lazy-refcounts image can leave them): 64 leaked
    # clusters still holding 0xaa; the leak repair frees them without touching their bytes.
    raw = bytearray(path.read_bytes())
    l2 = int.from_bytes(raw[int.from_bytes(raw[40:48], "big") :][:8], "big") & 0x00FF_FFFF_FFFF_FE00
    raw[l2 : l2 + 64 * 8] = bytes(64 * 8)
    path.write_bytes(raw)
    size_before = path.stat().st_size
    with open_rw(path) as image:
        assert image.check("leaks").leaks_fixed == 64
        image.resize(2 * MiB, prealloc)
        assert read_all(image)[MiB:] == bytes(MiB)
    check_clean(path, cwd=tmp_path)
    assert path.stat().st_size < size_before + MiB  # the freed clusters were reused
    assert convert(path, tmp_path, cwd=tmp_path) == bytes(2 * MiB)
