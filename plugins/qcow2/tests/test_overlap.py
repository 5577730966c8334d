"""Overlap checks: whatever a damaged table claims, imago never frees, punches, reuses or writes over metadata.

The damaged images are built here with qemu-img and qemu-io plus byte pokes, after the fuzz
findings of the issue: a compressed entry pointing into the header cluster, an L2 entry using
the refcount table's cluster, an L1 entry using it as an L2 table, an L2 entry past the end of
the file. imago refuses such writes (marking the image corrupt on disk, as QEMU does for an
invalid write on metadata) or performs them harmlessly; either way ``qemu-img check`` finds no
more errors afterwards than before, and the file stays a qcow2 image. Where QEMU refuses the
same write, a copy written with qemu-io is marked corrupt too.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imago import CorruptImageError, PermissiveImplicitOpenGate, SyncFormatAccess, runtime
from imago_qcow2 import Qcow2
from imago_qcow2.overlap import L2_TABLES, Metadata, MetadataMap, describe

from . import _qemu
from ._qemu import MiB

CLUSTER = 65536
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# --- building and inspecting images ------------------------------------------------------------


def read_u64(path: Path, offset: int) -> int:
    value: int = struct.unpack_from(">Q", path.read_bytes(), offset)[0]
    return value


def poke_u64(path: Path, offset: int, value: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(struct.pack(">Q", value))


def tables(path: Path) -> dict[str, int]:
    """Where the first L2 table, the L1 table and the refcount table lie."""
    l1 = read_u64(path, 40)
    return {"l1": l1, "l2": read_u64(path, l1) & OFFSET_MASK, "refcount_table": read_u64(path, 48)}


def check_counts(path: Path) -> dict[str, int]:
    """``qemu-img check``'s counts (corruptions, leaks, check errors); a damaged image is no failure here."""
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", os.fspath(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode in (0, 2, 3), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return {key: int(result.get(key, 0)) for key in ("corruptions", "leaks", "check-errors")}


def marked_corrupt(path: Path) -> bool:
    corrupt: bool = _qemu.info(path)["format-specific"]["data"]["corrupt"]
    return corrupt


def open_driver(path: Path) -> Qcow2:
    return Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())


def qemu_io_copy(path: Path, *commands: str) -> Path:
    """A copy of *path* that qemu-io ran *commands* on (failures are QEMU's answer, not ours)."""
    copy = path.with_name("qemu-" + path.name)
    shutil.copyfile(path, copy)
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, os.fspath(copy)], capture_output=True, check=False, timeout=120)
    return copy


def assert_still_qcow2(path: Path, header: bytes) -> None:
    """The header cluster is intact (never punched): only the incompatible features may differ."""
    data = path.read_bytes()
    assert data[:72] == header[:72]
    assert data[80:CLUSTER] == header[80:CLUSTER]
    assert _qemu.info(path)["format"] == "qcow2"


def assert_refused_and_marked(path: Path, header: bytes, before: dict[str, int]) -> None:
    """After imago refused a write: marked corrupt, still qcow2, no new errors, not writable any more."""
    assert marked_corrupt(path)
    assert_still_qcow2(path, header)
    after = check_counts(path)
    assert after["corruptions"] <= before["corruptions"]
    assert after["leaks"] <= before["leaks"]
    assert_not_writable(path)


def assert_not_writable(path: Path) -> None:
    """An image marked corrupt is refused for writing (or, opened for a repair only, refuses writes)."""
    try:
        driver = open_driver(path)
    except CorruptImageError as error:
        problem = str(error)
    else:
        with SyncFormatAccess(driver) as image, pytest.raises(CorruptImageError) as refused:
            image.write(b"\x01", 0)
        problem = str(refused.value)
    assert "corrupt" in problem


# --- the fuzz findings --------------------------------------------------------------------------


