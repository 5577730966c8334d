"""The check's work is bounded by the file, not by what the snapshot table claims (issue 11).

In a valid image no two L1 tables share a cluster. A snapshot whose L1 table overlaps one
counted before it is reported and its table is not walked, and every L1 table is read only
as far as the file reaches, so the L1 bytes a check reads add up to the file at most: 65536
snapshots naming one 32 MiB table (or tables shifted by a cluster) were 2 TiB to read and
parse. The images start as ``qemu-img`` made them; their snapshot tables are then rewritten
with :mod:`struct` (``_corpus``). The tests count bytes read through a counting storage, never
time; the unchanged path is compared with ``qemu-img check --output=json``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import AnnotatedStorage, CheckResult, FindingKind, PermissiveImplicitOpenGate, RepairMode, SyncFormatAccess
from imago_qcow2 import Qcow2

from . import _corpus as corpus
from .test_check import assert_same_check

CLUSTER = 65536
L1_ENTRIES = (32 << 20) // 8  # QEMU's largest snapshot L1 table
OVERLAP = "L1 table overlaps another L1 table"


class CountingStorage(AnnotatedStorage[str]):
    """Forwards everything; counts the bytes read and where."""

    def __init__(self, inner: imago.Storage) -> None:
        super().__init__(inner, "counting")
        self.reads: list[tuple[int, int]] = []

    @property
    def bytes_read(self) -> int:
        """Every byte read so far."""
        return sum(length for _, length in self.reads)

    def read_inside(self, start: int, length: int) -> int:
        """Bytes read that overlap ``[start, start + length)``."""
        return sum(max(0, min(o + n, start + length) - max(o, start)) for o, n in self.reads)

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Counted, then forwarded."""
        self.reads.append((offset, sum(len(buf) for buf in bufs)))
        await super().readv(bufs, offset)

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Counted, then forwarded."""
        self.reads.append((offset, sum(len(buf) for buf in bufs)))
        super().readv_inline(bufs, offset)


def open_counting(path: Path, *, write: bool) -> tuple[SyncFormatAccess, CountingStorage]:
    """The image opened for a check (or a repair) over a counting storage."""
    options = imago.StorageOpenOptions(filename=path, writable=write)
    storage = CountingStorage(imago.storage_driver("file").open_sync(options))
    driver = Qcow2.builder(storage).write(write).for_check(True).open_sync(PermissiveImplicitOpenGate())
    return SyncFormatAccess(driver), storage


def qemu_check_json(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode in (0, 2, 3), proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def assert_qemu_clean(path: Path) -> None:
    report = qemu_check_json(path)
    problems = {key: report.get(key, 0) for key in ("check-errors", "corruptions", "leaks")}
    assert problems == {"check-errors": 0, "corruptions": 0, "leaks": 0}, report


def qemu_findings(path: Path) -> list[str]:
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True, check=False, timeout=120
    )
    return proc.stderr.splitlines()


def image_with_snapshots(path: Path, count: int) -> Path:
    """A qemu-img image with *count* snapshots of different content (64 KiB clusters)."""
    corpus.create(path, 4 << 20)
    for number in range(count):
        corpus.apply_writes(path, [corpus.Write(0x30 + number, number * CLUSTER, CLUSTER)])
        corpus.qemu_img("snapshot", "-c", f"s{number}", path)
    corpus.apply_writes(path, [corpus.Write(0x60, 0, 4096)])
    return path


def overlap_snapshots(path: Path, count: int, *, l1_size: int, shift: int) -> tuple[int, int]:
    """Replace the snapshot table: *count* entries naming *l1_size* entries at the first real
    snapshot's L1 table plus ``number * shift`` bytes. Returns that L1 offset and the table's size."""
    first = corpus.snapshots(path)[0]
    entries = [
        corpus.encode_snapshot_entry(
            l1_table_offset=first.l1_table_offset + number * shift,
            l1_size=l1_size,
            id=f"{number + 1}".encode(),
            name=f"x{number}".encode(),
            disk_size=4 << 20,
        )
        for number in range(count)
    ]
    corpus.replace_snapshot_table(path, entries)
    return first.l1_table_offset, sum(map(len, entries))


def check(path: Path, fix: RepairMode | None = None) -> tuple[CheckResult, CountingStorage]:
    image, storage = open_counting(path, write=fix is not None)
    with image:
        return image.check(fix), storage


# --- 65536 snapshots naming 32 MiB L1 tables -------------------------------------------------------


@pytest.fixture(scope="module")
def bomb_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qemu-img image with one snapshot (of a disk written here)."""
    return image_with_snapshots(tmp_path_factory.mktemp("bomb") / "base.qcow2", 1)


