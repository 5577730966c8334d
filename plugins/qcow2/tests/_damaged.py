"""Damaged qcow2 images for the check and repair tests, made with qemu-img/qemu-io and then poked.

Every builder starts from a small valid image made by ``qemu-img create`` and ``qemu-io``
writes (and ``qemu-img snapshot`` when the case wants one), then breaks exactly one thing with
:class:`Qcow2File`, a small reader/patcher of the on-disk structures written for these tests
from QEMU's ``docs/interop/qcow2.rst`` (independent of the driver under test). A builder
returns a :class:`Damaged` naming the lines ``qemu-img check`` must print for the damage and
its exit status, so that a builder that silently makes a clean (or differently broken) image
fails its own validation against qemu-img before imago is asked anything.

All numbers in qcow2 are big-endian. Refcounts of fewer than 8 bits are packed from the least
significant bit of each byte (QEMU's ``get_refcount_ro0..2``).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

# L1/L2/refcount table entry bits (docs/interop/qcow2.rst).
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTL2 = 1 << 4


# --- the tools ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuCheck:
    """What one ``qemu-img check --output=json`` run said: exit status, JSON, finding lines.

    *json* is None when qemu-img gave up without a result (``Check failed: ...``); *lines* are
    its stderr lines but for the command's own error messages.
    """

    status: int
    json: dict[str, Any] | None
    lines: tuple[str, ...]
    stdout: str
    stderr: str

    def __str__(self) -> str:
        shown = self.stderr.splitlines()
        if len(shown) > 40:
            shown = [*shown[:40], f"... ({len(shown) - 40} more lines)"]
        return "\n".join([f"exit status {self.status}", self.stdout.rstrip(), *shown])


def qemu_check(path: StrPath, *args: str) -> QemuCheck:
    """``qemu-img check -f qcow2 --output=json ARGS PATH`` (a failing exit status is a result too).

    The findings go to stderr, one per line, whatever the output format.
    """
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", *args, os.fspath(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    result: dict[str, Any] | None = json.loads(proc.stdout) if proc.stdout.strip() else None
    # "qemu-img: Check failed..." is the command's own verdict, not a finding of the check.
    findings = tuple(line for line in proc.stderr.splitlines() if not line.startswith("qemu-img: "))
    return QemuCheck(proc.returncode, result, findings, proc.stdout, proc.stderr)


def qemu_img(*args: StrPath) -> str:
    """``qemu-img ARGS`` (must succeed)."""
    argv = ["qemu-img", *(os.fspath(a) for a in args)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit status {proc.returncode}\n{proc.stderr}")
    return str(proc.stdout)


def qemu_io(path: StrPath, *commands: str) -> None:
    """``qemu-io -f qcow2 -c CMD... PATH`` (every command must succeed)."""
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    proc = subprocess.run([*argv, os.fspath(path)], capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0 or "failed" in proc.stdout or "error" in proc.stdout.lower() or proc.stderr:
        raise AssertionError(f"{' '.join(argv)} {path}: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}")


def qemu_io_killed(path: StrPath, *commands: str, lazy_refcounts: bool = False) -> None:
    """Run qemu-io *commands*, then ``sigraise 9``: the process dies as in a crash, nothing flushed.

    *lazy_refcounts* opens the image with ``lazy-refcounts=on`` (whatever its header says).
    """
    image = f"driver=qcow2,file.filename={os.fspath(path)}"
    if lazy_refcounts:
        image += ",lazy-refcounts=on"
    argv = ["qemu-io", "--image-opts"]
    for command in (*commands, "sigraise 9"):
        argv += ["-c", command]
    proc = subprocess.run([*argv, image], capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"{' '.join(argv)} {path} was not killed: exit status {proc.returncode}\n{proc.stderr}")


def qemu_compare(a: StrPath, b: StrPath) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare -f qcow2 -F qcow2 A B``: 0 same content, 1 different, 2 error."""
    return subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", os.fspath(a), os.fspath(b)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


