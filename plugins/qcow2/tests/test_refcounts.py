"""Refcount structures of every width, read back from images QEMU made."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imago import CorruptImageError, PermissiveImplicitOpenGate, SyncFormatAccess, runtime
from imago.format.mapping import ShallowRaw
from imago_qcow2 import Qcow2
from imago_qcow2.refcounts import RefcountBlock

from . import _qemu

CLUSTER = 64 << 10


def qemu(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def referenced_clusters(image: Qcow2) -> dict[int, int]:
    """Host cluster offset -> how many references the metadata makes to it (active L1 and snapshots)."""
    header = image.header
    counts: dict[int, int] = {}

    def add(offset: int, length: int) -> None:
        for cluster in range(offset // CLUSTER * CLUSTER, offset + length, CLUSTER):
            counts[cluster] = counts.get(cluster, 0) + 1

    add(0, CLUSTER)
    add(header.refcount_table_offset, header.refcount_table_clusters * CLUSTER)
    table = runtime.run_sync(image._state.refcounts.table())
    for entry in table:
        if entry:
            add(entry, CLUSTER)
    if header.nb_snapshots:
        snapshots = image.snapshots
        last = snapshots[-1]
        table_end = last.table_offset + 40 + len(last.extra_data) + len(last.id) + len(last.name)
        add(header.snapshots_offset, table_end - header.snapshots_offset)
    for view in [image, *(image.read_snapshot_sync(s.id) for s in image.snapshots)]:
        l1 = view._state.l1
        add(view._state.snapshot.l1_table_offset if view._state.snapshot else header.l1_table_offset, len(l1) * 8)
        for l2 in l1:
            if l2:
                add(l2, CLUSTER)
        offset = 0
        while offset < view.size:
            mapping, length = runtime.run_sync(view.get_mapping(offset, view.size - offset))
            length = min(length, view.size - offset)
            if isinstance(mapping, ShallowRaw):
                add(mapping.offset, length)
            offset += length
    return counts


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcounts_of_every_width_match_the_metadata(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "img.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(path), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 200k", str(path))
    if bits >= 2:
        qemu("qemu-img", "snapshot", "-c", "s1", str(path))
        qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 128k", str(path))
    _qemu.check(path)  # clean, and imago's own check agrees
    image = Qcow2.builder_path(path).open_sync(PermissiveImplicitOpenGate())
    assert image.header.refcount_bits == bits
    expected = referenced_clusters(image)
    if bits >= 2:
        assert max(expected.values()) == 2  # clusters shared with the snapshot
    for cluster, count in expected.items():
        assert runtime.run_sync(image.refcount(cluster)) == count, f"cluster {cluster:#x}"
    file_end = path.stat().st_size // CLUSTER * CLUSTER + CLUSTER
    assert runtime.run_sync(image.refcount(file_end + 100 * CLUSTER)) == 0
    SyncFormatAccess(image).close()


@pytest.mark.parametrize("order", range(7))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_refcount_block_entries_are_independent(order: int, data: st.DataObject) -> None:
    block = RefcountBlock(bytearray(512), offset=0, refcount_order=order)
    assert len(block) == 4096 >> order
    model = [0] * len(block)
    for _ in range(data.draw(st.integers(1, 30))):
        index = data.draw(st.integers(0, len(block) - 1))
        value = data.draw(st.integers(0, block.max_refcount))
        block.set(index, value)
        model[index] = value
    assert [block.get(i) for i in range(len(block))] == model
    with pytest.raises(ValueError, match="does not fit"):
        block.set(0, block.max_refcount + 1)


@pytest.mark.parametrize("order", range(7))
@pytest.mark.parametrize("seed", range(6))
def test_refcount_block_batches_agree_with_single_entries(order: int, seed: int) -> None:
    """values/store/free_run/next_free (allocation's batch calls) say what get/set entry by entry do."""
    rng = random.Random(seed)
    block = RefcountBlock(bytearray(64), offset=0, refcount_order=order)
    size = len(block)
    for index in range(size):
        block.set(index, rng.choice([0, 0, 0, 1, block.max_refcount]))
    first = rng.randrange(size)
    count = rng.randint(1, size - first)
    assert block.values(first, count) == [block.get(i) for i in range(first, first + count)]
    free = 0
    while free < count and block.get(first + free) == 0:
        free += 1
    assert block.free_run(first, count) == free
    assert block.next_free(first, size) == next((i for i in range(first, size) if block.get(i) == 0), size)
    new = [rng.randint(0, block.max_refcount) for _ in range(count)]
    before = [block.get(i) for i in range(size)]
    block.store(first, new)
    assert [block.get(i) for i in range(size)] == before[:first] + new + before[first + count :]


def test_sub_byte_refcounts_are_packed_least_significant_bits_first() -> None:
    block = RefcountBlock(bytearray(2), offset=0, refcount_order=1)  # 2-bit entries
    block.set(0, 1)
    block.set(1, 2)
    block.set(4, 3)
    assert block.data == bytearray([0b00001001, 0b00000011])
    wide = RefcountBlock(bytearray(4), offset=0, refcount_order=4)
    wide.set(1, 0x1234)
    assert wide.data == bytearray([0, 0, 0x12, 0x34])


@pytest.mark.parametrize("bits", [1, 16])
def test_a_refcount_change_out_of_range_changes_nothing_in_its_block(tmp_path: Path, bits: int) -> None:
    """Batched changes are checked whole first: the error names the first bad cluster; frees are reported."""
    path = tmp_path / "img.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(path), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 256k", str(path))
    image = Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    refcounts = image._state.refcounts
    first_data = 4  # header, L1, refcount table and block, then the L2 table and data
    used = [runtime.run_sync(refcounts.get(cluster * CLUSTER)) for cluster in range(first_data, first_data + 12)]
    assert used[:5] == [1] * 5
    assert used[-1] == 0
    with pytest.raises(CorruptImageError, match="refcount would become -1") as caught:
        runtime.run_sync(refcounts.change(first_data, 12, -1))
    assert caught.value.offset == (first_data + used.index(0)) * CLUSTER
    after = [runtime.run_sync(refcounts.get(cluster * CLUSTER)) for cluster in range(first_data, first_data + 12)]
    assert after == used
    if bits == 16:
        assert runtime.run_sync(refcounts.change(first_data + 1, 2, +1)) == []
        assert runtime.run_sync(refcounts.change(first_data + 1, 3, -1)) == [first_data + 3]
    SyncFormatAccess(image).close()