def make_bomb(base: Path, path: Path, *, shift: int) -> tuple[int, int]:
    """65536 snapshots naming 32 MiB L1 tables at one offset plus ``number * shift``.

    The snapshot table goes to the end of the file, then a copy of the real snapshot's L1
    table, which the file (sparse) holds for all of its 32 MiB. Returns the copy's offset and
    the file size.
    """
    path.write_bytes(base.read_bytes())
    real = corpus.snapshots(path)[0]
    table_offset = corpus.align_up(corpus.file_size(path), CLUSTER)
    l1_offset = table_offset + corpus.align_up(65536 * 72, CLUSTER)  # (after the table: 72 bytes an entry at most)
    table = b"".join(
        corpus.encode_snapshot_entry(
            l1_table_offset=l1_offset + number * shift,
            l1_size=L1_ENTRIES,
            id=f"{number + 1}".encode(),
            name=f"x{number}".encode(),
            disk_size=4 << 20,
        )
        for number in range(65536)
    )
    assert l1_offset >= table_offset + len(table)
    corpus.patch(path, table_offset, table)
    corpus.patch(path, l1_offset, corpus.read_at(path, real.l1_table_offset, CLUSTER))
    with path.open("r+b") as file:
        file.truncate(l1_offset + L1_ENTRIES * 8)
    corpus.put_u64(path, corpus.OFF_SNAPSHOTS_OFFSET, table_offset)
    corpus.put_u32(path, corpus.OFF_NB_SNAPSHOTS, 65536)
    return l1_offset, corpus.file_size(path)


