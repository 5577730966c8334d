"""Internal snapshots (create, apply, delete, list), checked against ``qemu-img snapshot``.

* The same sequence of snapshot commands runs through ``qemu-img snapshot`` on one copy of an
  image and through imago on another: after every step the disks compare equal, the
  snapshot lists agree (IDs, names, sizes; not the dates) and both pass ``qemu-img check``.
* A hypothesis workload mixes snapshots with writes, compressed writes, zeroing, discards,
  resizes, flushes and reopens over the option matrix; every live snapshot must read back, through qemu, as it was
  when it was taken.
* Misuse: read-only images, external data files, refcount overflow (refused before anything
  changes), unknown snapshots, bad names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import imago
from imago import (
    ImagoError,
    InvalidRequestError,
    PermissiveImplicitOpenGate,
    ReadOnlyError,
    SyncFormatAccess,
    UnsupportedFeatureError,
)
from imago.testing.model import DiskModel
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB
from .test_write import (
    CONFIGS,
    Config,
    _WriteWorkload,
    assert_same,
    build_template,
    check_clean,
    check_model,
    convert,
    open_ro,
    open_rw,
    read_all,
    sha256,
)

KiB = 1 << 10


def qcow2_of(image: SyncFormatAccess) -> Qcow2:
    driver = image.driver
    assert isinstance(driver, Qcow2)
    return driver


def snapshot_list(path: Path) -> list[tuple[str, ...]]:
    """``qemu-img snapshot -l``, one tuple of columns per snapshot, dates left out."""
    rows = []
    for line in _qemu.qemu_img("snapshot", "-l", path).splitlines()[2:]:
        match = re.fullmatch(r"(\S+)\s+(.*?)\s+(\S+ \S+)\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+(\S+)\s*(\S*)", line)
        assert match, f"unexpected qemu-img snapshot -l line: {line!r}"
        rows.append(match.groups())
    return rows


def info_snapshots(path: Path) -> list[dict[str, Any]]:
    """The snapshots ``qemu-img info`` reports, dates left out."""
    found = _qemu.info(path).get("snapshots", [])
    return [{k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")} for s in found]


def make_image(path: Path, options: dict[str, object] | None = None, *, compressed: bool = True) -> None:
    """A 4 MiB image with data, zero clusters and (unless not *compressed*) compressed clusters."""
    _qemu.create(path, 4 * MiB, options={"cluster_size": 65536, **(options or {})})
    commands = [f"write -P 0x11 0 {MiB}", f"write -z {MiB} {MiB // 2}", f"write -P 0x33 {3 * MiB + 4096} 100000"]
    if compressed:
        commands.append(f"write -c -P 0x22 {2 * MiB} {256 * KiB}")
    _qemu.qemu_io(path, *commands)


# --- the same results as qemu-img snapshot ----------------------------------------------------


class Twins:
    """Two copies of one image: qemu-img works on one, imago on the other."""

    def __init__(self, directory: Path, options: dict[str, object] | None = None) -> None:
        self.qemu = directory / "qemu.qcow2"
        self.ours = directory / "ours.qcow2"
        self.directory = directory
        make_image(self.qemu, options)
        shutil.copy(self.qemu, self.ours)

    def both(self, command: str, argument: str) -> None:
        _qemu.qemu_img("snapshot", command, argument, self.qemu)
        with open_rw(self.ours) as image:
            driver = qcow2_of(image)
            {"-c": driver.create_snapshot_sync, "-a": driver.apply_snapshot_sync, "-d": driver.delete_snapshot_sync}[
                command
            ](argument)
        self.agree()

    def io(self, *commands: str) -> None:
        _qemu.qemu_io(self.qemu, *commands)
        _qemu.qemu_io(self.ours, *commands)

    def agree(self) -> None:
        check_clean(self.qemu)
        check_clean(self.ours)
        assert snapshot_list(self.ours) == snapshot_list(self.qemu)
        assert info_snapshots(self.ours) == info_snapshots(self.qemu)
        assert _qemu.info(self.ours)["virtual-size"] == _qemu.info(self.qemu)["virtual-size"]
        _qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", self.ours, self.qemu)
        for row in snapshot_list(self.qemu):
            spec = f"snapshot.id={row[0]}"
            assert_same(
                convert(self.ours, self.directory, snapshot=spec),
                convert(self.qemu, self.directory, snapshot=spec),
                f"snapshot {row[0]}",
            )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": 4096, "refcount_bits": 64},
        {"compression_type": "zstd"},
        {"lazy_refcounts": True},
        {"extended_l2": True},
    ],
    ids=["default", "v2", "4k-refcount-64", "zstd", "lazy-refcounts", "extended-l2"],
)
def test_same_results_as_qemu_img_snapshot(tmp_path: Path, options: dict[str, object]) -> None:
    twins = Twins(tmp_path, options)
    twins.both("-c", "s1")
    twins.io(f"write -P 0x44 {MiB - 4096} 8192", f"write -z {2 * MiB} 65536")
    twins.both("-c", "s2")
    twins.both("-c", "s1")  # names need not be unique: this is ID 3
    twins.io(f"write -P 0x55 {3 * MiB} {MiB}")
    twins.both("-a", "1")  # IDs first
    twins.io(f"write -P 0x66 {512 * KiB} 4096")
    twins.both("-d", "s1")  # names first: ID 1
    twins.both("-c", "2")  # a name that is another snapshot's ID: this is ID 4
    twins.both("-d", "2")  # names first: ID 4, not ID 2
    twins.both("-a", "s1")  # by name: ID 3
    twins.both("-d", "s1")  # ID 3, the only s1 left
    twins.both("-d", "s2")
    twins.both("-c", "again")  # IDs continue after the largest in use
    assert [row[0] for row in snapshot_list(twins.ours)] == ["1"]


def test_apply_restores_the_snapshot_size(tmp_path: Path) -> None:
    twins = Twins(tmp_path)
    twins.both("-c", "small")
    for path in (twins.qemu, twins.ours):
        _qemu.qemu_img("resize", "-f", "qcow2", path, "8M")
    twins.io(f"write -P 0x77 {6 * MiB} {MiB}", "write -P 0x78 0 4096")
    twins.both("-c", "large")
    twins.both("-a", "small")
    assert _qemu.info(twins.ours)["virtual-size"] == 4 * MiB
    twins.both("-a", "large")
    assert _qemu.info(twins.ours)["virtual-size"] == 8 * MiB


def test_imago_made_snapshots_read_back_through_imago(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    make_image(path)
    first = convert(path, tmp_path)
    with open_rw(path) as image:
        driver = qcow2_of(image)
        created = driver.create_snapshot_sync("first", date_ns=1_700_000_000_123_456_789, vm_clock_nsec=5_000_000_123)
        assert (created.id, created.name, created.disk_size) == ("1", "first", 4 * MiB)
        assert (created.date_sec, created.date_nsec, created.vm_clock_nsec) == (
            1_700_000_000,
            123_456_789,
            5_000_000_123,
        )
        image.write(b"\xab" * 70000, 10)
        view = SyncFormatAccess(driver.read_snapshot_sync("first"))
        assert_same(read_all(view), first, "the snapshot through imago")
        view.close()
        assert driver.snapshots == [created]
    described = info_snapshots(path)
    assert described == [
        {"id": "1", "name": "first", "vm-state-size": 0, "vm-clock-sec": 5, "vm-clock-nsec": 123, "icount": 0}
    ]
    full = _qemu.info(path)["snapshots"][0]
    assert (full["date-sec"], full["date-nsec"]) == (1_700_000_000, 123_456_789)
    check_clean(path)


def used_clusters(path: Path) -> int:
    """Host clusters in use (refcount above zero), as the image's refcounts say."""
    with open_ro(path) as image:
        driver = qcow2_of(image)
        cluster_size = driver.cluster_size
        return sum(
            1 for offset in range(0, path.stat().st_size, cluster_size) if asyncio.run(driver.refcount(offset)) > 0
        )


