"""Opening a qcow2 image: the header read and validated, the files it names opened through the gate.

The backing file and the external data file the header names are implicit opens: they go
through the gate, unless the builder gives them (or ``None``). Opening for writing refuses
an image marked corrupt, repairs a dirty one first (as QEMU does: ``check -r all``), leaves
one whose metadata lies in clusters counted free open for a repair only, and declares the
autoclear features it does not maintain invalid, as the specification asks of any writer.
"""

from __future__ import annotations

import enum
from array import array
from typing import TYPE_CHECKING

from imago import (
    CorruptImageError,
    DirtyImageError,
    FormatAccess,
    ImplicitOpenGate,
    InvalidOptionError,
    MissingStorageError,
    ReadOnlyError,
    RepairMode,
    Storage,
    StorageOpenOptions,
    UnopenedFile,
    check_local_file_name,
    naming_the_referrer,
    open_named_image,
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
from .tables import parse_l1

if TYPE_CHECKING:
    from .driver import Qcow2, Qcow2Builder

__all__ = ["NOT_GIVEN", "NotGiven", "open_image"]


class NotGiven(enum.Enum):
    """A builder option that was not set: the image's own choice applies."""

    NOT_GIVEN = "not given"


#: The value of a builder option that was not set.
NOT_GIVEN = NotGiven.NOT_GIVEN
# What one parsed snapshot table entry is charged to the memory budget (its record and strings).
_SNAPSHOT_BYTES = 512


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
    corrupt_damage: CorruptImageError | None = None
    allows_corrupt = builder.allows_corrupt or builder.checking
    if header.incompatible_features & INCOMPAT_CORRUPT:
        if builder.writable and not allows_corrupt:
            raise CorruptImageError(
                filename,
                features_at,
                "the image is marked corrupt; it cannot be opened for writing (allow_corrupt(True) opens it "
                "for a repair only)",
            )
        if builder.writable:
            # As qemu-img check -r opens it: a repair may clear the bit, nothing else is written.
            corrupt_damage = CorruptImageError(
                filename, features_at, "the image is marked corrupt; repair it (check with a fix) first"
            )
        elif not allows_corrupt:
            raise CorruptImageError(
                filename,
                features_at,
                "the image is marked corrupt; open it read-only with allow_corrupt(True) to read it",
            )
    if builder.writable:
        _check_writable(storage, header)
    found_autoclear = header.autoclear_features
    if builder.writable:
        header = header.__replace__(autoclear_features=found_autoclear & AUTOCLEAR_DATA_FILE_RAW)

    budget = builder.budget
    # Held whole: the L1 table (8 bytes an entry, and its COPIED flag) and the snapshot table.
    budget.hold(filename, "its L1 table", 9 * header.l1_size)
    l1, l1_copied, l1_damage = await _read_active_l1(storage, header)
    budget.hold(filename, "its snapshot table", _SNAPSHOT_BYTES * header.nb_snapshots)
    snapshot_damage: CorruptImageError | None = None
    try:
        snapshots = await read_snapshot_table(storage, header, filename)
    except CorruptImageError as unusable:
        # A snapshot's L1 table is unusable: open for checking and repair only, as QEMU does.
        snapshots = await read_snapshot_table(storage, header, filename, check_l1=False)
        snapshot_damage = unusable

    data_storage = storage
    given_data_file = builder.given_data_file
    if header.has_data_file and given_data_file is NOT_GIVEN and builder.opens_metadata_only:
        data_storage = UnopenedFile(header.data_file, storage.filename, role="data_file", what="external data file")
    elif header.has_data_file:
        data_storage = await _open_data_file(builder, gate, storage, header)
        if given_data_file is NOT_GIVEN:
            opened.append(data_storage)
    elif given_data_file is not NOT_GIVEN and given_data_file is not None:
        raise InvalidOptionError("data_file", f"{filename}: the image has no external data file")

    backing = builder.given_backing
    if backing is NOT_GIVEN:
        backing = await _open_backing(builder, gate, storage, header) if builder.opens_backing else None
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
        budget=budget,
    )
    state.l1_damage = l1_damage
    image = driver_class(state)
    if snapshot_damage is not None:
        image.refuse_snapshot_views(snapshot_damage)
    if builder.writable:
        found = corrupt_damage or next(iter(l1_damage.values()), snapshot_damage)
        if found is None and header.incompatible_features & INCOMPAT_DIRTY:
            if builder.checking:
                # qemu-img check opens it as it is: the check reports what the crash left.
                found = CorruptImageError(
                    filename, features_at, "the image is dirty; repair it (check with a fix) first"
                )
            else:
                found = await _repair_dirty(state)
        if found is not None:
            image.refuse_writes(found)
            return image
        try:
            await References(state).scan_metadata()
        except CorruptImageError as damage:
            # Open, but only for a repair: writes would trust refcounts that are wrong.
            image.refuse_writes(damage)
            return image
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