# --- reading and patching the structures ---------------------------------------------------------


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot table entry: where it is in the file and the L1 table it names."""

    offset: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str


class Qcow2File:
    """Reads and patches the qcow2 structures of one image file (the header is re-read each time).

    Offsets are file (host) offsets; *guest* offsets are offsets into the virtual disk.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)

    # raw bytes

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data.ljust(length, b"\0")  # past the end of the file reads as zeroes

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def u64(self, offset: int) -> int:
        return int(struct.unpack(">Q", self.read(offset, 8))[0])

    def put_u64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value))

    @property
    def file_size(self) -> int:
        return os.stat(self.path).st_size

    # the header (offsets of docs/interop/qcow2.rst)

    def _u32(self, offset: int) -> int:
        return int(struct.unpack(">I", self.read(offset, 4))[0])

    @property
    def cluster_bits(self) -> int:
        return self._u32(20)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l1_size(self) -> int:
        return self._u32(36)

    @property
    def l1_table_offset(self) -> int:
        return self.u64(40)

    @property
    def refcount_table_offset(self) -> int:
        return self.u64(48)

    @property
    def refcount_table_clusters(self) -> int:
        return self._u32(56)

    @property
    def nb_snapshots(self) -> int:
        return self._u32(60)

    @property
    def snapshots_offset(self) -> int:
        return self.u64(64)

    @property
    def incompatible_features(self) -> int:
        return self.u64(72)

    @property
    def refcount_bits(self) -> int:
        return 1 << self._u32(96)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table: guest clusters one L2 table maps."""
        return self.cluster_size // self.l2_entry_size

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    def mark_corrupt(self) -> None:
        """Set the corrupt bit, as QEMU does when it finds damage while the image is in use."""
        self.put_u64(72, self.incompatible_features | INCOMPAT_CORRUPT)

    # L1 and L2

    def l1_entry_offset(self, index: int, l1_table_offset: int | None = None) -> int:
        return (self.l1_table_offset if l1_table_offset is None else l1_table_offset) + 8 * index

    def l1_entry(self, index: int) -> int:
        return self.u64(self.l1_entry_offset(index))

    def l2_entry_offset(self, guest: int, l1_table_offset: int | None = None) -> int:
        """File offset of the L2 entry mapping guest offset *guest* (its L2 table must exist)."""
        cluster = guest >> self.cluster_bits
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        table = self.u64(self.l1_entry_offset(l1_index, l1_table_offset)) & OFFSET_MASK
        assert table, f"{self.path}: no L2 table for guest offset {guest:#x}"
        return table + l2_index * self.l2_entry_size

    def l2_entry(self, guest: int) -> int:
        """The (first 64 bits of the) active L2 entry mapping *guest*."""
        return self.u64(self.l2_entry_offset(guest))

    def data_offset(self, guest: int) -> int:
        """Host offset of the (uncompressed) data cluster holding guest offset *guest*."""
        offset = self.l2_entry(guest) & OFFSET_MASK
        assert offset, f"{self.path}: guest offset {guest:#x} has no host cluster"
        return offset

    def compressed_offset(self, guest: int) -> int:
        """Host offset where the compressed data of guest offset *guest* starts."""
        entry = self.l2_entry(guest)
        assert entry & OFLAG_COMPRESSED, f"{self.path}: guest offset {guest:#x} is not compressed"
        return entry & ((1 << (62 - (self.cluster_bits - 8))) - 1)

    # refcounts

    def reftable_entry_offset(self, index: int) -> int:
        return self.refcount_table_offset + 8 * index

    def reftable_entry(self, index: int) -> int:
        return self.u64(self.reftable_entry_offset(index))

    @property
    def refcounts_per_block(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    def _refcount_place(self, cluster: int) -> tuple[int, int]:
        """(file offset of the byte or word holding *cluster*'s refcount, bit shift inside a byte)."""
        index, slot = divmod(cluster, self.refcounts_per_block)
        block = self.reftable_entry(index) & REFT_OFFSET_MASK
        assert block, f"{self.path}: no refcount block for cluster {cluster}"
        bits = self.refcount_bits
        if bits < 8:
            per_byte = 8 // bits
            return block + slot // per_byte, (slot % per_byte) * bits
        return block + slot * (bits // 8), 0

    def refcount(self, cluster: int) -> int:
        offset, shift = self._refcount_place(cluster)
        bits = self.refcount_bits
        if bits < 8:
            return (self.read(offset, 1)[0] >> shift) & ((1 << bits) - 1)
        return int.from_bytes(self.read(offset, bits // 8), "big")

    def set_refcount(self, cluster: int, value: int) -> None:
        offset, shift = self._refcount_place(cluster)
        bits = self.refcount_bits
        assert 0 <= value < 1 << bits, f"refcount {value} does not fit in {bits} bits"
        if bits < 8:
            mask = ((1 << bits) - 1) << shift
            old = self.read(offset, 1)[0]
            self.write(offset, bytes([(old & ~mask) | (value << shift)]))
        else:
            self.write(offset, value.to_bytes(bits // 8, "big"))

    # snapshots

    def snapshots(self) -> list[SnapshotEntry]:
        """The snapshot table (fixed part, extra data skipped, ID and name)."""
        found = []
        offset = self.snapshots_offset
        for _ in range(self.nb_snapshots):
            l1_offset, l1_size, id_len, name_len = struct.unpack(">QIHH", self.read(offset, 16))
            extra = self._u32(offset + 36)
            names = self.read(offset + 40 + extra, id_len + name_len)
            found.append(SnapshotEntry(offset, l1_offset, l1_size, names[:id_len].decode(), names[id_len:].decode()))
            offset += (40 + extra + id_len + name_len + 7) // 8 * 8
        return found

    # whole-structure helpers

    def l2_tables(self) -> list[int]:
        """Host offsets of the active L2 tables, in L1 order."""
        return [e & OFFSET_MASK for e in (self.l1_entry(i) for i in range(self.l1_size)) if e & OFFSET_MASK]

    def cluster_of(self, offset: int) -> int:
        return offset >> self.cluster_bits

    def append_cluster(self) -> int:
        """Grow the file by one cluster at the cluster-aligned end; returns its offset."""
        offset = (self.file_size + self.cluster_size - 1) // self.cluster_size * self.cluster_size
        self.write(offset + self.cluster_size - 1, b"\0")
        return offset


# --- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The kind of image a case is built on."""

    cluster_size: int = 65536
    refcount_bits: int = 16
    extended_l2: bool = False
    #: Take an internal snapshot after the first writes, then overwrite part of the data.
    snapshot: bool = False
    lazy_refcounts: bool = False

    @property
    def id(self) -> str:
        parts = [f"c{self.cluster_size // 1024}k" if self.cluster_size >= 1024 else f"c{self.cluster_size}"]
        parts.append(f"r{self.refcount_bits}")
        if self.extended_l2:
            parts.append("xl2")
        if self.snapshot:
            parts.append("snap")
        if self.lazy_refcounts:
            parts.append("lazy")
        return "-".join(parts)

    @property
    def l2_coverage(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.cluster_size * (self.cluster_size // (16 if self.extended_l2 else 8))

    @property
    def size(self) -> int:
        """Virtual size: two L2 tables' worth (at least 1 MiB)."""
        return max(2 * self.l2_coverage, 1 << 20)

    @property
    def second_table(self) -> int:
        """A guest offset mapped by the second L2 table."""
        return self.l2_coverage


@dataclass
class Damaged:
    """A damaged image and what ``qemu-img check`` must say about it."""

    path: Path
    #: Lines ``qemu-img check`` must print (on stderr) for this damage; it may print more.
    lines: set[str] = field(default_factory=set)
    #: Line beginnings of which ``qemu-img check`` must print at least one each.
    prefixes: set[str] = field(default_factory=set)
    #: Its exit status: 1 check errors, 2 corruptions, 3 leaks only.
    status: int = 2
    #: Guest offsets whose clusters QEMU cannot read even after ``-r all``: they are made
    #: unallocated in both repaired copies before their content is compared.
    unreadable: list[int] = field(default_factory=list)
    #: L1 indexes whose L2 tables are garbage (``-r all`` keeps them): cleared the same way.
    garbage_tables: list[int] = field(default_factory=list)
    #: Dirty (lazy refcounts, crashed): opening for writing repairs it before anything else.
    dirty: bool = False

    @property
    def leaks_only(self) -> bool:
        """Only leaks: what ``qemu-img check -r leaks`` repairs completely."""
        return self.status == 3

    def unmet(self, result: QemuCheck) -> list[str]:
        """What *result* lacks of what this damage must make qemu-img say (empty: all there)."""
        problems = [f"missing line {line!r}" for line in sorted(self.lines - set(result.lines))]
        problems += [
            f"no line starting {p!r}" for p in sorted(self.prefixes) if not any(x.startswith(p) for x in result.lines)
        ]
        if result.status != self.status:
            problems.append(f"exit status {result.status}, expected {self.status}")
        return problems


def base_image(path: Path, geo: Geometry) -> Qcow2File:
    """A valid image: data in guest clusters 0-3 and in the second L2 table's first cluster.

    With :attr:`Geometry.snapshot`, snapshot ``s1`` is taken after those writes and guest
    cluster 1 is rewritten afterwards: guest cluster 1 and the first L2 table are then private
    (refcount 1, COPIED set), everything else is shared with the snapshot (refcount 2). Without
    a snapshot everything has refcount 1.
    """
    options = [f"cluster_size={geo.cluster_size}", f"refcount_bits={geo.refcount_bits}", "compat=1.1"]
    if geo.extended_l2:
        options.append("extended_l2=on")
    if geo.lazy_refcounts:
        options.append("lazy_refcounts=on")
    qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join(options), path, str(geo.size))
    cs = geo.cluster_size
    qemu_io(
        path,
        f"write -P 0x11 0 {cs}",
        f"write -P 0x12 {cs} {cs}",
        f"write -P 0x13 {2 * cs} {cs}",
        f"write -P 0x14 {3 * cs} {cs}",
        f"write -P 0x21 {geo.second_table} {cs}",
    )
    if geo.snapshot:
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, f"write -P 0x31 {cs} {cs}")
    return Qcow2File(path)


def copied(entry: int, refcount: int) -> str:
    """``qemu-img check``'s line for a data cluster whose COPIED flag disagrees with *refcount*."""
    return f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"


def copied_l1(index: int, entry: int, refcount: int) -> str:
    """``qemu-img check``'s line for an L2 table whose L1 entry's COPIED flag is wrong."""
    return f"ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} refcount={refcount}"


def refcount_line(cluster: int, refcount: int, references: int) -> str:
    """``Leaked cluster N refcount=X reference=Y`` (X > Y) or ``ERROR cluster N ...`` (X < Y)."""
    prefix = "Leaked" if refcount > references else "ERROR"
    return f"{prefix} cluster {cluster} refcount={refcount} reference={references}"


def overflow_lines(offset: int) -> set[str]:
    """What qemu-img says when a cluster has more references than the refcount width holds."""
    return {
        f"ERROR: overflow cluster offset={offset:#x}",
        "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy "
        "if the image cannot be opened for writing",
    }


def used_twice(img: Qcow2File, offset: int) -> set[str]:
    """What qemu-img says of the cluster at *offset*, with refcount 1, when it is used twice."""
    if img.refcount_bits == 1:
        return overflow_lines(offset)
    return {refcount_line(img.cluster_of(offset), 1, 2)}


def _remap(img: Qcow2File, where: int, target: int) -> int:
    """Point the table entry at *where* to *target*, keeping its flags; returns the new entry."""
    entry = (img.u64(where) & ~OFFSET_MASK) | target
    img.put_u64(where, entry)
    return entry


def _end(img: Qcow2File) -> int:
    """The file size rounded up to a cluster."""
    cs = img.cluster_size
    return (img.file_size + cs - 1) // cs * cs


# Each builder: (directory, geometry) -> Damaged. Guest cluster 1 and the first L2 table are
# private in every geometry (see base_image); the second L2 table is shared with a snapshot.


def leak_free_cluster(d: Path, geo: Geometry) -> Damaged:
    """A cluster past the last one in use, inside the file, with refcount 1 and no reference."""
    img = base_image(d / "leak.qcow2", geo)
    cluster = img.cluster_of(img.append_cluster())
    img.set_refcount(cluster, 1)
    return Damaged(img.path, {refcount_line(cluster, 1, 0)}, status=3)


def leak_marked_corrupt(d: Path, geo: Geometry) -> Damaged:
    """A leak in an image marked corrupt: a repair that leaves it clean clears the bit."""
    damaged = leak_free_cluster(d, geo)
    Qcow2File(damaged.path).mark_corrupt()
    return damaged


def refcount_raised_l2(d: Path, geo: Geometry) -> Damaged:
    """The second L2 table's refcount one higher than its references.

    A leak; when it was 1, COPIED in its L1 entry now disagrees too (a corruption).
    """
    img = base_image(d / "leak-l2.qcow2", geo)
    cluster = img.cluster_of(img.l2_tables()[1])
    refcount = img.refcount(cluster)
    img.set_refcount(cluster, refcount + 1)
    lines = {refcount_line(cluster, refcount + 1, refcount)}
    if refcount == 1:
        lines.add(copied_l1(1, img.l1_entry(1), 2))
    return Damaged(img.path, lines, status=2 if refcount == 1 else 3)


def refcount_raised_data(d: Path, geo: Geometry) -> Damaged:
    """A data cluster's refcount one higher than its references (the second L2 table's data)."""
    img = base_image(d / "leak-data.qcow2", geo)
    guest = geo.second_table
    cluster = img.cluster_of(img.data_offset(guest))
    refcount = img.refcount(cluster)
    img.set_refcount(cluster, refcount + 1)
    lines = {refcount_line(cluster, refcount + 1, refcount)}
    if refcount == 1:
        lines.add(copied(img.l2_entry(guest), 2))
    return Damaged(img.path, lines, status=2 if refcount == 1 else 3)


def refcount_lowered_shared_data(d: Path, geo: Geometry) -> Damaged:
    """A data cluster shared with the snapshot (two references) with refcount 1."""
    assert geo.snapshot
    img = base_image(d / "low-data.qcow2", geo)
    cluster = img.cluster_of(img.data_offset(0))
    assert img.refcount(cluster) == 2
    img.set_refcount(cluster, 1)
    # COPIED is clear in the active L2 entry (shared): with refcount 1 it looks wrong too.
    return Damaged(img.path, {refcount_line(cluster, 1, 2), copied(img.l2_entry(0), 1)})


def refcount_lowered_shared_l2(d: Path, geo: Geometry) -> Damaged:
    """The L2 table shared with the snapshot with refcount 1."""
    assert geo.snapshot
    img = base_image(d / "low-l2.qcow2", geo)
    cluster = img.cluster_of(img.l2_tables()[1])
    assert img.refcount(cluster) == 2
    img.set_refcount(cluster, 1)
    return Damaged(img.path, {refcount_line(cluster, 1, 2), copied_l1(1, img.l1_entry(1), 1)})


def refcount_zero_data(d: Path, geo: Geometry) -> Damaged:
    """A data cluster in use with refcount 0 (``-r all`` rebuilds the refcount structure)."""
    img = base_image(d / "zero-data.qcow2", geo)
    guest = geo.second_table
    cluster = img.cluster_of(img.data_offset(guest))
    references = img.refcount(cluster)
    img.set_refcount(cluster, 0)
    lines = {refcount_line(cluster, 0, references)}
    if img.l2_entry(guest) & OFLAG_COPIED:
        lines.add(copied(img.l2_entry(guest), 0))
    return Damaged(img.path, lines)


def refcount_zero_l2(d: Path, geo: Geometry) -> Damaged:
    """An L2 table in use with refcount 0."""
    img = base_image(d / "zero-l2.qcow2", geo)
    cluster = img.cluster_of(img.l2_tables()[1])
    references = img.refcount(cluster)
    img.set_refcount(cluster, 0)
    lines = {refcount_line(cluster, 0, references)}
    if img.l1_entry(1) & OFLAG_COPIED:
        lines.add(copied_l1(1, img.l1_entry(1), 0))
    return Damaged(img.path, lines)


def copied_cleared_l2(d: Path, geo: Geometry) -> Damaged:
    """COPIED cleared in the L2 entry of a data cluster with refcount 1."""
    img = base_image(d / "copied-l2.qcow2", geo)
    where = img.l2_entry_offset(geo.cluster_size)
    entry = img.u64(where) & ~OFLAG_COPIED
    img.put_u64(where, entry)
    return Damaged(img.path, {copied(entry, 1)})


def copied_cleared_l1(d: Path, geo: Geometry) -> Damaged:
    """COPIED cleared in the L1 entry of an L2 table with refcount 1."""
    img = base_image(d / "copied-l1.qcow2", geo)
    where = img.l1_entry_offset(0)
    entry = img.u64(where) & ~OFLAG_COPIED
    img.put_u64(where, entry)
    return Damaged(img.path, {copied_l1(0, entry, 1)})


def copied_set_shared_l2(d: Path, geo: Geometry) -> Damaged:
    """COPIED set in the active L2 entry of a data cluster the snapshot shares (refcount 2)."""
    assert geo.snapshot
    img = base_image(d / "copied-shared-l2.qcow2", geo)
    where = img.l2_entry_offset(2 * geo.cluster_size)
    entry = img.u64(where) | OFLAG_COPIED
    img.put_u64(where, entry)
    return Damaged(img.path, {copied(entry, 2)})


def copied_set_shared_l1(d: Path, geo: Geometry) -> Damaged:
    """COPIED set in the active L1 entry of the L2 table the snapshot shares (refcount 2)."""
    assert geo.snapshot
    img = base_image(d / "copied-shared-l1.qcow2", geo)
    where = img.l1_entry_offset(1)
    entry = img.u64(where) | OFLAG_COPIED
    img.put_u64(where, entry)
    return Damaged(img.path, {copied_l1(1, entry, 2)})


def referenced_twice(d: Path, geo: Geometry) -> Damaged:
    """Guest cluster 3 remapped onto guest cluster 0's host cluster (in the private L2 table).

    With 1-bit refcounts the second reference overflows the check's own refcount array.
    """
    img = base_image(d / "twice.qcow2", geo)
    cs = geo.cluster_size
    target, old = img.data_offset(0), img.data_offset(3 * cs)
    _remap(img, img.l2_entry_offset(3 * cs), target)
    refcount = img.refcount(img.cluster_of(target))
    lines = {refcount_line(img.cluster_of(old), refcount, refcount - 1)}
    if geo.refcount_bits == 1:
        lines |= overflow_lines(target)
    else:
        lines.add(refcount_line(img.cluster_of(target), refcount, refcount + 1))
    return Damaged(img.path, lines)


def l2_entry_past_eof(d: Path, geo: Geometry) -> Damaged:
    """Guest cluster 1's L2 entry pointing two clusters past the end of the file."""
    img = base_image(d / "past-eof.qcow2", geo)
    guest = geo.cluster_size
    old = img.data_offset(guest)
    target = _end(img) + 2 * geo.cluster_size
    _remap(img, img.l2_entry_offset(guest), target)
    lines = {
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
        f"offset {target:#x} size {geo.cluster_size:#x}",
        refcount_line(img.cluster_of(old), 1, 0),
    }
    return Damaged(img.path, lines, unreadable=[guest])


def unaligned_data(d: Path, geo: Geometry) -> Damaged:
    """Guest cluster 1's L2 entry 512 bytes into its data cluster."""
    assert geo.cluster_size > 512, "every offset is aligned to 512-byte clusters"
    img = base_image(d / "unaligned-data.qcow2", geo)
    guest = geo.cluster_size
    target = img.data_offset(guest) + 512
    _remap(img, img.l2_entry_offset(guest), target)
    lines = {f"ERROR offset={target:x}: Data cluster is not properly aligned; L2 entry corrupted."}
    return Damaged(img.path, lines, unreadable=[guest])


def unaligned_zero(d: Path, geo: Geometry) -> Damaged:
    """A preallocated zero cluster 512 bytes into its cluster (``-r all`` makes it a plain zero)."""
    assert geo.cluster_size > 512, "every offset is aligned to 512-byte clusters"
    img = base_image(d / "unaligned-zero.qcow2", geo)
    guest = geo.cluster_size
    qemu_io(img.path, f"write -z {guest} {geo.cluster_size}")  # zeroes, keeping the host cluster
    target = img.data_offset(guest) + 512
    _remap(img, img.l2_entry_offset(guest), target)
    lines = {f"ERROR offset={target:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."}
    return Damaged(img.path, lines)


def unaligned_l2(d: Path, geo: Geometry) -> Damaged:
    """The first L1 entry 512 bytes into its L2 table's cluster."""
    assert geo.cluster_size > 512, "every offset is aligned to 512-byte clusters"
    img = base_image(d / "unaligned-l2.qcow2", geo)
    where = img.l1_entry_offset(0)
    target = (img.u64(where) & OFFSET_MASK) + 512
    _remap(img, where, target)
    lines = {f"ERROR l2_offset={target:x}: Table is not cluster aligned; L1 entry corrupted"}
    return Damaged(img.path, lines, garbage_tables=[0])


def l2_table_twice(d: Path, geo: Geometry) -> Damaged:
    """The second L1 entry names the first L2 table: an L2 table (and its data) used twice."""
    img = base_image(d / "l2-twice.qcow2", geo)
    first, second = img.l2_tables()[:2]
    _remap(img, img.l1_entry_offset(1), first)
    old = img.refcount(img.cluster_of(second))
    lines = {refcount_line(img.cluster_of(second), old, old - 1)} | used_twice(img, first)
    return Damaged(img.path, lines)


def l2_on_refcount_block(d: Path, geo: Geometry) -> Damaged:
    """The second L1 entry names the first refcount block as its L2 table (metadata overlap)."""
    img = base_image(d / "l2-on-refblock.qcow2", geo)
    block = img.reftable_entry(0) & REFT_OFFSET_MASK
    second = img.l2_tables()[1]
    _remap(img, img.l1_entry_offset(1), block)
    old = img.refcount(img.cluster_of(second))
    lines = {refcount_line(img.cluster_of(second), old, old - 1)} | used_twice(img, block)
    return Damaged(img.path, lines, garbage_tables=[1])


def l2_on_l1(d: Path, geo: Geometry) -> Damaged:
    """The second L1 entry names the L1 table's own cluster as its L2 table (metadata overlap).

    The L1 entries then read as L2 entries too, so how many references the L1 cluster gets
    depends on the entry width.
    """
    img = base_image(d / "l2-on-l1.qcow2", geo)
    l1 = img.l1_table_offset
    second = img.l2_tables()[1]
    _remap(img, img.l1_entry_offset(1), l1)
    old = img.refcount(img.cluster_of(second))
    lines = {refcount_line(img.cluster_of(second), old, old - 1)}
    if geo.refcount_bits == 1:
        return Damaged(img.path, lines | overflow_lines(l1), garbage_tables=[1])
    return Damaged(
        img.path, lines, garbage_tables=[1], prefixes={f"ERROR cluster {img.cluster_of(l1)} refcount=1 reference="}
    )


def reftable_entry_past_eof(d: Path, geo: Geometry) -> Damaged:
    """A second refcount table entry naming a refcount block past the end of the file."""
    img = base_image(d / "reftable-eof.qcow2", geo)
    assert img.reftable_entry(1) == 0
    img.put_u64(img.reftable_entry_offset(1), _end(img) + 4 * geo.cluster_size)
    return Damaged(img.path, {"ERROR refcount block 1 is outside image"})


def reftable_entry_zero(d: Path, geo: Geometry) -> Damaged:
    """The first refcount table entry cleared: every cluster in use reads refcount 0."""
    img = base_image(d / "reftable-zero.qcow2", geo)
    table = img.cluster_of(img.l2_tables()[0])
    references = img.refcount(table)
    img.put_u64(img.reftable_entry_offset(0), 0)
    return Damaged(img.path, {refcount_line(0, 0, 1), refcount_line(table, 0, references)})


def reftable_entry_on_l1(d: Path, geo: Geometry) -> Damaged:
    """The first refcount table entry names the L1 table's cluster: the L1 table read as refcounts.

    The L1 cluster is then used twice (L1 table and refcount block).
    """
    img = base_image(d / "reftable-on-l1.qcow2", geo)
    img.put_u64(img.reftable_entry_offset(0), img.l1_table_offset)
    if geo.refcount_bits == 1:
        return Damaged(img.path, overflow_lines(img.l1_table_offset))
    return Damaged(img.path, {"ERROR refcount block 0 refcount=2"})


def reftable_entry_on_l2(d: Path, geo: Geometry) -> Damaged:
    """The first refcount table entry names the first L2 table's cluster: metadata overlap."""
    img = base_image(d / "reftable-on-l2.qcow2", geo)
    table = img.l2_tables()[0]
    img.put_u64(img.reftable_entry_offset(0), table)
    if geo.refcount_bits == 1:
        return Damaged(img.path, overflow_lines(table))
    return Damaged(img.path, {"ERROR refcount block 0 refcount=2"})


def compressed_shared_low(d: Path, geo: Geometry) -> Damaged:
    """Two compressed clusters packed into one host cluster (two references), its refcount 1."""
    assert geo.refcount_bits >= 2, "a host cluster holds one compressed cluster with 1-bit refcounts"
    img = base_image(d / "compressed.qcow2", geo)
    cs = geo.cluster_size
    qemu_io(img.path, f"write -c -P 0x51 {4 * cs} {cs}", f"write -c -P 0x52 {5 * cs} {cs}")
    hosts = {img.compressed_offset(g) >> img.cluster_bits for g in (4 * cs, 5 * cs)}
    assert len(hosts) == 1, f"qemu-img did not pack the compressed clusters into one host cluster: {hosts}"
    cluster = hosts.pop()
    assert img.refcount(cluster) == 2
    img.set_refcount(cluster, 1)
    return Damaged(img.path, {refcount_line(cluster, 1, 2)})


def reftable_entry_unaligned(d: Path, geo: Geometry) -> Damaged:
    """The first refcount table entry 512 bytes into its block's cluster: refcounts unreadable."""
    assert geo.cluster_size > 512, "every offset is aligned to 512-byte clusters"
    img = base_image(d / "reftable-unaligned.qcow2", geo)
    where = img.reftable_entry_offset(0)
    img.put_u64(where, img.u64(where) + 512)
    lines = {"ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted"}
    return Damaged(img.path, lines, prefixes={"Can't get refcount for cluster 0: "}, status=1)


def snapshot_l1_unaligned(d: Path, geo: Geometry) -> Damaged:
    """The snapshot table entry's L1 table offset 8 bytes off its cluster."""
    assert geo.snapshot
    img = base_image(d / "snap-l1.qcow2", geo)
    snap = img.snapshots()[0]
    img.put_u64(snap.offset, snap.l1_table_offset + 8)
    line = (
        f"ERROR snapshot {snap.id} ({snap.name}) l1_offset={snap.l1_table_offset + 8:#x}: "
        "L1 table is not cluster aligned; snapshot table entry corrupted"
    )
    return Damaged(img.path, {line})


def subcluster_alloc_and_zero(d: Path, geo: Geometry) -> Damaged:
    """Extended L2: subcluster 0 of an allocated cluster both allocated and zero."""
    assert geo.extended_l2
    img = base_image(d / "xl2-both.qcow2", geo)
    guest = geo.cluster_size
    where = img.l2_entry_offset(guest) + 8
    img.put_u64(where, img.u64(where) | (1 << 32))
    lines = {f"ERROR offset={img.data_offset(guest):x}: Allocated cluster has corrupted subcluster allocation bitmap"}
    return Damaged(img.path, lines, unreadable=[guest])


def subcluster_unallocated_with_bits(d: Path, geo: Geometry) -> Damaged:
    """Extended L2: an unallocated cluster whose bitmap says subcluster 0 is allocated."""
    assert geo.extended_l2
    img = base_image(d / "xl2-unalloc.qcow2", geo)
    where = img.l2_entry_offset(4 * geo.cluster_size)
    assert img.u64(where) == 0
    img.put_u64(where + 8, 1)
    lines = {"ERROR: Unallocated cluster has non-zero subcluster allocation map"}
    return Damaged(img.path, lines, unreadable=[4 * geo.cluster_size])


def dirty_lazy_opened(d: Path, geo: Geometry) -> Damaged:
    """Opened with ``lazy-refcounts=on``: qemu-io allocates and is killed before flushing."""
    img = base_image(d / "dirty-opened.qcow2", geo)
    cs = geo.cluster_size
    far = geo.second_table + 5 * cs
    qemu_io_killed(img.path, f"write -P 0x41 {far} {cs}", lazy_refcounts=True)
    assert img.dirty, f"{img.path}: qemu-io left the image clean"
    cluster = img.cluster_of(img.data_offset(far))
    return Damaged(img.path, {refcount_line(cluster, 0, 1)}, dirty=True)


def dirty_lazy_created(d: Path, geo: Geometry) -> Damaged:
    """Created with ``lazy_refcounts=on``: qemu-io allocates, copies on write, and is killed."""
    path = d / "dirty-created.qcow2"
    img = base_image(path, Geometry(geo.cluster_size, geo.refcount_bits, geo.extended_l2, geo.snapshot, True))
    cs = geo.cluster_size
    new = geo.second_table + 2 * cs
    qemu_io_killed(path, f"write -P 0x42 {new} {2 * cs}", f"write -P 0x43 {2 * cs} {cs}")
    assert img.dirty, f"{path}: qemu-io left the image clean"
    return Damaged(path, {refcount_line(img.cluster_of(img.data_offset(new)), 0, 1)}, dirty=True)


Builder = Callable[[Path, Geometry], Damaged]


def unmap(path: Path, damaged: Damaged) -> None:
    """Make what QEMU cannot read of *damaged* unallocated in the image at *path*.

    Its garbage L2 tables are dropped from the L1 table, the L2 entries of its unreadable
    clusters cleared.
    """
    img = Qcow2File(path)
    for index in damaged.garbage_tables:
        img.put_u64(img.l1_entry_offset(index), 0)
    for guest in damaged.unreadable:
        img.write(img.l2_entry_offset(guest), bytes(img.l2_entry_size))
