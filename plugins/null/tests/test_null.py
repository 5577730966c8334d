from pathlib import Path

import pytest

import imago
from imago import (
    InvalidOptionError,
    PreallocateMode,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
    runtime,
)
from imago.testing import StorageConformance
from imago_null import Null
from imago_raw import Raw


class TestNullConformance(StorageConformance):
    stores_data = False
    grows_on_write = False

    def create_storage(self, directory: Path, size: int) -> Null:
        return Null(size)

    def reopen_read_only(self, storage: imago.Storage) -> Null:
        return Null.open_sync(StorageOpenOptions(driver="null", driver_options={"size": storage.size}))


def test_open_and_create_by_options() -> None:
    opened = Null.open_sync(StorageOpenOptions(driver="null", driver_options={"size": 4096}))
    assert opened.size == 4096
    assert not opened.writable
    assert Null.open_sync(StorageOpenOptions(driver="null")).size == 0
    created = Null.create_sync(StorageCreateOptions(driver="null", size=1 << 40))
    assert created.size == 1 << 40
    assert created.writable


def test_registry_opens_null_by_name() -> None:
    assert imago.storage_driver("null") is Null


@pytest.mark.parametrize("size", [-1, 1.5, "10", True])
def test_bad_size(size: object) -> None:
    with pytest.raises(InvalidOptionError, match="size"):
        Null(size)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="size"):
        Null.open_sync(StorageOpenOptions(driver="null", driver_options={"size": size}))


def test_raw_over_null_huge_disk() -> None:
    image = SyncFormatAccess(Raw.builder(Null(1 << 50)).write(True).open_sync(imago.DenyImplicitOpenGate()))
    assert image.size == 1 << 50
    image.write(b"dropped", (1 << 50) - 7)
    buf = bytearray(b"\xff" * 7)
    image.read(buf, (1 << 50) - 7)
    assert buf == bytes(7)
    mapping, length = image.get_mapping(1 << 49, 1 << 20)
    assert isinstance(mapping, imago.Mapping.Raw)
    assert mapping.offset == 1 << 49
    assert length == 1 << 20
    image.resize(1 << 20, PreallocateMode.FULL, shrink=True)
    assert image.size == 1 << 20
    image.close()


def test_repr() -> None:
    assert repr(Null(5)) == "<Null size=5>"
    runtime.run_sync(Null(5).close())