def test_compressed_entry_in_the_header_cluster_is_never_released(tmp_path: Path) -> None:
    """Extended L2; a compressed entry points into cluster 0; one whole-cluster write there."""
    path = tmp_path / "c1.qcow2"
    _qemu.create(path, 4 * MiB, options={"extended_l2": True})
    _qemu.qemu_io(path, f"write -c -P 0x41 0 {CLUSTER}", f"write -P 0x42 {2 * CLUSTER} {CLUSTER}")
    where = tables(path)
    entry = read_u64(path, where["l2"])
    assert entry & COMPRESSED
    offset_bits = 62 - (16 - 8)
    sectors = (entry >> offset_bits) & 0xFF
    poke_u64(path, where["l2"], COMPRESSED | sectors << offset_bits | 0x100)  # data "inside" the header
    original = path.with_name("c1-orig.qcow2")
    shutil.copyfile(path, original)
    before, header = check_counts(path), path.read_bytes()[:CLUSTER]
    assert before["corruptions"] >= 1

    with SyncFormatAccess(open_driver(path)) as image:
        with pytest.raises(CorruptImageError, match="qcow2 header") as caught:
            image.write(b"\x55" * CLUSTER, 0)
        assert "marked corrupt" in str(caught.value)
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            image.write(b"\x56" * 512, 3 * CLUSTER)  # elsewhere too: the image is not used any more
        buf = bytearray(CLUSTER)
        image.read(buf, 2 * CLUSTER)  # reading goes on
        assert buf == b"\x42" * CLUSTER
    assert_refused_and_marked(path, header, before)
    # QEMU performs this write (dropping the header cluster's refcount to 0): no better than refusing it.
    theirs = check_counts(qemu_io_copy(original, f"write -P 0x55 0 {CLUSTER}"))
    assert theirs["corruptions"] >= before["corruptions"]


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "not-copied"])
def test_l2_entry_on_the_refcount_table_is_never_written_or_freed(tmp_path: Path, copied: bool) -> None:
    """An L2 entry uses the refcount table's cluster; one write there."""
    path = tmp_path / "c2.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}")
    where = tables(path)
    poke_u64(path, where["l2"] + 8, where["refcount_table"] | (COPIED if copied else 0))
    original = path.with_name("c2-orig.qcow2")
    shutil.copyfile(path, original)
    before, header = check_counts(path), path.read_bytes()[:CLUSTER]

    with SyncFormatAccess(open_driver(path)) as image, pytest.raises(CorruptImageError, match="refcount table"):
        image.write(b"\x55" * CLUSTER, CLUSTER)
    assert_refused_and_marked(path, header, before)
    # The refcount table is intact.
    assert (
        path.read_bytes()[where["refcount_table"] :][:CLUSTER]
        == original.read_bytes()[where["refcount_table"] :][:CLUSTER]
    )
    theirs = qemu_io_copy(original, f"write -P 0x55 {CLUSTER} {CLUSTER}")
    if copied:
        # QEMU: "Preventing invalid write on metadata (overlaps with refcount table)".
        assert marked_corrupt(theirs)


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "not-copied"])
def test_l1_entry_using_the_refcount_table_as_l2_table(tmp_path: Path, copied: bool) -> None:
    """An L1 entry names the refcount table's cluster as its L2 table; writes there."""
    path = tmp_path / "c3.qcow2"
    _qemu.create(path, 1024 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}")
    where = tables(path)
    poke_u64(path, where["l1"] + 8, where["refcount_table"] | (COPIED if copied else 0))
    original = path.with_name("c3-orig.qcow2")
    shutil.copyfile(path, original)
    before, header = check_counts(path), path.read_bytes()[:CLUSTER]

    with SyncFormatAccess(open_driver(path)) as image:
        image.write(b"\x43" * 4096, 4 * MiB)  # a good write first: it stays in the (unflushed) caches
        with pytest.raises(CorruptImageError, match=f"L2 table at {where['refcount_table']:#x}.*refcount table"):
            image.write(b"\x55" * CLUSTER, 512 * MiB)
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            image.write(b"\x55" * CLUSTER, 512 * MiB + CLUSTER)
    assert_refused_and_marked(path, header, before)
    data, old = path.read_bytes(), original.read_bytes()
    table = slice(where["refcount_table"], where["refcount_table"] + CLUSTER)
    assert data[table] == old[table]  # no L2 entry was stored in the refcount table
    theirs = qemu_io_copy(original, f"write -P 0x55 {512 * MiB} {CLUSTER}")
    assert marked_corrupt(theirs)  # QEMU refuses this write too


