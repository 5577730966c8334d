"""Writing qcow2 images with extended L2 entries (32 subclusters per cluster), judged by QEMU.

Images are made by ``qemu-img create -o extended_l2=on`` and QEMU's tools put every subcluster
state into them; imago then writes, and ``qemu-img check`` / ``compare`` / ``map`` judge, with
the L2 entries themselves read independently (``_qemu.qcow2_layout``) where a test pins down
QEMU's allocation behaviour: a write allocates a whole host cluster but only the subclusters
it touches, copying on write only the unwritten part of partly written subclusters; zeroing
and discards work per subcluster.

* Directed tests: partial subcluster writes (alone, over a backing file, into zero and
  unallocated subclusters of allocated clusters), zeroing and discards, compressed clusters,
  clusters shared with a snapshot, 2 MiB clusters, external data files, resizing.
* The core conformance suite on an extended-L2 image.
* A hypothesis workload (the state machine of test_write.py plus subcluster-sized requests and
  compressed writes) over those options, against a bytearray model.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

import imago
from imago import FormatDriver, PermissiveImplicitOpenGate, StorageCreateOptions
from imago.testing.model import DiskModel
from imago_file import File
from imago_qcow2 import Qcow2

from . import _qemu, test_qcow2
from ._qemu import MiB
from .test_interop import check_image
from .test_write import (
    Config,
    Template,
    _WriteWorkload,
    assert_same,
    build_template,
    check_clean,
    convert,
    make_backed,
    noise,
    open_rw,
    read_all,
    write_concurrently,
)

KiB = 1 << 10
CS = 64 * KiB
SUB = CS // 32
ALL = (1 << 32) - 1


def ext(cluster_size: int = CS, **more: object) -> dict[str, object]:
    """Creation options for an extended-L2 image."""
    return {"extended_l2": True, "cluster_size": cluster_size, **more}


def bits(first: int, stop: int) -> int:
    """Allocation bits of subclusters ``[first, stop)``."""
    return (1 << stop) - (1 << first)


def zero_bits(first: int, stop: int) -> int:
    """Zero bits of subclusters ``[first, stop)``."""
    return bits(first, stop) << 32


def l2(path: Path) -> dict[int, tuple[int, int]]:
    """Guest cluster -> (descriptor, bitmap) of the active L2 entries, read independently."""
    layout = _qemu.qcow2_layout(path)
    assert layout.extended_l2
    return {e.guest_cluster: (e.entry, e.bitmap) for e in layout.entries}


def host_of(entry: tuple[int, int]) -> int:
    return entry[0] & _qemu.L2E_OFFSET_MASK


def judge(path: Path, model: DiskModel, tmp_path: Path, files_by_depth: list[Path] | None = None) -> None:
    """No leaks or errors; QEMU reads the model; imago's mappings agree with ``qemu-img map``."""
    check_clean(path, cwd=path.parent)
    assert_same(convert(path, tmp_path, cwd=path.parent), bytes(model.data), "qemu")
    files = [str(f) for f in files_by_depth] if files_by_depth else None
    check_image(path, tmp_path, files_by_depth=files, qemu_cwd=path.parent)


# --- data writes ----------------------------------------------------------------------------------


def test_partial_subcluster_writes_over_backing_file(tmp_path: Path) -> None:
    size = 2 * MiB
    model = DiskModel(size)
    model.write(0, make_backed(tmp_path, MiB + 1536, size, options=ext()))
    path = tmp_path / "top.qcow2"
    rng = random.Random(1)
    writes = [
        (CS + 5000, 1000),  # inside subcluster 2 of cluster 1
        (3 * CS - 100, 300),  # the last subcluster of cluster 2, the first of cluster 3
        (5 * CS + 3 * SUB, 4 * SUB),  # subclusters 3-6, aligned: nothing to copy
        (MiB + 1000, 2000),  # across the end of the backing file
        (CS + 20 * SUB + 1, 1),  # a second subcluster of cluster 1
    ]
    with open_rw(path) as image:
        for offset, length in writes:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    entries = l2(path)
    assert {c: e[1] for c, e in entries.items()} == {
        1: bits(2, 3) | bits(20, 21),
        2: bits(31, 32),
        3: bits(0, 1),
        5: bits(3, 7),
        16: bits(0, 2),
    }
    # One host cluster per L2 entry, COPIED, all distinct.
    assert all(e[0] & _qemu.QCOW_OFLAG_COPIED and host_of(e) for e in entries.values())
    assert len({host_of(e) for e in entries.values()}) == len(entries)


