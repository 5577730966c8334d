"""The memory cap on a chain (issue 11): caches under ``cache_size``, whole tables under ``memory_limit``.

Images are made by ``qemu-img``/``qemu-io``; results are checked with ``qemu-img compare`` and
``qemu-img check``. The cap is asserted on the caches' byte counts (``MemoryBudget.cached``,
``peak_cached``, each cache's ``nbytes``), not on the process's memory.
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import pytest

import imago
from imago import InvalidOptionError, MemoryBudget, PermissiveImplicitOpenGate, ResourceLimitError, SyncFormatAccess
from imago.budget import DEFAULT_CACHE_SIZE, MIN_CACHE_SIZE
from imago_qcow2.state import Qcow2State

from . import _qemu as qemu

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def layers(disk: SyncFormatAccess) -> list[Qcow2State]:
    """The qcow2 states of the chain, top first."""
    states = []
    access = disk.access
    while access is not None:
        state: Qcow2State = access.driver._state  # type: ignore[attr-defined]
        states.append(state)
        access = state.backing
    return states


def cached_bytes(states: list[Qcow2State]) -> int:
    """What every layer's L2 and refcount block caches hold, summed."""
    return sum(state.tables.nbytes + state.refcounts.blocks.nbytes for state in states)


def assert_within_cap(disk: SyncFormatAccess) -> MemoryBudget:
    states = layers(disk)
    budget = states[0].budget
    assert all(state.budget is budget for state in states)
    assert cached_bytes(states) == budget.cached <= budget.cache_size
    return budget


def compare(a: Path, b: Path) -> None:
    """``qemu-img compare``: the two disks read the same (the overlays with their backing files)."""
    qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b)


