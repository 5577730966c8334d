"""Property: mutating a valid image's metadata never makes the reader fail with anything but ImagoError.

Valid images of several kinds are made once by ``qemu-img``/``qemu-io``. Hypothesis then picks
metadata regions (header, header extensions, L1 and L2 tables, compressed cluster data,
refcount table and blocks, snapshot table and snapshot L1 tables), offsets inside them and new
values (boundary values, cluster-aligned huge offsets, random words, single bit flips), or cuts
the file short, writes the mutated image, and opens it, reads the whole disk, walks its
mappings, lists its snapshots and reads them. The only acceptable outcomes are success or an
:class:`imago.ImagoError`; a hang (caught by an alarm) or any other exception fails.

Mutations that touch only data-free metadata (refcounts, the snapshot table) must not change
what the active disk reads; and where qemu-img also reads a mutated image, both must read the
same disk.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import imago
from imago import DenyImplicitOpenGate, ImagoError, SyncFormatAccess
from imago_qcow2 import Qcow2

from . import _corpus as corpus
from . import _qemu
from ._corpus import Write

SIZE = 4 << 20
CLUSTER = 64 << 10
READ_LIMIT = 8 << 20
# Seconds one example may take before it counts as a hang.
EXAMPLE_TIMEOUT = 20
# Regions that hold no guest data: mutating them must leave the active disk's content alone.
DATA_FREE_REGIONS = frozenset({"refcount_table", "refcount_block", "snapshot_table", "snapshot_l1"})

WRITES = (Write(0x11, 0, CLUSTER), Write(0x22, 1 << 20, CLUSTER), Write(0x33, SIZE - 4096, 4096))


# --- the valid images --------------------------------------------------------------------------


def _make_v3(path: Path) -> None:
    corpus.create(path, SIZE)
    corpus.apply_writes(path, WRITES)


def _make_v2(path: Path) -> None:
    corpus.create(path, SIZE, compat="0.10")
    corpus.apply_writes(path, WRITES)


def _make_extended_l2(path: Path) -> None:
    corpus.create(path, SIZE, extended_l2=True)
    # Partial clusters: some subclusters allocated, one zeroed, the rest unallocated.
    corpus.apply_writes(path, (*WRITES, Write(0x44, 2 << 20, 6144), Write(0x55, (2 << 20) + 16384, 2048)))
    corpus.qemu_io(path, f"write -z {(1 << 20) + 4096} 4096")


def _make_compressed(path: Path) -> None:
    corpus.create(path, SIZE)
    corpus.apply_writes(
        path,
        (
            Write(0x11, 0, CLUSTER, compressed=True),
            Write(0x22, 2 * CLUSTER, CLUSTER, compressed=True),
            Write(0x33, 3 * CLUSTER, CLUSTER, compressed=True),
            Write(0x44, 1 << 20, CLUSTER),
        ),
    )


def _make_compressed_zstd(path: Path) -> None:
    corpus.qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", path, str(SIZE))
    corpus.apply_writes(
        path,
        (
            Write(0x11, 0, CLUSTER, compressed=True),
            Write(0x22, 2 * CLUSTER, CLUSTER, compressed=True),
            Write(0x44, 1 << 20, CLUSTER),
        ),
    )


def _make_compressed_extended_l2(path: Path) -> None:
    corpus.create(path, SIZE, extended_l2=True)
    corpus.apply_writes(
        path, (Write(0x11, 0, CLUSTER, compressed=True), Write(0x22, 1 << 20, 4096), Write(0x33, SIZE - 4096, 4096))
    )


def _make_snapshot(path: Path) -> None:
    corpus.create(path, SIZE)
    corpus.apply_writes(path, WRITES)
    corpus.qemu_img("snapshot", "-c", "before", path)
    corpus.apply_writes(path, (Write(0x66, 0, 4096), Write(0x77, 2 << 20, CLUSTER)))
    corpus.qemu_img("snapshot", "-c", "after", path)
    corpus.apply_writes(path, (Write(0x88, 3 << 20, CLUSTER),))


def _make_small_clusters(path: Path) -> None:
    # 512-byte clusters: 128 L1 entries, many L2 tables and refcount blocks.
    corpus.create(path, SIZE, cluster_size=512)
    corpus.apply_writes(path, (*WRITES, Write(0x44, 2 << 20, 8192)))


KINDS: dict[str, Callable[[Path], None]] = {
    "v2": _make_v2,
    "v3": _make_v3,
    "extended_l2": _make_extended_l2,
    "compressed": _make_compressed,
    "compressed_zstd": _make_compressed_zstd,
    "compressed_extended_l2": _make_compressed_extended_l2,
    "snapshot": _make_snapshot,
    "small_clusters": _make_small_clusters,
}


@dataclass(frozen=True)
class Base:
    """A valid image: its bytes, metadata regions, and what qemu reads from it."""

    kind: str
    data: bytes
    cluster_size: int
    regions: dict[str, list[tuple[int, int]]]
    # Offsets of non-zero 64-bit words per region: the entries worth hitting most.
    hot: dict[str, list[int]]
    content: bytes
    snapshot_contents: dict[str, bytes]


def _hot_words(data: bytes, spans: list[tuple[int, int]]) -> list[int]:
    found = []
    for start, end in spans:
        for offset in range(start, min(end, len(data)) - 7, 8):
            if data[offset : offset + 8] != bytes(8):
                found.append(offset)
    return found


def _build(kind: str, directory: Path) -> Base:
    path = directory / f"{kind}.qcow2"
    KINDS[kind](path)
    snapshot_contents = {}
    for snapshot in corpus.snapshots(path):
        name = snapshot.name.decode()
        out = directory / f"{kind}-{name}.raw"
        corpus.qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={name}", path, out)
        snapshot_contents[snapshot.id.decode()] = out.read_bytes()
    regions = corpus.regions(path)
    data = path.read_bytes()
    return Base(
        kind=kind,
        data=data,
        cluster_size=corpus.header(path).cluster_size,
        regions=regions,
        hot={name: _hot_words(data, spans) for name, spans in regions.items()},
        content=corpus.qemu_content(path, directory / f"{kind}.raw"),
        snapshot_contents=snapshot_contents,
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Base]:
    """``bases(kind)``: the valid image of that kind, built on first use."""
    directory = tmp_path_factory.mktemp("bases")
    cache: dict[str, Base] = {}

    def get(kind: str) -> Base:
        if kind not in cache:
            cache[kind] = _build(kind, directory)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutated")


# --- mutations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """Write *value* (``width`` bytes, big-endian) at *offset*, or flip bit *value* there."""

    region: str
    offset: int
    width: int
    op: str  # "set", "flip" or "truncate" (the file, at offset)
    value: int

    def apply(self, image: bytearray) -> None:
        if self.op == "truncate":
            del image[self.offset :]
            return
        if self.offset + self.width > len(image):
            return  # cut off by an earlier truncation
        fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[self.width]
        if self.op == "flip":
            (old,) = struct.unpack_from(fmt, image, self.offset)
            struct.pack_into(fmt, image, self.offset, old ^ (1 << self.value))
        else:
            struct.pack_into(fmt, image, self.offset, self.value)

    def __repr__(self) -> str:
        if self.op == "truncate":
            return f"<truncate the file to {self.offset:#x}>"
        what = f"flip bit {self.value}" if self.op == "flip" else f"= {self.value:#x}"
        return f"<{self.region} @{self.offset:#x} u{8 * self.width} {what}>"


def _values(width: int, base: Base) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    specials = {0, 1, top, top >> 1, 1 << (8 * width - 1), 2, 0xFF & top}
    if width == 2:
        specials |= {1023, 1024, 0x8000}
    if width >= 4:
        specials |= {9, 21, 22, 64, 104, 112, 1023, 1024, 65535, 65536, 65537, 1 << 22, (1 << 22) + 1, 1 << 31}
    if width == 8:
        file_size = len(base.data)
        cluster = base.cluster_size
        eof = corpus.align_up(file_size, cluster)
        specials |= {
            1 << 55,
            1 << 56,
            1 << 62,
            (1 << 62) - cluster,
            corpus.L2_COPIED,
            corpus.L2_COMPRESSED,
            corpus.L2_COPIED | eof,
            corpus.L2_COPIED | (eof + cluster),
            corpus.L2_COPIED | cluster,
            corpus.L2_COPIED | 1,
            corpus.L2_COPIED | (1 << 54),
            eof,
            eof - cluster,
            file_size,
            cluster,
            0x00FF_FFFF_FFFF_FE00,
            0xFFFF_FFFF_FFFF_FE00,
            0xFFFF_FFFF_0000_0000,
            0x0000_0000_FFFF_FFFF,
        }
    strategies = [st.sampled_from(sorted(specials)), st.integers(0, top)]
    if width == 8:
        cluster = base.cluster_size
        strategies += [
            st.builds(lambda k: k * cluster, st.integers(0, 1 << 20)),
            st.builds(lambda k: corpus.L2_COPIED | k * cluster, st.integers(0, 256)),
            st.builds(lambda k, n: corpus.L2_COMPRESSED | n << 54 | k, st.integers(0, 1 << 24), st.integers(0, 255)),
        ]
    return st.one_of(strategies)


@st.composite
def _mutation(draw: st.DrawFn, base: Base) -> Mutation:
    if draw(st.integers(0, 15)) == 0:
        # Cut the file short: somewhere in a metadata region, or anywhere.
        spans = [span for spans in base.regions.values() for span in spans]
        start, end = draw(st.sampled_from(spans))
        offset = draw(st.one_of(st.integers(start, end), st.integers(0, len(base.data))))
        return Mutation("file", offset, 0, "truncate", 0)
    region = draw(st.sampled_from(sorted(base.regions)))
    hot = base.hot.get(region, [])
    if hot and draw(st.booleans()):
        offset, width = draw(st.sampled_from(hot)), 8
        # Sometimes hit a narrower field inside that word.
        width = draw(st.sampled_from([8, 8, 4, 2, 1]))
        offset += draw(st.integers(0, 8 - width)) // width * width
    else:
        start, end = draw(st.sampled_from(base.regions[region]))
        end = min(end, len(base.data))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        while width > 1 and end - start < width:
            width //= 2
        if end - start < width:
            start, end = 0, 8
        offset = start + draw(st.integers(0, (end - start - width) // width)) * width
        # Header fields are not all aligned to their width: allow any byte offset there.
        if region in ("header", "extensions") and draw(st.booleans()):
            offset = draw(st.integers(start, end - width))
    if draw(st.integers(0, 3)) == 0:
        return Mutation(region, offset, width, "flip", draw(st.integers(0, 8 * width - 1)))
    return Mutation(region, offset, width, "set", draw(_values(width, base)))


def _mutations(base: Base) -> st.SearchStrategy[list[Mutation]]:
    return st.lists(_mutation(base), min_size=1, max_size=3)


# --- exercising an image --------------------------------------------------------------------------


class HangError(Exception):
    """An example ran longer than EXAMPLE_TIMEOUT seconds."""


@contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - pytest runs tests there
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise HangError(f"opening/reading the mutated image took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _read(disk: SyncFormatAccess) -> bytes:
    """The first READ_LIMIT bytes, and the last cluster when the disk is larger."""
    data = corpus.read_disk(disk, READ_LIMIT)
    if disk.size > READ_LIMIT:
        tail = bytearray(min(CLUSTER, disk.size - READ_LIMIT))
        disk.read(tail, disk.size - len(tail))
    return data


def _read_unaligned(disk: SyncFormatAccess) -> None:
    """Reads that straddle cluster and subcluster boundaries at odd offsets."""
    for offset, length in ((12345, 100_000), (CLUSTER - 3, 7), ((1 << 20) - 511, 70_000)):
        if offset + length <= disk.size:
            disk.read(bytearray(length), offset)


def _walk_mappings(disk: SyncFormatAccess, steps: int = 2048) -> None:
    offset = 0
    for _ in range(steps):
        if offset >= disk.size:
            return
        _, length = disk.get_mapping(offset, disk.size - offset)
        assert length > 0, f"get_mapping({offset:#x}) returned an empty mapping"
        offset += length


@dataclass
class Outcome:
    size: int
    content: bytes
    snapshots: dict[str, bytes]


def exercise(path: Path) -> Outcome:
    """Open read-only, read everything, walk mappings, list and read snapshots. May raise ImagoError."""
    storage = corpus.open_storage(path)
    try:
        driver = Qcow2.builder(storage).open_sync(DenyImplicitOpenGate())
    except BaseException:
        # A driver given a storage does not own it until it opened.
        imago.runtime.run_sync(storage.close())
        raise
    disk = SyncFormatAccess(driver)
    try:
        content = _read(disk)
        _read_unaligned(disk)
        _walk_mappings(disk)
        driver.info()
        snapshot_contents = {}
        for snapshot in driver.snapshots[:4]:
            view = SyncFormatAccess(driver.read_snapshot_sync(snapshot.id))
            try:
                snapshot_contents[snapshot.id] = _read(view)
                _walk_mappings(view, 256)
            finally:
                view.close()
        return Outcome(disk.size, content, snapshot_contents)
    finally:
        disk.close()


def _mutated(base: Base, mutations: list[Mutation], path: Path) -> Outcome | None:
    """Write the mutated image to *path* and exercise it: its outcome, or None after an ImagoError."""
    image = bytearray(base.data)
    for mutation in mutations:
        mutation.apply(image)
    note(f"{base.kind}: {mutations}")
    path.write_bytes(image)
    try:
        with _alarm(EXAMPLE_TIMEOUT):
            return exercise(path)
    except ImagoError:
        return None
    except (HangError, AssertionError):
        raise
    except Exception as error:
        raise AssertionError(
            f"{base.kind} mutated by {mutations}: {type(error).__name__} is not an ImagoError: {error}"
        ) from error


def check_property(base: Base, mutations: list[Mutation], workdir: Path) -> None:
    outcome = _mutated(base, mutations, workdir / f"{base.kind}.qcow2")
    if outcome is None:
        return
    if all(m.region in DATA_FREE_REGIONS for m in mutations):
        assert outcome.content == base.content[: len(outcome.content)], f"data changed by {mutations}"
        assert len(outcome.content) == min(len(base.content), READ_LIMIT)
        if all(m.region in ("refcount_table", "refcount_block") for m in mutations):
            for snapshot_id, content in outcome.snapshots.items():
                assert content == base.snapshot_contents[snapshot_id][: len(content)], f"snapshot {snapshot_id}"


# --- the properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_valid_base_image_reads_like_qemu(bases: Callable[[str], Base], workdir: Path, kind: str) -> None:
    base = bases(kind)
    path = workdir / f"{kind}-unmutated.qcow2"
    path.write_bytes(base.data)
    outcome = exercise(path)
    assert outcome.content == base.content
    assert outcome.snapshots == base.snapshot_contents
    assert (kind == "snapshot") == bool(base.snapshot_contents)
    # Every region the mutations draw from exists and lies in the file.
    for spans in base.regions.values():
        for start, end in spans:
            assert 0 <= start < end <= len(base.data)


MUTATION_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("kind", sorted(KINDS))
@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_image_fails_only_with_imago_errors(
    bases: Callable[[str], Base], workdir: Path, kind: str, data: st.DataObject
) -> None:
    base = bases(kind)
    check_property(base, data.draw(_mutations(base), label="mutations"), workdir)


@pytest.mark.parametrize("kind", ["v3", "snapshot", "small_clusters"])
@MUTATION_SETTINGS
@given(data=st.data())
def test_refcount_mutations_do_not_change_data(
    bases: Callable[[str], Base], workdir: Path, kind: str, data: st.DataObject
) -> None:
    base = bases(kind)
    refcount_only = Base(
        kind=base.kind,
        data=base.data,
        cluster_size=base.cluster_size,
        regions={k: v for k, v in base.regions.items() if k in ("refcount_table", "refcount_block")},
        hot=base.hot,
        content=base.content,
        snapshot_contents=base.snapshot_contents,
    )
    mutations = data.draw(_mutations(refcount_only), label="mutations")
    check_property(base, mutations, workdir)


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(MUTATION_SETTINGS, max_examples=50)
@given(data=st.data())
def test_mutated_image_reads_like_qemu_when_both_read_it(
    bases: Callable[[str], Base], workdir: Path, kind: str, data: st.DataObject
) -> None:
    """Differential: where imago and qemu-img both accept a mutated image, they read the same disk."""
    base = bases(kind)
    mutations = data.draw(_mutations(base), label="mutations")
    path = workdir / f"{kind}-differential.qcow2"
    outcome = _mutated(base, mutations, path)
    if outcome is None or outcome.size > 64 << 20:
        return
    raw = workdir / f"{kind}-differential.raw"
    proc = subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw], capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        return
    theirs = raw.read_bytes()
    # QEMU rounds the virtual size down to whole sectors.
    assert len(theirs) == outcome.size // 512 * 512
    common = min(len(theirs), len(outcome.content))
    assert outcome.content[:common] == theirs[:common], f"imago and qemu-img read differently after {mutations}"


# --- writing mutated images -----------------------------------------------------------------------


def exercise_writes(path: Path) -> None:
    """Open for writing and change the disk every way there is. May raise ImagoError."""
    storage = corpus.open_storage(path, writable=True)
    try:
        driver = Qcow2.builder(storage).write(True).open_sync(DenyImplicitOpenGate())
    except BaseException:
        imago.runtime.run_sync(storage.close())
        raise
    disk = SyncFormatAccess(driver)
    try:
        size = disk.size
        cluster = driver.cluster_size
        for offset, length in ((5000, 3000), (CLUSTER - 100, 2 * CLUSTER), (size - 700, 700)):
            if offset >= 0 and offset + length <= size:
                disk.write(bytes([0x5A]) * length, offset)
        for operation in (disk.write_zeroes, disk.discard_to_zero, disk.discard_to_any, disk.discard_to_backing):
            if size >= 3 * CLUSTER:
                operation(CLUSTER // 2, 2 * CLUSTER)
        if 4 * cluster <= size:
            disk.write_compressed(b"compressible " * (cluster // 13) + bytes(cluster % 13), 3 * cluster)
        disk.flush()
        snapshot = driver.create_snapshot_sync("fuzz")
        disk.write(b"\x6b" * 4096, 0)
        driver.apply_snapshot_sync(snapshot.id)
        driver.delete_snapshot_sync(snapshot.id)
        disk.resize(size + (1 << 20))
        disk.write(b"\x7c" * 4096, size)
        disk.resize(size, shrink=True)
        _read(disk)
    finally:
        disk.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(MUTATION_SETTINGS, max_examples=60)
@given(data=st.data())
def test_writing_a_mutated_image_fails_only_with_imago_errors(
    bases: Callable[[str], Base], workdir: Path, kind: str, data: st.DataObject
) -> None:
    """Writes, zeroing, discards, compressed writes, snapshots and resizes of a damaged image:
    success or an ImagoError, never another exception or a hang."""
    base = bases(kind)
    mutations = data.draw(_mutations(base), label="mutations")
    image = bytearray(base.data)
    for mutation in mutations:
        mutation.apply(image)
    note(f"{base.kind}: {mutations}")
    path = workdir / f"{kind}-written.qcow2"
    path.write_bytes(image)
    try:
        with _alarm(EXAMPLE_TIMEOUT):
            exercise_writes(path)
    except ImagoError:
        return
    except (HangError, AssertionError):
        raise
    except Exception as error:
        raise AssertionError(
            f"{base.kind} mutated by {mutations}: writing raised {type(error).__name__}, not an ImagoError: {error}"
        ) from error


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_writing_each_valid_base_image_succeeds(bases: Callable[[str], Base], workdir: Path, kind: str) -> None:
    """The write exercise itself passes on the unmutated images (so the property above tests something)."""
    path = workdir / f"{kind}-written-unmutated.qcow2"
    path.write_bytes(bases(kind).data)
    exercise_writes(path)
    _qemu.check(path)  # clean, and imago's own check agrees
