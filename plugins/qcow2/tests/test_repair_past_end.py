"""Repairing an L2 entry that names a cluster a whole cluster or more past the end of the file.

A power loss leaves one on a lazy-refcounts image when the L2 table reached the disk and the
write of the new data cluster (which would have grown the file) did not. QEMU 7.2 cannot
repair it ("counting reference for region exceeding the end of the file by one cluster or
more"); imago unmaps the entry (the data was never written: the cluster reads as before its
allocation) and never grows the file to reach it, so a hostile entry naming 2^55 costs one
small write. The images are made by ``qemu-img``/``qemu-io`` and then edited with :mod:`struct`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import AnnotatedStorage, PermissiveImplicitOpenGate, RepairMode, SyncFormatAccess
from imago_qcow2 import Qcow2

from . import _corpus as corpus
from .test_check import assert_same_check
from .test_check_bounded import CountingStorage

PAST_THE_END = "exceeding the end of the file by one cluster or more"
COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


# --- the helpers of plugins/faults/tests/test_qcow2_power_loss.py the reproduction uses ---------------


def run(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(arg) for arg in args], capture_output=True, text=True, cwd=cwd, check=False, timeout=120
    )


def checked(*args: str | os.PathLike[str], cwd: Path) -> str:
    proc = run(*args, cwd=cwd)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))}: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout


def qemu_check(path: Path) -> dict[str, Any]:
    """``qemu-img check``: no corruption, no check errors (leaks allowed: exit status 0 or 3)."""
    proc = run("qemu-img", "check", "-f", "qcow2", "--output=json", path.name, cwd=path.parent)
    result: dict[str, Any] = json.loads(proc.stdout)
    problems = {key: result[key] for key in ("corruptions", "check-errors") if result.get(key, 0)}
    assert not problems, f"qemu-img check: {problems}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode in (0, 3), f"qemu-img check: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return result


def is_dirty(path: Path) -> bool:
    """Whether the header's dirty bit (incompatible feature bit 0) is set."""
    with path.open("rb") as file:
        header = file.read(80)
    return int.from_bytes(header[4:8], "big") >= 3 and bool(int.from_bytes(header[72:80], "big") & 1)


# --- the known bug of test_qcow2_power_loss.py, fixed ------------------------------------------------


def test_lazy_repair_with_an_l2_entry_past_the_end(tmp_path: Path) -> None:
    """The body of ``test_known_bug_lazy_repair_with_an_l2_entry_past_the_end`` (plugins/faults), unchanged."""
    path = tmp_path / "lazy.qcow2"
    options = "cluster_size=512,lazy_refcounts=on"
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path.name, "1M", cwd=tmp_path)
    checked("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", path.name, cwd=tmp_path)
    image = bytearray(path.read_bytes())
    l1_offset = int.from_bytes(image[40:48], "big")
    l2_offset = int.from_bytes(image[l1_offset : l1_offset + 8], "big") & 0x00FF_FFFF_FFFF_FE00
    past_the_end = -(-len(image) // 512) * 512
    image[l2_offset + 8 : l2_offset + 16] = (1 << 63 | past_the_end).to_bytes(8, "big")  # COPIED, past the end
    image[79] |= 1  # the dirty bit (incompatible feature bit 0)
    path.write_bytes(image)
    assert PAST_THE_END in run("qemu-img", "check", "-f", "qcow2", path.name, cwd=tmp_path).stderr
    with imago.open(path, "qcow2", write=True):
        pass
    assert not is_dirty(path), "the repair on opening failed: still dirty"
    qemu_check(path)
    # Beyond the original: nothing leaked, the file did not grow, the disk reads as written
    # (the lost cluster as it was before: zeroes), and writes work again.
    assert not qemu_check(path).get("leaks", 0)
    assert path.stat().st_size == len(image)
    corpus.qemu_io(path, "read -P 0x11 0 512", "read -P 0 512 512")
    with imago.open(path, "qcow2", write=True) as disk:
        disk.write(b"\x22" * 512, 512)
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 512", "read -P 0x22 512 512")


# --- the repair's rule for each kind of entry ---------------------------------------------------------


def lazy_image(path: Path, *options: str, backing: Path | None = None) -> Path:
    """A lazy-refcounts image of 64 KiB clusters with data in its first cluster."""
    lazy = [] if any(o.startswith("lazy_refcounts=") for o in options) else ["lazy_refcounts=on"]
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join([*lazy, *options])]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    corpus.qemu_img(*args, path, "4M")
    corpus.qemu_io(path, "write -P 0x11 0 64k")
    return path