def test_delete_releases_what_only_the_snapshot_used(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    make_image(path)
    used = used_clusters(path)
    # 64 KiB clusters: 1 MiB of data, 100000 bytes over 2 clusters, 4 compressed clusters of
    # one byte pattern that qemu packs into a single host cluster.
    data = 16 + 2 + 1
    with open_rw(path) as image:
        driver = qcow2_of(image)
        driver.create_snapshot_sync("old")
        image.write(b"\x99" * (4 * MiB), 0)  # every cluster now differs from the snapshot's
    check_clean(path)
    grown = used_clusters(path)
    assert grown >= used + 64
    with open_rw(path) as image:
        qcow2_of(image).delete_snapshot_sync("old")
    check_clean(path)
    # The snapshot's data clusters, its L1 table, the L2 table only it used and the snapshot
    # table are gone.
    assert used_clusters(path) == grown - data - 3
    _qemu.qemu_io(path, f"read -P 0x99 0 {4 * MiB}")


def test_qemu_made_snapshots_are_deleted_and_applied(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    make_image(path)
    _qemu.qemu_img("snapshot", "-c", "q1", path)
    q1 = convert(path, tmp_path)
    _qemu.qemu_io(path, f"write -P 0x5a 0 {2 * MiB}")
    _qemu.qemu_img("snapshot", "-c", "q2", path)
    q2 = convert(path, tmp_path)
    _qemu.qemu_io(path, f"write -P 0x5b {MiB} {2 * MiB}")
    with open_rw(path) as image:
        driver = qcow2_of(image)
        driver.apply_snapshot_sync("q1")
        assert_same(read_all(image), q1, "after applying q1")
        driver.delete_snapshot_sync("q1")
        image.write(b"\x01" * 5000, 3 * MiB - 100)
    check_clean(path)
    assert_same(convert(path, tmp_path, snapshot="snapshot.name=q2"), q2, "q2")
    expected = bytearray(q1)
    expected[3 * MiB - 100 : 3 * MiB + 4900] = b"\x01" * 5000
    assert_same(convert(path, tmp_path), bytes(expected), "the active disk")


def test_snapshots_of_an_image_with_a_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 * MiB // 256))
    path = tmp_path / "top.qcow2"
    _qemu.create(path, 4 * MiB, backing="base.raw", backing_fmt="raw", cwd=tmp_path)
    _qemu.qemu_io(path, "write -P 0x10 100000 5000", cwd=tmp_path)
    before = convert(path, tmp_path, cwd=tmp_path)
    with open_rw(path) as image:
        driver = qcow2_of(image)
        driver.create_snapshot_sync("s")
        image.write(b"\x20" * 70000, 99000)
        image.discard_to_backing(0, 4 * MiB)
        driver.apply_snapshot_sync("s")
        assert_same(read_all(image), before, "after applying")
    check_clean(path, cwd=tmp_path)
    assert_same(convert(path, tmp_path, cwd=tmp_path), before, "qemu after applying")


# --- misuse ---------------------------------------------------------------------------------------


def test_refcount_overflow_is_refused_before_anything_changes(tmp_path: Path) -> None:
    path = tmp_path / "narrow.qcow2"
    # (Without compressed clusters: many of them share a host cluster, whose refcount is their count.)
    make_image(path, {"refcount_bits": 2, "cluster_size": 4096}, compressed=False)
    with open_rw(path) as image:
        driver = qcow2_of(image)
        driver.create_snapshot_sync("a")
        driver.create_snapshot_sync("b")  # data clusters now at refcount 3, the most 2 bits hold
        image.flush()
        before = sha256(path)
        with pytest.raises(InvalidRequestError, match="refcount_bits"):
            driver.create_snapshot_sync("c")
        # Applying takes the snapshot's references before it drops the active ones: 4 for a moment.
        with pytest.raises(InvalidRequestError, match="refcount_bits"):
            driver.apply_snapshot_sync("a")
        assert sha256(path) == before
        assert [s.name for s in driver.snapshots] == ["a", "b"]
        driver.delete_snapshot_sync("a")
        driver.create_snapshot_sync("c")
    check_clean(path)
    assert [row[1] for row in snapshot_list(path)] == ["b", "c"]

    one = tmp_path / "one.qcow2"
    make_image(one, {"refcount_bits": 1}, compressed=False)
    with open_rw(one) as image:
        image.flush()
        before = sha256(one)
        with pytest.raises(InvalidRequestError, match="refcount"):
            qcow2_of(image).create_snapshot_sync("x")
    assert sha256(one) == before
    check_clean(one)


def test_misuse(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    make_image(path)
    _qemu.qemu_img("snapshot", "-c", "s", path)
    digest = sha256(path)
    with open_ro(path) as image:
        driver = qcow2_of(image)
        for call in (
            lambda: driver.create_snapshot_sync("new"),
            lambda: driver.apply_snapshot_sync("s"),
            lambda: driver.delete_snapshot_sync("s"),
        ):
            with pytest.raises(ReadOnlyError):
                call()
    assert sha256(path) == digest
    with open_rw(path) as image:
        driver = qcow2_of(image)
        for missing in ("nope", "2", ""):
            with pytest.raises(ImagoError, match="no snapshot"):
                driver.apply_snapshot_sync(missing)
            with pytest.raises(ImagoError, match="no snapshot"):
                driver.delete_snapshot_sync(missing)
        bad_names: list[Any] = ["", "x" * 1024, "\ud800", 7, None, b"s"]
        for name in bad_names:
            with pytest.raises(InvalidRequestError):
                driver.create_snapshot_sync(name)
        with pytest.raises(InvalidRequestError):
            driver.apply_snapshot_sync(1)  # type: ignore[arg-type]
        for date in (-1, 1 << 80, 1.5):
            with pytest.raises(InvalidRequestError, match="date"):
                driver.create_snapshot_sync("d", date_ns=date)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="clock"):
            driver.create_snapshot_sync("d", vm_clock_nsec=-5)
        assert [s.name for s in driver.snapshots] == ["s"]
        # Deleting by ID works too (qemu-img snapshot -d only looks at names).
        driver.create_snapshot_sync("by-id")
        assert driver.delete_snapshot_sync("2").name == "by-id"
        # A name of 1023 bytes of UTF-8 is the longest allowed.
        longest = "é" * 511 + "x"
        driver.create_snapshot_sync(longest)
    check_clean(path)
    # qemu-img shows at most 255 bytes of a name (cut mid-character): read it back through imago.
    with open_ro(path) as image:
        assert [s.name for s in qcow2_of(image).snapshots] == ["s", longest]
    assert [s["name"][:100] for s in _qemu.info(path)["snapshots"]] == ["s", longest[:100]]


def test_external_data_file_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    _qemu.create(path, 4 * MiB, options={"data_file": "d.data"}, cwd=tmp_path)
    with open_rw(path) as image, pytest.raises(UnsupportedFeatureError, match="external data file"):
        qcow2_of(image).create_snapshot_sync("s")
    # QEMU refuses as well.
    proc = subprocess.run(["qemu-img", "snapshot", "-c", "s", path], capture_output=True, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    check_clean(path, cwd=tmp_path)


def test_imago_open_exposes_snapshots_through_the_driver(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    make_image(path)
    with imago.open(path, format="qcow2", write=True) as image:
        qcow2_of(image).create_snapshot_sync("via-open")
    assert [row[1] for row in snapshot_list(path)] == ["via-open"]


# --- random workloads with snapshots --------------------------------------------------------------


@dataclasses.dataclass
class Taken:
    """A snapshot the workload took (or found), and what it must read as."""

    id: str
    name: str
    content: bytes


class _SnapshotWorkload(_WriteWorkload):
    """The write workload, plus snapshots created, applied and deleted at random."""

    narrow_refcounts: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[Taken] = [
            Taken(str(index + 1), name, content)
            for index, (name, content) in enumerate(self.template.snapshots.items())
        ]
        self.counter = 0

    @property
    def driver(self) -> Qcow2:
        return qcow2_of(self.image)

    @rule()
    def create_snapshot(self) -> None:
        content = read_all(self.image)
        check_model(self.model, content)
        self.counter += 1
        name = f"w{self.counter}"
        try:
            snapshot = self.driver.create_snapshot_sync(name)
        except InvalidRequestError:
            if not self.narrow_refcounts:
                raise
            return
        self.taken.append(Taken(snapshot.id, name, content))

    @precondition(lambda self: self.taken)
    @rule(which=st.integers(0, 1 << 16))
    def apply_snapshot(self, which: int) -> None:
        taken = self.taken[which % len(self.taken)]
        try:
            self.driver.apply_snapshot_sync(taken.id)
        except InvalidRequestError:
            if not self.narrow_refcounts:
                raise
            return
        self.model = DiskModel(len(taken.content))
        self.model.write(0, taken.content)

    @precondition(lambda self: self.taken)
    @rule(which=st.integers(0, 1 << 16))
    def delete_snapshot(self, which: int) -> None:
        taken = self.taken.pop(which % len(self.taken))
        deleted = self.driver.delete_snapshot_sync(taken.id)
        assert deleted.id == taken.id

    @rule(position=st.integers(0, 1 << 30), count=st.integers(1, 4), compressible=st.booleans())
    def write_compressed(self, position: int, count: int, compressible: bool) -> None:
        cs = self.config.cluster_size
        size = self.model.size
        clusters = -(-size // cs)
        if not clusters:
            return
        offset = position % clusters * cs
        length = min(count * cs, size - offset)
        if compressible:  # packed tightly, often straddling host clusters
            data = (bytes([self.rng.randrange(1, 256)]) * self.rng.randrange(1, 64) + b"snapshot") * (length // 9 + 1)
            data = data[:length]
        else:  # does not shrink: stored as an ordinary cluster
            data = self.rng.randbytes(length)
        self.image.write_compressed(data, offset)
        self.model.write(offset, data)

    @precondition(lambda self: self.resizing)
    @rule(size=st.integers(min_value=0, max_value=1 << 30))
    def resize(self, size: int) -> None:
        base = self.config.size
        new_size = (base // 2 + size % base) // 512 * 512
        floor = max((len(t.content) for t in self.taken), default=0)
        if new_size < min(floor, self.model.size):
            with pytest.raises(UnsupportedFeatureError, match="snapshots"):
                self.image.resize(new_size, shrink=True)
            return
        self.image.resize(new_size, shrink=True)
        self.model.resize(new_size)

    def _judge(self) -> None:
        directory = self.directory
        ours = read_all(self.image)
        check_model(self.model, ours)
        self.image.close()
        check_clean(self.path, cwd=directory)
        theirs = convert(self.path, directory, cwd=directory)
        check_model(self.model, theirs)
        assert_same(theirs, ours, "qemu-img convert")
        rows = snapshot_list(self.path)
        assert [(row[0], row[1]) for row in rows] == [(t.id, t.name) for t in self.taken]
        size = len(theirs)
        for taken in self.taken:
            got = convert(self.path, directory, snapshot=f"snapshot.id={taken.id}", cwd=directory)
            # qemu-img reads a snapshot at the active disk's size: past the snapshot's own end
            # it shows what the snapshot's tables leave unallocated (backing file, or zeroes).
            shared = min(size, len(taken.content))
            assert_same(got[:shared], taken.content[:shared], f"snapshot {taken.name}")
        image = Qcow2.builder_path(self.path).open_sync(PermissiveImplicitOpenGate())
        for taken in self.taken:
            view = SyncFormatAccess(image.read_snapshot_sync(taken.id))
            assert_same(read_all(view), taken.content, f"snapshot {taken.name} through imago")
            view.close()
        SyncFormatAccess(image).close()
        with open_ro(self.path) as again:
            assert_same(read_all(again), theirs, "imago after reopening")
        for name, digest in self.template.frozen.items():
            assert sha256(directory / name) == digest, f"{name} changed"


SNAPSHOT_CONFIGS = [
    *(
        c
        for c in CONFIGS
        if c.name
        in {
            "cluster-512",
            "cluster-64k",
            "cluster-2m",
            "refcount-64-4k",
            "compat-0.10-4k",
            "backing-raw",
            "backing-qcow2-v2",
            "snapshots",
            "snapshot-refcount-2",
            "compressed-zstd",
            "compressed-over-backing",
            "extended-l2",
            "extended-l2-backing-qcow2",
            "extended-l2-snapshots",
            "extended-l2-compressed",
        }
    ),
]


@pytest.mark.parametrize("config", SNAPSHOT_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("resizing", [False, True], ids=["fixed-size", "resizing"])
def test_random_workload_with_snapshots(config: Config, resizing: bool, tmp_path: Path) -> None:
    directory = tmp_path / "template"
    directory.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    class Workload(_SnapshotWorkload):
        template = build_template(config, directory, scratch)

    Workload.resizing = resizing
    Workload.narrow_refcounts = int(str(config.options.get("refcount_bits", 16))) < 4
    Workload.TestCase.settings = settings(
        # 2 MiB clusters make every step copy megabytes: fewer examples keep the suite's time
        # (examples are random in every run, so runs add up to more).
        max_examples=2 if config.name == "cluster-2m" else 4,
        stateful_step_count=20,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    Workload.TestCase().runTest()


@pytest.mark.parametrize("extended_l2", [False, True], ids=["standard", "extended-l2"])
def test_mappings_are_writable_in_place_only_where_unshared(tmp_path: Path, extended_l2: bool) -> None:
    path = tmp_path / "a.qcow2"
    _qemu.create(path, 4 * MiB, options={"extended_l2": extended_l2})
    with open_rw(path) as image:
        image.write(b"\x01" * (2 * 65536), 0)

        def writable() -> bool:
            mapping, length = image.get_shallow_mapping(0, 2 * 65536)
            assert length == 2 * 65536
            return bool(getattr(mapping, "writable", False))

        assert writable()
        driver = qcow2_of(image)
        driver.create_snapshot_sync("s")
        assert not writable()  # shared with the snapshot: a write must copy first
        image.write(b"\x02" * (2 * 65536), 0)
        assert writable()
        driver.apply_snapshot_sync("s")
        assert not writable()
        driver.delete_snapshot_sync("s")
        assert writable()  # ours alone again: COPIED flags are back
    check_clean(path)
    _qemu.qemu_io(path, f"read -P 1 0 {2 * 65536}")


def test_refcounts_that_do_not_cover_a_snapshot_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "damaged.qcow2"
    make_image(path, compressed=False)
    _qemu.qemu_img("snapshot", "-c", "s", path)
    _qemu.qemu_io(path, "write -P 0x77 0 65536")  # cluster 0 now differs: the old one is the snapshot's alone
    with open_ro(path) as image:
        view = SyncFormatAccess(qcow2_of(image).read_snapshot_sync("s"))
        mapping, _ = view.get_shallow_mapping(0, 65536)
        view.close()
    host = getattr(mapping, "offset", None)
    assert isinstance(host, int)
    # Damage: the snapshot's cluster gets refcount 0 (16-bit entries in the block at 0x20000).
    layout = _qemu.qcow2_layout(path)
    assert layout.cluster_size == 65536
    data = bytearray(path.read_bytes())
    refcount_table = int.from_bytes(data[48:56], "big")
    block = int.from_bytes(data[refcount_table : refcount_table + 8], "big")
    entry = block + 2 * (host // 65536)
    assert data[entry : entry + 2] == b"\x00\x01"
    data[entry : entry + 2] = b"\x00\x00"
    path.write_bytes(data)
    with open_rw(path) as image:
        image.flush()
        before = sha256(path)
        driver = qcow2_of(image)
        with pytest.raises(imago.CorruptImageError, match="qemu-img check -r all"):
            driver.delete_snapshot_sync("s")
        assert sha256(path) == before
        assert [s.name for s in driver.snapshots] == ["s"]
