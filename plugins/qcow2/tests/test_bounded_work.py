"""Work bounded by the file, not by what its tables claim (issue 11, findings 1 and 2).

Each image starts as a valid one made by ``qemu-img`` and is then crafted with :mod:`struct`
(as in ``test_malformed.py``). The tests count work (refcount entries examined, bytes read),
never time.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest

import imago
from imago import CorruptImageError, PermissiveImplicitOpenGate, SyncFormatAccess
from imago_file import File
from imago_qcow2 import Qcow2
from imago_qcow2 import refcounts as refcounts_module

from . import _corpus as corpus

SMALL = 512


@pytest.fixture
def examined(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the refcount entries free-cluster searches look at."""
    count = [0]
    block = refcounts_module.RefcountBlock
    next_free, free_run = block.next_free, block.free_run

    def counting_next_free(self: refcounts_module.RefcountBlock, index: int, end: int) -> int:
        found = next_free(self, index, end)
        count[0] += min(found + 1, end) - index
        return found

    def counting_free_run(self: refcounts_module.RefcountBlock, index: int, limit: int) -> int:
        run = free_run(self, index, limit)
        count[0] += min(run + 1, limit)
        return run

    monkeypatch.setattr(block, "next_free", counting_next_free)
    monkeypatch.setattr(block, "free_run", counting_free_run)
    return count


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every ``(offset, length)`` the file storage reads."""
    seen: list[tuple[int, int]] = []
    readv = File.readv

    async def counting_readv(self: File, bufs: list[memoryview], offset: int) -> None:
        seen.append((offset, sum(len(b) for b in bufs)))
        await readv(self, bufs, offset)

    monkeypatch.setattr(File, "readv", counting_readv)
    return seen


def _read(disk: SyncFormatAccess, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    disk.read(buf, offset)
    return bytes(buf)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(path: Path) -> dict[str, int]:
    """``qemu-img check`` as JSON (leaks allowed: exit status 3)."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    import json

    result: dict[str, int] = json.loads(proc.stdout)
    return result