def l2_entry_offset(path: Path, index: int) -> int:
    """Where the active L2 entry for cluster *index* of the first L2 table lies."""
    h = corpus.header(path)
    l2 = corpus.get_u64(path, h.l1_table_offset) & OFFSET_MASK
    return l2 + index * h.l2_entry_size


def crash_past_the_end(
    path: Path, index: int, host: int, *, flags: int = COPIED, bitmap: int | None = None, dirty: bool = True
) -> None:
    """Cluster *index* names *host* (past the end) in the active L2 table; the image marked dirty."""
    where = l2_entry_offset(path, index)
    corpus.put_u64(path, where, flags | host)
    if bitmap is not None:
        corpus.put_u64(path, where + 8, bitmap)
    if dirty:
        features = corpus.get_u64(path, corpus.OFF_INCOMPATIBLE_FEATURES)
        corpus.put_u64(path, corpus.OFF_INCOMPATIBLE_FEATURES, features | 1)


def repair(path: Path) -> imago.CheckResult:
    with imago.open(path, "qcow2", write=True, for_check=True) as disk:
        return disk.check(RepairMode.ALL)


def end_cluster(path: Path) -> int:
    return corpus.align_up(corpus.file_size(path), 65536)


def test_check_reports_it_as_qemu_img_does(tmp_path: Path) -> None:
    path = lazy_image(tmp_path / "a.qcow2")
    crash_past_the_end(path, 1, end_cluster(path))
    result = assert_same_check(path)
    assert any(PAST_THE_END in f.message for f in result.findings)


