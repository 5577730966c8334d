"""qcow2 check and repair against ``qemu-img check [-r leaks|all]`` as the reference.

Clean images of many shapes and images damaged here on purpose (bytes poked into their
metadata, independently of imago) are checked by both; counts, exit status and the finding
lines (qemu-img's stderr) must agree. Repairs must leave an image both call clean, with the
content of a copy qemu-img repaired. Also: memory stays bounded on a huge virtual disk, a
dirty lazy-refcount image is repaired when opened for writing, and misuse is refused.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import (
    CheckResult,
    ClosedError,
    CorruptImageError,
    FindingKind,
    InvalidOptionError,
    PermissiveImplicitOpenGate,
    ReadOnlyError,
    RepairMode,
    SyncFormatAccess,
)
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB

# --- the reference and imago, side by side ------------------------------------------------------


def qemu_check(path: Path, *args: str) -> tuple[int, dict[str, Any] | None, list[str]]:
    """``qemu-img check --output=json``: exit status, the JSON (if printed), the finding lines."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", *args, "-f", "qcow2", path.name],
        capture_output=True,
        text=True,
        cwd=path.parent,  # (where qemu 7.2 looks for a relative data file name)
        check=False,
        timeout=120,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, finding_lines(proc.stderr.splitlines())


def finding_lines(lines: list[str]) -> list[str]:
    """The lines that report findings or stop the check (not hints, nor qemu-img's program name)."""
    lines = [line.removeprefix("qemu-img: ") for line in lines]
    return [line for line in lines if line.startswith(("ERROR", "Leaked", "Repairing", "Rebuilding"))]


def open_image(path: Path, *, write: bool = False) -> SyncFormatAccess:
    return SyncFormatAccess(Qcow2.builder_path(path).write(write).open_sync(PermissiveImplicitOpenGate()))


def imago_check(path: Path, fix: RepairMode | None = None) -> CheckResult:
    with open_image(path, write=fix is not None) as image:
        return image.check(fix)


def assert_same_check(path: Path, fix: str | None = None) -> CheckResult:
    """Check (or repair) a copy with qemu-img and the image with imago; both must agree."""
    reference = path.with_suffix(".qemu.qcow2")
    shutil.copyfile(path, reference)
    args = ("-r", fix) if fix else ()
    status, report, lines = qemu_check(reference, *args)
    result = imago_check(path, RepairMode.parse(fix))
    assert result.exit_status == status, (result, status, lines)
    if report is not None:
        assert result.to_json() | {"filename": None} == report | {"filename": None}, lines
    # qemu-img prints the repair pass's lines, then (if it fixed anything) the second check's.
    findings = result.findings
    if fix and (result.corruptions_fixed or result.leaks_fixed):
        findings = result.repaired + findings
    mine = [line for finding in findings for line in finding.message.splitlines()]
    assert finding_lines(mine) == lines
    return result


# --- poking at an image's metadata (independently of imago) --------------------------------------