def test_l2_entry_past_the_end_of_the_file_is_never_aliased(tmp_path: Path) -> None:
    """An L2 entry points past the end of the file; allocating writes elsewhere would hand that cluster out."""
    path = tmp_path / "c4.qcow2"
    _qemu.create(path, 1024 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}", f"write -P 0x42 {512 * MiB} {CLUSTER}")
    where = tables(path)
    past = (path.stat().st_size // CLUSTER + 2) * CLUSTER
    poke_u64(path, where["l2"] + 8, past | COPIED)
    before, original = check_counts(path), path.read_bytes()
    assert before["corruptions"] >= 1

    with SyncFormatAccess(open_driver(path)) as image:
        # The first table was never loaded: the file may only grow once it is known to map nothing there.
        with pytest.raises(CorruptImageError, match=r"past the end of the file.*not grown"):
            image.write(b"\x66" * CLUSTER, 600 * MiB)
        with pytest.raises(CorruptImageError, match="past the end of the file"):
            image.write(b"\x67" * CLUSTER, 700 * MiB)
        with pytest.raises(CorruptImageError, match="past the end of the file"):
            image.write(b"\x68" * 4096, CLUSTER)
        image.write(b"\x69" * 4096, 512 * MiB)  # in place: harmless
    assert path.read_bytes()[:CLUSTER] == original[:CLUSTER]  # not marked corrupt: qemu-img cannot repair it
    assert not marked_corrupt(path)
    after = check_counts(path)
    assert after["corruptions"] <= before["corruptions"]
    assert after["leaks"] <= before["leaks"]
    _qemu.qemu_io(path, f"read -P 0x69 {512 * MiB} 4096", f"read -P 0x41 0 {CLUSTER}")


# --- more ways to free or overwrite metadata ------------------------------------------------------


@pytest.mark.parametrize("operation", ["write_zeroes", "discard_to_zero", "discard_to_any", "write_compressed"])
def test_zeroing_or_replacing_an_entry_on_metadata_never_frees_it(tmp_path: Path, operation: str) -> None:
    """Zeroing and discarding release the entries they cover: one using the L1 table's cluster is refused."""
    path = tmp_path / "z.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {2 * CLUSTER}")
    where = tables(path)
    poke_u64(path, where["l2"] + 8, where["l1"])  # not ours: zeroing would release it
    before, header = check_counts(path), path.read_bytes()[:CLUSTER]
    l1 = path.read_bytes()[where["l1"] : where["l1"] + CLUSTER]

    with SyncFormatAccess(open_driver(path)) as image:
        if operation == "write_compressed":
            with pytest.raises(CorruptImageError, match="active L1 table"):
                image.write_compressed(b"\x44" * CLUSTER, CLUSTER)
        else:
            with pytest.raises(CorruptImageError, match="active L1 table"):
                getattr(image, operation)(CLUSTER, CLUSTER)
    assert_refused_and_marked(path, header, before)
    assert path.read_bytes()[where["l1"] : where["l1"] + CLUSTER] == l1


def test_deleting_a_snapshot_whose_entry_uses_metadata_frees_nothing(tmp_path: Path) -> None:
    """The snapshot's tree names the refcount table as data: dropping it would free the refcount table."""
    path = tmp_path / "s.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}")
    _qemu.qemu_img("snapshot", "-c", "s1", path)
    _qemu.qemu_io(path, f"write -P 0x42 0 {CLUSTER}")  # the active tree gets its own L2 table
    snapshot_l1 = next(s for s in _snapshot_l1_offsets(path))
    snapshot_l2 = read_u64(path, snapshot_l1) & OFFSET_MASK
    assert snapshot_l2 != tables(path)["l2"]
    poke_u64(path, snapshot_l2 + 8, tables(path)["refcount_table"])
    before, header = check_counts(path), path.read_bytes()[:CLUSTER]

    driver = open_driver(path)
    with SyncFormatAccess(driver), pytest.raises(CorruptImageError, match="refcount table"):
        driver.delete_snapshot_sync("s1")
    assert_refused_and_marked(path, header, before)
    assert [s["name"] for s in _qemu.info(path).get("snapshots", [])] == ["s1"]


def _snapshot_l1_offsets(path: Path) -> list[int]:
    """The L1 table offsets the snapshot table records."""
    data = path.read_bytes()
    count, table = struct.unpack_from(">IQ", data, 60)
    offsets = []
    position = table
    for _ in range(count):
        l1_offset, _, id_size, name_size, *_rest, extra = struct.unpack_from(">QIHHIIQII", data, position)
        offsets.append(l1_offset)
        position += 40 + extra + id_size + name_size
        position += -(position - table) % 8
    return offsets


