"""Whole-table L2 classification, long runs over empty L1 entries, and zeroes that keep their host space.

L2 tables are validated and classified a whole table at a time; here the result is checked
against the per-entry rules (kinds, host offsets, runs of contiguous entries) on generated
tables, and bad entries must be refused naming the first one, as the entry by entry walk
does. Mappings of real images (made by qemu-img/qemu-io) are compared with ``qemu-img map``.
"""

from __future__ import annotations

import itertools
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import imago
from imago import CorruptImageError, ShallowIndirect, ShallowRaw, ShallowZero
from imago_qcow2.tables import (
    COMPRESSED,
    DATA,
    L2_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO,
    L2Table,
)

from . import _qemu

CLUSTER = 65536
TABLE_SPAN = CLUSTER * CLUSTER // 8  # guest bytes one L2 table maps (512 MiB)
TABLE_AT = 0x30000  # where the generated tables claim to lie in their file


# --- generated tables ------------------------------------------------------------------------------


def _entry_kind(entry: int, external: bool) -> tuple[int, int]:
    """The per-entry rule: ``(kind, host offset or compressed descriptor)`` of a valid entry."""
    if not entry:
        return UNALLOCATED, 0
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED, entry
    host = entry & L2_OFFSET_MASK
    if entry & OFLAG_ZERO:
        return ZERO, host
    if host or (external and entry & OFLAG_COPIED):
        return DATA, host
    return UNALLOCATED, 0


def _run_starts(classes: list[tuple[int, int]], step: int) -> list[int]:
    """Where runs start: kind changes, or (data, zero with a host) the host offsets stop following on."""
    starts = [0]
    for index in range(1, len(classes)):
        (kind, host), (before, before_host) = classes[index], classes[index - 1]
        located = kind == DATA or (kind == ZERO and host != 0)
        located_before = before == DATA or (before == ZERO and before_host != 0)
        if kind != before or located != located_before or (located and host != before_host + step):
            starts.append(index)
    return [*starts, len(classes)]


def _table(entries: list[int], *, cluster_bits: int, external: bool = False, data_size: int = 1 << 40) -> L2Table:
    return L2Table(
        struct.pack(f">{len(entries)}Q", *entries),
        offset=TABLE_AT,
        cluster_bits=cluster_bits,
        extended=False,
        zero_flag=True,
        external_data=external,
        image_size=1 << 40,
        data_size=data_size,
        filename="image.qcow2",
    )