class Raw:
    """An image file's metadata, read and changed with struct."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = path.read_bytes()
        self.cluster_bits = struct.unpack_from(">I", data, 20)[0]
        self.cluster_size = 1 << self.cluster_bits
        self.l1_size, self.l1_offset, self.rt_offset, self.rt_clusters = struct.unpack_from(">IQQI", data, 36)
        self.version = struct.unpack_from(">I", data, 4)[0]
        self.refcount_order = struct.unpack_from(">I", data, 96)[0] if self.version >= 3 else 4
        self.extended = self.version >= 3 and bool(struct.unpack_from(">Q", data, 72)[0] & 16)

    def u64(self, offset: int) -> int:
        with self.path.open("rb") as f:
            f.seek(offset)
            return int(struct.unpack(">Q", f.read(8))[0])

    def put64(self, offset: int, value: int) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">Q", value))

    def l1(self, index: int) -> int:
        return self.u64(self.l1_offset + 8 * index)

    def l2_entry_offset(self, index: int) -> int:
        """Where the L2 entry of guest cluster *index* lies (its table must exist)."""
        entry_size = 16 if self.extended else 8
        per_table = self.cluster_size // entry_size
        l2 = self.l1(index // per_table) & 0x00FFFFFFFFFFFE00
        assert l2, f"guest cluster {index} has no L2 table"
        return l2 + (index % per_table) * entry_size

    def l2(self, index: int) -> int:
        return self.u64(self.l2_entry_offset(index))

    def set_l2(self, index: int, value: int) -> None:
        self.put64(self.l2_entry_offset(index), value)

    def refcount_location(self, cluster: int) -> tuple[int, int]:
        bits = 1 << self.refcount_order
        per_block = self.cluster_size * 8 // bits
        block = self.u64(self.rt_offset + 8 * (cluster // per_block)) & ~0x1FF
        assert block
        return block, (cluster % per_block) * bits

    def refcount(self, cluster: int) -> int:
        block, bit = self.refcount_location(cluster)
        bits = 1 << self.refcount_order
        with self.path.open("rb") as f:
            f.seek(block + bit // 8)
            raw = f.read(max(1, bits // 8))
        if bits < 8:
            return (raw[0] >> (bit % 8)) & ((1 << bits) - 1)
        return int.from_bytes(raw, "big")

    def set_refcount(self, cluster: int, value: int) -> None:
        block, bit = self.refcount_location(cluster)
        bits = 1 << self.refcount_order
        with self.path.open("r+b") as f:
            f.seek(block + bit // 8)
            if bits < 8:
                byte = f.read(1)[0]
                mask = ((1 << bits) - 1) << (bit % 8)
                f.seek(block + bit // 8)
                f.write(bytes([(byte & ~mask) | (value << (bit % 8))]))
            else:
                f.write(value.to_bytes(bits // 8, "big"))


def make(path: Path, size: int = 64 * MiB, options: dict[str, object] | None = None, *commands: str) -> Raw:
    _qemu.create(path.name, size, options=options or {}, cwd=path.parent)
    if commands:
        # (qemu 7.2 resolves a relative data file name against the working directory)
        _qemu.qemu_io(path.name, *commands, cwd=path.parent)
    return Raw(path)


# --- clean images ---------------------------------------------------------------------------------


CLEAN = {
    "512": ({"cluster_size": 512}, ["write -P 1 0 300k", "write -c -P 2 1M 64k"]),
    "4k-refcount1": ({"cluster_size": 4096, "refcount_bits": 1}, ["write -P 1 0 200k"]),
    "refcount2": ({"refcount_bits": 2}, ["write -P 1 0 1M"]),
    "refcount4": ({"refcount_bits": 4}, ["write -P 1 64k 1M", "write -c -P 3 4M 256k"]),
    "refcount8": ({"refcount_bits": 8}, ["write -P 1 0 1M"]),
    "refcount32": ({"refcount_bits": 32}, ["write -P 1 0 1M"]),
    "refcount64": ({"refcount_bits": 64}, ["write -P 1 0 1M", "write -z 4M 1M"]),
    "2M": ({"cluster_size": 2 * MiB}, ["write -P 1 0 5M", "write -c -P 2 8M 2M"]),
    "extended-l2": ({"extended_l2": True}, ["write -P 1 0 100k", "write -P 2 1M 4k", "write -z 2M 64k"]),
    "compat-0.10": ({"compat": "0.10"}, ["write -P 1 0 1M", "write -c -P 2 2M 64k"]),
    "prealloc-metadata": ({"preallocation": "metadata", "cluster_size": 65536}, ["write -P 1 0 64k"]),
    "zero-clusters": ({}, ["write -P 1 0 1M", "write -z 256k 256k", "write -z -u 512k 128k"]),
    "fragmented": ({}, ["write -P 1 1M 64k", "write -P 2 0 64k", "write -P 3 3M 64k", "write -P 4 64k 64k"]),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_images_count_as_qemu_does(tmp_path: Path, name: str) -> None:
    options, commands = CLEAN[name]
    path = tmp_path / "disk.qcow2"
    make(path, 32 * MiB, options, *commands)
    result = assert_same_check(path)
    assert result.clean
    assert result.exit_status == 0
    assert result.allocated_clusters


def test_snapshots_and_compressed_clusters(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 32 * MiB, {"cluster_size": 4096}, "write -P 1 0 1M", "write -c -P 2 2M 64k")
    _qemu.qemu_img("snapshot", "-c", "one", path)
    _qemu.qemu_io(path, "write -P 3 0 8k", "write -c -P 4 4M 32k")
    _qemu.qemu_img("snapshot", "-c", "two", path)
    _qemu.qemu_io(path, "write -P 5 512k 8k")
    result = assert_same_check(path)
    assert result.clean
    assert result.compressed_clusters


def test_external_data_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 32 * MiB, {"data_file": "disk.raw"}, "write -P 1 0 1M", "write -z 2M 64k")
    assert_same_check(path)


def test_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 64 * MiB, {}, "write -P 1 0 1M")
    _qemu.qemu_img("bitmap", "--add", path, "b0")
    _qemu.qemu_img("bitmap", "--add", "-g", "512", path, "b1")
    result = assert_same_check(path)
    assert result.clean


# --- damaged images -------------------------------------------------------------------------------

Damage = Callable[[Raw], None]


def leak_at_end(raw: Raw) -> None:
    """A cluster past everything, refcount 1, used by nothing."""
    size = raw.path.stat().st_size
    cluster = -(-size // raw.cluster_size)
    with raw.path.open("r+b") as f:
        f.truncate((cluster + 1) * raw.cluster_size)
    raw.set_refcount(cluster, 1)


def refcount_too_high(raw: Raw) -> None:
    raw.set_refcount((raw.l2(0) & 0x00FFFFFFFFFFFE00) >> raw.cluster_bits, 2)


def refcount_zero(raw: Raw) -> None:
    raw.set_refcount((raw.l2(1) & 0x00FFFFFFFFFFFE00) >> raw.cluster_bits, 0)


def copied_cleared(raw: Raw) -> None:
    raw.set_l2(2, raw.l2(2) & ~(1 << 63))


def referenced_twice(raw: Raw) -> None:
    raw.set_l2(3, raw.l2(2))


def past_eof(raw: Raw) -> None:
    raw.set_l2(4, (1 << 63) | (raw.path.stat().st_size + 16 * raw.cluster_size))


def unaligned_data(raw: Raw) -> None:
    raw.set_l2(5, raw.l2(5) + 512)


def unaligned_prealloc_zero(raw: Raw) -> None:
    raw.set_l2(6, (raw.l2(6) + 512) | 1)


def l1_copied_cleared(raw: Raw) -> None:
    raw.put64(raw.l1_offset, raw.l1(0) & ~(1 << 63))


def reftable_reserved_bits(raw: Raw) -> None:
    raw.put64(raw.rt_offset, raw.u64(raw.rt_offset) | 1)


def refblock_outside(raw: Raw) -> None:
    raw.put64(raw.rt_offset + 8, raw.path.stat().st_size + 4 * raw.cluster_size)


def l1_unaligned(raw: Raw) -> None:
    raw.put64(raw.l1_offset, raw.l1(0) + 512)


def l1_past_eof(raw: Raw) -> None:
    raw.put64(raw.l1_offset, (1 << 63) | (raw.path.stat().st_size + 8 * raw.cluster_size))


def l1_reserved_bits(raw: Raw) -> None:
    raw.put64(raw.l1_offset, raw.l1(0) | 2)


def l2_reserved_bits(raw: Raw) -> None:
    raw.set_l2(1, raw.l2(1) | 4)


def refblock_unaligned(raw: Raw) -> None:
    raw.put64(raw.rt_offset, raw.u64(raw.rt_offset) + 512)


def l2_in_refcount_block(raw: Raw) -> None:
    """An L1 entry using the refcount block as its L2 table."""
    raw.put64(raw.l1_offset, (1 << 63) | raw.u64(raw.rt_offset))


def data_on_refcount_table(raw: Raw) -> None:
    raw.set_l2(7, (1 << 63) | raw.rt_offset)


DAMAGES: dict[str, Damage] = {
    "l1-unaligned": l1_unaligned,
    "l1-past-eof": l1_past_eof,
    "l1-reserved-bits": l1_reserved_bits,
    "l2-reserved-bits": l2_reserved_bits,
    "refblock-unaligned": refblock_unaligned,
    "l2-in-refcount-block": l2_in_refcount_block,
    "data-on-refcount-table": data_on_refcount_table,
    "leak-at-end": leak_at_end,
    "refcount-too-high": refcount_too_high,
    "refcount-zero": refcount_zero,
    "copied-cleared": copied_cleared,
    "referenced-twice": referenced_twice,
    "past-eof": past_eof,
    "unaligned-data": unaligned_data,
    "unaligned-prealloc-zero": unaligned_prealloc_zero,
    "l1-copied-cleared": l1_copied_cleared,
    "reftable-reserved-bits": reftable_reserved_bits,
    "refblock-outside": refblock_outside,
}

SHAPES: dict[str, dict[str, object]] = {
    "64k": {},
    "4k-refcount8": {"cluster_size": 4096, "refcount_bits": 8},
    "extended": {"extended_l2": True, "refcount_bits": 32},
}


def damaged(path: Path, shape: str, damage: Damage) -> None:
    raw = make(path, 64 * MiB, SHAPES[shape], "write -P 1 0 512k", "write -z 384k 128k")
    damage(raw)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_images(tmp_path: Path, shape: str, damage: str) -> None:
    path = tmp_path / "disk.qcow2"
    damaged(path, shape, DAMAGES[damage])
    result = assert_same_check(path)
    assert not result.clean


def assert_repaired_like_qemu(path: Path, fix: str) -> CheckResult:
    """Repair *path* with imago and a copy with qemu-img: same report, and then same content."""
    result = assert_same_check(path, fix)
    reference = path.with_suffix(".qemu.qcow2")
    after_mine, after_theirs = qemu_check(path), qemu_check(reference)
    assert after_mine[0] == after_theirs[0]
    if after_theirs[0] == 0:
        assert imago_check(path).clean
        _qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", path, reference)
    return result


# An L2 entry past the end of the file is the one damage `-r all` repairs where QEMU 7.2 cannot (the
# entry is unmapped): plugins/qcow2/tests/test_repair_past_end.py compares that with qemu-img instead.
@pytest.mark.parametrize(
    ("damage", "fix"), [(d, f) for d in sorted(DAMAGES) for f in ("leaks", "all") if (d, f) != ("past-eof", "all")]
)
@pytest.mark.parametrize("shape", ["64k", "extended"])
def test_repairs_as_qemu_does(tmp_path: Path, damage: str, shape: str, fix: str) -> None:
    path = tmp_path / "disk.qcow2"
    damaged(path, shape, DAMAGES[damage])
    assert_repaired_like_qemu(path, fix)


def snapshot_image(path: Path, options: dict[str, object]) -> Raw:
    make(path, 32 * MiB, options, "write -P 1 0 256k", "write -c -P 2 1M 64k")
    _qemu.qemu_img("snapshot", "-c", "one", path)
    _qemu.qemu_io(path, "write -P 3 0 4k")
    return Raw(path)


def test_snapshot_shared_cluster_with_low_refcount(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = snapshot_image(path, {"cluster_size": 4096})
    shared = (raw.l2(8) & 0x00FFFFFFFFFFFE00) >> raw.cluster_bits
    assert raw.refcount(shared) == 2
    raw.set_refcount(shared, 1)
    assert_same_check(path)
    assert_repaired_like_qemu(path, "all")


def test_overflowing_one_bit_refcounts(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 32 * MiB, {"cluster_size": 4096, "refcount_bits": 1}, "write -P 1 0 64k")
    raw.set_l2(3, raw.l2(2))  # one cluster, two references: more than one bit counts
    result = assert_same_check(path)
    assert any("overflow" in finding.message for finding in result.findings)
    assert_repaired_like_qemu(path, "all")


def test_rebuild_on_small_clusters_grows_the_refcount_table(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 64 * MiB, {"cluster_size": 512, "refcount_bits": 64}, "write -P 1 0 2M")
    raw.put64(raw.rt_offset, raw.u64(raw.rt_offset) | 1)  # the refcount table must be rebuilt
    result = assert_repaired_like_qemu(path, "all")
    assert any(finding.message == "Rebuilding refcount structure" for finding in result.repaired)


def test_compressed_cluster_with_copied_flag(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 32 * MiB, {}, "write -c -P 1 0 128k")
    raw.set_l2(1, raw.l2(1) | 1 << 63)
    assert_same_check(path)
    assert_repaired_like_qemu(path, "all")


def test_subclusters_both_allocated_and_zero(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 32 * MiB, {"extended_l2": True}, "write -P 1 0 64k", "write -P 2 128k 4k")
    bitmap_at = raw.l2_entry_offset(0) + 8
    raw.put64(bitmap_at, raw.u64(bitmap_at) | 1 << 32)  # subcluster 0 allocated and zero
    unallocated_at = raw.l2_entry_offset(5) + 8
    raw.put64(unallocated_at, 1)  # an unallocated cluster with an allocated subcluster
    assert_same_check(path)
    assert_repaired_like_qemu(path, "all")


def test_each_metadata_cluster_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    snapshot_image(path, {"cluster_size": 4096})
    _qemu.qemu_img("snapshot", "-c", "two", path)  # three L1 tables sharing L2 tables
    reads: dict[int, int] = {}
    with open_image(path) as image:
        storage = image.driver.storage
        real = storage.readv

        async def counting(bufs: Any, offset: int) -> None:
            reads[offset] = reads.get(offset, 0) + 1
            await real(bufs, offset)

        storage.readv = counting  # type: ignore[method-assign]
        assert image.check().clean
    assert reads
    assert max(reads.values()) == 1, {offset: n for offset, n in reads.items() if n > 1}


# --- dirty images, memory, misuse -------------------------------------------------------------------


def crashed_lazy_image(path: Path) -> None:
    """A lazy-refcount image QEMU was killed writing to: dirty, refcounts behind the L2 tables."""
    _qemu.create(path, 64 * MiB, options={"lazy_refcounts": True, "cluster_size": 4096})
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 300k",
            "-c",
            "write -P 0x22 8M 64k",
            "-c",
            "sigraise 9",
            path,
        ],
        capture_output=True,
        check=False,
    )
    assert _qemu.info(path)["dirty-flag"] is True


def test_dirty_image_is_repaired_when_opened_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    crashed_lazy_image(path)
    reference = tmp_path / "qemu.qcow2"
    shutil.copyfile(path, reference)
    status, _, lines = qemu_check(path)
    assert status == 2
    assert lines
    # Read-only: read as it is, reported dirty, not changed.
    before = path.read_bytes()
    with open_image(path) as image:
        assert image.driver.info()["dirty-flag"] is True
        assert image.check().exit_status == status
    assert path.read_bytes() == before
    # For writing: repaired first (as QEMU's open does), then writable.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 300k", reference], check=True, capture_output=True)
    with open_image(path, write=True) as image:
        assert image.driver.info()["dirty-flag"] is False
        image.write(b"\x33" * 4096, 16 * MiB)
    assert qemu_check(path)[0] == 0
    assert imago_check(path).clean
    _qemu.qemu_io(path, "read -P 0x11 0 300k", "read -P 0x22 8M 64k", "read -P 0x33 16M 4k")
    _qemu.qemu_io(reference, "write -P 0x33 16M 4k")  # (qemu-io's open repairs it the same way)
    _qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", path, reference)


def test_huge_virtual_disk_checks_in_little_memory(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 1 << 40, {}, "write -P 1 0 64k", f"write -P 2 {(1 << 40) - MiB} 64k", f"write -P 3 {1 << 39} 64k")
    # In a child process, so that its peak memory is its own.
    code = (
        "import resource, sys\n"
        "from imago import PermissiveImplicitOpenGate, SyncFormatAccess\n"
        "from imago_qcow2 import Qcow2\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "image = SyncFormatAccess(Qcow2.builder_path(sys.argv[1]).open_sync(PermissiveImplicitOpenGate()))\n"
        "result = image.check()\n"
        "image.close()\n"
        "assert result.clean and result.total_clusters == 1 << 24, result\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    grown_kib = int(out.stdout)
    # 16 M guest clusters: a per-guest-cluster array would take 16 MiB or more.
    assert grown_kib < 8 * 1024, f"checking grew the process by {grown_kib} KiB"
    assert_same_check(path)


def test_misuse(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 16 * MiB, {}, "write -P 1 0 64k")
    image = open_image(path)
    with pytest.raises(ReadOnlyError):
        image.check("all")
    with pytest.raises(ReadOnlyError):
        image.check(RepairMode.LEAKS)
    with pytest.raises(ValueError, match="repair mode"):
        image.check("everything")
    image.close()
    with pytest.raises(ClosedError):
        image.check()


def test_read_errors_count_as_check_errors(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make(path, 16 * MiB, {}, "write -P 1 0 64k")
    with open_image(path) as image:
        storage = image.driver.storage
        real = storage.readv

        async def failing(bufs: Any, offset: int) -> None:
            if offset >= 3 * 65536:  # the L2 table and data, not the header
                raise OSError(5, "Input/output error")
            await real(bufs, offset)

        storage.readv = failing  # type: ignore[method-assign]
        result = image.check()
    assert result.check_errors
    assert result.exit_status == 1
    assert any(finding.kind is FindingKind.CHECK_ERROR for finding in result.findings)


def test_image_marked_corrupt_opens_for_a_repair_only(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 16 * MiB, {}, "write -P 1 0 64k")
    leak_at_end(raw)
    raw.put64(72, raw.u64(72) | 2)  # the corrupt bit
    with pytest.raises(CorruptImageError, match="marked corrupt"):
        open_image(path, write=True)
    builder = Qcow2.builder_path(path).write(True).allow_corrupt(True)
    with SyncFormatAccess(builder.open_sync(PermissiveImplicitOpenGate())) as image:
        with pytest.raises(CorruptImageError, match="marked corrupt"):
            image.write(b"\x22" * 512, 0)
        reference = tmp_path / "qemu.qcow2"
        shutil.copyfile(path, reference)
        status, report, _ = qemu_check(reference, "-r", "all")
        result = image.check("all")
        assert (result.exit_status, result.to_json() | {"filename": None}) == (status, report | {"filename": None})
        assert result.leaks_fixed == 1
        image.write(b"\x22" * 512, 0)  # repaired: writable again
    assert _qemu.info(path)["format-specific"]["data"]["corrupt"] is False
    assert qemu_check(path)[0] == 0
    _qemu.qemu_io(path, "read -P 0x22 0 512", "read -P 1 512 65024")


def test_opened_for_check_a_dirty_image_is_repaired_by_the_check(tmp_path: Path) -> None:
    """``for_check``: as qemu-img check opens it, the dirty image is left for the check to repair."""
    path = tmp_path / "disk.qcow2"
    crashed_lazy_image(path)
    reference = tmp_path / "qemu.qcow2"
    shutil.copyfile(path, reference)
    status, report, lines = qemu_check(reference, "-r", "all")
    with imago.open(path, "qcow2", write=True, for_check=True) as image:
        assert image.driver.info()["dirty-flag"] is True
        with pytest.raises(CorruptImageError, match="dirty"):
            image.write(b"\x44" * 512, 0)
        result = image.check("all")
        assert result.corruptions_fixed > 0
        assert (result.exit_status, result.to_json() | {"filename": None}) == (status, report | {"filename": None})
        assert set(finding_lines(lines)) == {finding.message for finding in (*result.repaired, *result.findings)}
        image.write(b"\x44" * 512, 0)  # repaired: writable again
    assert qemu_check(path)[0] == 0
    _qemu.qemu_io(path, "read -P 0x44 0 512", "read -P 0x11 512 299.5k", "read -P 0x22 8M 64k")


def test_opened_for_check_an_image_marked_corrupt_is_checked_read_only(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    raw = make(path, 16 * MiB, {}, "write -P 1 0 64k")
    leak_at_end(raw)
    raw.put64(72, raw.u64(72) | 2)  # the corrupt bit
    with pytest.raises(CorruptImageError, match="marked corrupt"):
        imago.open(path, "qcow2")
    before = path.read_bytes()
    status, report, _ = qemu_check(path)
    with imago.open(path, "qcow2", for_check=True) as image:
        result = image.check()
    assert (result.exit_status, result.to_json() | {"filename": None}) == (status, report | {"filename": None})
    assert path.read_bytes() == before
    with pytest.raises(InvalidOptionError, match="for_check"):
        Qcow2.builder_path(path).for_check("yes")  # type: ignore[arg-type]
