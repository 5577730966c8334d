"""The ``faults`` storage itself: conformance, registration, misuse, injected faults, the volatile cache."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

import imago
from imago import (
    InvalidOptionError,
    PreallocateMode,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
    runtime,
)
from imago.testing import StorageConformance
from imago.testing.model import DiskModel
from imago_faults import CachedChange, Fault, FaultPlan, FaultyStorage, InjectedError
from imago_file import File
from imago_raw import Raw


def new_file(path: Path, size: int = 1 << 20) -> File:
    return File.create_sync(StorageCreateOptions(filename=path, size=size, overwrite=True))


def read(storage: Storage, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    runtime.run_sync(storage.readv([memoryview(buf)], offset))
    return bytes(buf)


def write(storage: Storage, offset: int, data: bytes) -> None:
    runtime.run_sync(storage.writev([memoryview(data)], offset))


# --- conformance ------------------------------------------------------------------------------


class TestFaultsPassThroughConformance(StorageConformance):
    """No faults planned, no write cache: the storage behaves as the file below it."""

    def create_storage(self, directory: Path, size: int) -> Storage:
        return FaultyStorage(new_file(directory / "storage.img", size))

    def reopen_read_only(self, storage: Storage) -> Storage:
        options = StorageOpenOptions(filename=storage.filename, force_share=True, driver="faults")
        return imago.storage_driver("faults").open_sync(options)


class TestFaultsWriteCacheConformance(TestFaultsPassThroughConformance):
    """With the volatile write cache on, reads see the cached changes: the storage still conforms."""

    def create_storage(self, directory: Path, size: int) -> Storage:
        return FaultyStorage(new_file(directory / "storage.img", size), FaultPlan(write_cache=True))


class TestFaultsEarlyWriteBackConformance(TestFaultsPassThroughConformance):
    """A disk that writes half of its cached changes back early, out of order: still the same bytes."""

    def create_storage(self, directory: Path, size: int) -> Storage:
        plan = FaultPlan(write_cache=True, write_back_early=0.5, seed=3)
        return FaultyStorage(new_file(directory / "storage.img", size), plan)


# --- registration and opening -----------------------------------------------------------------


def test_entry_point_registers_the_driver() -> None:
    assert imago.storage_driver("faults") is FaultyStorage
    info = next(info for info in imago.plugins() if info.name == "faults")
    assert info.distribution == "imago-faults"
    assert info.storage_drivers == ("faults",)
    assert info.error is None


def test_open_by_options_wraps_a_file_and_shares_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    runtime.run_sync(new_file(path, 8192).close())
    plan = FaultPlan()
    options = StorageOpenOptions(filename=path, writable=True, driver="faults", driver_options={"plan": plan})
    storage = imago.storage_driver("faults").open_sync(options)
    try:
        assert isinstance(storage, FaultyStorage)
        assert isinstance(storage.inner, File)
        assert storage.plan is plan
        assert storage.filename == str(path)
        write(storage, 100, b"through")
        assert read(storage, 100, 7) == b"through"
        runtime.run_sync(storage.flush())
        assert (plan.calls["write"], plan.calls["read"], plan.calls["flush"], plan.calls["any"]) == (1, 1, 1, 3)
    finally:
        runtime.run_sync(storage.close())
    assert path.read_bytes()[100:107] == b"through"


def test_plan_given_as_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    runtime.run_sync(new_file(path, 4096).close())
    options = StorageOpenOptions(
        filename=path,
        writable=True,
        driver="faults",
        driver_options={"plan": {"faults": [{"op": "write", "nth": 2}], "write_cache": True}},
    )
    storage = FaultyStorage.open_sync(options)
    write(storage, 0, b"one")
    with pytest.raises(InjectedError):
        write(storage, 0, b"two")
    assert storage.plan.write_cache
    assert storage.pending == 1
    runtime.run_sync(storage.close())


def test_create_by_options(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    storage = FaultyStorage.create_sync(StorageCreateOptions(filename=path, size=65536, driver="faults"))
    assert storage.size == 65536
    assert isinstance(storage.inner, File)
    runtime.run_sync(storage.close())
    assert path.stat().st_size == 65536


def test_imago_open_through_the_faults_driver(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    runtime.run_sync(new_file(path, 65536).close())
    with imago.open(path, "raw", write=True, storage_driver_name="faults") as image:
        assert isinstance(image.driver.storages()[0], FaultyStorage)
        image.write(b"data", 4096)
    assert path.read_bytes()[4096:4100] == b"data"


def test_raw_image_over_the_null_driver(tmp_path: Path) -> None:
    options = StorageOpenOptions(
        driver="faults", writable=True, driver_options={"inner_driver": "null", "inner_options": {"size": 4096}}
    )
    storage = FaultyStorage.open_sync(options)
    assert storage.inner.name == "null"
    image = SyncFormatAccess(Raw.builder(storage).write(True).open_sync(imago.DenyImplicitOpenGate()))
    image.write(b"dropped", 0)
    image.close()


# --- misuse -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name", "message"),
    [
        ({"bogus": 1}, "driver_options", "unknown key.*'bogus'"),
        ({"plan": {"faults": [], "colour": "red"}}, "plan", "unknown key.*'colour'"),
        ({"plan": {"faults": [{"op": "write", "when": 3}]}}, "faults", "unknown key.*'when'"),
        ({"plan": {"faults": [{"nth": 3}]}}, "op", "must name its operation"),
        ({"plan": {"faults": "write"}}, "faults", "list of faults"),
        ({"plan": 42}, "plan", "FaultPlan or a mapping"),
        ({"inner_driver": ""}, "inner_driver", "driver name"),
        ({"inner_driver": "faults"}, "inner_driver", "over another"),
        ({"inner_options": [1]}, "inner_options", "mapping"),
    ],
)
def test_bad_driver_options(tmp_path: Path, options: dict[str, object], name: str, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message) as caught:
        FaultyStorage.open_sync(StorageOpenOptions(filename=tmp_path / "x", driver="faults", driver_options=options))
    assert caught.value.option == name


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"op": "wirte"}, "op"),
        ({"op": "write", "nth": 0}, "nth"),
        ({"op": "write", "nth": -2}, "nth"),
        ({"op": "write", "nth": 1.5}, "nth"),
        ({"op": "write", "nth": True}, "nth"),
        ({"op": "write", "times": 0}, "times"),
        ({"op": "write", "offset_range": (10, 5)}, "offset_range"),
        ({"op": "write", "offset_range": (-1, 5)}, "offset_range"),
        ({"op": "write", "offset_range": 7}, "offset_range"),
        ({"op": "write", "effect": "explode"}, "effect"),
        ({"op": "write", "effect": "short-read"}, "effect"),
        ({"op": "read", "effect": "short-read", "short_length": -1}, "short_length"),
        ({"op": "flush", "errno": 0}, "errno"),
    ],
)
def test_bad_faults(fields: dict[str, object], name: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        Fault(**fields)  # type: ignore[arg-type]
    assert caught.value.option == name
    with pytest.raises(InvalidOptionError):
        FaultPlan(faults=[fields])


@pytest.mark.parametrize(
    ("fields", "name"),
    [({"write_cache": 1}, "write_cache"), ({"write_back_early": 2.0}, "write_back_early"), ({"seed": "x"}, "seed")],
)
def test_bad_plans(fields: dict[str, object], name: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        FaultPlan(**fields)  # type: ignore[arg-type]
    assert caught.value.option == name


def test_bad_construction_and_power_loss_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="wraps a Storage"):
        FaultyStorage(b"not a storage")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="FaultPlan"):
        FaultyStorage(new_file(tmp_path / "a"), {"faults": []})  # type: ignore[arg-type]
    storage = FaultyStorage(new_file(tmp_path / "b"), FaultPlan(write_cache=True))
    with pytest.raises(InvalidOptionError, match="keep"):
        storage.power_loss(1, keep=1.5)
    with pytest.raises(InvalidOptionError, match="sector"):
        storage.power_loss(1, sector=0)
    with pytest.raises(InvalidOptionError, match="size"):
        runtime.run_sync(storage.resize(-1))
    runtime.run_sync(storage.close())


# --- injected faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["read", "write", "write_zeroes", "discard", "flush", "sync", "resize"])
def test_the_nth_call_fails_with_eio(tmp_path: Path, op: str) -> None:
    plan = FaultPlan(faults=[Fault(op=op, nth=2)])
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), plan)
    calls = {
        "read": lambda: read(storage, 0, 512),
        "write": lambda: write(storage, 0, b"x" * 512),
        "write_zeroes": lambda: runtime.run_sync(storage.write_zeroes(0, 512)),
        "discard": lambda: runtime.run_sync(storage.discard(0, 4096)),
        "flush": lambda: runtime.run_sync(storage.flush()),
        "sync": lambda: runtime.run_sync(storage.sync()),
        "resize": lambda: runtime.run_sync(storage.resize(storage.size + 4096)),
    }
    calls[op]()
    with pytest.raises(OSError, match=f"injected fault: {op} #2") as caught:
        calls[op]()
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(tmp_path / "disk.img")
    assert isinstance(caught.value, InjectedError)
    assert caught.value.call.nth == 2
    calls[op]()  # only the second call fails
    assert plan.calls[op] == 3
    assert plan.injected == [caught.value]
    runtime.run_sync(storage.close())


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), FaultPlan(faults=[Fault(op="write")]))
    with pytest.raises(InjectedError):
        write(storage, 0, b"lost")
    assert read(storage, 0, 4) == bytes(4)
    runtime.run_sync(storage.close())


def test_faults_in_an_offset_range_and_any_operation(tmp_path: Path) -> None:
    plan = FaultPlan(faults=[Fault(op="any", offset_range=(8192, 12288), times=None, errno=errno.ENOSPC)])
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), plan)
    write(storage, 0, b"x" * 8192)  # ends where the range starts: no overlap
    write(storage, 12288, b"y")
    runtime.run_sync(storage.flush())  # no range: never matches
    for attempt in range(3):
        with pytest.raises(OSError, match="injected fault: read") as caught:
            read(storage, 8000, 200)
        assert caught.value.errno == errno.ENOSPC, attempt
    with pytest.raises(InjectedError):
        runtime.run_sync(storage.write_zeroes(12000, 1000))
    assert len(plan.injected) == 4
    plan.clear()
    assert read(storage, 8000, 200) == b"x" * 192 + bytes(8)
    runtime.run_sync(storage.close())


def test_short_reads_zero_the_rest(tmp_path: Path) -> None:
    plan = FaultPlan(faults=[Fault(op="read", nth=2, effect="short-read", short_length=100)])
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), plan)
    write(storage, 0, b"\x11" * 1000)
    assert read(storage, 0, 1000) == b"\x11" * 1000
    first, second = bytearray(60), bytearray(940)
    storage.readv_inline([memoryview(first), memoryview(second)], 0)  # the inline path too
    assert bytes(first + second) == b"\x11" * 100 + bytes(900)
    assert read(storage, 0, 1000) == b"\x11" * 1000
    assert [call.nth for call in plan.injected] == [2]  # type: ignore[union-attr]
    runtime.run_sync(storage.close())


def test_the_observer_sees_every_call_first(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int, int]] = []
    plan = FaultPlan(faults=[Fault(op="write", nth=2)])
    plan.observer = lambda call: seen.append((call.op, call.index, call.offset, call.length))
    storage = FaultyStorage(new_file(tmp_path / "disk.img", 4096), plan)
    write(storage, 10, b"abc")
    with pytest.raises(InjectedError):
        write(storage, 20, b"de")
    runtime.run_sync(storage.resize(1000))
    runtime.run_sync(storage.sync())
    assert seen == [("write", 1, 10, 3), ("write", 2, 20, 2), ("resize", 3, 1000, 3096), ("sync", 4, 0, 0)]
    runtime.run_sync(storage.close())


def test_added_faults_count_from_then_on(tmp_path: Path) -> None:
    plan = FaultPlan()
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), plan)
    for _ in range(5):
        runtime.run_sync(storage.flush())
    plan.add({"op": "flush", "nth": 2, "times": 2})
    runtime.run_sync(storage.flush())
    for _ in range(2):
        with pytest.raises(InjectedError):
            runtime.run_sync(storage.flush())
    runtime.run_sync(storage.flush())
    assert plan.calls["flush"] == 9
    runtime.run_sync(storage.close())


# --- the volatile cache and power loss --------------------------------------------------------


def test_writes_stay_volatile_until_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    storage = FaultyStorage(new_file(path, 8192), FaultPlan(write_cache=True))
    write(storage, 0, b"durable")
    runtime.run_sync(storage.flush())
    write(storage, 0, b"VOLATILE")
    runtime.run_sync(storage.write_zeroes(4096, 100))
    runtime.run_sync(storage.resize(100_000))
    assert storage.size == 100_000
    assert read(storage, 0, 8) == b"VOLATILE"  # read-your-writes
    assert path.read_bytes()[:8] == b"durable\0"
    assert path.stat().st_size == 8192
    assert storage.pending == 3
    assert storage.power_loss() == 0
    with pytest.raises(OSError, match="the power is off") as caught:
        read(storage, 0, 8)
    assert caught.value.errno == errno.EIO
    storage.power_on()
    assert storage.size == 8192
    assert read(storage, 0, 8) == b"durable\0"
    runtime.run_sync(storage.close())


def test_sync_and_close_write_back(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    storage = FaultyStorage(new_file(path, 8192), FaultPlan(write_cache=True))
    write(storage, 0, b"synced")
    runtime.run_sync(storage.sync())
    assert path.read_bytes()[:6] == b"synced"
    write(storage, 10, b"closed")
    runtime.run_sync(storage.close())
    assert path.read_bytes()[10:16] == b"closed"


def test_no_flush_makes_only_sync_durable(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    runtime.run_sync(new_file(path, 4096).close())
    options = StorageOpenOptions(
        filename=path, writable=True, no_flush=True, driver="faults", driver_options={"plan": {"write_cache": True}}
    )
    storage = FaultyStorage.open_sync(options)
    write(storage, 0, b"x")
    runtime.run_sync(storage.flush())
    assert storage.pending == 1
    runtime.run_sync(storage.sync())
    assert storage.pending == 0
    runtime.run_sync(storage.close())


def test_a_failed_flush_keeps_the_changes_volatile(tmp_path: Path) -> None:
    storage = FaultyStorage(new_file(tmp_path / "disk.img"), FaultPlan(write_cache=True, faults=[Fault(op="flush")]))
    write(storage, 0, b"x")
    with pytest.raises(InjectedError):
        runtime.run_sync(storage.flush())
    assert storage.pending == 1
    storage.power_loss()
    storage.power_on()
    assert read(storage, 0, 1) == b"\0"
    runtime.run_sync(storage.close())


def apply_all(base: bytes, changes: list[CachedChange]) -> bytes:
    content = bytearray(base)
    for change in changes:
        change.apply(content)
    return bytes(content)


def test_power_loss_keeps_an_ordered_subset(tmp_path: Path) -> None:
    """Every surviving subset is a subset of the changes applied in order; overlapping writes never go back in time."""
    rng = random.Random(11)
    base = rng.randbytes(16384)
    path = tmp_path / "disk.img"
    path.write_bytes(base)
    storage = FaultyStorage(
        File.open_sync(StorageOpenOptions(filename=path, writable=True)), FaultPlan(write_cache=True)
    )
    for index in range(12):
        offset = rng.randrange(0, 16000)
        kind = rng.choice(["write", "zeroes", "discard"])
        if kind == "write":
            write(storage, offset, bytes([index + 1]) * rng.randint(1, 3000))
        elif kind == "zeroes":
            runtime.run_sync(storage.write_zeroes(offset, rng.randint(1, 3000), unmap=rng.random() < 0.5))
        else:
            runtime.run_sync(storage.discard(offset, rng.randint(1, 3000)))
    runtime.run_sync(storage.resize(20000))
    write(storage, 19000, b"\xee" * 500)
    changes = list(storage.cache.changes)
    everything = apply_all(base, changes)
    assert read(storage, 0, storage.size) == everything
    assert storage.power_loss_image(1, keep=1.0) == everything
    assert storage.power_loss_image() == base
    seen = set()
    for seed in range(40):
        image = storage.power_loss_image(seed)
        kept = storage.cache.survivors(random.Random(seed), 0.5, None)
        assert {id(change) for change in kept} <= {id(change) for change in changes}
        assert image == apply_all(base, kept)
        seen.add(image)
    assert len(seen) > 30  # the subsets differ from seed to seed
    # Torn at 512-byte sectors: a write may survive in part.
    torn = storage.power_loss_image(5, sector=512)
    assert torn not in (base, everything)
    expected = storage.power_loss_image(7)
    kept_count = storage.power_loss(7)
    assert 0 < kept_count < len(changes)
    assert storage.pending == 0
    storage.power_on()
    assert read(storage, 0, storage.size) == path.read_bytes() == expected
    runtime.run_sync(storage.close())


def test_early_write_back_never_reorders_overlapping_writes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    plan = FaultPlan(write_cache=True, write_back_early=0.7, seed=5)
    storage = FaultyStorage(new_file(path, 65536), plan)
    model = DiskModel(65536)
    rng = random.Random(2)
    for index in range(300):
        offset, length = rng.randrange(60000), rng.randint(1, 5000)
        data = bytes([index % 255 + 1]) * length
        write(storage, offset, data)
        model.write(offset, data)
        if index % 50 == 49:
            runtime.run_sync(storage.resize(65536, PreallocateMode.FULL))
    model.check(read(storage, 0, 65536))
    assert storage.pending < 300  # some went back early
    # The durable file plus the pending changes in order is what the disk reads as.
    assert apply_all(path.read_bytes(), storage.cache.changes) == bytes(model.data[: storage.size])
    runtime.run_sync(storage.sync())
    model.check(path.read_bytes())
    runtime.run_sync(storage.close())


def test_save_power_loss_image(tmp_path: Path) -> None:
    storage = FaultyStorage(new_file(tmp_path / "disk.img", 4096), FaultPlan(write_cache=True))
    write(storage, 5000, b"grown")
    assert storage.save_power_loss_image(tmp_path / "lost.img") == 4096
    assert storage.save_power_loss_image(tmp_path / "kept.img", 0, keep=1.0) == 5005
    assert (tmp_path / "kept.img").read_bytes()[5000:] == b"grown"
    runtime.run_sync(storage.close())


def test_repr_names_the_inner_storage(tmp_path: Path) -> None:
    storage = FaultyStorage(new_file(tmp_path / "disk.img"))
    assert "FaultyStorage over <File" in repr(storage)
    runtime.run_sync(storage.close())