def _append_refcount_structure(path: Path, blocks: list[int], table_entries: list[int]) -> None:
    """Append refcount blocks (each full of refcount 1) and a new refcount table naming *table_entries*.

    *blocks* are indexes into the appended blocks; the header then points to the new table.
    """
    h = corpus.header(path)
    cs = h.cluster_size
    end = corpus.align_up(corpus.file_size(path), cs)
    ones = struct.pack(">H", 1) * (cs // 2)
    block_offsets = [end + i * cs for i in range(len(blocks))]
    table_offset = end + len(blocks) * cs
    table = struct.pack(f">{len(table_entries)}Q", *table_entries) if table_entries else b""
    table_clusters = -(-len(table) // cs)
    with open(path, "r+b") as f:
        for offset in block_offsets:
            f.seek(offset)
            f.write(ones)
        f.seek(table_offset)
        f.write(table.ljust(table_clusters * cs, b"\0"))
    corpus.put_u64(path, corpus.OFF_REFCOUNT_TABLE_OFFSET, table_offset)
    corpus.put_u32(path, corpus.OFF_REFCOUNT_TABLE_CLUSTERS, table_clusters)


# --- finding 1: refcount tables that claim more than the file holds --------------------------------


def test_refcount_table_naming_one_block_4096_times_is_refused_for_writing(tmp_path: Path, examined: list[int]) -> None:
    """The fuzzer's image: 4096 table entries, all the one block full of 1s (5.6 s of scanning once)."""
    path = corpus.create(tmp_path / "shared.qcow2", 64 << 20, cluster_size=SMALL)
    corpus.apply_writes(path, [corpus.Write(0x11, 0, SMALL)])
    end = corpus.align_up(corpus.file_size(path), SMALL)
    _append_refcount_structure(path, [0], [end] * 4096)
    before = _sha(path)
    with imago.open(path, "qcow2", write=True) as disk, pytest.raises(CorruptImageError) as info:
        disk.write(b"x" * 4096, 8 << 20)
    assert "both name the refcount block" in str(info.value)
    assert info.value.offset == corpus.header(path).refcount_table_offset + 8
    assert examined[0] == 0  # refused before any search
    assert _sha(path) == before
    # qemu-img check sees the damage too.
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True, timeout=120).returncode == 2
    # Read-only, the image still reads.
    with imago.open(path, "qcow2") as disk:
        assert _read(disk, SMALL, 0) == b"\x11" * SMALL


def test_refcount_block_overlapping_other_metadata_is_refused_for_writing(tmp_path: Path) -> None:
    path = corpus.create(tmp_path / "overlap.qcow2", 4 << 20, cluster_size=SMALL)
    h = corpus.header(path)
    table = corpus.get_u64(path, h.refcount_table_offset)
    # A second table entry names the L1 table's cluster as a refcount block.
    corpus.put_u64(path, h.refcount_table_offset + 8, h.l1_table_offset)
    assert table
    with (
        imago.open(path, "qcow2", write=True) as disk,
        pytest.raises(CorruptImageError, match="overlaps the active L1"),
    ):
        disk.write(b"x" * 512, 0)


@pytest.mark.parametrize("blocks", [64, 512])
def test_leaked_refcounts_past_the_end_are_not_searched(tmp_path: Path, examined: list[int], blocks: int) -> None:
    """Distinct refcount blocks full of 1s claim *blocks* x 256 clusters; the file has a few hundred.

    Before: the first allocating write looked at every claimed entry and put the data
    past all of them (a sparse file of blocks x 128 KiB). Now the search stops where the
    file ends (nothing there can be anybody's) and the data goes there.
    """
    path = corpus.create(tmp_path / "leaks.qcow2", 64 << 20, cluster_size=SMALL)
    corpus.apply_writes(path, [corpus.Write(0x11, 0, SMALL)])
    h = corpus.header(path)
    per_block = SMALL * 8 // 16
    first_block = corpus.refcount_blocks(path)[0]
    # Block 0 (qemu-img's) claims every cluster it covers past the end of the file too.
    used = corpus.file_size(path) // SMALL
    corpus.patch(path, first_block + 2 * used, struct.pack(">H", 1) * (per_block - used))
    end = corpus.align_up(corpus.file_size(path), SMALL)
    _append_refcount_structure(path, list(range(blocks)), [first_block] + [end + i * SMALL for i in range(blocks)])
    assert corpus.header(path).refcount_table_offset != h.refcount_table_offset
    size_before = corpus.file_size(path)
    clusters_before = size_before // SMALL
    claimed = (blocks + 1) * per_block
    assert claimed > 4 * clusters_before
    with imago.open(path, "qcow2", write=True) as disk:
        disk.write(b"\x22" * 4096, 8 << 20)
    assert examined[0] <= clusters_before + 64, (examined[0], clusters_before)
    # The data (and its L2 table) went to the end of the file, not past the claimed clusters.
    assert corpus.file_size(path) <= size_before + 16 * SMALL
    result = _check(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    corpus.qemu_io(path, "read -P 0x22 8M 4k", "read -P 0x11 0 512")


# --- finding 2: snapshots whose L1 tables are read at open -----------------------------------------


def _many_snapshots(directory: Path, count: int, l1_entries: int) -> tuple[Path, int]:
    """An image whose *count* snapshots all name the one real snapshot's L1 table, *l1_entries* long.

    The refcounts are then made right by ``qemu-img check -r all`` (the shared table counts
    once per snapshot), so the image is writable. Returns the path and the L1 table offset.
    """
    path = corpus.create(directory / "snaps.qcow2", 1 << 20)
    corpus.apply_writes(path, [corpus.Write(0x44, 0, 65536)])
    subprocess.run(["qemu-img", "snapshot", "-c", "s0", str(path)], check=True, timeout=60)
    snapshot = corpus.snapshots(path)[0]
    assert l1_entries * 8 <= corpus.header(path).cluster_size  # (inside the table's one cluster)
    entries = [
        corpus.encode_snapshot_entry(
            l1_table_offset=snapshot.l1_table_offset,
            l1_size=l1_entries,
            id=str(i).encode(),
            name=f"s{i}".encode(),
            disk_size=1 << 20,
        )
        for i in range(count)
    ]
    corpus.replace_snapshot_table(path, entries)
    corpus.patch(path, corpus.align_up(corpus.file_size(path), 65536) - 1, b"\0")  # (whole clusters)
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(path)], capture_output=True, timeout=120)
    assert _check(path).get("corruptions", 0) == 0
    return path, snapshot.l1_table_offset


def _inside(reads: list[tuple[int, int]], start: int, length: int) -> int:
    """Bytes read that overlap ``[start, start + length)``."""
    return sum(max(0, min(o + n, start + length) - max(o, start)) for o, n in reads)


