"""qcow2 under concurrency: many writes, reads, zeroings and discards in flight on one image.

Everything runs through :class:`imago.FormatAccess` under ``asyncio.run``, so the file storage
hands its I/O to imago's thread pool and requests really overlap (with ``O_DIRECT`` every
request goes to a thread). Each round starts 64 to 256 tasks over disjoint byte ranges and
waits for all of them (``gather``) before the next round, so the final content of every byte is
defined. The ranges are cut so that concurrent writers share L2 tables and single clusters:
different byte ranges of one unallocated cluster (or one cluster shared with the backing file
or an internal snapshot) are written at the same time, which races allocation and
copy-on-write; both writers' bytes must survive. Reads of ranges no task writes in that round
run in between and must see the state before the round.

Each task that wrote reads its range back as soon as it is done (while its neighbours are
still busy), and after every round each range is read back again through the same image
(reads that the engine's extent cache may answer). At the end ``qemu-img check`` must find the
image clean (no corruption, no leaked clusters), ``qemu-img convert`` must see what a plain
bytearray model says, backing files stay untouched and internal snapshots keep their content.

Some cases put :class:`JitteryStorage` under the image: it delays requests at random so that
they complete in many different orders. Directed tests use it to hold one read in flight while
another request changes the mappings around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from imago import FormatAccess, PermissiveImplicitOpenGate, PreallocateMode, Storage, StorageOpenOptions
from imago.testing.model import DiskModel
from imago_file import File
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB


@dataclasses.dataclass(frozen=True)
class Case:
    """How to make the starting image, and how to open it."""

    name: str
    cluster_size: int
    size: int
    options: dict[str, object] = dataclasses.field(default_factory=dict)
    backing: bool = False
    snapshot: bool = False
    direct: bool = False
    jitter: bool = False
    rounds: int = 14


CASES = [
    Case("64k", 65536, 24 * MiB),
    Case("64k-jitter", 65536, 24 * MiB, jitter=True),
    # 4 KiB clusters: an L2 table maps 2 MiB, so rounds also spread over several tables.
    Case("4k-direct", 4096, 12 * MiB, {"refcount_bits": 16}, direct=True),
    # 512-byte clusters: new L2 tables, refcount blocks and refcount table moves all the time.
    Case("512-refcount-64", 512, 3 * MiB, {"refcount_bits": 64}),
    Case("refcount-1", 16384, 12 * MiB, {"refcount_bits": 1}),
    Case("backing-4k", 4096, 8 * MiB, backing=True),
    Case("backing-64k-v2", 65536, 16 * MiB, {"compat": "0.10"}, backing=True, direct=True),
    Case("snapshot-64k", 65536, 16 * MiB, snapshot=True),
    Case("snapshot-64k-jitter", 65536, 16 * MiB, snapshot=True, jitter=True),
    Case("snapshot-4k-direct", 4096, 8 * MiB, snapshot=True, direct=True),
    Case("snapshot-backing-v2", 8192, 8 * MiB, {"compat": "0.10"}, backing=True, snapshot=True),
]


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def noise(rng: random.Random, length: int) -> bytes:
    """Random bytes without zeroes (so that zeroing is always visible)."""
    return rng.randbytes(length).replace(b"\0", b"\x5a")


def first_difference(got: bytes, expected: bytes, undefined: bytes | bytearray, base: int) -> str:
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b and not undefined[index]:
            return (
                f"at {base + index:#x}: {got[index : index + 16].hex()} instead of {expected[index : index + 16].hex()}"
            )
    return "no difference"  # pragma: no cover


def check_model(model: DiskModel, actual: bytes | bytearray, offset: int, what: str) -> None:
    """*actual*, read at *offset*, agrees with the model except where the model is undefined."""
    end = offset + len(actual)
    expected = bytearray(model.data[offset:end])
    undefined = model.undefined[offset:end]
    for match in re.finditer(b"\x01+", undefined):
        expected[match.start() : match.end()] = actual[match.start() : match.end()]
    if bytes(actual) != bytes(expected):
        raise AssertionError(f"{what}: {first_difference(bytes(actual), bytes(expected), undefined, offset)}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_clean(path: Path) -> None:
    """``qemu-img check``: no corruption, no leaked clusters (a clean close frees everything).

    imago's own check must say the same.
    """
    _qemu.check(path.name, cwd=path.parent)


# --- the starting image -----------------------------------------------------------------------


@dataclasses.dataclass
class Start:
    path: Path
    content: bytes
    snapshot: bytes | None
    frozen: dict[Path, str]


def make_image(case: Case, directory: Path) -> Start:
    size = case.size
    path = directory / "disk.qcow2"
    options: dict[str, object] = {"cluster_size": case.cluster_size, **case.options}
    frozen: dict[Path, str] = {}
    if case.backing:
        base = directory / "base.raw"
        # Shorter than the overlay and not cluster-aligned: the overlay reads zero past its end.
        base.write_bytes(noise(random.Random(seed_of(case.name, "base")), size * 3 // 4 + 1536))
        frozen[base] = sha256(base)
        _qemu.create(path, size, options=options, backing=base.name, backing_fmt="raw", cwd=directory)
    else:
        _qemu.create(path, size, options=options, cwd=directory)
    # Data, a zero cluster range and untouched space, so that rounds also write in place,
    # over zero clusters, and into fresh clusters.
    _qemu.qemu_io(
        path,
        f"write -P 0x11 {size // 16} {size // 8}",
        f"write -z {size // 4} {size // 16}",
        f"write -P 0x22 {size // 2 + 12345} {size // 16}",
        cwd=directory,
    )
    snapshot = None
    if case.snapshot:
        _qemu.qemu_io(path, f"write -P 0x33 0 {size * 7 // 16}", cwd=directory)
        _qemu.qemu_img("snapshot", "-c", "s1", path.name, cwd=directory)
        snapshot = _qemu.convert_to_raw(path, directory / "snapshot.raw", snapshot="snapshot.name=s1", cwd=directory)
    check_clean(path)
    content = _qemu.convert_to_raw(path, directory / "start.raw", cwd=directory)
    return Start(path, content, snapshot, frozen)


# --- the image file, slowed down at random -------------------------------------------------


class JitteryStorage(Storage):
    """A storage that pauses before some requests, so that concurrent requests finish out of order.

    Delegates to a real storage (the image file); the pauses only widen the windows in which
    other requests run, as a busy disk would.
    """

    name = "jittery-test"

    #: When set, the next request waits for this event (and clears it): a directed test's way
    #: to keep one request in flight while others run.
    held: asyncio.Event | None = None

    def __init__(self, inner: Storage, rng: random.Random | None) -> None:
        self._inner = inner
        self._rng = rng  # None: no pauses but held ones

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> JitteryStorage:
        raise NotImplementedError("wraps an opened storage")

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def writable(self) -> bool:
        return self._inner.writable

    @property
    def filename(self) -> str | None:
        return self._inner.filename

    @property
    def mem_align(self) -> int:
        return self._inner.mem_align

    @property
    def req_align(self) -> int:
        return self._inner.req_align

    async def _pause(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            await held.wait()
            return
        roll = 1.0 if self._rng is None else self._rng.random()
        if roll < 0.5:
            await asyncio.sleep(roll / 250)  # up to 2 ms

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        await self._pause()
        await self._inner.readv(bufs, offset)

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        await self._pause()
        await self._inner.writev(bufs, offset)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        await self._pause()
        await self._inner.write_zeroes(offset, length, unmap=unmap)

    async def discard(self, offset: int, length: int) -> None:
        await self._pause()
        await self._inner.discard(offset, length)

    async def flush(self) -> None:
        await self._pause()
        await self._inner.flush()

    async def sync(self) -> None:
        await self._inner.sync()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        await self._inner.resize(new_size, prealloc)

    async def close(self) -> None:
        await self._inner.close()


async def open_image(path: Path, *, direct: bool, jitter: random.Random | None = None) -> FormatAccess:
    options = StorageOpenOptions(filename=path, writable=True, direct=direct)
    if jitter is None:
        builder = Qcow2.builder_path(path).write(True).storage_options(options)
    else:
        builder = Qcow2.builder(JitteryStorage(await File.open(options), jitter)).write(True)
    return FormatAccess(await builder.open(PermissiveImplicitOpenGate()))


# --- rounds of concurrent requests ------------------------------------------------------------


@dataclasses.dataclass
class Request:
    kind: str  # write, read, zeroes, discard-zero, discard-any, flush
    offset: int = 0
    length: int = 0
    data: bytes = b""
    got: bytearray | None = None  # what a read saw
    after: bytearray | None = None  # what the task read back from its own range when done


def plan_round(rng: random.Random, case: Case) -> list[Request]:
    """About 64 to 256 requests on disjoint ranges, cut from a few windows of the disk.

    A window spans 1 to 48 clusters (at least 4 KiB) and is cut at random byte offsets into
    many pieces, so that several pieces fall into one cluster and many into one L2 table.
    """
    cluster = case.cluster_size
    clusters = case.size // cluster
    wanted = rng.randint(64, 256)
    windows: list[tuple[int, int]] = []
    pieces_left = wanted
    for _ in range(rng.randint(1, 3)):
        span = min(rng.randint(1, 48) * max(1, 4096 // cluster), clusters)
        start = rng.randrange(clusters - span + 1)
        if any(start < end and start + span > begin for begin, end in windows):
            continue
        windows.append((start, start + span))
    requests: list[Request] = []
    for index, (begin, end) in enumerate(windows):
        # Every window gets at least one cut, the last one what is left.
        count = pieces_left if index == len(windows) - 1 else rng.randint(1, pieces_left - (len(windows) - 1 - index))
        pieces_left -= count
        low, high = begin * cluster, end * cluster
        # Sector-aligned cuts half of the time (where there is room), arbitrary bytes otherwise.
        align = 512 if rng.random() < 0.5 and (high - low) // 512 >= 4 * count else 1
        cuts = sorted({low, high} | {rng.randrange(low, high) // align * align for _ in range(count)})
        for start, stop in itertools.pairwise(cuts):
            if stop <= start:
                continue
            roll = rng.random()
            if roll < 0.55:
                requests.append(Request("write", start, stop - start, noise(rng, stop - start)))
            elif roll < 0.80:
                requests.append(Request("read", start, stop - start))
            elif roll < 0.87:
                requests.append(Request("zeroes", start, stop - start))
            elif roll < 0.93:
                requests.append(Request("discard-zero", start, stop - start))
            else:
                requests.append(Request("discard-any", start, stop - start))
    if rng.random() < 0.3:
        requests.append(Request("flush"))
    rng.shuffle(requests)
    return requests


async def perform(image: FormatAccess, request: Request) -> None:
    # Yield once first, so that every request of the round is started before any finishes.
    await asyncio.sleep(0)
    kind, offset, length = request.kind, request.offset, request.length
    if kind == "write":
        await image.write(request.data, offset)
    elif kind == "read":
        request.got = bytearray(length)
        await image.read(request.got, offset)
    elif kind == "zeroes":
        await image.write_zeroes(offset, length)
    elif kind == "discard-zero":
        await image.discard_to_zero(offset, length)
    elif kind == "discard-any":
        await image.discard_to_any(offset, length)
    else:
        assert kind == "flush"
        await image.flush()
    if kind in ("write", "zeroes", "discard-zero"):
        # Read your own writes, while the other tasks are still busy around this range.
        request.after = bytearray(length)
        await image.read(request.after, offset)


def record(model: DiskModel, request: Request) -> None:
    kind, offset, length = request.kind, request.offset, request.length
    if kind == "write":
        model.write(offset, request.data)
    elif kind in ("zeroes", "discard-zero"):
        model.zero(offset, length)
    elif kind == "discard-any":
        model.forget(offset, length)


async def run_rounds(image: FormatAccess, model: DiskModel, case: Case, rng: random.Random) -> int:
    """Run the rounds; returns how many requests were made."""
    made = 0
    for round_number in range(case.rounds):
        requests = plan_round(rng, case)
        made += len(requests)
        await asyncio.gather(*(perform(image, request) for request in requests))
        for request in requests:
            if request.got is not None:
                # Nobody wrote this range during the round: it holds what it held before.
                check_model(model, request.got, request.offset, f"round {round_number}: concurrent read")
        for request in requests:
            record(model, request)
        for request in requests:
            if request.after is not None:
                check_model(
                    model, request.after, request.offset, f"round {round_number}: {request.kind} read back early"
                )
        # Read every range back on its own (the extent cache may answer these) ...
        for request in requests:
            if request.length:
                buf = bytearray(request.length)
                await image.read(buf, request.offset)
                check_model(model, buf, request.offset, f"round {round_number}: {request.kind} read back")
        # ... and the clusters around them, resolved afresh.
        touched = [r for r in requests if r.length]
        if touched:
            low = min(r.offset for r in touched) // case.cluster_size * case.cluster_size
            high = min(
                case.size, -(-max(r.offset + r.length for r in touched) // case.cluster_size) * case.cluster_size
            )
            buf = bytearray(high - low)
            await image.readv([buf], low)
            check_model(model, buf, low, f"round {round_number}: whole span read back")
    return made


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_concurrent_requests(case: Case, tmp_path: Path) -> None:
    start = make_image(case, tmp_path)
    model = DiskModel(case.size)
    model.data[:] = start.content
    rng = random.Random(seed_of(case.name))

    async def main() -> int:
        jitter = random.Random(seed_of(case.name, "jitter")) if case.jitter else None
        image = await open_image(start.path, direct=case.direct, jitter=jitter)
        try:
            return await run_rounds(image, model, case, rng)
        finally:
            await image.close()

    made = asyncio.run(main())
    assert made >= 60 * case.rounds

    check_clean(start.path)
    got = _qemu.convert_to_raw(start.path, tmp_path / "end.raw", cwd=tmp_path)
    check_model(model, got, 0, "qemu-img convert after the run")
    if start.snapshot is not None:
        kept = _qemu.convert_to_raw(start.path, tmp_path / "s1.raw", snapshot="snapshot.name=s1", cwd=tmp_path)
        assert kept == start.snapshot, "the internal snapshot changed"
    for path, digest in start.frozen.items():
        assert sha256(path) == digest, f"{path.name} changed"


def test_same_cluster_writers(tmp_path: Path) -> None:
    """Every cluster of the disk written by up to 8 concurrent writers at once, twice over.

    In the first pass the writers of a cluster race to allocate it (most clusters are
    unallocated, some hold data or are zero clusters; all share one L2 table); in the second
    they write in place. Pieces of some clusters are left out: copy-on-write from the backing
    file fills them.
    """
    case = Case("same-cluster", 16384, 4 * MiB, backing=True)
    start = make_image(case, tmp_path)
    model = DiskModel(case.size)
    model.data[:] = start.content
    rng = random.Random(seed_of(case.name))
    cluster = case.cluster_size

    async def main() -> None:
        image = await open_image(start.path, direct=False, jitter=random.Random(1))
        try:
            for _ in range(2):
                requests = []
                for first in range(0, case.size, cluster):
                    cuts = sorted({first, first + cluster} | {rng.randrange(first, first + cluster) for _ in range(7)})
                    # Mostly one piece of a cluster is left out: copy-on-write fills it.
                    skip = rng.randrange(len(cuts) + 2)
                    for index, (low, high) in enumerate(itertools.pairwise(cuts)):
                        if index != skip:
                            requests.append(Request("write", low, high - low, noise(rng, high - low)))
                rng.shuffle(requests)
                await asyncio.gather(*(perform(image, request) for request in requests))
                for request in requests:
                    record(model, request)
                buf = bytearray(case.size)
                await image.read(buf, 0)
                check_model(model, buf, 0, "after concurrent writers")
        finally:
            await image.close()

    asyncio.run(main())
    check_clean(start.path)
    check_model(model, _qemu.convert_to_raw(start.path, tmp_path / "end.raw", cwd=tmp_path), 0, "qemu-img convert")


# --- directed races: a read in flight while the mappings of its run change ---------------------


async def held_read(
    image: FormatAccess, storage: JitteryStorage, offset: int, length: int
) -> tuple[asyncio.Task[None], bytearray, asyncio.Event]:
    """Start a read whose storage request waits until the returned event is set."""
    await image.get_shallow_mapping(offset, length)  # the L2 table is loaded: the next storage read is the data
    release = asyncio.Event()
    storage.held = release
    buf = bytearray(length)
    task = asyncio.create_task(image.read(buf, offset))
    await asyncio.sleep(0)
    assert storage.held is None, "the read did not reach the storage"
    return task, buf, release


def make_held_image(tmp_path: Path, *, snapshot: bool) -> Path:
    path = tmp_path / "disk.qcow2"
    _qemu.create(path, 1 * MiB)
    # One contiguous run of data clusters (64 KiB each) over the whole disk.
    _qemu.qemu_io(path, "write -P 0x33 0 1M")
    if snapshot:
        _qemu.qemu_img("snapshot", "-c", "s1", path)
    return path


@pytest.mark.parametrize(
    ("snapshot", "operation"),
    [
        # Copy-on-write of the snapshot-shared cluster the read is in.
        pytest.param(True, "write", id="snapshot-write-same-cluster"),
        # Copy-on-write of a snapshot-shared cluster in the same run.
        pytest.param(True, "write-next-cluster", id="snapshot-write-next-cluster"),
        # A cluster of the run gets the zero flag, its space freed.
        pytest.param(False, "discard-zero", id="discard-zero-next-cluster"),
        # A cluster of the run gets the zero flag, its space kept.
        pytest.param(False, "zeroes", id="write-zeroes-next-cluster"),
    ],
)
def test_read_in_flight_while_its_run_changes(tmp_path: Path, snapshot: bool, operation: str) -> None:
    """A read of cluster 0 is in flight while another request changes the mapping of [64K, 128K)
    (or of the rest of cluster 0). Afterwards, reads of the changed range see the change.

    The read's mapping covers the whole run of contiguous clusters; it must not be cached
    once a mapping changed under it.
    """
    path = make_held_image(tmp_path, snapshot=snapshot)
    new = b"\x44" * 4096
    changed = 8192 if operation == "write" else 65536
    expected = bytes(4096) if operation in ("discard-zero", "zeroes") else new

    async def main() -> bytes:
        storage = JitteryStorage(await File.open(StorageOpenOptions(filename=path, writable=True)), None)
        image = FormatAccess(await Qcow2.builder(storage).write(True).open(PermissiveImplicitOpenGate()))
        try:
            task, buf, release = await held_read(image, storage, 0, 4096)
            if operation in ("write", "write-next-cluster"):
                await image.write(new, changed)
            elif operation == "discard-zero":
                await image.discard_to_zero(65536, 65536)
            else:
                await image.write_zeroes(65536, 65536)
            release.set()
            await task
            assert buf == b"\x33" * 4096
            after = bytearray(4096)
            await image.read(after, changed)
            return bytes(after)
        finally:
            await image.close()

    after = asyncio.run(main())
    assert after == expected, f"a read after the change saw {after[:8].hex()}... (the mapping from before it)"
    check_clean(path)
