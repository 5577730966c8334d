"""qcow2 crash safety: a writer killed with SIGKILL at a random moment leaves a usable image.

A child process opens a qcow2 image for writing with imago and runs a seeded random workload
(partial and multi-cluster writes, write_zeroes, discard_to_zero, discard_to_any, and a flush
now and then). It keeps a journal: a line before each operation starts, and after each
completed flush a line with the number of operations done and a digest of them, fsync'd. The
parent kills the child with SIGKILL after a random delay, then:

* ``qemu-img check`` must find no corruption and no check errors (leaked clusters are allowed:
  clusters whose release was still pending when the writer died);
* with lazy refcounts the image may be left dirty: then imago refuses to write it, and
  ``qemu-img check -r all`` must repair it to a clean image before the checks below;
* everything written before the last journaled flush must read back: the parent replays the
  same seeded workload up to that flush into a :class:`~imago.testing.model.DiskModel`, and
  treats the ranges of later operations (up to the last one the journal says may have
  started) as undefined;
* internal snapshots keep their content, backing files stay untouched, imago reads the image
  as qemu-img does, and repairing the leaks leaves a clean image with the same content.

What this can and cannot show: the page cache survives the death of a process, so every
``pwrite`` the child completed reaches the file, in the order it was made. The test therefore
checks the *order* of imago's metadata updates at the level of a process crash (a new cluster's
refcount before the L2 entry using it, an L2 table before the L1 entry, an L2 entry dropped
before the refcount of the cluster it pointed to). It cannot simulate a power loss or a kernel
crash, where writes not yet flushed to the disk may be lost or reordered.

This module is also the child: it is loaded by file name in the child process (see
:data:`CHILD`), so it must not use relative imports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imago import ImagoError, PermissiveImplicitOpenGate, SyncFormatAccess
from imago.testing.model import DiskModel
from imago_qcow2 import Qcow2

MiB = 1 << 20

# Far more operations than a child gets through before it is killed.
MAX_OPS = 200_000

CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("qcow2_crash_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.child_main(sys.argv[2:])
"""


# --- the workload (shared by child and parent) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # write, zeroes, discard-zero, discard-any, flush
    offset: int = 0
    length: int = 0
    data: bytes = b""