@pytest.fixture(scope="module")
def snapshot_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    return _many_snapshots(tmp_path_factory.mktemp("snaps"), 2048, 8192)


@pytest.mark.parametrize("write", [False, True], ids=["read-only", "writable"])
def test_opening_reads_no_snapshot_l1_table(
    snapshot_image: tuple[Path, int], reads: list[tuple[int, int]], write: bool, tmp_path: Path
) -> None:
    source, l1_offset = snapshot_image
    path = tmp_path / "copy.qcow2"
    path.write_bytes(source.read_bytes())
    image = Qcow2.builder_path(path).write(write).open_sync(PermissiveImplicitOpenGate())
    disk = SyncFormatAccess(image)
    try:
        assert _inside(reads, l1_offset, 65536) == 0
        assert len(image.snapshots) == 2048
        size = corpus.file_size(path)
        assert sum(n for _, n in reads) <= size  # (the snapshot table is 2048 small entries)
        if write:
            reads.clear()
            disk.write(b"\x55" * 4096, 65536)
            # The first write reads the snapshots' L2 table offsets: the shared table once,
            # not 2048 times 64 KiB.
            assert _inside(reads, l1_offset, 65536) <= 65536
            assert sum(n for _, n in reads) <= 2 * size
    finally:
        disk.close()
    if write:
        result = _check(path)
        assert result.get("corruptions", 0) == 0, result
        assert result.get("leaks", 0) == 0, result
        corpus.qemu_io(path, "read -P 0x55 64k 4k", "read -P 0x44 0 64k")


def test_damaged_snapshot_l1_entry_still_refuses_writes(tmp_path: Path) -> None:
    path, l1_offset = _many_snapshots(tmp_path, 4, 8192)
    corpus.put_u64(path, l1_offset, corpus.get_u64(path, l1_offset) | 1)  # a reserved bit
    before = _sha(path)
    with imago.open(path, "qcow2", write=True) as disk:
        with pytest.raises(CorruptImageError) as info:
            disk.write(b"x" * 512, 0)
        assert info.value.offset == l1_offset
        assert "L1 entry 0" in str(info.value)
        assert "reserved" in str(info.value)
        with pytest.raises(CorruptImageError):  # (and again, without reading it all again)
            disk.write(b"x" * 512, 0)
        assert _read(disk, 512, 0) == b"\x44" * 512
    assert _sha(path) == before