def test_writes_into_allocated_clusters(tmp_path: Path) -> None:
    # Allocated clusters whose subclusters are allocated, zero (with and without data behind
    # them) or unallocated: writes go in place, into the host cluster the entry has.
    size = MiB
    model = DiskModel(size)
    model.write(0, make_backed(tmp_path, size, size, options=ext()))
    path = tmp_path / "top.qcow2"
    _qemu.qemu_io(
        path,
        f"write -P 0x11 0 {4 * CS}",
        f"write -z {2 * SUB} {4 * SUB}",  # zero subclusters 2-5 of cluster 0
        f"write -P 0x22 {CS + 8 * SUB} {SUB}",  # cluster 1 was written whole: overwritten
        f"write -P 0x33 {4 * CS + 10 * SUB} {2 * SUB}",  # cluster 4: subclusters 10-11 only
        cwd=tmp_path,
    )
    model.write(0, _qemu.fill_bytes(4 * CS, 0x11))
    model.zero(2 * SUB, 4 * SUB)
    model.write(CS + 8 * SUB, _qemu.fill_bytes(SUB, 0x22))
    model.write(4 * CS + 10 * SUB, _qemu.fill_bytes(2 * SUB, 0x33))
    before = l2(path)
    assert before[0][1] == (ALL & ~bits(2, 6)) | zero_bits(2, 6)
    assert before[4][1] == bits(10, 12)
    rng = random.Random(2)
    writes = [
        (2 * SUB + 100, 50),  # into a zero subcluster: the rest of it reads zero
        (5 * SUB - 10, 20),  # across zero subclusters 4 and 5 (3 stays zero)
        (CS + 100, 2 * CS),  # allocated clusters, in place
        (4 * CS + 3 * SUB + 7, 5 * SUB),  # unallocated subclusters 3-8 of cluster 4: from the backing file
        (4 * CS + 12 * SUB - 5, 10),  # allocated subcluster 11 and unallocated 12
    ]
    with open_rw(path) as image:
        for offset, length in writes:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    after = l2(path)
    assert {c: host_of(e) for c, e in after.items()} == {c: host_of(e) for c, e in before.items()}, "moved"
    assert after[0][1] == (ALL & ~bits(3, 4)) | zero_bits(3, 4)
    assert after[4][1] == bits(3, 9) | bits(10, 13)


def test_write_into_compressed_cluster(tmp_path: Path) -> None:
    # As QEMU does: the whole cluster is decompressed into a new, fully allocated one.
    size = MiB
    path = tmp_path / "c.qcow2"
    _qemu.create(path, size, options=ext())
    source = _qemu.text_bytes(2 * CS, 4)
    (tmp_path / "src").write_bytes(source)
    _qemu.qemu_io(path, f"write -c -s {tmp_path / 'src'} {2 * CS} {2 * CS}", cwd=tmp_path)
    assert len(list(_qemu.qcow2_layout(path).compressed_ranges())) == 2
    model = DiskModel(size)
    model.write(2 * CS, source)
    with open_rw(path) as image:
        image.write(b"x" * 100, 2 * CS + 5 * SUB + 3)
        model.write(2 * CS + 5 * SUB + 3, b"x" * 100)
        # Zeroing part of the other compressed cluster: data mappings do it (copy-on-write).
        image.write_zeroes(3 * CS + 4 * SUB, 2 * SUB)
        model.zero(3 * CS + 4 * SUB, 2 * SUB)
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path)
    entries = l2(path)
    assert not list(_qemu.qcow2_layout(path).compressed_ranges())
    assert entries[2][1] == ALL
    assert entries[3][1] == ALL  # zeroing part of a compressed cluster wrote zeroes into a copy