def noise(rng: random.Random, length: int) -> bytes:
    """Random bytes without zeroes (so that zeroing is always visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def workload(seed: int, size: int, cluster: int) -> Iterator[Op]:
    """The seeded operations: the same sequence in the child and in the parent's replay."""
    rng = random.Random(seed)
    # Most requests gather around a few spots, so clusters are written, zeroed, discarded,
    # reallocated and copied on write again and again.
    hot = [rng.randrange(size // cluster) * cluster for _ in range(4)]
    for _ in range(MAX_OPS):
        roll = rng.random()
        if roll < 0.07:
            yield Op("flush")
            continue
        kind = "write" if roll < 0.6 else "zeroes" if roll < 0.72 else "discard-zero" if roll < 0.86 else "discard-any"
        shape = rng.random()
        if shape < 0.15:
            length = rng.randint(1, 512)
        elif shape < 0.6:
            length = rng.randint(1, cluster)
        else:
            length = rng.randint(cluster, 4 * cluster + cluster // 2)
        if rng.random() < 0.6:
            offset = rng.choice(hot) + rng.randrange(-4 * cluster, 4 * cluster)
        else:
            offset = rng.randrange(size)
        alignment = rng.choice((1, 512, cluster))
        offset = min(max(offset // alignment * alignment, 0), size - 1)
        length = min(length, size - offset)
        yield Op(kind, offset, length, noise(rng, length) if kind == "write" else b"")


def digest_update(digest: Any, op: Op) -> None:
    digest.update(f"{op.kind} {op.offset} {op.length};".encode())
    digest.update(op.data)


# --- the child --------------------------------------------------------------------------------


def child_main(argv: list[str]) -> None:
    """Open the image, say so in the journal, and run the workload until killed."""
    path, journal_path, seed, size, cluster = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    image = SyncFormatAccess(Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate()))
    journal = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(line: str, durable: bool) -> None:
        os.write(journal, line.encode())
        if durable:
            os.fsync(journal)

    note("ready\n", True)
    digest = hashlib.sha256()
    done = 0
    for index, op in enumerate(workload(seed, size, cluster)):
        # Not fsync'd: written before the operation starts, and a killed process's writes
        # survive in the page cache; this only bounds how far the child may have got.
        note(f"begin {index}\n", False)
        if op.kind == "write":
            image.write(op.data, op.offset)
        elif op.kind == "zeroes":
            image.write_zeroes(op.offset, op.length)
        elif op.kind == "discard-zero":
            image.discard_to_zero(op.offset, op.length)
        elif op.kind == "discard-any":
            image.discard_to_any(op.offset, op.length)
        else:
            image.flush()
        digest_update(digest, op)
        done = index + 1
        if op.kind == "flush":
            note(f"flush {done} {digest.hexdigest()}\n", True)
    image.close()
    note(f"done {done} {digest.hexdigest()}\n", True)


# --- the parent -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cluster_size: int
    size: int
    options: dict[str, object] = dataclasses.field(default_factory=dict)
    backing: bool = False
    snapshot: bool = False
    kills: int = 3


CASES = [
    Case("4k", 4096, 8 * MiB, {"refcount_bits": 16}),
    Case("64k-refcount-1", 65536, 16 * MiB, {"refcount_bits": 1}),
    Case("4k-v2", 4096, 8 * MiB, {"compat": "0.10"}),
    Case("64k-backing", 65536, 16 * MiB, backing=True),
    # Version 2 with a backing file: zeroing has no zero flag and writes zeroes.
    Case("4k-backing-v2", 4096, 8 * MiB, {"compat": "0.10"}, backing=True),
    Case("64k-snapshot", 65536, 16 * MiB, snapshot=True),
    # Refcount blocks cover 32 KiB, the first refcount table 2 MiB: the table moves often.
    Case("512-refcount-64", 512, 4 * MiB, {"refcount_bits": 64}),
    # Refcounts may lag behind while the image is marked dirty: a repair makes it whole.
    Case("512-lazy-refcounts", 512, 4 * MiB, {"lazy_refcounts": "on"}, kills=4),
]
RUNS = [(case, kill) for case in CASES for kill in range(case.kills)]


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


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
    """``qemu-img check --output=json``: no corruption and no check errors; leaks are allowed."""
    proc = run("qemu-img", "check", "-f", "qcow2", "--output=json", path.name, cwd=path.parent)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"qemu-img check (exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}") from None
    problems = {key: result[key] for key in ("corruptions", "check-errors") if result.get(key, 0)}
    assert not problems, f"qemu-img check: {problems}\n{proc.stdout}{proc.stderr}"
    # 0: clean, 3: leaked clusters only.
    assert proc.returncode in (0, 3), f"qemu-img check: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return result


def is_dirty(path: Path) -> bool:
    """Whether the header's dirty bit (incompatible feature bit 0) is set."""
    with path.open("rb") as f:
        header = f.read(80)
    return int.from_bytes(header[4:8], "big") >= 3 and bool(int.from_bytes(header[72:80], "big") & 1)


def convert(path: Path, *, snapshot: str | None = None) -> bytes:
    out = path.with_name(f"{path.stem}-{snapshot or 'active'}.raw")
    extra = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    checked("qemu-img", "convert", "-f", "qcow2", *extra, "-O", "raw", path.name, out.name, cwd=path.parent)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class Start:
    path: Path
    content: bytes
    snapshot: bytes | None
    frozen: dict[Path, str]


def make_image(case: Case, directory: Path) -> Start:
    size = case.size
    path = directory / "disk.qcow2"
    options = ",".join(f"{key}={value}" for key, value in {"cluster_size": case.cluster_size, **case.options}.items())
    frozen: dict[Path, str] = {}
    backing: list[str] = []
    if case.backing:
        base = directory / "base.raw"
        # Shorter than the overlay and not cluster-aligned.
        base.write_bytes(noise(random.Random(seed_of(case.name, "base")), size * 3 // 4 + 1536))
        frozen[base] = sha256(base)
        backing = ["-b", base.name, "-F", "raw"]
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, *backing, path.name, str(size), cwd=directory)
    writes = [f"write -P 0x11 {size // 16} {size // 8}", f"write -z {size // 4} {size // 16}"]
    if case.snapshot:
        writes.append(f"write -P 0x33 {size // 2} {size // 2}")
    for command in writes:
        checked("qemu-io", "-f", "qcow2", "-c", command, path.name, cwd=directory)
    snapshot = None
    if case.snapshot:
        checked("qemu-img", "snapshot", "-c", "s1", path.name, cwd=directory)
        snapshot = convert(path, snapshot="s1")
    return Start(path, convert(path), snapshot, frozen)


@dataclasses.dataclass
class Journal:
    ready: bool = False
    flushed: int = 0  # operations done at the last completed flush
    digest: str | None = None
    begun: int = -1  # the last operation that may have started
    done: bool = False


def read_journal(path: Path) -> Journal:
    journal = Journal()
    text = path.read_text() if path.exists() else ""
    # Only whole lines count: the child may have died in the middle of one.
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        words = line.split()
        if words[0] == "ready":
            journal.ready = True
        elif words[0] == "begin":
            journal.begun = int(words[1])
        elif words[0] in ("flush", "done"):
            journal.flushed, journal.digest = int(words[1]), words[2]
            journal.done = words[0] == "done"
    return journal


def masked(model: DiskModel, actual: bytes) -> bytes:
    """The model's data, with *actual*'s bytes where the model is undefined."""
    expected = bytearray(model.data)
    for match in re.finditer(b"\x01+", model.undefined):
        expected[match.start() : match.end()] = actual[match.start() : match.end()]
    return bytes(expected)


def first_difference(got: bytes, expected: bytes) -> str:
    index = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    return f"at {index:#x}: {got[index : index + 16].hex()} instead of {expected[index : index + 16].hex()}"


def run_and_kill(start: Start, case: Case, seed: int, delay: float) -> tuple[Journal, str]:
    """Start the child, kill it *delay* seconds after it opened the image; its journal and stderr."""
    journal_path = start.path.with_name("journal")
    stderr_path = start.path.with_name("child.stderr")
    argv = [start.path, journal_path, seed, case.size, case.cluster_size]
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, __file__, *map(str, argv)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            while not read_journal(journal_path).ready:
                assert child.poll() is None, f"the child exited early:\n{stderr_path.read_text()}"
                assert time.monotonic() < deadline, "the child did not open the image within 60 s"
                time.sleep(0.005)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            status = child.wait()
    errors = stderr_path.read_text()
    journal = read_journal(journal_path)
    assert status == -signal.SIGKILL or (status == 0 and journal.done), f"the child failed ({status}):\n{errors}"
    return journal, errors


@pytest.mark.parametrize(("case", "kill"), RUNS, ids=[f"{case.name}-{kill}" for case, kill in RUNS])
def test_killed_writer(case: Case, kill: int, tmp_path: Path) -> None:
    start = make_image(case, tmp_path)
    seed = seed_of(case.name, kill)
    delay = random.Random(seed).uniform(0.05, 1.5)
    journal, _ = run_and_kill(start, case, seed, delay)

    # Replay: operations up to the last flush are durable; the ones after it, up to the one
    # after the last that the journal says began, may have happened, in part or not at all.
    model = DiskModel(case.size)
    model.data[:] = start.content
    digest = hashlib.sha256()
    uncertain_end = journal.flushed if journal.done else journal.begun + 2
    for index, op in enumerate(workload(seed, case.size, case.cluster_size)):
        if index >= max(journal.flushed, uncertain_end):
            break
        if index < journal.flushed:
            digest_update(digest, op)
            if op.kind == "write":
                model.write(op.offset, op.data)
            elif op.kind in ("zeroes", "discard-zero"):
                model.zero(op.offset, op.length)
            elif op.kind == "discard-any":
                model.forget(op.offset, op.length)
        elif op.kind != "flush":
            model.forget(op.offset, op.length)
    if journal.flushed:
        assert digest.hexdigest() == journal.digest, "the replay is not the workload the child ran"

    if is_dirty(start.path):
        # Only lazy refcounts mark an image dirty. Such an image is refused for writing until
        # repaired; the repair (which QEMU does on its own when it opens it) leaves it clean.
        assert case.options.get("lazy_refcounts") == "on", "a dirty image without lazy refcounts"
        with pytest.raises(ImagoError, match="dirty"):
            Qcow2.builder_path(start.path).write(True).open_sync(PermissiveImplicitOpenGate())
        checked("qemu-img", "check", "-q", "-r", "all", "-f", "qcow2", start.path.name, cwd=tmp_path)
        assert not is_dirty(start.path)
        assert not qemu_check(start.path).get("leaks", 0)
    result = qemu_check(start.path)
    got = convert(start.path)
    what = f"killed after {journal.begun + 1} operations, {journal.flushed} flushed"
    expected = masked(model, got)
    assert got == expected, f"{what}: durable data lost {first_difference(got, expected)}"

    # imago reads what qemu-img reads.
    image = SyncFormatAccess(Qcow2.builder_path(start.path).open_sync(PermissiveImplicitOpenGate()))
    try:
        mine = bytearray(case.size)
        image.read(mine, 0)
    finally:
        image.close()
    assert bytes(mine) == got, f"{what}: imago reads the image differently {first_difference(bytes(mine), got)}"

    if start.snapshot is not None:
        assert convert(start.path, snapshot="s1") == start.snapshot, f"{what}: the snapshot changed"
    for path, digest_before in start.frozen.items():
        assert sha256(path) == digest_before, f"{path.name} changed"

    if journal.done:
        assert not result.get("leaks", 0), "the child finished, and its clean close leaked clusters"
    elif result.get("leaks", 0):
        # What qemu-img check found is leaks alone: repairing them leaves a clean image.
        checked("qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2", start.path.name, cwd=tmp_path)
        checked("qemu-img", "check", "-q", "-f", "qcow2", start.path.name, cwd=tmp_path)
        assert convert(start.path) == got, f"{what}: repairing leaks changed the content"


def test_workload_reaches_every_operation_kind() -> None:
    """The replay's operations include every kind, often enough (a guard for the generator)."""
    kinds: dict[str, int] = {}
    for index, op in enumerate(workload(1, 8 * MiB, 4096)):
        if index == 2000:
            break
        kinds[op.kind] = kinds.get(op.kind, 0) + 1
        assert op.offset >= 0
        assert op.offset + op.length <= 8 * MiB
        assert op.length > 0 or op.kind == "flush"
    assert set(kinds) == {"write", "zeroes", "discard-zero", "discard-any", "flush"}
    assert min(kinds.values()) > 50, kinds