SHAPES = {
    "64k-dirty": ((), True),
    "64k-clean": ((), False),
    "extended-dirty": (("extended_l2=on",), True),
    "extended-clean": (("extended_l2=on",), False),
    "eager-refcounts": (("lazy_refcounts=off",), False),  # (only lazy refcounts mark an image dirty)
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_check_r_all_unmaps_a_data_cluster(tmp_path: Path, shape: str) -> None:
    """Where QEMU's ``check -r all`` leaves the corruption (test_check.py's ``past-eof`` damage)."""
    options, dirty = SHAPES[shape]
    extended = options == ("extended_l2=on",)
    path = lazy_image(tmp_path / "a.qcow2", *options)
    host = end_cluster(path) + 16 * 65536
    crash_past_the_end(path, 1, host, dirty=dirty, bitmap=0xFFFFFFFF if extended else None)
    size = corpus.file_size(path)
    result = repair(path)
    assert [f.message for f in result.repaired if PAST_THE_END.replace("exceeding", "exceeds") in f.message] == [
        f"Repairing offset={host:x}: Data cluster exceeds the end of the file by one cluster or more; L2 entry "
        "corrupted, cluster unmapped"
    ]
    assert (result.corruptions, result.check_errors, result.leaks) == (0, 0, 0), result.findings
    assert result.corruptions_fixed >= 1
    assert corpus.get_u64(path, l2_entry_offset(path, 1)) == 0
    if extended:
        assert corpus.get_u64(path, l2_entry_offset(path, 1) + 8) == 0
    assert corpus.file_size(path) == size
    assert not is_dirty(path)
    assert not qemu_check(path).get("leaks", 0)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0 64k 64k")


def test_unmapped_cluster_reads_from_the_backing_file(tmp_path: Path) -> None:
    """The cluster reads as before its allocation: the backing file's data, not zeroes."""
    backing = tmp_path / "base.qcow2"
    corpus.qemu_img("create", "-q", "-f", "qcow2", backing, "4M")
    corpus.qemu_io(backing, "write -P 0x77 0 4M")
    path = lazy_image(tmp_path / "top.qcow2", backing=backing)
    crash_past_the_end(path, 2, end_cluster(path))
    with imago.open(path, "qcow2", write=True):
        pass  # (the repair on opening)
    assert not is_dirty(path)
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0x77 64k 128k")


def test_preallocated_zero_cluster_stays_zero(tmp_path: Path) -> None:
    backing = tmp_path / "base.qcow2"
    corpus.qemu_img("create", "-q", "-f", "qcow2", backing, "4M")
    corpus.qemu_io(backing, "write -P 0x77 0 4M")
    path = lazy_image(tmp_path / "top.qcow2", backing=backing)
    host = end_cluster(path) + 65536
    crash_past_the_end(path, 1, host, flags=COPIED | 1)  # the zero flag, a host cluster past the end
    result = repair(path)
    assert any(f.message.startswith(f"Repairing offset={host:x}: Preallocated zero cluster") for f in result.repaired)
    assert corpus.get_u64(path, l2_entry_offset(path, 1)) == 1  # (zero, no host cluster)
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0 64k 64k", "read -P 0x77 128k 64k")


def test_extended_l2_keeps_the_zero_subclusters(tmp_path: Path) -> None:
    path = lazy_image(tmp_path / "ext.qcow2", "extended_l2=on")
    zero_half = 0xFFFF << 32 << 16  # subclusters 16-31 zero
    crash_past_the_end(path, 1, end_cluster(path), bitmap=zero_half | 0xFFFF)  # 0-15 allocated
    repair(path)
    where = l2_entry_offset(path, 1)
    assert (corpus.get_u64(path, where), corpus.get_u64(path, where + 8)) == (0, zero_half)
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0 64k 64k")


def test_compressed_cluster_past_the_end_is_unmapped(tmp_path: Path) -> None:
    path = lazy_image(tmp_path / "c.qcow2")
    corpus.qemu_io(path, "write -c -P 0x33 128k 64k")
    where = l2_entry_offset(path, 2)
    entry = corpus.get_u64(path, where)
    assert entry & (1 << 62)
    # The same compressed length, at the end of the file plus a cluster.
    x = 62 - (16 - 8)
    host = end_cluster(path) + 65536
    corpus.put_u64(path, where, (entry & ~((1 << x) - 1)) | host)
    result = repair(path)
    assert any(f.message.startswith(f"Repairing offset={host:x}: Compressed cluster") for f in result.repaired)
    assert corpus.get_u64(path, where) == 0
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0 128k 64k")


@pytest.mark.parametrize("host", [1 << 40, 1 << 55], ids=["1-TiB", "2^55"])
def test_hostile_entry_far_past_the_end_repairs_in_bounded_work(tmp_path: Path, host: int) -> None:
    """Growing the file to reach the cluster would write up to 2^55 bytes; unmapping writes 8."""
    path = lazy_image(tmp_path / "far.qcow2")
    crash_past_the_end(path, 1, host)
    size = corpus.file_size(path)
    storage = WriteCounting(
        imago.storage_driver("file").open_sync(imago.StorageOpenOptions(filename=path, writable=True))
    )
    driver = Qcow2.builder(storage).write(True).open_sync(PermissiveImplicitOpenGate())  # (repairs it: dirty)
    SyncFormatAccess(driver).close()
    assert storage.bytes_read <= 4 * size, storage.bytes_read
    assert storage.bytes_written <= 4 * 65536, storage.bytes_written
    assert corpus.file_size(path) == size
    assert not is_dirty(path)
    qemu_check(path)
    corpus.qemu_io(path, "read -P 0x11 0 64k", "read -P 0 64k 64k")


class WriteCounting(CountingStorage):
    """Counts the bytes written too."""

    def __init__(self, inner: imago.Storage) -> None:
        super().__init__(inner)
        self.bytes_written = 0

    async def writev(self, bufs: Any, offset: int) -> None:
        """Counted, then forwarded."""
        self.bytes_written += sum(len(buf) for buf in bufs)
        await AnnotatedStorage.writev(self, bufs, offset)