@pytest.mark.parametrize(
    ("cluster_size", "cache_size", "extended", "lazy_snapshot"),
    [
        (8 * KiB, MIN_CACHE_SIZE, False, False),
        (64 * KiB, 320 * KiB, True, False),
        (8 * KiB, MIN_CACHE_SIZE, False, True),
    ],
    ids=["8k", "64k-extended", "8k-lazy-snapshot"],
)
def test_tiny_cap_random_writes_over_many_tables(
    tmp_path: Path, cluster_size: int, cache_size: int, extended: bool, lazy_snapshot: bool
) -> None:
    """A cap of one or two L2 tables for a whole chain: random writes and reads stay right.

    With *lazy_snapshot*: lazy refcounts (no write-back order between the caches) and a snapshot
    taken first, so that written tables are copies of tables the snapshot shares.
    """
    size = 48 * (cluster_size // (16 if extended else 8)) * cluster_size  # 48 L2 tables' worth
    base, top, reference = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "reference.qcow2"
    options: dict[str, object] = {"cluster_size": cluster_size, "extended_l2": extended}
    qemu.create(base, size, options=options)
    rng = random.Random(cluster_size)
    stride = size // 48
    qemu.qemu_io(base, *(f"write -P {0x10 + n} {n * stride + rng.randrange(stride // 2)} 12k" for n in range(48)))
    top_options = {**options, "lazy_refcounts": lazy_snapshot}
    qemu.create(top, None, options=top_options, backing=base.name, backing_fmt="qcow2", cwd=tmp_path)
    if lazy_snapshot:
        qemu.qemu_io(top, *(f"write -P {0x90 + n} {n * stride + stride // 2} 8k" for n in range(48)))
        qemu.qemu_img("snapshot", "-c", "before", top)
    shutil.copyfile(top, reference)
    writes = []
    for n in range(100):
        offset = rng.randrange(size - 64 * KiB) // 512 * 512
        writes.append((offset, rng.choice([512, 4 * KiB, 9 * KiB, 3 * cluster_size + 512]), 0x40 + n % 160))
    with imago.open(top, "qcow2", write=True, cache_size=cache_size) as disk:
        budget = assert_within_cap(disk)
        assert budget.cache_size == cache_size
        top_state = layers(disk)[0]
        for offset, length, pattern in writes:
            disk.write(bytes([pattern]) * length, offset)
            assert_within_cap(disk)
        disk.flush()
        assert_within_cap(disk)
        # Tables were evicted (dirty ones written back) over and over.
        assert sum(1 for entry in top_state.l1 if entry) >= 30
        assert len(top_state.tables) <= 2
        assert top_state.write_backs >= 1
    assert budget.peak_cached <= cache_size
    qemu.qemu_io(reference, *(f"write -P {pattern} {offset} {length}" for offset, length, pattern in writes))
    compare(top, reference)
    qemu.check(top)

    # Read back through the same cap, in random order, against qemu-img's view.
    qemu.qemu_img("convert", "-f", "qcow2", "-O", "raw", reference, tmp_path / "reference.raw")
    with imago.open(top, "qcow2", cache_size=cache_size) as disk, open(tmp_path / "reference.raw", "rb") as raw:
        for offset, length, _ in rng.sample(writes, len(writes)):
            start = max(0, offset - 1000)
            buf = bytearray(length + 2000)
            disk.read(buf, start)
            raw.seek(start)
            assert buf == raw.read(len(buf))
            assert_within_cap(disk)
        assert len(layers(disk)) == 2
        assert disk.access.driver._state.budget.peak_cached <= cache_size  # type: ignore[attr-defined]


def test_default_cap_holds_over_a_chain_of_2m_clusters(tmp_path: Path) -> None:
    """Three layers of 2 MiB clusters, data under 10 L2 tables each: 30 tables of about 4.3 MiB, under 32 MiB."""
    options = {"cluster_size": 2 * MiB}
    table_span = 2 * MiB * (2 * MiB // 8)  # what one L2 table maps: 512 GiB
    size = 10 * table_span
    names = ["base.qcow2", "middle.qcow2", "top.qcow2"]
    expected: dict[int, int] = {}
    for depth, name in enumerate(names):
        if depth == 0:
            qemu.create(tmp_path / name, size, options=options)
        else:
            qemu.create(
                tmp_path / name, None, options=options, backing=names[depth - 1], backing_fmt="qcow2", cwd=tmp_path
            )
        commands = []
        for table in range(10):
            offset = table * table_span + (depth + 1) * 64 * KiB
            commands.append(f"write -P {0x20 + 10 * depth + table} {offset} 4k")
            expected[offset] = 0x20 + 10 * depth + table
        qemu.qemu_io(tmp_path / name, *commands)
    with imago.open(tmp_path / "top.qcow2", "qcow2") as disk:
        budget = assert_within_cap(disk)
        assert budget.cache_size == DEFAULT_CACHE_SIZE
        rng = random.Random(7)
        for _ in range(3):
            for offset in rng.sample(sorted(expected), len(expected)):
                buf = bytearray(4 * KiB)
                disk.read(buf, offset)
                assert buf == bytes([expected[offset]]) * len(buf)
                assert_within_cap(disk)
        states = layers(disk)
        assert len(states) == 3
        # Far fewer tables are held than were read: evicted across the layers, each layer's own share.
        assert sum(len(state.tables) for state in states) <= DEFAULT_CACHE_SIZE // (4 * MiB)
    assert budget.peak_cached <= DEFAULT_CACHE_SIZE


def test_cap_too_small_for_the_clusters_names_the_option(tmp_path: Path) -> None:
    path = tmp_path / "big.qcow2"
    qemu.create(path, GiB, options={"cluster_size": 2 * MiB})
    with pytest.raises(InvalidOptionError) as info:
        imago.open(path, "qcow2", cache_size=4 * MiB)
    assert info.value.option == "cache_size"
    assert str(path) in str(info.value)
    with imago.open(path, "qcow2", cache_size=9 * MiB) as disk:
        assert_within_cap(disk)


def make_chain(tmp_path: Path, count: int, size: int) -> list[Path]:
    """*count* images, each the backing file of the next (sparse, large virtual size: a large L1)."""
    paths = [tmp_path / f"layer{n}.qcow2" for n in range(count)]
    qemu.create(paths[0], size)
    for below, above in itertools.pairwise(paths):
        qemu.create(above, None, backing=below.name, backing_fmt="qcow2", cwd=tmp_path)
    return paths


def test_chain_over_the_memory_limit_is_refused(tmp_path: Path) -> None:
    """Each layer holds a 1 MiB L1 table (64 TiB, 64 KiB clusters); the fourth passes a 4 MiB limit."""
    paths = make_chain(tmp_path, 5, 64 * TiB)
    top = paths[-1]
    l1_bytes = 9 * (64 * TiB // (512 * MiB))  # entries and their COPIED flags
    with pytest.raises(ResourceLimitError) as info:
        imago.open(top, "qcow2", memory_limit=4 * MiB, gate=PermissiveImplicitOpenGate())
    error = info.value
    # Opened top down: the fourth from the top (layer1) is the one that does not fit.
    assert error.filename == str(paths[1])
    assert error.what == "its L1 table"
    assert error.nbytes == l1_bytes
    assert error.held == 3 * l1_bytes
    assert error.limit == 4 * MiB
    assert str(paths[1]) in str(error)
    assert "L1 table" in str(error)
    # The same chain within a large enough limit; its images are still fine.
    with imago.open(top, "qcow2", memory_limit=6 * MiB, gate=PermissiveImplicitOpenGate()) as disk:
        assert len(layers(disk)) == 5
        assert layers(disk)[0].budget.held == 5 * l1_bytes


def test_writable_open_charges_the_refcount_table(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu.create(path, 64 * TiB)
    l1_bytes = 9 * (64 * TiB // (512 * MiB))
    with pytest.raises(ResourceLimitError) as info:
        imago.open(path, "qcow2", write=True, memory_limit=l1_bytes + 1)
    assert info.value.what == "its refcount table"
    assert info.value.filename == str(path)
    with imago.open(path, "qcow2", write=True, memory_limit=l1_bytes + MiB) as disk:
        disk.write(b"x" * 512, 0)
    qemu.check(path)


@pytest.mark.parametrize("size", ["1E", "2E"])
def test_default_limit_opens_an_exabyte_image(tmp_path: Path, size: str) -> None:
    """qemu-img 7.2 makes images up to 2 EiB with 2 MiB clusters (a 16 or 32 MiB L1 table): the defaults open them."""
    path = tmp_path / "huge.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", path, size)
    last = qemu.info(path)["virtual-size"] - 4 * KiB
    if size == "1E":
        with imago.open(path, "qcow2", write=True) as disk:
            disk.write(b"\xa5" * 4 * KiB, last)
            disk.write(b"\x5a" * 4 * KiB, 0)
            assert_within_cap(disk)
        qemu.qemu_img("check", "-q", path)  # (exit status 0: no leaks, no corruption)
        qemu.qemu_io(path, f"read -P 0xa5 {last} 4k", "read -P 0x5a 0 4k")
    with imago.open(path, "qcow2") as disk:
        buf = bytearray(4 * KiB)
        disk.read(buf, last)
        assert buf == (b"\xa5" if size == "1E" else bytes(1)) * 4 * KiB
        budget = assert_within_cap(disk)
        assert budget.held == 9 * (disk.size // (512 * GiB))  # the L1 table: 18 or 36 MiB
