"""Opening a qcow2 image: the header read and validated, the files it names opened through the gate.

The backing file and the external data file the header names are implicit opens: they go
through the gate, unless the builder gives them (or ``None``). Opening for writing refuses
what this driver cannot write safely (a dirty or corrupt image, metadata in clusters counted
free), and declares the autoclear features it does not maintain invalid, as the
specification asks of any writer.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs

from imago import (
    CorruptImageError,
    DirtyImageError,
    FormatAccess,
    ImplicitOpenGate,
    InvalidOptionError,
    MissingStorageError,
    ReadOnlyError,
    Storage,
    StorageOpenOptions,
    check_local_file_name,
    format_driver,
    probe,
)

from .header import Header, header_cluster_size, parse_header
from .layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    HEADER_PROBE_BYTES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    field_offset,
)
from .references import References
from .snapshot_table import read_snapshot_table
from .state import Qcow2State
from .tables import read_l1

if TYPE_CHECKING:
    from .driver import Qcow2, Qcow2Builder

__all__ = ["NOT_GIVEN", "NotGiven", "open_image"]


class NotGiven(enum.Enum):
    """A builder option that was not set: the image's own choice applies."""

    NOT_GIVEN = "not given"


#: The value of a builder option that was not set.
NOT_GIVEN = NotGiven.NOT_GIVEN


async def open_image(driver_class: type[Qcow2], builder: Qcow2Builder, gate: ImplicitOpenGate) -> Qcow2:
    """Open and validate the image; open its data file and backing chain as *builder* says.

    What was opened here is closed again when opening fails.
    """
    storage = await builder.open_storage(gate)
    opened: list[Storage | FormatAccess] = [storage] if builder.path is not None else []
    try:
        return await _open(driver_class, builder, gate, storage, opened)
    except BaseException:
        for resource in reversed(opened):
            await resource.close()
        raise


async def _read_header(storage: Storage) -> Header:
    """The header, from the whole header cluster (or all of a shorter file)."""
    file_size = storage.size
    head = bytearray(min(HEADER_PROBE_BYTES, file_size))
    await storage.readv([memoryview(head)], 0)
    cluster_size = header_cluster_size(bytes(head))
    if cluster_size is not None:
        head = bytearray(min(cluster_size, file_size))
        await storage.readv([memoryview(head)], 0)
    return parse_header(bytes(head), file_size, storage.filename)


async def _open(
    driver_class: type[Qcow2],
    builder: Qcow2Builder,
    gate: ImplicitOpenGate,
    storage: Storage,
    opened: list[Storage | FormatAccess],
) -> Qcow2:
    filename = storage.filename
    header = await _read_header(storage)
    features_at = field_offset("incompatible_features")
    if header.incompatible_features & INCOMPAT_CORRUPT:
        if builder.writable:
            raise CorruptImageError(
                filename, features_at, "the image is marked corrupt; it cannot be opened for writing"
            )
        if not builder.allows_corrupt:
            raise CorruptImageError(
                filename,
                features_at,
                "the image is marked corrupt; open it read-only with allow_corrupt(True) to read it",
            )
    if builder.writable:
        _check_writable(storage, header)
    found_autoclear = header.autoclear_features
    if builder.writable:
        header = attrs.evolve(header, autoclear_features=found_autoclear & AUTOCLEAR_DATA_FILE_RAW)

    l1, l1_copied = await read_l1(
        storage,
        table_offset=header.l1_table_offset,
        entries=header.l1_size,
        cluster_bits=header.cluster_bits,
        filename=filename,
    )
    snapshots = await read_snapshot_table(storage, header, filename)

    data_storage = storage
    given_data_file = builder.given_data_file
    if header.has_data_file:
        data_storage = await _open_data_file(builder, gate, storage, header)
        if given_data_file is NOT_GIVEN:
            opened.append(data_storage)
    elif given_data_file is not NOT_GIVEN and given_data_file is not None:
        raise InvalidOptionError("data_file", f"{filename}: the image has no external data file")

    backing = builder.given_backing
    if backing is NOT_GIVEN:
        backing = await _open_backing(builder, gate, storage, header)
        if backing is not None:
            opened.append(backing)
    state = Qcow2State(
        storage=storage,
        header=header,
        l1=l1,
        l1_copied=l1_copied,
        data_storage=data_storage,
        backing=backing,
        snapshots=snapshots,
        writable=builder.writable,
        discard_freed=builder.discards_freed,
    )
    image = driver_class(state)
    if builder.writable:
        await References(state).scan_metadata()
        if header.autoclear_features != found_autoclear:
            # Only now that the image is accepted: features this driver does not maintain
            # are declared invalid, as the specification asks of any writer.
            await state.update_header(autoclear_features=header.autoclear_features)
    return image


def _check_writable(storage: Storage, header: Header) -> None:
    """Refuse what this driver cannot write safely."""
    filename = storage.filename
    if not storage.writable:
        raise ReadOnlyError(filename or "qcow2 image file")
    if header.incompatible_features & INCOMPAT_DIRTY:
        raise DirtyImageError(filename, "repair it (qemu-img check -r all)")


async def _open_data_file(builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, header: Header) -> Storage:
    given = builder.given_data_file
    if given is None:
        raise MissingStorageError(
            storage.filename, "data_file", "the image keeps its data in an external data file, and none was given"
        )
    if given is not NOT_GIVEN:
        return given
    if not header.data_file:
        raise CorruptImageError(
            storage.filename,
            field_offset("incompatible_features"),
            "the image needs an external data file but does not name one",
        )
    name = storage.resolve_relative_path(check_local_file_name(header.data_file))
    # The image file's storage options (direct, no_flush, driver) apply to its data file too.
    options = attrs.evolve(builder.given_storage_options, filename=name, writable=builder.writable)
    return await gate.open_storage(options)


async def _open_backing(
    builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, header: Header
) -> FormatAccess | None:
    if header.backing_file is None:
        return None
    name = storage.resolve_relative_path(check_local_file_name(header.backing_file))
    if header.backing_format is not None:
        # The recorded format is used as it is: never probed.
        driver = format_driver(header.backing_format)
    else:
        probe_storage = await gate.open_storage(StorageOpenOptions(filename=name))
        try:
            driver = await probe(probe_storage)
        finally:
            await probe_storage.close()
    child = driver.builder_path(name).below(builder)
    return FormatAccess(await gate.open_format(child))