def test_snapshot_l2_table_with_refcount_zero_refuses_the_first_write(tmp_path: Path) -> None:
    """What opening checked for all metadata, the first write checks for the snapshots' L2 tables."""
    path = corpus.create(tmp_path / "s.qcow2", 1 << 20)
    corpus.apply_writes(path, [corpus.Write(0x44, 0, 65536)])
    subprocess.run(["qemu-img", "snapshot", "-c", "s0", str(path)], check=True, timeout=60)
    corpus.apply_writes(path, [corpus.Write(0x45, 0, 4096)])  # the active L2 table is copied
    snapshot = corpus.snapshots(path)[0]
    (l2,) = corpus.l2_tables(path, snapshot.l1_table_offset, snapshot.l1_size)
    assert l2 not in corpus.l2_tables(path)
    block = corpus.refcount_blocks(path)[0]
    corpus.put_u16(path, block + 2 * (l2 // 65536), 0)
    with imago.open(path, "qcow2", write=True) as disk, pytest.raises(CorruptImageError, match="refcount is 0"):
        disk.write(b"x" * 512, 1 << 19)
    assert corpus.get_u16(path, block + 2 * (l2 // 65536)) == 0


def test_counts_needing_more_bytes_than_the_file_are_refused_at_once(
    tmp_path: Path, reads: list[tuple[int, int]]
) -> None:
    """Sweep: an entry count whose entries cannot fit in the file is refused before they are read."""
    path = corpus.create(tmp_path / "c.qcow2", 1 << 20)
    subprocess.run(["qemu-img", "snapshot", "-c", "s0", str(path)], check=True, timeout=60)
    size = corpus.file_size(path)
    for field, value in [
        (corpus.OFF_NB_SNAPSHOTS, 65536),
        (corpus.OFF_L1_SIZE, 1 << 22),
        (corpus.OFF_REFCOUNT_TABLE_CLUSTERS, 128),
    ]:
        copy = tmp_path / f"{field}.qcow2"
        copy.write_bytes(path.read_bytes())
        width = 4
        corpus.patch(copy, field, value.to_bytes(width, "big"))
        reads.clear()
        with pytest.raises(CorruptImageError):
            imago.open(copy, "qcow2", write=True).close()
        assert sum(n for _, n in reads) <= size, field
    assert os.path.exists(path)


def test_65536_snapshots_with_32_mib_l1_tables_open_for_writing_without_reading_them(
    tmp_path: Path, reads: list[tuple[int, int]]
) -> None:
    """The fuzzer's second image: 65536 snapshots, each naming a 32 MiB L1 table (one, in a sparse file).

    Opening it for writing parsed every snapshot's L1 table (2 TiB: about 10 hours). Now it
    reads the header, the tables opening needs and the snapshot table: no L1 table byte.
    """
    cluster = 1 << 16
    l1_entries = (32 << 20) // 8
    l1_offset = 4 << 20
    table = bytearray()
    for i in range(65536):
        table += corpus.encode_snapshot_entry(
            l1_table_offset=l1_offset, l1_size=l1_entries, id=f"{i:x}".encode(), name=b"s", disk_size=1 << 20
        )
    snapshots_offset = corpus.align_up(l1_offset + l1_entries * 8, cluster)
    header = corpus.craft_header(
        size=1 << 20,
        l1_size=1,
        l1_table_offset=cluster,
        refcount_table_offset=2 * cluster,
        nb_snapshots=65536,
        snapshots_offset=snapshots_offset,
        file_length=cluster,
    )
    path = tmp_path / "bomb.qcow2"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(snapshots_offset)
        f.seek(snapshots_offset)
        f.write(table)
    image = Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    disk = SyncFormatAccess(image)
    try:
        assert len(image.snapshots) == 65536
        assert _inside(reads, l1_offset, l1_entries * 8) == 0
        assert sum(n for _, n in reads) <= 2 * len(table) + 8 * cluster
        # (No refcount block counts the metadata: the image is open for a repair only.)
        with pytest.raises(CorruptImageError, match="refcount is 0"):
            disk.write(b"x" * 512, 0)
    finally:
        disk.close()


def test_repairing_a_refcount_block_named_far_past_the_end_works_by_the_clusters_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by fuzzing (cli_check): QEMU repairs such an image by growing the file (sparse) to the
    # named block; counting then compared, and rebuilt, 33 Mi clusters one by one in Python. Now a
    # block that far out (past twice the file's size) is left out by rebuilding the refcounts, and
    # the file keeps its size (QEMU's grows to 128 GiB, and the check's counts in memory with it).
    from imago_qcow2 import refcount_array

    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    corpus.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", ours, "1M")
    corpus.qemu_io(ours, "write -P 3 0 64k")
    table = struct.unpack(">Q", corpus.read_at(ours, corpus.OFF_REFCOUNT_TABLE_OFFSET, 8))[0]
    with open(ours, "r+b") as file:
        file.seek(table + 63 * 8)
        file.write(struct.pack(">Q", 128 << 30))
    theirs.write_bytes(ours.read_bytes())
    looked_up = [0]
    getitem = refcount_array.RefcountArray.__getitem__

    def counting(self: refcount_array.RefcountArray, cluster: int) -> int:
        looked_up[0] += 1
        return getitem(self, cluster)

    monkeypatch.setattr(refcount_array.RefcountArray, "__getitem__", counting)
    with imago.open(ours, "qcow2", write=True, for_check=True) as disk:
        result = disk.check("all")
    assert looked_up[0] < 100_000  # 33 Mi before; the clusters in use are a few dozen
    assert result.corruptions_fixed > 0
    assert result.corruptions == 0
    assert any("too far to grow the image" in finding.message for finding in result.repaired)
    assert any(finding.message == "Rebuilding refcount structure" for finding in result.repaired)
    size = ours.stat().st_size
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(theirs)], check=False)
    assert theirs.stat().st_size > 128 << 30  # QEMU grew its copy to the block
    assert size < 1 << 20  # ours was not grown
    assert subprocess.run(["qemu-img", "check", "-q", str(ours)], check=False).returncode == 0
    assert subprocess.run(["qemu-img", "compare", "-q", str(ours), str(theirs)], check=False).returncode == 0