@st.composite
def tables(draw: st.DrawFn, cluster_bits: int) -> tuple[list[int], bool]:
    """Valid standard L2 tables: stretches of unallocated, data (contiguous or not), zero, compressed entries."""
    count = 1 << (cluster_bits - 3)
    step = 1 << cluster_bits
    external = draw(st.booleans())
    entries: list[int] = []
    while len(entries) < count:
        length = draw(st.integers(count // 32, count // 4))  # few stretches: few draws
        shape = draw(st.sampled_from(["empty", "data", "scattered", "zero", "zero-allocated", "compressed", "copied"]))
        first = draw(st.integers(0 if external else 1, 1000)) * step
        flags = draw(st.sampled_from([0, OFLAG_COPIED]))
        pick = random.Random(draw(st.integers(0, 1000)))  # per-entry choices: few draws for large tables
        for index in range(length):
            if shape == "empty":
                entries.append(0)
            elif shape == "data":
                entries.append((first + index * step) | flags)
            elif shape == "scattered":
                entries.append(pick.randrange(1, 1000) * step | flags)
            elif shape == "zero":
                entries.append(OFLAG_ZERO)
            elif shape == "zero-allocated":
                entries.append((first + index * step) | OFLAG_ZERO | flags)
            elif shape == "compressed" and not external:  # (none with an external data file)
                sectors = pick.randrange(4)
                entries.append(OFLAG_COMPRESSED | sectors << (62 - (cluster_bits - 8)) | (first + 512 * index))
            elif shape == "copied":
                entries.append(OFLAG_COPIED)
            else:
                entries.append(0)
    return entries[:count], external


@pytest.mark.parametrize("cluster_bits", [9, 12])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_whole_table_classification_follows_the_entry_rules(cluster_bits: int, data: st.DataObject) -> None:
    entries, external = data.draw(tables(cluster_bits))
    table = _table(entries, cluster_bits=cluster_bits, external=external)
    classes = [_entry_kind(entry, external) for entry in entries]
    assert list(table.kinds) == [kind for kind, _ in classes]
    assert list(table.hosts) == [host for _, host in classes]
    starts = _run_starts(classes, 1 << cluster_bits)
    assert table.run_starts == starts
    for start, end in itertools.pairwise(starts):
        assert table.run_length(start, len(entries)) == end - start
        assert table.run_length(end - 1, len(entries)) == 1
    # Updated tables: the scan while runs are stale and the recomputed runs agree with the rules.
    index = data.draw(st.integers(0, len(entries) - 1))
    new_entry = data.draw(st.sampled_from([0, OFLAG_ZERO, entries[index - 1] + (1 << cluster_bits), 7 << cluster_bits]))
    table.set_entry(index, new_entry)
    entries[index] = new_entry
    classes = [_entry_kind(entry, external) for entry in entries]
    starts = _run_starts(classes, 1 << cluster_bits)
    stale = [table.run_length(start, len(entries)) for start in starts[:-1]]
    table.recompute_runs()
    assert table.run_starts == starts
    assert stale == [end - start for start, end in itertools.pairwise(starts)]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (1 << 58 | 5 << 12, "has reserved bits set"),
        (2, "has reserved bits set"),
        (3 << 12 | 512, "is unaligned"),
        (4000 << 12, "lies past the end of the file"),
    ],
)
@pytest.mark.parametrize("where", [0, 17, 511])
def test_bad_entries_are_refused_naming_the_first(bad: int, problem: str, where: int) -> None:
    """Wherever the bad entry lies among valid ones (compressed too), the first bad one is named."""
    step = 1 << 12
    entries = [(100 + index) * step | OFLAG_COPIED for index in range(512)]
    entries[5] = OFLAG_COMPRESSED | (200 * step + 100)
    entries[6] = 0
    entries[where] = bad
    if where < 511:
        entries[511] = 1 << 57  # a later bad entry is not the one reported
    with pytest.raises(CorruptImageError) as caught:
        _table(entries, cluster_bits=12, data_size=3000 * step)
    assert caught.value.offset == TABLE_AT + 8 * where
    assert f"L2 entry {where}" in caught.value.problem
    assert problem in caught.value.problem


def test_compressed_entries_are_checked_too() -> None:
    step = 1 << 9
    entries = [0] * 64
    entries[3] = OFLAG_COMPRESSED | (200 * step)
    entries[9] = OFLAG_COMPRESSED | (1 << 41)  # past the end of the file
    with pytest.raises(CorruptImageError, match="runs past the end of the file") as caught:
        _table(entries, cluster_bits=9)
    assert caught.value.offset == TABLE_AT + 8 * 9
    with pytest.raises(CorruptImageError, match="external data file") as caught:
        _table([0, 0, OFLAG_COMPRESSED | (200 * step), *[0] * 61], cluster_bits=9, external=True)
    assert caught.value.offset == TABLE_AT + 16


# --- real images -----------------------------------------------------------------------------------


def _walk(image: imago.SyncFormatAccess, start: int, end: int) -> list[tuple[int, int, Any]]:
    """Every shallow mapping from *start* to *end*: ``(offset, length, mapping)``."""
    found: list[tuple[int, int, Any]] = []
    position = start
    while position < end:
        mapping, length = image.get_shallow_mapping(position, end - position)
        assert length > 0
        found.append((position, length, mapping))
        position += length
    return found


@pytest.mark.parametrize("backing", [False, True])
def test_empty_l1_entries_make_one_run(tmp_path: Path, backing: bool) -> None:
    """A 64 GiB image with two data clusters: three long runs, not one per L1 entry; max_length bounds them."""
    path = tmp_path / "image.qcow2"
    if backing:
        _qemu.qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "64G")
        _qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path, "64G", cwd=tmp_path)
    else:
        _qemu.qemu_img("create", "-q", "-f", "qcow2", path, "64G")
    _qemu.qemu_io(path, "write -P 1 0 64k", "write -P 2 40G 64k", cwd=tmp_path)
    expected = _qemu.qemu_map(path, cwd=tmp_path)
    with imago.open(path, gate=imago.PermissiveImplicitOpenGate()) as image:
        walked = _walk(image, 0, image.size)
        assert [(offset, length) for offset, length, _ in walked] == [
            (0, CLUSTER),
            (CLUSTER, TABLE_SPAN - CLUSTER),  # the rest of the first L2 table
            (TABLE_SPAN, 40 * 2**30 - TABLE_SPAN),  # 79 L1 entries without a table
            (40 * 2**30, CLUSTER),
            (40 * 2**30 + CLUSTER, TABLE_SPAN - CLUSTER),
            (40 * 2**30 + TABLE_SPAN, 24 * 2**30 - TABLE_SPAN),  # to the end of the disk
        ]
        for offset, _length, mapping in walked:
            entry = next(e for e in expected if e["start"] <= offset < e["start"] + e["length"])
            if entry["data"]:
                assert isinstance(mapping, ShallowRaw)
                assert mapping.offset == entry["offset"]
            elif backing:
                assert isinstance(mapping, ShallowIndirect)
                assert mapping.offset == offset
            else:
                assert mapping == ShallowZero(False)
        # Bounded by max_length (the engine trims what the driver reports to it).
        mapping, length = image.get_shallow_mapping(TABLE_SPAN + 5, 3 * TABLE_SPAN)
        assert length == 3 * TABLE_SPAN
        mapping, length = image.get_shallow_mapping(39 * 2**30, 2**31)
        assert length == 2**30