async def _read_active_l1(
    storage: Storage, header: Header
) -> tuple[array[int], bytearray, dict[int, CorruptImageError]]:
    """The active L1 table, and its damaged entries (QEMU opens such images too).

    A damaged entry stays unusable (reading through it raises its error) but the image can
    be checked and repaired.
    """
    raw = bytearray(header.l1_size * 8)
    if raw:
        await storage.readv([memoryview(raw)], header.l1_table_offset)
    damage: dict[int, CorruptImageError] = {}
    l1, l1_copied = parse_l1(
        raw,
        table_offset=header.l1_table_offset,
        cluster_bits=header.cluster_bits,
        file_size=storage.size,
        filename=storage.filename,
        damage=damage,
    )
    for index in damage:
        l1[index] = index << 1 | 1  # (see Qcow2State.l1_damage)
    return l1, l1_copied, damage


async def _repair_dirty(state: Qcow2State) -> CorruptImageError | None:
    """A dirty image (lazy refcounts, left by a crash) is repaired before it is written to.

    As QEMU does when opening it: a check with ``-r all``, which rebuilds what the refcounts
    lack and clears the dirty bit.
    """
    from .check import check_pass, reload_state  # only for images to repair: not on every open

    repair = await check_pass(state, RepairMode.ALL)
    counts = repair.counts
    if repair.failed is not None or counts.check_errors:
        raise DirtyImageError(state.filename, "the automatic repair failed; repair it with qemu-img check -r all")
    if counts.corruptions:
        # (still dirty on disk, as QEMU leaves it)
        return CorruptImageError(
            state.filename,
            None,
            f"the automatic repair of the dirty image left {counts.corruptions} corruptions; check it (qemu-img check)",
        )
    try:
        await reload_state(state)
    except CorruptImageError as damage:
        return damage  # (what no repair fixes: the image is open for checking only)
    return None


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
    with naming_the_referrer(storage, header.data_file, "external data file"):
        name = storage.resolve_relative_path(check_local_file_name(header.data_file))
        # The image file's storage options (direct, no_flush, driver) apply to its data file too;
        # QEMU lets others write to a data file (not resize it), so imago locks it the same way.
        options = builder.given_storage_options.__replace__(filename=name, writable=builder.writable, share_write=True)
        return await gate.open_storage(options)


async def _open_backing(
    builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, header: Header
) -> FormatAccess | None:
    if header.backing_file is None:
        return None
    from imago import format_driver, probe  # the registry: imported by the first backing file, not with the driver

    with naming_the_referrer(storage, header.backing_file, "backing file"):
        if header.backing_format is not None:
            # The recorded format is used as it is: never probed.
            driver = format_driver(header.backing_format)
        else:
            # Only the header is read: no lock that could stop a writer (the real open takes them).
            name = storage.resolve_relative_path(check_local_file_name(header.backing_file))
            probe_storage = await gate.open_storage(StorageOpenOptions(filename=name, force_share=True))
            try:
                driver = await probe(probe_storage)
            finally:
                await probe_storage.close()
    # Backing files are opened read-only, locked as such unless the image is read with force_share.
    return FormatAccess(await open_named_image(builder, gate, storage, header.backing_file, driver))