def test_write_compressed(tmp_path: Path) -> None:
    size = MiB
    path = tmp_path / "wc.qcow2"
    _qemu.create(path, size, options=ext())
    _qemu.qemu_io(path, f"write -P 0x11 0 {SUB}", f"write -z {CS} {SUB}", cwd=tmp_path)
    data = _qemu.text_bytes(3 * CS, 5)
    model = DiskModel(size)
    with open_rw(path) as image:
        image.write_compressed(data, 0)
        model.write(0, data)
        image.write_compressed(data[: 2 * CS], size - 2 * CS)
        model.write(size - 2 * CS, data[: 2 * CS])
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path)
    entries = l2(path)
    compressed = {c for c, _, _ in _qemu.qcow2_layout(path).compressed_ranges()}
    assert compressed == {0, 1, 2, 14, 15}
    assert all(entries[c][1] == 0 for c in compressed), "a compressed cluster has a bitmap"


def test_shared_cluster_copy_on_write(tmp_path: Path) -> None:
    # A cluster shared with an internal snapshot: a new host cluster gets the subclusters
    # allocated before (those not written) and the written ones; zero and unallocated
    # subclusters keep their state. The snapshot keeps its content.
    size = MiB
    model = DiskModel(size)
    model.write(0, make_backed(tmp_path, size, size, options=ext()))
    path = tmp_path / "top.qcow2"
    _qemu.qemu_io(
        path, f"write -P 0x11 {4 * SUB} {8 * SUB}", f"write -z {20 * SUB} {2 * SUB}", f"write -P 0x12 {CS} {CS}"
    )
    model.write(4 * SUB, _qemu.fill_bytes(8 * SUB, 0x11))
    model.zero(20 * SUB, 2 * SUB)
    model.write(CS, _qemu.fill_bytes(CS, 0x12))
    _qemu.qemu_img("snapshot", "-c", "s", path, cwd=tmp_path)
    snapshot = convert(path, tmp_path, snapshot="snapshot.name=s", cwd=tmp_path)
    old = l2(path)
    rng = random.Random(3)
    with open_rw(path) as image:
        image.write_zeroes(CS + 16 * SUB, 16 * SUB)  # a partly zeroed shared cluster keeps its host
        model.zero(CS + 16 * SUB, 16 * SUB)
        for offset, length in [(6 * SUB + 5, 10), (25 * SUB + 1, SUB), (CS + 3, 10)]:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    assert_same(convert(path, tmp_path, snapshot="snapshot.name=s", cwd=tmp_path), snapshot, "the snapshot")
    new = l2(path)
    assert host_of(new[0]) != host_of(old[0])
    assert host_of(new[1]) != host_of(old[1])
    assert new[0][1] == bits(4, 12) | bits(25, 27) | zero_bits(20, 22)
    assert new[1][1] == bits(0, 16) | zero_bits(16, 32)
    _qemu.qemu_img("snapshot", "-d", "s", path, cwd=tmp_path)
    check_clean(path, cwd=tmp_path)


def test_concurrent_writes_into_subclusters(tmp_path: Path) -> None:
    # Many small writes at once, several per subcluster and many per cluster, none
    # overlapping: allocation, in-place writes and subcluster copy-on-write race.
    size = MiB
    model = DiskModel(size)
    model.write(0, make_backed(tmp_path, size, size, options=ext(32 * KiB)))
    path = tmp_path / "top.qcow2"
    _qemu.qemu_io(path, f"write -c -P 0x44 {8 * 32 * KiB} {32 * KiB}", f"write -z {9 * 32 * KiB} {4 * KiB}")
    model.write(8 * 32 * KiB, _qemu.fill_bytes(32 * KiB, 0x44))
    model.zero(9 * 32 * KiB, 4 * KiB)
    rng = random.Random(9)
    chunks = {index * 700 + 50: noise(rng, 500) for index in range(600)}
    for offset, data in chunks.items():
        model.write(offset, data)

    assert_same(write_concurrently(path, chunks), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])