@pytest.mark.parametrize("extended_l2", ["on", "off"])
def test_zeroes_keep_their_host_offset(tmp_path: Path, extended_l2: str) -> None:
    """Zeroed clusters that stay allocated (and unallocated subclusters of allocated clusters) say where."""
    path = tmp_path / "image.qcow2"
    _qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2={extended_l2}", path, "2M")
    _qemu.qemu_io(path, "write -P 1 0 256k", "write -z 64k 64k", "write -z 160k 8k", "write -z 1M 64k")
    expected = _qemu.qemu_map(path)
    zero_with_offset = [e for e in expected if e["zero"] and "offset" in e]
    assert zero_with_offset
    with imago.open(path) as image:
        for entry in expected:
            mapping, length = image.get_shallow_mapping(entry["start"], entry["length"])
            assert length <= entry["length"]
            if entry["data"]:
                assert isinstance(mapping, ShallowRaw)
                assert mapping.offset == entry["offset"]
                continue
            assert isinstance(mapping, ShallowZero)
            assert mapping.explicit == entry["present"]
            assert mapping.offset == entry.get("offset")
            if mapping.offset is not None:
                assert mapping.storage is not None
                assert mapping.storage.filename == str(path)


@pytest.mark.parametrize(
    ("descriptor", "bitmap", "problem"),
    [
        (1 << 57 | 5 << 12 | OFLAG_COPIED, 1, "has reserved bits set"),
        (5 << 12 | OFLAG_ZERO, 1, "has reserved bits set"),
        (5 << 12 | OFLAG_COPIED, 1 << 32 | 1, "marked both allocated and zero"),
        (0, 1 << 3, "unallocated cluster has allocated subclusters"),
        (5 << 12 | 512 | OFLAG_COPIED, 1, "is unaligned"),
        (4000 << 12 | OFLAG_COPIED, 1, "lies past the end of the file"),
        (OFLAG_COMPRESSED | 300 << 12, 1, "compressed cluster has a subcluster bitmap"),
        (OFLAG_COMPRESSED | 1 << 41, 0, "runs past the end of the file"),
    ],
)
@pytest.mark.parametrize("where", [0, 200])
def test_bad_extended_entries_are_refused_naming_the_first(
    descriptor: int, bitmap: int, problem: str, where: int
) -> None:
    step = 1 << 12
    entries: list[int] = []
    for index in range(256):  # valid entries of every kind around the bad one
        entries += [
            ((100 + index) * step | OFLAG_COPIED, 0xFFFF),  # data subclusters
            ((100 + index) * step | OFLAG_COPIED, 0xFFFF << 32 | 0xFFFF0000),  # data and zero ones
            (0, 0xFFFFFFFF << 32),  # zero subclusters, no host cluster
            (0, 0),
            (OFLAG_COMPRESSED | 200 * step, 0),
        ][index % 5]
    entries[2 * where : 2 * where + 2] = [descriptor, bitmap]
    if where < 255:
        entries[-2:] = [0, 1]  # a later bad entry is not the one reported
    with pytest.raises(CorruptImageError) as caught:
        L2Table(
            struct.pack(f">{len(entries)}Q", *entries),
            offset=TABLE_AT,
            cluster_bits=12,
            extended=True,
            zero_flag=True,
            external_data=False,
            image_size=1 << 30,
            data_size=3000 * step,
            filename="image.qcow2",
        )
    assert caught.value.offset in (TABLE_AT + 16 * where, TABLE_AT + 16 * where + 8)
    assert problem in caught.value.problem
