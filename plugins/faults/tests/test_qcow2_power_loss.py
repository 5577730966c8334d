"""qcow2 write workloads on the ``faults`` storage: injected I/O errors and simulated power loss.

Each workload (writes with copy-on-write into fresh clusters, zeroing, discards, compressed
writes, internal snapshots created and deleted, resizes, lazy refcounts) starts from an image
made by qemu-img/qemu-io and runs as a seeded list of operations through ``imago_qcow2`` on a
:class:`~imago_faults.FaultyStorage` over the image file.

* Injected faults: the k-th storage call of the run (open, operations, close; reads included)
  fails with EIO, for a seeded sample of k. The error must reach the caller in the operation
  during which it was injected (never swallowed, never surfacing later). Then the file as it is
  (what a crash right after the error leaves) and the file after closing the image with the
  faults gone must both pass ``qemu-img check`` (leaks allowed) and imago's check, and read back
  what the model says: after a clean close everything done before the failed operation.
* Power loss: the storage keeps a volatile write cache; at a seeded sample of its write, zeroing,
  discard, resize, flush and sync calls the test takes the image a power loss would leave there
  (every pending change dropped, a random subset kept, a random subset of 512-byte pieces kept),
  opens it (a dirty lazy-refcount image is repaired on opening for writing), checks it with
  ``qemu-img check`` and imago's check, and compares it with the model of the disk as of the last
  completed flush (bytes changed since then may hold either content; snapshots created or deleted
  since may or may not exist; snapshots that existed at the flush must keep their content).

The qcow2 bugs these tests found are fixed; each has a small regression test at the end
(a failed L2 copy, a failed data write's binding, and in ``plugins/qcow2/tests/test_repair_past_end.py``
the repair of an L2 entry a power loss left pointing past the end of the file).

The number of crash points explored is printed (``-s``). ``IMAGO_POWER_LOSS_POINTS`` sets the
number of crash points per workload (``all``: every one), ``IMAGO_FAULT_POINTS`` the number of
injected faults per workload; ``IMAGO_FAULTS_SEED`` (any string) picks other workloads and losses.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imago
from imago import PermissiveImplicitOpenGate, StorageOpenOptions, SyncFormatAccess, runtime
from imago.testing.model import DiskModel
from imago_faults import Call, Fault, FaultPlan, FaultyStorage, InjectedError
from imago_qcow2 import Qcow2

MiB = 1 << 20


def _points(name: str, default: int) -> int | None:
    value = os.environ.get(name, "")
    if value == "all":
        return None
    return int(value) if value else default


#: Crash points per workload (None: every write, zeroing, discard, resize, flush and sync call).
POWER_LOSS_POINTS = _points("IMAGO_POWER_LOSS_POINTS", 8)
#: Injected faults per workload (None: every storage call).
FAULT_POINTS = _points("IMAGO_FAULT_POINTS", 6)
#: Varies every workload and power loss of a run (the default: the suite's fixed choice).
SEED = os.environ.get("IMAGO_FAULTS_SEED", "")
#: How a power loss treats the pending changes: (label, keep a random subset, torn at 512 bytes).
LOSSES = (("all-dropped", False, None), ("subset", True, None), ("torn-512", True, 512))
#: Storage calls after which the disk content can differ: the crash points.
WRITE_CALLS = ("write", "write_zeroes", "discard", "resize", "flush", "sync")


# --- workloads ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    cluster: int
    size: int
    mix: dict[str, int]
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    prepare: tuple[str, ...] = ()  # qemu-io commands run on the new image
    backing: bool = False  # a backing file holding data in the second half of the disk
    snapshot: bool = False  # a snapshot taken by qemu-img after *prepare*: every cluster shared
    ops: int = 36

    @property
    def lazy(self) -> bool:
        return self.options.get("lazy_refcounts") == "on"


WORKLOADS = [
    # Partial writes into clusters shared with a snapshot or backed by the backing file: every
    # one copies on write into a fresh cluster.
    Workload(
        "cow",
        4096,
        MiB,
        {"write": 8, "flush": 2},
        prepare=("write -P 0x11 0 384k",),
        backing=True,
        snapshot=True,
    ),
    Workload(
        "zeroing-discards",
        4096,
        MiB,
        {"write": 4, "zeroes": 3, "discard-zero": 3, "discard-any": 3, "flush": 2},
        prepare=("write -P 0x22 0 768k",),
    ),
    Workload(
        "compressed",
        4096,
        MiB,
        {"compressed": 6, "write": 3, "discard-any": 1, "flush": 2},
        prepare=("write -c -P 0x33 0 64k",),
    ),
    Workload(
        "snapshots",
        4096,
        MiB,
        {"write": 6, "snap-create": 2, "snap-delete": 2, "snap-apply": 1, "flush": 1},
        prepare=("write -P 0x44 0 512k",),
        ops=28,
    ),
    Workload(
        "resize",
        4096,
        MiB,
        {"write": 5, "resize": 3, "flush": 2},
        prepare=("write -P 0x55 0 1M",),
        ops=30,
    ),
    # 512-byte clusters: an L2 table covers 32 KiB, so scattered writes allocate many tables,
    # each written before the refcounts that account for it (the image marked dirty first).
    Workload(
        "lazy-refcounts",
        512,
        MiB,
        {"write": 6, "zeroes": 1, "discard-any": 1, "flush": 2},
        options={"lazy_refcounts": "on"},
        prepare=("write -P 0x66 0 128k",),
    ),
]


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # write, zeroes, discard-zero, discard-any, compressed, snap-create/-delete/-apply, resize, flush
    offset: int = 0
    length: int = 0
    data: bytes = b""
    name: str = ""


def noise(rng: random.Random, length: int) -> bytes:
    """Random bytes without zeroes (so that zeroing is always visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def workload_ops(workload: Workload, seed: int) -> list[Op]:
    """The seeded operations of a workload."""
    rng = random.Random(seed)
    kinds, weights = list(workload.mix), list(workload.mix.values())
    cluster, size = workload.cluster, workload.size
    snapshots: list[str] = []
    ops: list[Op] = []
    for index in range(workload.ops):
        kind = rng.choices(kinds, weights)[0]
        if kind == "snap-create" and len(snapshots) >= 3:
            kind = "snap-delete"
        if kind in ("snap-delete", "snap-apply") and not snapshots:
            kind = "snap-create"
        if kind == "flush":
            ops.append(Op("flush"))
        elif kind == "snap-create":
            snapshots.append(f"s{index}")
            ops.append(Op(kind, name=snapshots[-1]))
        elif kind == "snap-delete":
            name = rng.choice(snapshots)
            snapshots.remove(name)
            ops.append(Op(kind, name=name))
        elif kind == "snap-apply":
            ops.append(Op(kind, name=rng.choice(snapshots)))
        elif kind == "resize":
            # Grow or shrink, to sizes around the starting one, whole sectors (qcow2 needs them).
            size = rng.randrange(workload.size // 2, 2 * workload.size) // 512 * 512
            ops.append(Op(kind, length=size))
        elif kind == "compressed":
            count = rng.randint(1, 3)
            offset = rng.randrange(size // cluster - count) * cluster
            # Half of each cluster repeats a byte: it compresses, but not to nothing.
            data = b"".join(
                bytes([rng.randrange(1, 256)]) * (cluster // 2) + noise(rng, cluster // 2) for _ in range(count)
            )
            ops.append(Op(kind, offset, len(data), data))
        else:
            shape = rng.random()
            length = (
                rng.randint(1, 512)
                if shape < 0.2
                else rng.randint(1, 2 * cluster)
                if shape < 0.7
                else rng.randint(2 * cluster, 12 * cluster)
            )
            alignment = rng.choice((1, 512, cluster))
            offset = rng.randrange(size) // alignment * alignment
            length = max(1, min(length, size - offset))
            ops.append(Op(kind, offset, length, noise(rng, length) if kind == "write" else b""))
    return ops


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr((SEED, *parts)).encode())


# --- tools --------------------------------------------------------------------------------------


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


def make_base(workload: Workload, directory: Path) -> Path:
    """The starting image (and its backing file) made by qemu-img and qemu-io."""
    path = directory / "base.qcow2"
    options = [f"cluster_size={workload.cluster}", *(f"{key}={value}" for key, value in workload.options.items())]
    if workload.backing:
        backing = directory / "backing.qcow2"
        checked("qemu-img", "create", "-q", "-f", "qcow2", backing.name, str(workload.size), cwd=directory)
        checked(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -P 0x77 {workload.size // 2} {workload.size // 2}",
            backing.name,
            cwd=directory,
        )
        options += [f"backing_file={backing.name}", "backing_fmt=qcow2"]
    checked(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(options), path.name, str(workload.size), cwd=directory
    )
    for command in workload.prepare:
        out = checked("qemu-io", "-f", "qcow2", "-c", command, path.name, cwd=directory)
        assert "failed" not in out, out
    if workload.snapshot:
        checked("qemu-img", "snapshot", "-c", "base", path.name, cwd=directory)
    return path


def qemu_check(path: Path) -> dict[str, Any]:
    """``qemu-img check``: no corruption, no check errors (leaks allowed: exit status 0 or 3)."""
    proc = run("qemu-img", "check", "-f", "qcow2", "--output=json", path.name, cwd=path.parent)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"qemu-img check (exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}") from None
    problems = {key: result[key] for key in ("corruptions", "check-errors") if result.get(key, 0)}
    assert not problems, f"qemu-img check: {problems}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode in (0, 3), f"qemu-img check: exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return result


def imago_check(path: Path, qemu: dict[str, Any]) -> None:
    """imago's own check agrees: no corruption, the same leaks."""
    with imago.open(path, "qcow2") as image:
        result = image.check()
    found = (result.corruptions, result.check_errors, result.leaks)
    assert found == (0, 0, qemu.get("leaks", 0)), f"imago check: {result.to_json()}\n" + "\n".join(
        map(str, result.findings)
    )


def is_dirty(path: Path) -> bool:
    """Whether the header's dirty bit (incompatible feature bit 0) is set."""
    with path.open("rb") as file:
        header = file.read(80)
    return int.from_bytes(header[4:8], "big") >= 3 and bool(int.from_bytes(header[72:80], "big") & 1)


def read_all(image: SyncFormatAccess) -> bytes:
    buf = bytearray(image.size)
    image.read(buf, 0)
    return bytes(buf)


def caused_by(error: BaseException, cause: BaseException) -> bool:
    """Whether *cause* is *error* or in its chain of causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if current is cause:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# --- the model -------------------------------------------------------------------------------------


def copy_model(model: DiskModel) -> DiskModel:
    copy = DiskModel(0)
    copy.data = bytearray(model.data)
    copy.undefined = bytearray(model.undefined)
    return copy


@dataclasses.dataclass
class Expectation:
    """What the image may hold after a crash: the disk as of the last flush, some bytes and facts undecided."""

    model: DiskModel  # the disk at the last flush, bytes changed since undefined
    sizes: set[int]  # the disk sizes it may have
    snapshots: dict[str, DiskModel]  # snapshots that must exist, and their content
    maybe_snapshots: set[str]  # snapshots that may exist

    def verify(self, image: SyncFormatAccess, driver: Qcow2, what: str) -> None:
        assert image.size in self.sizes, f"{what}: disk size {image.size}, expected one of {sorted(self.sizes)}"
        content = read_all(image)
        shared = min(len(content), self.model.size)
        try:
            self.model.check(content[:shared])
        except AssertionError as error:
            raise AssertionError(f"{what}: data flushed before the loss did not read back: {error}") from None
        names = {snapshot.name for snapshot in driver.snapshots}
        assert set(self.snapshots) <= names <= set(self.snapshots) | self.maybe_snapshots, (
            f"{what}: snapshots {sorted(names)}, expected {sorted(self.snapshots)}, "
            f"maybe {sorted(self.maybe_snapshots)}"
        )
        for name, model in self.snapshots.items():
            view = SyncFormatAccess(driver.read_snapshot_sync(name))
            try:
                snapshot_content = read_all(view)
            finally:
                view.close()
            try:
                model.check(snapshot_content[: model.size])
            except AssertionError as error:
                raise AssertionError(f"{what}: snapshot {name} changed: {error}") from None


class Executor:
    """Runs operations on an image and keeps the model: the disk now, and as of the last flush."""

    def __init__(self, image: SyncFormatAccess, driver: Qcow2, start: Start) -> None:
        self.image = image
        self.driver = driver
        self.model = start.model()
        self.snapshots: dict[str, DiskModel] = {name: start.model(data) for name, data in start.snapshots.items()}
        self._barrier()
        self.current: Op | None = None

    def _barrier(self) -> None:
        self.flushed = copy_model(self.model)
        self.flushed_snapshots = dict(self.snapshots)
        self.touched: list[tuple[int, int]] = []
        self.sizes = {self.model.size}
        self.snapshot_changes: set[str] = set()

    def _note(self, op: Op) -> None:
        """Record what *op* may change before it runs (a crash may leave it done or not)."""
        if op.kind in ("snap-create", "snap-delete"):
            self.snapshot_changes.add(op.name)
        elif op.kind == "snap-apply":  # (the workloads applying snapshots do not resize)
            self.touched.append((0, self.model.size))
        elif op.kind == "resize":
            old = self.model.size
            self.touched.append((min(old, op.length), abs(op.length - old)))
            self.sizes.add(op.length)
        elif op.kind != "flush":
            self.touched.append((op.offset, op.length))

    def expectation(self) -> Expectation:
        """What a crash now may leave: everything up to the last flush, and either state of what came after."""
        model = copy_model(self.flushed)
        for offset, length in self.touched:
            model.forget(offset, length)
        required = {name: snap for name, snap in self.flushed_snapshots.items() if name not in self.snapshot_changes}
        return Expectation(model, set(self.sizes), required, set(self.snapshot_changes))

    def expectation_without_loss(self, failed: Op | None) -> Expectation:
        """What the image holds after a clean close: every operation done, *failed* either done or not."""
        model = copy_model(self.model)
        sizes = {model.size}
        maybe: set[str] = set()
        if failed is not None:
            if failed.kind == "resize":
                sizes.add(failed.length)
                model.forget(min(model.size, failed.length), abs(failed.length - model.size))
            elif failed.kind in ("snap-create", "snap-delete"):
                maybe.add(failed.name)
            elif failed.kind == "snap-apply":
                model.forget(0, model.size)
            elif failed.kind != "flush":
                model.forget(failed.offset, failed.length)
        required = {name: snap for name, snap in self.snapshots.items() if name not in maybe}
        return Expectation(model, sizes, required, maybe)

    def apply(self, op: Op) -> None:
        self.current = op
        self._note(op)
        image, model = self.image, self.model
        if op.kind == "write":
            image.write(op.data, op.offset)
            model.write(op.offset, op.data)
        elif op.kind == "compressed":
            image.write_compressed(op.data, op.offset)
            model.write(op.offset, op.data)
        elif op.kind == "zeroes":
            image.write_zeroes(op.offset, op.length)
            model.zero(op.offset, op.length)
        elif op.kind == "discard-zero":
            image.discard_to_zero(op.offset, op.length)
            model.zero(op.offset, op.length)
        elif op.kind == "discard-any":
            image.discard_to_any(op.offset, op.length)
            model.forget(op.offset, op.length)
        elif op.kind == "resize":
            image.resize(op.length, shrink=True)
            model.resize(op.length)
        elif op.kind == "snap-create":
            self.driver.create_snapshot_sync(op.name)
            self.snapshots[op.name] = copy_model(model)
        elif op.kind == "snap-delete":
            self.driver.delete_snapshot_sync(op.name)
            del self.snapshots[op.name]
        elif op.kind == "snap-apply":
            self.driver.apply_snapshot_sync(op.name)
            self.model = copy_model(self.snapshots[op.name])
        else:
            assert op.kind == "flush", op
            image.flush()
            self._barrier()
        self.current = None


def verify_image(path: Path, expectation: Expectation, workload: Workload, what: str) -> bool:
    """Check a crashed image as the module says; whether it was dirty (and repaired on opening)."""
    dirty = is_dirty(path)
    if dirty:
        # Only lazy refcounts mark an image dirty; opening it for writing repairs it (as QEMU does).
        assert workload.lazy, f"{what}: a dirty image without lazy refcounts"
        # (An L2 entry the power loss left pointing past the end of the file is unmapped by the
        # repair: its data write never reached the disk. QEMU 7.2 cannot repair that.)
        with imago.open(path, "qcow2", write=True):
            pass
        assert not is_dirty(path), f"{what}: still dirty after imago opened it for writing"
    try:
        qemu = qemu_check(path)
        imago_check(path, qemu)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None
    if dirty:
        assert not qemu.get("leaks", 0), f"{what}: the repair on opening left leaks"
    driver = Qcow2.builder_path(path).open_sync(imago.SandboxImplicitOpenGate([path.parent]))
    image = SyncFormatAccess(driver)
    try:
        expectation.verify(image, driver, what)
    finally:
        image.close()
    return dirty


def open_on(storage: FaultyStorage) -> tuple[SyncFormatAccess, Qcow2]:
    driver = imago.format_driver("qcow2").builder(storage).write(True).open_sync(PermissiveImplicitOpenGate())
    assert isinstance(driver, Qcow2)
    return SyncFormatAccess(driver), driver


def faulty_file(path: Path, plan: FaultPlan) -> FaultyStorage:
    options = StorageOpenOptions(filename=path, writable=True, driver="faults", driver_options={"plan": plan})
    storage = imago.storage_driver("faults").open_sync(options)
    assert isinstance(storage, FaultyStorage)
    return storage


@dataclasses.dataclass(frozen=True)
class Start:
    """The disk and its snapshots as the workload finds them."""

    content: bytes
    snapshots: dict[str, bytes]

    def model(self, content: bytes | None = None) -> DiskModel:
        data = self.content if content is None else content
        model = DiskModel(len(data))
        model.write(0, data)
        return model

    def expectation(self) -> Expectation:
        snapshots = {name: self.model(content) for name, content in self.snapshots.items()}
        return Expectation(self.model(), {len(self.content)}, snapshots, set())


def start_state(base: Path, workload: Workload) -> Start:
    """What the base image holds: the disk (read by imago), and its snapshot (which held the same then)."""
    with imago.open(base, "qcow2") as image:
        content = read_all(image)
    return Start(content, {"base": content} if workload.snapshot else {})


# --- what was explored (printed with -s) -------------------------------------------------------------

EXPLORED: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report_explored() -> Iterator[None]:
    yield
    if EXPLORED:
        total = collections.Counter[str]()
        for counter in EXPLORED.values():
            total.update(counter)
        print(f"\nqcow2 on the faults storage, in total: {dict(total)}")


@pytest.fixture(params=WORKLOADS, ids=[workload.name for workload in WORKLOADS])
def workload(request: pytest.FixtureRequest) -> Workload:
    param: Workload = request.param
    return param


# --- power loss -------------------------------------------------------------------------------------


def count_calls(base: Path, disk: Path, plan: FaultPlan, ops: list[Op], start: Start) -> None:
    """Run the workload on a copy of *base* (open, operations, close) with *plan* counting the calls."""
    shutil.copyfile(base, disk)
    storage = faulty_file(disk, plan)
    image, driver = open_on(storage)
    executor = Executor(image, driver, start)
    try:
        for op in ops:
            executor.apply(op)
    finally:
        image.close()


def explore_power_loss(
    workload: Workload,
    directory: Path,
    *,
    points: int | None = POWER_LOSS_POINTS,
    only: set[int] | None = None,
    losses: tuple[tuple[str, bool, int | None], ...] = LOSSES,
) -> collections.Counter[str]:
    """Run the workload with a volatile write cache, checking the images a power loss leaves at sampled points.

    *points* crash points are sampled (``None``: all of them), or *only* those given (numbers of
    write calls).
    """
    base = make_base(workload, directory)
    start = start_state(base, workload)
    seed = seed_of("power-loss", workload.name)
    ops = workload_ops(workload, seed)
    disk = directory / "disk.qcow2"

    # A dry run counts the crash points: the calls that change what the disk may hold.
    counting = FaultPlan(write_cache=True)
    count_calls(base, disk, counting, ops, start)
    total = sum(counting.calls[op] for op in WRITE_CALLS)
    if only is not None:
        chosen = only
    else:
        count = total if points is None else min(total, points)
        chosen = set(random.Random(seed).sample(range(1, total + 1), count))

    # The real run: at each chosen point, the images a power loss may leave are taken (the run goes on).
    shutil.copyfile(base, disk)
    plan = FaultPlan(write_cache=True)
    storage = faulty_file(disk, plan)
    taken: list[tuple[str, bytes, Expectation]] = []
    write_calls = 0
    explored: collections.Counter[str] = collections.Counter()
    holder: dict[str, Executor] = {}

    def observe(call: Call) -> None:
        nonlocal write_calls
        if call.op not in WRITE_CALLS:
            return
        write_calls += 1
        if write_calls not in chosen:
            return
        executor = holder.get("executor")
        # Still opening the image: nothing was written since it was made.
        expectation = start.expectation() if executor is None else executor.expectation()
        op = executor.current if executor is not None else None
        where = f"{call.op} #{call.nth} (write call {write_calls}) in {op.kind if op else 'open/close'}"
        for label, subset, sector in losses:
            loss_seed = seed_of(seed, write_calls, label) if subset else None
            image = storage.power_loss_image(loss_seed, sector=sector)
            taken.append((f"{where}, {label} (seed {loss_seed})", image, expectation))
        explored["crash points"] += 1
        explored[f"in {op.kind if op else 'open/close'}"] += 1

    plan.observer = observe
    image, driver = open_on(storage)
    executor = Executor(image, driver, start)
    holder["executor"] = executor
    crashed = directory / "crashed.qcow2"

    def verify_taken() -> None:
        for what, data, expectation in taken:
            crashed.write_bytes(data)
            explored["dirty, repaired on opening"] += verify_image(
                crashed, expectation, workload, f"{workload.name}: power loss before {what}"
            )
            explored["images checked"] += 1
        taken.clear()

    try:
        for op in ops:
            executor.apply(op)
            verify_taken()
        executor.current = Op("close")
        image.close()
    finally:
        if not image.closed:
            image.close()
    verify_taken()
    assert explored["crash points"] == len(chosen), f"{len(chosen)} points chosen, {explored['crash points']} reached"
    # Closed: everything reached the file.
    assert verify_image(disk, executor.expectation_without_loss(None), workload, "after close") is False
    # The workload did what it is named for.
    if "compressed" in workload.mix:
        assert qemu_check(disk).get("compressed-clusters", 0) > 0, "no compressed cluster written"
    if workload.lazy and only is None:
        assert explored["dirty, repaired on opening"] > 0, "no power loss left the lazy image dirty"
    print(f"\n{workload.name}: {len(chosen)} of {total} crash points, {dict(explored)}")
    return explored


def test_power_loss(workload: Workload, tmp_path: Path) -> None:
    explored = explore_power_loss(workload, tmp_path)
    EXPLORED[f"{workload.name}, power loss"].update(explored)


# --- injected faults -------------------------------------------------------------------------------


def run_with_fault(base: Path, disk: Path, workload: Workload, ops: list[Op], start: Start, nth: int) -> str:
    """The workload with its *nth* storage call failing; checks the error and the image; what failed."""
    shutil.copyfile(base, disk)
    plan = FaultPlan(faults=[Fault(op="any", nth=nth)])
    storage = faulty_file(disk, plan)
    what = f"{workload.name}: storage call {nth} failing"
    failed: Op | None = None
    error: BaseException | None = None
    executor: Executor | None = None
    image: SyncFormatAccess | None = None
    try:
        image, driver = open_on(storage)
    except Exception as caught:
        error, failed = caught, Op("open")
    if image is not None:
        executor = Executor(image, driver, start)
        for op in [*ops, Op("close")]:
            injected = len(plan.injected)
            try:
                if op.kind == "close":
                    image.close()
                else:
                    executor.apply(op)
            except Exception as caught:
                error, failed = caught, op
                break
            assert len(plan.injected) == injected, f"{what}: {plan.injected[-1]} swallowed by {op.kind}"
    assert failed is not None, f"{what}: the run made only {plan.calls['any']} calls"
    assert error is not None
    assert len(plan.injected) == 1, f"{what}: {plan.injected}"
    assert caused_by(error, plan.injected[0]), f"{what}: {failed.kind} raised {error!r}, not the injected fault"
    plan.clear()
    kind = f"{plan.injected[0].call.op} in {failed.kind}"  # type: ignore[union-attr]
    what += f" ({kind})"

    # The file as the error left it: what a crash right after it leaves.
    crashed = disk.with_name("crashed.qcow2")
    shutil.copyfile(disk, crashed)
    expectation = start.expectation() if executor is None else executor.expectation()
    verify_image(crashed, expectation, workload, f"{what}, right after the error")

    # Closed with the fault gone: everything before the failed operation is there.
    closed = True
    if image is not None and not image.closed:
        try:
            image.close()
        except Exception:
            closed = False
    elif failed.kind == "close":
        closed = False
    runtime.run_sync(storage.inner.close())  # (a failed close may leave the file open)
    if closed and executor is not None:
        expectation = executor.expectation_without_loss(failed)
    verify_image(disk, expectation, workload, f"{what}, closed after the error")
    return kind if closed else f"{kind}, close failed"


def test_injected_faults(workload: Workload, tmp_path: Path) -> None:
    base = make_base(workload, tmp_path)
    start = start_state(base, workload)
    seed = seed_of("faults", workload.name)
    ops = workload_ops(workload, seed)
    disk = tmp_path / "disk.qcow2"
    counting = FaultPlan()
    count_calls(base, disk, counting, ops, start)
    total = counting.calls["any"]
    rng = random.Random(seed)
    count = total if FAULT_POINTS is None else min(total, FAULT_POINTS)
    explored = EXPLORED[f"{workload.name}, injected faults"]
    for nth in sorted(rng.sample(range(1, total + 1), count)):
        explored["faults injected"] += 1
        kind = run_with_fault(base, disk, workload, ops, start, nth)
        explored[f"fault: {kind}"] += 1
    print(f"\n{workload.name}: {count} of {total} calls failed in turn, {dict(explored)}")


def small_image(directory: Path, *commands: str, snapshot: bool = False) -> Path:
    """A 1 MiB image of 4 KiB clusters made by qemu-img, qemu-io *commands* run on it."""
    path = directory / "small.qcow2"
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path.name, "1M", cwd=directory)
    for command in commands:
        checked("qemu-io", "-f", "qcow2", "-c", command, path.name, cwd=directory)
    if snapshot:
        checked("qemu-img", "snapshot", "-c", "base", path.name, cwd=directory)
    return path


def write_failing_then_close(path: Path, fault: Fault, offset: int, data: bytes, *, arm_after_flush: bool) -> None:
    """Open *path* on the faults storage, write *data* with *fault* planned (the error must come), close."""
    plan = FaultPlan()
    storage = faulty_file(path, plan)
    image, _ = open_on(storage)
    if arm_after_flush:
        image.write(b"\x01" * 4096, 0)  # the L2 table and a first data cluster: written at the flush
        image.flush()
    plan.add(fault)
    with pytest.raises(InjectedError):
        image.write(data, offset)
    plan.clear()
    image.close()


def test_a_failed_l2_copy_leaves_only_a_leak(tmp_path: Path) -> None:
    """Found by the injected faults of the cow workload (storage calls 10 to 14: every write of the L2 copy); fixed.

    The L2 table is shared with a snapshot (refcount 2). The first write of a data write there
    (the copy's refcount) fails; the error reaches the caller. The old table's reference is
    released only once the L1 entry names the copy, so closing leaves at worst the copy leaked;
    before the fix the release was queued first and closing wrote it: the old table, still named
    by the active L1 table and the snapshot, had refcount 1 (``ERROR cluster 4 refcount=1
    reference=2``).
    """
    path = small_image(tmp_path, "write -P 0x11 0 64k", snapshot=True)
    write_failing_then_close(path, Fault(op="write", nth=1), 0, b"\x22" * 512, arm_after_flush=False)
    qemu_check(path)


def read_back(image: SyncFormatAccess, length: int, offset: int) -> bytes:
    """*length* bytes of the disk at *offset*."""
    buf = bytearray(length)
    image.read(buf, offset)
    return bytes(buf)


def test_a_failed_data_write_unbinds_its_new_cluster(tmp_path: Path) -> None:
    """Found by the injected faults of the cow workload (storage calls 74, 117, 119: new data clusters); fixed.

    A whole-cluster write into an existing L2 table: its only storage write is the data (the L2
    entry waits for the flush). That write fails, the error reaches the caller. The binding made
    for it is taken back (``FormatDriver.data_write_failed``); before the fix closing wrote the L2
    entry naming a cluster past the end of the file: ``ERROR: counting reference for region
    exceeding the end of the file by one cluster or more``.
    """
    path = small_image(tmp_path)
    write_failing_then_close(path, Fault(op="write", nth=1), 65536, b"\x33" * 4096, arm_after_flush=True)
    result = qemu_check(path)
    assert not result.get("leaks", 0), result  # the new cluster was released again
    assert json.loads(run("qemu-img", "map", "--output=json", path.name, cwd=tmp_path).stdout)[1] == {
        "start": 4096,
        "length": 1044480,
        "depth": 0,
        "present": False,
        "zero": True,
        "data": False,
    }
    with imago.open(path, "qcow2") as image:
        assert read_back(image, 4096, 0) == b"\x01" * 4096
        assert read_back(image, 4096, 65536) == bytes(4096)


def test_a_failed_copy_on_write_keeps_the_old_data(tmp_path: Path) -> None:
    """A partial write into a cluster shared with a snapshot: the copy is made, the data write fails.

    The active L2 entry goes back to the shared cluster (its release cancelled), so the guest
    keeps reading the old bytes, and the snapshot is untouched.
    """
    path = small_image(tmp_path, "write -P 0x11 0 64k", snapshot=True)
    plan = FaultPlan()
    image, _ = open_on(faulty_file(path, plan))
    image.write(b"\x01" * 4096, 0)  # the L2 table copied and cluster 0 copied: ours from here on
    image.flush()
    # Cluster 1 is still shared: the write copies its head and tail (two writes), then the data fails.
    plan.add(Fault(op="write", nth=3))
    with pytest.raises(InjectedError):
        image.write(b"\x22" * 512, 4096 + 1024)
    plan.clear()
    assert read_back(image, 4096, 4096) == b"\x11" * 4096
    image.close()
    assert not qemu_check(path).get("leaks", 0)
    with imago.open(path, "qcow2") as reopened:
        assert read_back(reopened, 4096, 4096) == b"\x11" * 4096
    converted = tmp_path / "base.raw"
    checked("qemu-img", "convert", "-l", "snapshot.name=base", "-O", "raw", path.name, converted.name, cwd=tmp_path)
    assert converted.read_bytes()[:65536] == b"\x11" * 65536


def test_a_failed_write_into_subclusters_of_a_new_cluster_is_undone(tmp_path: Path) -> None:
    """Extended L2 entries: a 4 KiB write into a fresh cluster fails; the cluster is not bound afterwards."""
    path = tmp_path / "extended.qcow2"
    options = "cluster_size=65536,extended_l2=on"
    checked("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path.name, "1M", cwd=tmp_path)
    checked("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4k", path.name, cwd=tmp_path)
    plan = FaultPlan(faults=[Fault(op="write", nth=1)])
    image, _ = open_on(faulty_file(path, plan))
    with pytest.raises(InjectedError):
        image.write(b"\x22" * 4096, 131072 + 8192)
    plan.clear()
    image.close()
    assert not qemu_check(path).get("leaks", 0)
    mapped = json.loads(run("qemu-img", "map", "--output=json", path.name, cwd=tmp_path).stdout)
    assert [extent["start"] for extent in mapped if extent["data"]] == [0], mapped
    with imago.open(path, "qcow2") as reopened:
        assert read_back(reopened, 65536, 131072) == bytes(65536)


def test_a_binding_another_write_used_is_kept(tmp_path: Path) -> None:
    """The contract under concurrency, step by step: a second write into the new cluster keeps its binding.

    Write A binds a new cluster; write B (in flight at the same time) writes into it in place and
    succeeds; A's data write then fails. Undoing A's binding would lose B's acknowledged data: it
    stays. A binding a write-back (a flush) made permanent stays too.
    """
    path = small_image(tmp_path, "write -P 0x11 0 4k")
    with imago.open(path, "qcow2", write=True) as image:
        driver = image.driver
        mapping_a, length_a = runtime.run_sync(driver.ensure_data_mapping(65536, 4096, True))
        assert length_a == 4096
        mapping_b, _ = runtime.run_sync(driver.ensure_data_mapping(65536 + 4096, 512, True))
        assert mapping_b.offset == mapping_a.offset + 4096  # in place: the cluster A bound
        runtime.run_sync(mapping_b.storage.writev([memoryview(b"\x44" * 512)], mapping_b.offset))
        driver.data_write_failed(65536, 4096)  # A failed after B used the cluster
        assert read_back(image, 512, 65536 + 4096) == b"\x44" * 512
        # A binding flushed before its write failed stays (the range reads what the cluster holds).
        mapping_c, _ = runtime.run_sync(driver.ensure_data_mapping(131072, 4096, True))
        runtime.run_sync(mapping_c.storage.writev([memoryview(b"\x55" * 4096)], mapping_c.offset))
        image.flush()
        driver.data_write_failed(131072, 4096)
        assert read_back(image, 4096, 131072) == b"\x55" * 4096
        # Without either, the failed write's binding is taken back.
        runtime.run_sync(driver.ensure_data_mapping(196608, 4096, True))
        driver.data_write_failed(196608, 4096)
        mapping, _ = runtime.run_sync(driver.get_mapping(196608, 4096))
        assert not isinstance(mapping, imago.ShallowRaw)
    assert not qemu_check(path).get("leaks", 0)


# --- the live power loss, and the oracle itself ----------------------------------------------------


def test_power_loss_on_the_live_storage(tmp_path: Path) -> None:
    """``power_loss`` itself: the file keeps what was flushed (and a subset of the rest), and opens clean."""
    workload = WORKLOADS[0]
    base = make_base(workload, tmp_path)
    start = start_state(base, workload)
    planned = workload_ops(workload, seed_of("live", workload.name))
    # Some operations, a flush, then writes the power loss may take.
    ops = [*planned[:20], Op("flush"), *(op for op in planned[20:] if op.kind == "write")]
    assert len(ops) > 24
    for seed in (None, 1, 2):
        disk = tmp_path / "disk.qcow2"
        shutil.copyfile(base, disk)
        plan = FaultPlan(write_cache=True)
        storage = faulty_file(disk, plan)
        image, driver = open_on(storage)
        executor = Executor(image, driver, start)
        for op in ops:
            executor.apply(op)
        expectation = executor.expectation()
        assert storage.pending > 0
        pending = storage.pending
        kept = storage.power_loss(seed)
        assert storage.pending == 0
        assert (kept == 0) == (seed is None), (seed, kept, pending)
        # The power is off: closing the image writes nothing (the flush on closing fails).
        with pytest.raises(OSError, match="the power is off"):
            image.close()
        runtime.run_sync(storage.close())
        verify_image(disk, expectation, workload, f"live power loss (seed {seed})")


def test_the_oracle_notices_a_disk_that_ignores_flushes(tmp_path: Path) -> None:
    """With ``no_flush`` a flush makes nothing durable: a power loss loses flushed data, and the checks say so."""
    workload = WORKLOADS[1]
    base = make_base(workload, tmp_path)
    start = start_state(base, workload)
    disk = tmp_path / "disk.qcow2"
    shutil.copyfile(base, disk)
    options = StorageOpenOptions(
        filename=disk,
        writable=True,
        no_flush=True,
        driver="faults",
        driver_options={"plan": FaultPlan(write_cache=True)},
    )
    storage = imago.storage_driver("faults").open_sync(options)
    assert isinstance(storage, FaultyStorage)
    image, driver = open_on(storage)
    executor = Executor(image, driver, start)
    executor.apply(Op("write", 4096, 8192, b"\x99" * 8192))
    executor.apply(Op("flush"))
    crashed = tmp_path / "crashed.qcow2"
    crashed.write_bytes(storage.power_loss_image())
    with pytest.raises(AssertionError, match="did not read back"):
        verify_image(crashed, executor.expectation(), workload, "a disk ignoring flushes")
    image.close()


def test_short_metadata_reads_give_imago_errors_or_zeroes(tmp_path: Path) -> None:
    """A read of the first metadata that comes back short (the rest zero, as past the end of a file).

    The driver cannot tell such zeroes from real ones; what it must never do is fail with
    anything but an :class:`~imago.ImagoError` (a damaged header is a ``CorruptImageError``
    naming the file), whichever read is cut and wherever.
    """
    base = small_image(tmp_path, "write -P 0x11 0 64k")
    disk = tmp_path / "disk.qcow2"
    outcomes: collections.Counter[str] = collections.Counter()
    for nth in range(1, 6):
        for short_length in (0, 8, 50, 104, 111, 1000, 4095):
            shutil.copyfile(base, disk)
            plan = FaultPlan(faults=[Fault(op="read", nth=nth, effect="short-read", short_length=short_length)])
            storage = faulty_file(disk, plan)
            try:
                image, _ = open_on(storage)
                content = bytearray(65536)
                image.read(content, 0)
                image.close()
                outcomes["opened, data intact" if content == b"\x11" * 65536 else "opened, zeroes read"] += 1
            except imago.ImagoError as error:
                named = disk.name in str(error)
                outcomes[type(error).__name__ if named else f"{type(error).__name__} not naming the file"] += 1
            finally:
                runtime.run_sync(storage.inner.close())
            assert plan.injected, (nth, short_length)
    assert set(outcomes) <= {"CorruptImageError", "opened, data intact", "opened, zeroes read"}, outcomes
    assert outcomes["CorruptImageError"] > 0, outcomes
    assert outcomes["opened, data intact"] > 0, outcomes
    assert sum(outcomes.values()) == 35, outcomes
