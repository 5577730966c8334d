"""qcow2 crash safety: a writer killed with SIGKILL at a random moment leaves a usable image.

A child process opens a qcow2 image for writing with imago and runs a seeded random workload:
partial and multi-cluster writes, write_zeroes, the three discards, flushes, and, by workload,
internal snapshot create/apply/delete or resizes (growing and shrinking). It keeps a journal:
a line before each operation starts, and after each completed barrier (a flush, or a snapshot
operation, which flushes too) a line with the number of operations done and a digest of them,
fsync'd. The parent kills the child with SIGKILL after a random delay, then:

* ``qemu-img check`` must find no corruption and no check errors (leaked clusters are allowed:
  clusters whose release was still pending when the writer died), and imago's own check must
  report the same (a second oracle);
* with lazy refcounts the image may be left dirty: opening it for writing with imago repairs
  it (as QEMU does), after which ``qemu-img check`` finds it clean;
* everything written before the last journaled barrier must read back: the parent replays the
  same seeded workload up to it into :class:`~imago.testing.model.DiskModel` objects (the
  active disk and every snapshot), and treats the ranges of later operations as undefined; an
  interrupted snapshot operation or resize may have happened or not, but nothing in between;
* imago reads the image as qemu-img does, backing files stay untouched, and repairing the
  leaks leaves a clean image with the same content.

Each test kills several children in turn on the same image (each round starts from what the
previous one left, once verified and repaired), so that many crash points are explored at the
cost of one image. The operation each kill interrupted is counted and printed (``-s``).

What this can and cannot show: the page cache survives the death of a process, so every
``pwrite`` the child completed reaches the file, in the order it was made. The test therefore
checks the *order* of imago's metadata updates at the level of a process crash (a new cluster's
refcount before the L2 entry using it, an L2 table before the L1 entry, an L2 entry dropped
before the refcount of the cluster it pointed to, a snapshot recorded at the same moment as the
refcounts and COPIED flags that account for it). It cannot simulate a power loss or a kernel
crash, where writes not yet flushed to the disk may be lost or reordered.

This module is also the child: it is loaded by file name in the child process (see
:data:`CHILD`), so it must not use relative imports.
"""

from __future__ import annotations

import collections
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
from typing import TYPE_CHECKING, Any

import imago
from imago import PermissiveImplicitOpenGate, SyncFormatAccess
from imago_qcow2 import Qcow2

if TYPE_CHECKING:
    import pytest

    from imago.testing.model import DiskModel

MiB = 1 << 20

# Far more operations than a child gets through before it is killed.
MAX_OPS = 200_000
# Snapshots a workload keeps at most (it deletes one before creating more).
MAX_SNAPSHOTS = 4

CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("qcow2_crash_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.child_main(sys.argv[2:])
"""


# --- the workload (shared by child and parent) --------------------------------------------------

DATA_KINDS = ("write", "zeroes", "discard-zero", "discard-any", "discard-backing")
SNAPSHOT_KINDS = ("snap-create", "snap-apply", "snap-delete")
# Operations after which everything before is on disk (the child journals them durably).
BARRIERS = ("flush", *SNAPSHOT_KINDS)

# Operation weights of each workload.
MIXES: dict[str, dict[str, int]] = {
    "data": {"flush": 7, "write": 53, "zeroes": 12, "discard-zero": 14, "discard-any": 14},
    "discards": {"flush": 7, "write": 45, "zeroes": 6, "discard-zero": 14, "discard-any": 14, "discard-backing": 14},
    "snapshots": {
        "flush": 4,
        "write": 50,
        "zeroes": 6,
        "discard-zero": 6,
        "discard-any": 4,
        "snap-create": 14,
        "snap-apply": 8,
        "snap-delete": 8,
    },
    "resize": {"flush": 6, "write": 50, "zeroes": 6, "discard-zero": 8, "discard-any": 6, "resize": 24},
}


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # a data kind, flush, a snapshot kind (name: the snapshot), resize (length: new size)
    offset: int = 0
    length: int = 0
    data: bytes = b""
    name: str = ""


def noise(rng: random.Random, length: int) -> bytes:
    """Random bytes without zeroes (so that zeroing is always visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def workload(seed: int, size: int, base: int, cluster: int, mix: str, snapshots: list[str]) -> Iterator[Op]:
    """The seeded operations on a disk of *size* bytes with *snapshots*: the same in child and parent.

    Resizes choose sizes around *base*. Snapshots keep the disk size (no workload both
    resizes and snapshots), so the generator only tracks the size that resizes set and the
    names of the snapshots.
    """
    rng = random.Random(seed)
    kinds, weights = list(MIXES[mix]), list(MIXES[mix].values())
    snapshots = list(snapshots)
    # Most requests gather around a few spots, so clusters are written, zeroed, discarded,
    # reallocated and copied on write again and again.
    hot = [rng.randrange(base // cluster) * cluster for _ in range(4)]
    for index in range(MAX_OPS):
        kind = rng.choices(kinds, weights)[0]
        if kind == "flush":
            yield Op("flush")
            continue
        if kind in SNAPSHOT_KINDS:
            if kind == "snap-create" and len(snapshots) >= MAX_SNAPSHOTS:
                kind = "snap-delete"
            elif kind != "snap-create" and not snapshots:
                kind = "snap-create"
            if kind == "snap-create":
                name = f"s{seed:08x}-{index}"
                snapshots.append(name)
            else:
                name = rng.choice(snapshots)
                if kind == "snap-delete":
                    snapshots.remove(name)
            yield Op(kind, name=name)
            continue
        if kind == "resize":
            # Between half and twice the starting size, in sectors, often not whole clusters.
            granule = rng.choice((512, cluster))
            size = max(granule, rng.randrange(base // 2, 2 * base) // granule * granule)
            yield Op("resize", length=size)
            continue
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
    digest.update(f"{op.kind} {op.offset} {op.length} {op.name};".encode())
    digest.update(op.data)


# --- the child --------------------------------------------------------------------------------


def kill_after_writes(count: int) -> None:
    """Die by SIGKILL right after the *count*-th write to a file from now (a reproducible crash point)."""
    real_pwritev, real_ftruncate = os.pwritev, os.ftruncate
    left = count

    def written() -> None:
        nonlocal left
        left -= 1
        if not left:
            os.kill(os.getpid(), signal.SIGKILL)

    def pwritev(*args: Any) -> int:
        result = real_pwritev(*args)
        written()
        return result

    def ftruncate(*args: Any) -> None:
        real_ftruncate(*args)
        written()

    os.pwritev, os.ftruncate = pwritev, ftruncate


def child_main(argv: list[str]) -> None:
    """Open the image, say so in the journal, and run the workload until killed (or run one step)."""
    if argv[0] == "step":
        child_step(argv[1:])
        return
    path, journal_path, mix = argv[0], argv[1], argv[6]
    seed, size, base, cluster = int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
    snapshots = argv[7].split(",") if argv[7] else []
    writes = int(argv[8])
    driver = Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    image = SyncFormatAccess(driver)
    journal = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(line: str, durable: bool) -> None:
        os.write(journal, line.encode())
        if durable:
            os.fsync(journal)

    note("ready\n", True)
    if writes:
        kill_after_writes(writes)
    digest = hashlib.sha256()
    done = 0
    for index, op in enumerate(workload(seed, size, base, cluster, mix, snapshots)):
        # Not fsync'd: written (whole, in one write) before the operation starts, and a killed
        # process's writes survive in the page cache; this bounds how far the child got.
        note(f"begin {index}\n", False)
        if op.kind == "write":
            image.write(op.data, op.offset)
        elif op.kind == "zeroes":
            image.write_zeroes(op.offset, op.length)
        elif op.kind == "discard-zero":
            image.discard_to_zero(op.offset, op.length)
        elif op.kind == "discard-any":
            image.discard_to_any(op.offset, op.length)
        elif op.kind == "discard-backing":
            image.discard_to_backing(op.offset, op.length)
        elif op.kind == "resize":
            image.resize(op.length, shrink=True)
        elif op.kind == "snap-create":
            driver.create_snapshot_sync(op.name)
        elif op.kind == "snap-apply":
            driver.apply_snapshot_sync(op.name)
        elif op.kind == "snap-delete":
            driver.delete_snapshot_sync(op.name)
        else:
            image.flush()
        digest_update(digest, op)
        done = index + 1
        if op.kind in BARRIERS:
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
    mix: str = "data"
    backing: bool = False
    snapshot: bool = False  # a snapshot taken by qemu-img before the first round
    kills: int = 3
    max_delay: float = 0.6  # seconds after the child opened the image
    max_writes: int = 400  # writes to the files after which a child may kill itself

    @property
    def lazy(self) -> bool:
        return self.options.get("lazy_refcounts") == "on"


CASES = [
    Case("4k", 4096, 8 * MiB, {"refcount_bits": 16}),
    Case("64k-refcount-1", 65536, 16 * MiB, {"refcount_bits": 1}),
    Case("4k-v2", 4096, 8 * MiB, {"compat": "0.10"}),
    # Refcount blocks cover 32 KiB, the first refcount table 2 MiB: the table moves often.
    Case("512-refcount-64", 512, 4 * MiB, {"refcount_bits": 64}),
    # Discards to the backing file, and zeroing where there is one.
    Case("64k-backing", 65536, 16 * MiB, mix="discards", backing=True),
    # Version 2 with a backing file: zeroing has no zero flag and writes zeroes.
    Case("4k-backing-v2", 4096, 8 * MiB, {"compat": "0.10"}, mix="discards", backing=True),
    Case("64k-snapshot", 65536, 16 * MiB, snapshot=True),
    # Internal snapshots created, applied and deleted; 512-byte clusters make each of them
    # walk many tables, so that most kills land inside one.
    Case("512-snapshots", 512, 2 * MiB, mix="snapshots", snapshot=True, kills=8),
    Case("4k-snapshots-v2", 4096, 4 * MiB, {"compat": "0.10"}, mix="snapshots", kills=5),
    Case("16k-snapshots-extended-l2", 16384, 4 * MiB, {"extended_l2": "on"}, mix="snapshots", kills=4),
    Case("4k-resize", 4096, 4 * MiB, mix="resize", kills=5),
    Case("64k-resize-extended-l2", 65536, 8 * MiB, {"extended_l2": "on"}, mix="resize", kills=4),
    # Refcounts may lag behind while the image is marked dirty: opening it for writing
    # repairs it.
    Case("512-lazy-refcounts", 512, 4 * MiB, {"lazy_refcounts": "on"}, kills=4),
    Case("4k-lazy-snapshots", 4096, 4 * MiB, {"lazy_refcounts": "on"}, mix="snapshots", kills=4),
]


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


def imago_check(path: Path, qemu: dict[str, Any]) -> None:
    """imago's own check agrees with ``qemu-img check``: no corruption, the same leaks."""
    with imago.open(path, "qcow2") as image:
        result = image.check()
    found = (result.corruptions, result.check_errors, result.leaks)
    assert found == (0, 0, qemu.get("leaks", 0)), f"imago check: {result.to_json()}\n" + "\n".join(
        map(str, result.findings)
    )


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


def snapshot_names(path: Path) -> list[str]:
    info = json.loads(checked("qemu-img", "info", "-f", "qcow2", "--output=json", path.name, cwd=path.parent))
    return [snapshot["name"] for snapshot in info.get("snapshots", [])]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class Start:
    """What a round starts from: the image, its content and its snapshots' (by name)."""

    path: Path
    content: bytes
    snapshots: dict[str, bytes]
    backing: bytes | None
    frozen: dict[Path, str]


def make_image(case: Case, directory: Path) -> Start:
    size = case.size
    path = directory / "disk.qcow2"
    options = ",".join(f"{key}={value}" for key, value in {"cluster_size": case.cluster_size, **case.options}.items())
    frozen: dict[Path, str] = {}
    backing: list[str] = []
    base_content = None
    if case.backing:
        base = directory / "base.raw"
        # Shorter than the overlay and not cluster-aligned.
        base_content = noise(random.Random(seed_of(case.name, "base")), size * 3 // 4 + 1536)
        base.write_bytes(base_content)
        frozen[base] = sha256(base)
        backing = ["-b", base.name, "-F", "raw"]
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, *backing, path.name, str(size), cwd=directory)
    commands = [f"write -P 0x11 {size // 16} {size // 8}", f"write -z {size // 4} {size // 16}"]
    if case.snapshot:
        commands.append(f"write -P 0x33 {size // 2} {size // 2}")
    checked("qemu-io", "-f", "qcow2", *(f"-c{command}" for command in commands), path.name, cwd=directory)
    snapshots = {}
    if case.snapshot:
        checked("qemu-img", "snapshot", "-c", "s1", path.name, cwd=directory)
        snapshots["s1"] = convert(path, snapshot="s1")
    return Start(path, convert(path), snapshots, base_content, frozen)


@dataclasses.dataclass
class Journal:
    ready: bool = False
    flushed: int = 0  # operations done at the last completed barrier
    digest: str | None = None
    begun: int = -1  # the last operation that started
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


def model_of(content: bytes) -> DiskModel:
    # (Imported here: imago.testing imports pytest and hypothesis, which the child does not need.)
    from imago.testing.model import DiskModel

    model = DiskModel(len(content))
    model.data[:] = content
    return model


def copy_model(model: DiskModel) -> DiskModel:
    copy = model_of(bytes(model.data))
    copy.undefined[:] = model.undefined
    return copy


@dataclasses.dataclass
class World:
    """One state the image may be in after the kill."""

    active: DiskModel
    snapshots: dict[str, DiskModel | None]  # None: created by the interrupted operation
    sizes: set[int]  # the disk sizes it may have (several when resizes were interrupted)


def replay(start: Start, case: Case, seed: int, journal: Journal) -> tuple[list[World], Op | None]:
    """The states the image may be in, and the operation the kill interrupted (``None``: none).

    Operations up to the last barrier are durable; the ones after it, up to the last one the
    journal says began, may have happened, in part or not at all. Only the last of those can
    be a barrier: the child journals each barrier durably before the next operation begins.
    """
    model = model_of(start.content)
    snapshots = {name: model_of(content) for name, content in start.snapshots.items()}
    sizes = {model.size}
    digest = hashlib.sha256()
    pending: Op | None = None
    interrupted: Op | None = None
    end = journal.flushed if journal.done else max(journal.flushed, journal.begun + 1)
    ops = workload(seed, model.size, case.size, case.cluster_size, case.mix, list(start.snapshots))
    for index, op in enumerate(ops):
        if index >= end:
            break
        interrupted = op
        if index < journal.flushed:
            digest_update(digest, op)
            if op.kind == "write":
                model.write(op.offset, op.data)
            elif op.kind in ("zeroes", "discard-zero"):
                model.zero(op.offset, op.length)
            elif op.kind == "discard-any":
                model.forget(op.offset, op.length)
            elif op.kind == "discard-backing":
                part = (start.backing or b"")[op.offset : op.offset + op.length]
                model.write(op.offset, part + bytes(op.length - len(part)))
            elif op.kind == "resize":
                model.resize(op.length)
            elif op.kind == "snap-create":
                snapshots[op.name] = copy_model(model)
            elif op.kind == "snap-apply":
                model = copy_model(snapshots[op.name])
            elif op.kind == "snap-delete":
                del snapshots[op.name]
            sizes = {model.size}
        elif op.kind == "resize":
            old = model.size
            if op.length > old:
                model.resize(op.length)
            model.forget(min(old, op.length), abs(op.length - old))
            sizes.add(op.length)
        elif op.kind in BARRIERS:
            assert index == end - 1, "a barrier operation in the middle of the undurable ones"
            pending = op
        else:
            model.forget(op.offset, op.length)
    if journal.flushed:
        assert digest.hexdigest() == journal.digest, "the replay is not the workload the child ran"
    recorded: dict[str, DiskModel | None] = dict(snapshots)
    worlds = [World(model, recorded, sizes)]
    if pending is not None and pending.kind == "snap-create":
        worlds.append(World(model, {**recorded, pending.name: None}, sizes))
    elif pending is not None and pending.kind == "snap-apply":
        target = snapshots[pending.name]
        worlds.append(World(target, recorded, {target.size}))
    elif pending is not None and pending.kind == "snap-delete":
        worlds.append(World(model, {k: v for k, v in recorded.items() if k != pending.name}, sizes))
    return worlds, interrupted if journal.begun >= journal.flushed and not journal.done else None


def masked(model: DiskModel, actual: bytes) -> bytes:
    """The model's data, with *actual*'s bytes where the model is undefined (and past its end)."""
    expected = bytearray(model.data[: len(actual)])
    for match in re.finditer(b"\x01+", model.undefined[: len(actual)]):
        expected[match.start() : match.end()] = actual[match.start() : match.end()]
    return bytes(expected) + actual[len(expected) :]


def first_difference(got: bytes, expected: bytes) -> str:
    if len(got) != len(expected):
        return f"of {len(got)} bytes instead of {len(expected)}"
    index = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    return f"at {index:#x}: {got[index : index + 16].hex()} instead of {expected[index : index + 16].hex()}"


def mismatch(world: World, active: bytes, snapshots: dict[str, bytes]) -> str | None:
    """Why the image is not in state *world* (``None``: it is)."""
    if set(snapshots) != set(world.snapshots):
        return f"snapshots {sorted(snapshots)} instead of {sorted(world.snapshots)}"
    if len(active) not in world.sizes:
        return f"disk size {len(active)} instead of one of {sorted(world.sizes)}"
    expected = masked(world.active, active)
    if active != expected:
        return f"durable data lost {first_difference(active, expected)}"
    for name, model in world.snapshots.items():
        # A snapshot the interrupted operation created holds what the disk holds.
        expected = active if model is None else masked(model, snapshots[name])
        if snapshots[name] != expected:
            return f"snapshot {name} changed {first_difference(snapshots[name], expected)}"
    return None


def run_and_kill(
    path: Path, case: Case, seed: int, size: int, snapshots: list[str], *, delay: float = 0.0, writes: int = 0
) -> Journal:
    """Start the child; kill it *delay* seconds after it opened the image, or let it kill itself
    after its *writes*-th write to a file; its journal.
    """
    journal_path = path.with_name("journal")
    journal_path.unlink(missing_ok=True)
    stderr_path = path.with_name("child.stderr")
    argv = [path, journal_path, seed, size, case.size, case.cluster_size, case.mix, ",".join(snapshots), writes]
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
            if writes:
                child.wait(60)
            else:
                time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            status = child.wait()
    journal = read_journal(journal_path)
    assert status == -signal.SIGKILL or (status == 0 and journal.done), (
        f"the child failed ({status}):\n{stderr_path.read_text()}"
    )
    return journal


def verify_round(start: Start, case: Case, seed: int, journal: Journal) -> tuple[Start, str]:
    """Check the image a killed child left; what the next round starts from, and what was interrupted."""
    path = start.path
    worlds, interrupted = replay(start, case, seed, journal)
    kind = interrupted.kind if interrupted else "none"
    what = f"killed in operation {journal.begun} ({kind}), {journal.flushed} durable"

    if is_dirty(path):
        # Only lazy refcounts mark an image dirty. Opening it for writing repairs it, as QEMU
        # does on its own; the repair leaves it clean.
        assert case.lazy, f"{what}: a dirty image without lazy refcounts"
        with imago.open(path, "qcow2", write=True):
            pass
        assert not is_dirty(path), f"{what}: still dirty after imago opened it for writing"
        assert not qemu_check(path).get("leaks", 0), f"{what}: the automatic repair left leaks"
    result = qemu_check(path)
    active = convert(path)
    snapshots = {name: convert(path, snapshot=name) for name in snapshot_names(path)}
    reasons = [mismatch(world, active, snapshots) for world in worlds]
    assert None in reasons, f"{what}: " + "; or ".join(map(str, reasons))

    # imago reads what qemu-img reads.
    with imago.open(path, "qcow2") as image:
        mine = bytearray(image.size)
        image.read(mine, 0)
    assert bytes(mine) == active, f"{what}: imago reads the image differently {first_difference(bytes(mine), active)}"
    for frozen, digest_before in start.frozen.items():
        assert sha256(frozen) == digest_before, f"{frozen.name} changed"
    imago_check(path, result)

    if journal.done:
        assert not result.get("leaks", 0), "the child finished, and its clean close leaked clusters"
    elif result.get("leaks", 0):
        # What qemu-img check found is leaks alone: repairing them leaves a clean image.
        checked("qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2", path.name, cwd=path.parent)
        checked("qemu-img", "check", "-q", "-f", "qcow2", path.name, cwd=path.parent)
        assert convert(path) == active, f"{what}: repairing leaks changed the content"
    return Start(path, active, snapshots, start.backing, start.frozen), kind


# Kills per workload, and which operation each interrupted (printed with -s).
EXPLORED: dict[str, collections.Counter[str]] = {}
# More kills for a longer search (IMAGO_CRASH_KILLS=10: ten times as many).
KILLS_FACTOR = int(os.environ.get("IMAGO_CRASH_KILLS", "1"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize here, not with a decorator: the child then need not import pytest (faster)."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[case.name for case in CASES])
    elif "mix" in metafunc.fixturenames:
        metafunc.parametrize("mix", list(MIXES))
    elif "step" in metafunc.fixturenames:
        metafunc.parametrize("step", list(STEPS))


def test_killed_writer(case: Case, tmp_path: Path) -> None:
    start = make_image(case, tmp_path)
    explored: collections.Counter[str] = collections.Counter()
    dirty_kills = 0
    for kill in range(case.kills * KILLS_FACTOR):
        seed = seed_of(case.name, kill)
        rng = random.Random(seed)
        args = (start.path, case, seed, len(start.content), list(start.snapshots))
        if kill % 3 == 2:
            journal = run_and_kill(*args, delay=rng.uniform(0.01, case.max_delay))
        else:
            # Most kills at a write chosen at random: each such crash point is reproducible.
            journal = run_and_kill(*args, writes=rng.randint(1, case.max_writes))
        dirty = is_dirty(start.path)
        start, interrupted = verify_round(start, case, seed, journal)
        explored[interrupted] += 1
        dirty_kills += dirty
    EXPLORED[case.name] = explored
    print(f"\n{case.name}: {sum(explored.values())} kills ({dirty_kills} left it dirty), interrupting {dict(explored)}")


# --- every crash point of one operation -------------------------------------------------------

# One operation on a small image (4 KiB clusters, 1 MiB; for snapshot operations, snapshot "a"
# taken before the last writes), killed after each of its writes to the file in turn.
STEPS = {
    "shrink": lambda driver, image: image.resize(307712, shrink=True),
    "grow": lambda driver, image: image.resize(3 * MiB),
    "snapshot-create": lambda driver, image: driver.create_snapshot_sync("b"),
    "snapshot-apply": lambda driver, image: driver.apply_snapshot_sync("a"),
    "snapshot-delete": lambda driver, image: driver.delete_snapshot_sync("a"),
}


def child_step(argv: list[str]) -> None:
    """Open the image, run one step (and close), dying after the *writes*-th write; say if it got through."""
    path, journal_path, step, writes = argv[0], argv[1], argv[2], int(argv[3])
    driver = Qcow2.builder_path(path).write(True).open_sync(PermissiveImplicitOpenGate())
    image = SyncFormatAccess(driver)
    kill_after_writes(writes)
    STEPS[step](driver, image)
    image.close()
    with open(journal_path, "w") as journal:
        journal.write("done\n")


def image_state(path: Path) -> tuple[int, bytes, dict[str, bytes]]:
    """What qemu-img reads: the disk size, the content, the snapshots' content by name."""
    active = convert(path)
    return len(active), active, {name: convert(path, snapshot=name) for name in snapshot_names(path)}


def test_every_crash_point_of_one_operation(step: str, tmp_path: Path) -> None:
    """A kill after any write of a resize or snapshot operation leaves the image as before or after.

    (Or, for a shrink, with the old size and what lies past the new end already dropped.)

    Also: ``qemu-img check`` and imago's check find no corruption, and growing the image with
    qemu-img shows zeroes past the old end (no cluster mapping was left behind past it).
    """
    base = tmp_path / "base.qcow2"
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base.name, str(MiB), cwd=tmp_path)
    checked("qemu-io", "-f", "qcow2", "-cwrite -P 0x11 0 1M", base.name, cwd=tmp_path)
    if step.startswith("snapshot"):
        checked("qemu-img", "snapshot", "-c", "a", base.name, cwd=tmp_path)
    checked("qemu-io", "-f", "qcow2", "-cwrite -P 0x22 256k 512k", "-cwrite -z 900k 100k", base.name, cwd=tmp_path)
    before = image_state(base)
    path = tmp_path / "disk.qcow2"
    journal = tmp_path / "journal"
    after = None
    states: list[tuple[int, bytes, dict[str, bytes]]] = []
    writes = 0
    while after is None:
        writes += 1
        assert writes < 200, f"{step} did not finish within 200 writes"
        path.write_bytes(base.read_bytes())
        journal.unlink(missing_ok=True)
        child = run(sys.executable, "-c", CHILD, __file__, "step", path, journal, step, str(writes), cwd=tmp_path)
        what = f"{step} killed after write {writes}"
        if journal.exists():
            assert child.returncode == 0, f"{what}: {child.stderr}"
        else:
            assert child.returncode == -signal.SIGKILL, f"{what}: the child failed\n{child.stderr}"
        result = qemu_check(path)
        imago_check(path, result)
        state = image_state(path)
        if journal.exists():
            after = state
            assert not result.get("leaks", 0), f"{step} leaked clusters"
        else:
            assert state[0] in (before[0], 307712, 3 * MiB), f"{what}: disk size {state[0]}"
        # (What the last cluster holds past the end shows too: QEMU does not zero it on growing.)
        checked("qemu-img", "resize", "-q", "-f", "qcow2", path.name, str(state[0] + MiB), cwd=tmp_path)
        assert not convert(path)[-(-state[0] // 4096) * 4096 :].strip(b"\0"), f"{what}: old data past the end"
        states.append(state)
    assert after != before, f"{step} changed nothing"
    print(f"\n{step}: killed after each of its {writes - 1} writes")
    for index, state in enumerate(states, 1):
        # An interrupted shrink may have dropped what lies past the new end already.
        dropping = step == "shrink" and state[0] == before[0] and state[1][: after[0]] == before[1][: after[0]]
        assert state in (before, after) or dropping, f"{step} killed after write {index}: neither before nor after"


def test_workload_reaches_every_operation_kind(mix: str) -> None:
    """The replay's operations include every kind of the workload, often enough."""
    kinds: collections.Counter[str] = collections.Counter()
    size = 8 * MiB
    snapshots: set[str] = set()
    for index, op in enumerate(workload(1, size, size, 4096, mix, [])):
        if index == 2000:
            break
        kinds[op.kind] += 1
        if op.kind == "resize":
            size = op.length
            assert op.length % 512 == 0
            assert 4 * MiB <= op.length < 16 * MiB
        elif op.kind == "snap-create":
            assert op.name not in snapshots
            snapshots.add(op.name)
            assert len(snapshots) <= MAX_SNAPSHOTS
        elif op.kind in SNAPSHOT_KINDS:
            assert op.name in snapshots
            if op.kind == "snap-delete":
                snapshots.remove(op.name)
        elif op.kind != "flush":
            assert 0 <= op.offset < op.offset + op.length <= size
    assert set(kinds) == set(MIXES[mix])
    assert min(kinds.values()) > 50, kinds