# --- zeroes and discards ----------------------------------------------------------------------------


def test_zeroing_and_discards_per_subcluster(tmp_path: Path) -> None:
    size = 2 * MiB
    below = make_backed(tmp_path, size, size, options=ext())
    path = tmp_path / "top.qcow2"
    _qemu.qemu_io(path, f"write -P 0x11 0 {MiB}", cwd=tmp_path)
    model = DiskModel(size)
    model.write(0, below)
    model.write(0, _qemu.fill_bytes(MiB, 0x11))
    hosts = {c: host_of(e) for c, e in l2(path).items()}
    with open_rw(path) as image:
        image.write_zeroes(2 * SUB + 100, 3 * SUB)  # subclusters 3-4 as zero bits, the rest data
        model.zero(2 * SUB + 100, 3 * SUB)
        image.discard_to_zero(CS + 4 * SUB, 4 * SUB)
        model.zero(CS + 4 * SUB, 4 * SUB)
        image.discard_to_backing(2 * CS + 30 * SUB, 4 * SUB)  # across clusters 2 and 3
        model.write(2 * CS + 30 * SUB, below[2 * CS + 30 * SUB : 2 * CS + 34 * SUB])
        image.discard_to_backing(4 * CS, CS)  # a whole cluster: released
        model.write(4 * CS, below[4 * CS : 5 * CS])
        image.discard_to_zero(5 * CS, CS)  # a whole cluster: released, reads as zero
        model.zero(5 * CS, CS)
        image.write_zeroes(6 * CS, CS)  # a whole cluster of ours: kept
        model.zero(6 * CS, CS)
        image.write_zeroes(MiB + 3 * SUB, 2 * SUB)  # zero bits in an unallocated cluster
        model.zero(MiB + 3 * SUB, 2 * SUB)
        for sub in range(32):  # piecewise: the last subcluster discarded releases the cluster
            image.discard_to_backing(7 * CS + sub * SUB, SUB)
        model.write(7 * CS, below[7 * CS : 8 * CS])
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    entries = l2(path)
    assert entries[0] == (hosts[0] | _qemu.QCOW_OFLAG_COPIED, (ALL & ~bits(3, 5)) | zero_bits(3, 5))
    assert entries[1][1] == (ALL & ~bits(4, 8)) | zero_bits(4, 8)
    assert entries[2][1] == bits(0, 30)
    assert entries[3][1] == bits(2, 32)
    assert 4 not in entries
    assert 7 not in entries
    assert entries[5] == (0, zero_bits(0, 32))
    assert entries[6] == (hosts[6] | _qemu.QCOW_OFLAG_COPIED, zero_bits(0, 32))
    assert entries[MiB // CS] == (0, zero_bits(3, 5))


def test_discard_to_zero_frees_space(tmp_path: Path) -> None:
    size = 8 * MiB
    path = tmp_path / "d.qcow2"
    _qemu.create(path, size, options=ext())
    with open_rw(path) as image:
        image.write(_qemu.random_bytes(size, 2), 0)
    full = path.stat().st_blocks * 512
    with open_rw(path) as image:
        image.discard_to_zero(0, size)
        assert read_all(image) == bytes(size)
    assert path.stat().st_blocks * 512 < full // 4
    check_clean(path)
    assert convert(path, tmp_path) == bytes(size)
    assert not [r for r in _qemu.qemu_runs(_qemu.qemu_map(path)) if r.kind == "data"]


# --- geometries and files -------------------------------------------------------------------------


def test_2m_clusters_over_backing_file(tmp_path: Path) -> None:
    cs = 2 * MiB
    sub = cs // 32
    size = 8 * MiB
    below = make_backed(tmp_path, 5 * MiB, size, options=ext(cs))
    model = DiskModel(size)
    model.write(0, below)
    path = tmp_path / "top.qcow2"
    rng = random.Random(6)
    with open_rw(path) as image:
        for offset, length in [(100, 1000), (sub - 1, 2), (cs - 5000, 10000), (3 * cs + 7 * sub, 3 * sub)]:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        image.write_zeroes(cs + 3 * sub - 7, 2 * sub + 14)
        model.zero(cs + 3 * sub - 7, 2 * sub + 14)
        image.discard_to_backing(30 * sub, 4 * sub)  # subclusters 30-31 of cluster 0, 0-1 of cluster 1
        model.write(30 * sub, below[30 * sub : 34 * sub])
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    entries = l2(path)
    assert entries[0][1] == bits(0, 2)
    # The zeroed range's unaligned head and tail were written as data.
    assert entries[1][1] == bits(2, 3) | bits(5, 6) | zero_bits(3, 5)
    assert entries[3][1] == bits(7, 10)


@pytest.mark.parametrize("raw", [False, True], ids=["data-file", "data-file-raw"])
def test_external_data_file(tmp_path: Path, raw: bool) -> None:
    size = 2 * MiB
    path = tmp_path / "d.qcow2"
    _qemu.create(path, size, options=ext(32 * KiB, data_file="d.data", data_file_raw=raw), cwd=tmp_path)
    sub = 1024
    _qemu.qemu_io(path, f"write -P 0x11 {5 * sub} {10 * sub}", f"write -z {40 * sub} {3 * sub}", cwd=tmp_path)
    model = DiskModel(size)
    model.write(5 * sub, _qemu.fill_bytes(10 * sub, 0x11))
    rng = random.Random(7)
    with open_rw(path) as image:
        for offset, length in [(100, 300), (12 * sub + 5, 10 * sub), (70 * sub - 1, 2), (MiB, 100 * sub + 3)]:
            data = noise(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        image.write_zeroes(MiB + 10 * sub, 20 * sub)
        model.zero(MiB + 10 * sub, 20 * sub)
        image.discard_to_zero(6 * sub, 2 * sub)
        model.zero(6 * sub, 2 * sub)
        image.discard_to_any(MiB + 64 * sub, 32 * sub)  # a whole cluster
        model.zero(MiB + 64 * sub, 32 * sub)  # no backing file: reads as zero
        assert_same(read_all(image), bytes(model.data), "imago")
    judge(path, model, tmp_path, [tmp_path / "d.data"])
    for cluster, (descriptor, _) in l2(path).items():
        if host_of((descriptor, 0)) or descriptor & _qemu.QCOW_OFLAG_COPIED:
            assert host_of((descriptor, 0)) == cluster * 32 * KiB, "data not at its guest offset"
    if raw:
        data = (tmp_path / "d.data").read_bytes()[:size]
        assert_same(data + bytes(size - len(data)), bytes(model.data), "the raw data file")


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_resize(tmp_path: Path, prealloc: str) -> None:
    size = MiB + 3 * SUB + 512  # the last cluster is partial
    model = DiskModel(size)
    model.write(0, make_backed(tmp_path, 2 * MiB, size, options=ext()))
    path = tmp_path / "top.qcow2"
    rng = random.Random(8)
    with open_rw(path) as image:
        data = noise(rng, 5000)
        image.write(data, size - 5000)
        model.write(size - 5000, data)
        for new_size in (3 * MiB + 512, MiB - SUB - 512, 2 * MiB + CS):
            image.resize(new_size, prealloc, shrink=True)
            model.resize(new_size)
            assert_same(read_all(image), bytes(model.data), f"imago after resizing to {new_size}")
        data = noise(rng, 3000)
        image.write(data, 2 * MiB - 5000)
        model.write(2 * MiB - 5000, data)
    judge(path, model, tmp_path, [path, tmp_path / "base.raw"])
    if prealloc != "off":
        # The grown area is bound to host clusters, its subclusters not allocated.
        entries = l2(path)
        last = (2 * MiB + CS - 1) // CS
        assert all(host_of(entries[c]) for c in range(MiB // CS, last + 1))
        assert entries[last][1] == 0  # past the backing file: unallocated reads as zero


class TestExtendedL2WriteConformance(test_qcow2.TestQcow2WriteConformance):
    """The core conformance suite on an extended-L2 image (16 KiB clusters: 512-byte subclusters)."""

    def create_image(self, directory: Path, size: int) -> FormatDriver:
        path = directory / "conformance.qcow2"
        storage = File.create_sync(StorageCreateOptions(filename=path, overwrite=True))
        Qcow2.create_builder(storage).size(size).cluster_size(16384).extended_l2(True).create_sync()
        imago.runtime.run_sync(storage.close())
        return Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())


# --- the random workload ------------------------------------------------------------------------

_positions = st.integers(min_value=0, max_value=1 << 30)


class _ExtendedWorkload(_WriteWorkload):
    """test_write's workload plus requests around subcluster boundaries and compressed writes."""

    def _subclusters(self, position: int, count: int, jitter: int) -> tuple[int, int]:
        """*count* subclusters, their start and end moved by *jitter* bytes now and then."""
        sub = self.config.cluster_size // 32
        size = self.model.size
        offset = position % -(-size // sub) * sub
        start = offset + jitter if jitter % 3 else offset
        end = offset + count * sub + (jitter if jitter % 2 else 0)
        start = min(max(0, start), size - 1)
        end = min(max(end, start + 1), size)
        return start, end - start

    @rule(position=_positions, count=st.integers(1, 40), jitter=st.integers(-700, 700))
    def write_subclusters(self, position: int, count: int, jitter: int) -> None:
        offset, length = self._subclusters(position, count, jitter)
        data = noise(self.rng, length)
        self.image.write(data, offset)
        self.model.write(offset, data)

    @rule(
        position=_positions,
        count=st.integers(1, 40),
        jitter=st.integers(-700, 700),
        how=st.sampled_from(["write_zeroes", "discard_to_zero", "discard_to_any", "discard_to_backing"]),
    )
    def zero_subclusters(self, position: int, count: int, jitter: int, how: str) -> None:
        offset, length = self._subclusters(position, count, jitter)
        getattr(self.image, how)(offset, length)
        if how == "discard_to_any":
            self.model.forget(offset, length)
        elif how == "discard_to_backing":
            below = self.template.backing_content[offset : offset + length]
            self.model.write(offset, below + bytes(length - len(below)))
        else:
            self.model.zero(offset, length)

    @rule(position=_positions, count=st.integers(1, 3), compressible=st.booleans())
    def write_compressed(self, position: int, count: int, compressible: bool) -> None:
        if self.config.data_file:
            return  # no compressed clusters with an external data file
        cs = self.config.cluster_size
        size = self.model.size
        offset = position % -(-size // cs) * cs
        length = min(count * cs, size - offset)
        data = _qemu.text_bytes(length, position) if compressible else noise(self.rng, length)
        self.image.write_compressed(data, offset)
        self.model.write(offset, data)


WORKLOAD_CONFIGS = [
    Config("ext-64k", options=ext()),
    Config("ext-64k-backing-qcow2", options=ext(), backing="qcow2"),
    Config("ext-2m-backing-raw", size=8 * MiB, options=ext(2 * MiB), backing="raw"),
    Config("ext-32k-data-file", options=ext(32 * KiB), data_file=True),
    Config("ext-64k-data-file-raw", options=ext(data_file_raw=True), data_file=True),
    Config("ext-16k-snapshot-compressed", options=ext(16 * KiB), snapshots=1, compression="zlib"),
]


@pytest.mark.parametrize("config", WORKLOAD_CONFIGS, ids=lambda c: c.name)
def test_random_workload_matches_model(config: Config, tmp_path: Path) -> None:
    directory = tmp_path / "template"
    directory.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    class Workload(_ExtendedWorkload):
        template: ClassVar[Template] = build_template(config, directory, scratch)

    Workload.resizing = config.name in {"ext-64k", "ext-64k-backing-qcow2"}
    Workload.TestCase.settings = settings(
        max_examples=8,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    Workload.TestCase().runTest()