@pytest.mark.parametrize("shift", [0, CLUSTER], ids=["one-offset", "shifted-by-a-cluster"])
def test_65536_overlapping_32_mib_l1_tables_are_read_once(bomb_base: Path, tmp_path: Path, shift: int) -> None:
    l1_offset, size = make_bomb(bomb_base, tmp_path / "bomb.qcow2", shift=shift)
    assert size < 48 << 20  # (what was read before: 65536 x 32 MiB = 2 TiB)
    result, storage = check(tmp_path / "bomb.qcow2")
    # The L1 tables' bytes once; the snapshot table (before them) by the open and the check.
    assert storage.read_inside(l1_offset, size - l1_offset) == size - l1_offset
    assert storage.bytes_read <= 2 * size, storage.bytes_read
    overlaps = [f for f in result.findings if OVERLAP in f.message]
    # Shifted, every 512th table (32 MiB on) overlaps none before it: those lie past the end.
    expected = 65535 if shift == 0 else 65536 - len(range(0, 65536, L1_ENTRIES * 8 // CLUSTER))
    assert len(overlaps) == expected
    assert {f.kind for f in overlaps} == {FindingKind.CORRUPTION}
    assert overlaps[0].message == (
        f"ERROR snapshot 2 (x1) l1_offset={l1_offset + shift:#x}: {OVERLAP}; snapshot table entry corrupted"
    )
    assert result.corruptions >= expected
    assert result.check_errors == 0


def test_repair_discards_the_overlapping_snapshots_in_bounded_work(bomb_base: Path, tmp_path: Path) -> None:
    path = tmp_path / "bomb.qcow2"
    _, size = make_bomb(bomb_base, path, shift=0)
    result, storage = check(path, RepairMode.ALL)
    assert storage.bytes_read <= 4 * size, storage.bytes_read
    discarded = [f for f in result.repaired if OVERLAP in f.message]
    assert len(discarded) == 65535
    assert all(f.fixed and f.message.endswith("snapshot discarded") for f in discarded)
    assert (result.corruptions, result.check_errors, result.leaks) == (0, 0, 0), result.findings[:5]
    assert [s.id for s in corpus.snapshots(path)] == [b"1"]
    assert_qemu_clean(path)  # (its check now reads one table: the one that is left)
    assert list(snapshot_contents(path)) == ["x0"]


# --- a few overlapping tables: what the check reports, what the repair keeps -------------------------


def test_overlapping_snapshot_counts_its_clusters_as_qemu_img_does(tmp_path: Path) -> None:
    """The refcount comparison still shows the shared L1 cluster as qemu-img reports it."""
    path = image_with_snapshots(tmp_path / "two.qcow2", 2)
    real = corpus.snapshots(path)
    entries = [
        corpus.encode_snapshot_entry(
            l1_table_offset=snapshot.l1_table_offset,
            l1_size=snapshot.l1_size,
            id=snapshot.id,
            name=snapshot.name,
            disk_size=4 << 20,
        )
        for snapshot in real
    ]
    # A third snapshot naming s0's table.
    entries.append(
        corpus.encode_snapshot_entry(
            l1_table_offset=real[0].l1_table_offset, l1_size=real[0].l1_size, id=b"9", name=b"copy", disk_size=4 << 20
        )
    )
    corpus.replace_snapshot_table(path, entries)
    result, _ = check(path)
    mine = [line for f in result.findings for line in f.message.splitlines()]
    assert (
        f"ERROR snapshot 9 (copy) l1_offset={real[0].l1_table_offset:#x}: {OVERLAP}; snapshot table entry corrupted"
        in (mine)
    )
    l1_cluster = real[0].l1_table_offset // CLUSTER
    line = f"ERROR cluster {l1_cluster} refcount=1 reference=2"
    assert line in qemu_findings(path)
    assert line in mine


def test_repair_keeps_the_first_table_and_the_snapshots_read_as_before(tmp_path: Path) -> None:
    path = image_with_snapshots(tmp_path / "three.qcow2", 3)
    real = corpus.snapshots(path)
    before = snapshot_contents(path)
    entries = [
        corpus.encode_snapshot_entry(
            l1_table_offset=s.l1_table_offset, l1_size=s.l1_size, id=s.id, name=s.name, disk_size=4 << 20
        )
        for s in real
    ]
    # Two crafted entries: one naming s1's table, one whose table runs from s2's into the next cluster.
    crafted = [(b"91", real[1].l1_table_offset, real[1].l1_size), (b"92", real[2].l1_table_offset, CLUSTER // 8 + 1)]
    entries += [
        corpus.encode_snapshot_entry(l1_table_offset=offset, l1_size=size, id=ident, name=b"bad", disk_size=4 << 20)
        for ident, offset, size in crafted
    ]
    corpus.replace_snapshot_table(path, entries)
    result, _ = check(path, RepairMode.ALL)
    assert (result.corruptions, result.check_errors, result.leaks) == (0, 0, 0), result.findings
    assert [f.message for f in result.repaired if OVERLAP in f.message] == [
        f"Repairing snapshot {ident.decode()} (bad) l1_offset={offset:#x}: {OVERLAP}; snapshot discarded"
        for ident, offset, _ in crafted
    ]
    assert [s.name for s in corpus.snapshots(path)] == [s.name for s in real]
    assert_qemu_clean(path)
    assert snapshot_contents(path) == before


def snapshot_contents(path: Path) -> dict[str, bytes]:
    """Each snapshot's disk, read by imago, by name."""
    driver = Qcow2.builder_path(path).open_sync(PermissiveImplicitOpenGate())
    found: dict[str, bytes] = {}
    try:
        for snapshot in driver.snapshots:
            view = SyncFormatAccess(driver.read_snapshot_sync(snapshot.name))
            buf = bytearray(view.size)
            view.read(buf, 0)
            view.close()
            found[snapshot.name] = bytes(buf)
    finally:
        SyncFormatAccess(driver).close()
    return found


# --- the unchanged path: valid images with snapshots check exactly as qemu-img reports ---------------


@pytest.mark.parametrize("count", [1, 4])
def test_valid_image_with_snapshots_checks_as_qemu_img(tmp_path: Path, count: int) -> None:
    path = image_with_snapshots(tmp_path / "valid.qcow2", count)
    result = assert_same_check(path)
    assert result.corruptions == 0
    assert not [f for f in result.findings if OVERLAP in f.message]