def test_a_metadata_write_onto_other_metadata_marks_the_image_corrupt(tmp_path: Path) -> None:
    """The guard itself: a refcount block write into the L1 table's cluster is refused, nothing written."""
    path = tmp_path / "m.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}")
    where = tables(path)
    original = path.read_bytes()
    driver = open_driver(path)
    with SyncFormatAccess(driver) as image:
        image.write(b"\x42" * 4096, 2 * MiB)  # allocating: new metadata waits in the caches
        guard = driver._state.guard
        with pytest.raises(CorruptImageError, match=f"refcount block at {where['l1']:#x} overlaps active L1 table"):
            runtime.run_sync(guard.check_write(Metadata.REFCOUNT_BLOCK, where["l1"], CLUSTER))
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            image.write(b"\x01", 0)
        image.flush()  # writes no metadata any more
    data = path.read_bytes()
    # Only the corrupt bit and the data cluster written before reached the file: no metadata.
    assert data[:72] == original[:72]
    assert data[80 : len(original)] == original[80:]
    assert marked_corrupt(path)


@pytest.mark.parametrize("how", ["free", "allocate"])
def test_metadata_is_never_freed_or_handed_out(tmp_path: Path, how: str) -> None:
    """The last line of defence: a refcount dropping to zero, or an allocation, on the L1 table's cluster."""
    path = tmp_path / "f.qcow2"
    _qemu.create(path, 4 * MiB)
    _qemu.qemu_io(path, f"write -P 0x41 0 {CLUSTER}")
    l1_cluster = tables(path)["l1"] // CLUSTER
    original = path.read_bytes()
    driver = open_driver(path)
    state = driver._state
    with SyncFormatAccess(driver):
        if how == "free":
            with pytest.raises(CorruptImageError, match=r"active L1 table at .* would be freed"):
                runtime.run_sync(state.refcounts.change(l1_cluster, 1, -1))
        else:
            with pytest.raises(CorruptImageError, match=r"active L1 table at .* would be allocated"):
                runtime.run_sync(state.guard.check_free(l1_cluster, 1))
    data = path.read_bytes()
    assert data[:72] == original[:72]
    assert data[80:] == original[80:]  # the refcount change never reached the file
    assert marked_corrupt(path)
    assert _qemu.convert_to_raw(path, tmp_path / "f.raw")[:CLUSTER] == b"\x41" * CLUSTER


def test_tables_written_since_opening_may_map_past_the_old_end(tmp_path: Path) -> None:
    """L2 tables unchanged since opening are checked against the file size then; our own against the current one."""
    path = tmp_path / "t.qcow2"
    _qemu.create(path, 1024 * MiB)
    driver = open_driver(path)
    with SyncFormatAccess(driver) as image:
        image.write(b"\x11" * CLUSTER, 0)
        image.write(b"\x22" * CLUSTER, 512 * MiB)
        image.flush()
        driver._state.tables.clear()  # reloaded from the file: they map clusters past the old end
        buf = bytearray(CLUSTER)
        image.read(buf, 512 * MiB)
        assert buf == b"\x22" * CLUSTER
        image.write(b"\x33" * CLUSTER, CLUSTER)
    _qemu.check(path)
    _qemu.qemu_io(path, f"read -P 0x11 0 {CLUSTER}", f"read -P 0x33 {CLUSTER} {CLUSTER}")


# --- the map --------------------------------------------------------------------------------------


def test_metadata_map_ranges_and_kinds() -> None:
    metadata = MetadataMap({0: Metadata.HEADER, 5: Metadata.ACTIVE_L2, 9: Metadata.REFCOUNT_BLOCK})
    assert metadata.overlap(1, 4) is None
    assert metadata.overlap(1, 5) == (5, Metadata.ACTIVE_L2)
    assert metadata.overlap(5, 10, L2_TABLES) == (9, Metadata.REFCOUNT_BLOCK)
    metadata.add(Metadata.INACTIVE_L2, [5, 7])
    assert metadata.kinds(5) == L2_TABLES
    assert metadata.overlap(6, 2) == (7, Metadata.INACTIVE_L2)
    metadata.remove(Metadata.INACTIVE_L2, [5, 7])
    assert metadata.kinds(5) == Metadata.ACTIVE_L2
    assert 7 not in metadata
    assert list(metadata) == [0, 5, 9]
    assert describe(Metadata.REFCOUNT_TABLE | Metadata.ACTIVE_L2) == "active L2 table and refcount table"
