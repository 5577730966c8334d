"""``qemu-img amend -o`` for qcow2: changing creation options of an existing image.

Every option is parsed and every rule checked before the first write (QEMU checks some only
half-way through); then the changes run in QEMU's order: upgrade to compat 1.1, the external
data file's name and raw flag, lazy refcounts, the disk size, and the downgrade to compat 0.10
last (so that features it cannot keep were removed before). Each step leaves a consistent
image: header changes are single writes (in place, or the whole header cluster through
:func:`~imago_qcow2.header_rewrite.write_header`), data changes go through the driver.

Options that only make sense when creating an image (``cluster_size``, ``extended_l2``,
``compression_type``, ``preallocation``, encryption) are refused, naming the option, and so is
a change of the backing file (QEMU 7.2 refuses it too: ``qemu-img rebase`` changes it).
A new ``refcount_bits`` rebuilds the refcount structure (refused when a refcount does not fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imago import (
    InvalidOptionError,
    PreallocateMode,
    Record,
    ShallowRaw,
    ShallowSpecial,
    ShallowZero,
    Storage,
    StorageOpenOptions,
    UnsupportedFeatureError,
    io_buffers,
)

from .header_rewrite import write_header
from .layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
    MAX_L1_BYTES,
    MAX_NAME_BYTES,
)
from .tables import OFLAG_COPIED, OFLAG_ZERO

# Check, repair and the refcount rebuild are imported by the amendments that use them: the
# driver imports this module for AMEND_OPTION_NAMES, on every open.
if TYPE_CHECKING:
    from imago import FormatDriver

    from .driver import Qcow2
    from .refcount_array import RefcountArray
    from .state import Qcow2State

__all__ = ["AMEND_OPTION_NAMES", "amend_image"]

#: Sets a field of a frozen record, once, in its ``__init__``.
_set = object.__setattr__

#: The options qemu-img 7.2 lets ``amend`` change on a qcow2 image.
AMEND_OPTION_NAMES: tuple[str, ...] = (
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
    "size",
)

#: Creation options amend cannot change (QEMU: "only supported for image creation").
_CREATION_ONLY = ("cluster_size", "extended_l2", "compression_type", "preallocation", "encryption", "encrypt.format")
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
# How much of the disk one mapping request may cover while looking for zero clusters.
_STEP = 1 << 40


class _Plan(Record):
    """What the amend changes, every value checked."""

    __slots__ = ("data_file", "data_file_raw", "lazy_refcounts", "refcount_bits", "size", "version")

    version: int
    size: int | None
    lazy_refcounts: bool
    refcount_bits: int
    data_file: str | None
    data_file_raw: bool

    def __init__(
        self,
        version: int,
        size: int | None,
        lazy_refcounts: bool,
        refcount_bits: int,
        data_file: str | None,
        data_file_raw: bool,
    ) -> None:
        _set(self, "version", version)
        _set(self, "size", size)
        _set(self, "lazy_refcounts", lazy_refcounts)
        _set(self, "refcount_bits", refcount_bits)
        _set(self, "data_file", data_file)
        _set(self, "data_file_raw", data_file_raw)


async def amend_image(driver: Qcow2, state: Qcow2State, options: dict[str, Any], *, force: bool = False) -> None:
    """Change *options* of the open image (qemu-img's names; values as strings or typed).

    Raises :class:`~imago.InvalidOptionError` naming the option (nothing written) for unknown,
    creation-only or invalid options and for changes QEMU refuses; *force* is accepted for
    qemu-img's ``--force`` (no qcow2 option needs it).
    """
    plan = _plan(state, options)
    header = state.header
    if plan.version < header.version:
        await _check_downgrade(driver, state, plan)
    await state.flush()
    order = plan.refcount_bits.bit_length() - 1
    if order != header.refcount_order:
        await _counts(state, order)  # refuses refcounts the new width cannot hold, before any change

    if plan.version > header.version:
        await _upgrade(state)
    if order != header.refcount_order:
        await _change_refcount_order(state, order)
    await _data_file(state, plan)
    await _lazy_refcounts(state, plan)
    if plan.size is not None and plan.size != state.size:
        await driver.resize(plan.size)
        await state.flush()
    if plan.version < header.version:
        await _downgrade(driver, state)


# --- checking ------------------------------------------------------------------------------------


def _plan(state: Qcow2State, options: dict[str, Any]) -> _Plan:
    header = state.header
    for name in options:
        if name in _CREATION_ONLY or name.startswith("encrypt."):
            raise InvalidOptionError(name, "this option is only supported for image creation")
        if name not in AMEND_OPTION_NAMES:
            raise InvalidOptionError(name, f"not an amend option of qcow2 (options: {', '.join(AMEND_OPTION_NAMES)})")
    version = header.version
    if "compat" in options:
        compat = options["compat"]
        if compat not in _COMPAT:
            raise InvalidOptionError("compat", f"Unknown compatibility level {compat}")
        version = _COMPAT[compat]
    size = _size(options["size"]) if "size" in options else None
    if size is not None:
        _check_size(state, size)
    lazy = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    if "lazy_refcounts" in options:
        lazy = _flag("lazy_refcounts", options["lazy_refcounts"])
    refcount_bits = header.refcount_bits
    if "refcount_bits" in options:
        refcount_bits = _number("refcount_bits", options["refcount_bits"])
        if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise InvalidOptionError(
                "refcount_bits", "Refcount width must be a power of two and may not exceed 64 bits"
            )
    data_file = header.data_file
    if "data_file" in options:
        name = options["data_file"]
        if not isinstance(name, str) or len(name.encode()) > MAX_NAME_BYTES or "\0" in name:
            raise InvalidOptionError("data_file", f"invalid data file name {name!r}")
        if not header.has_data_file:
            raise InvalidOptionError("data_file", "data-file can only be set for images that use an external data file")
        data_file = name or None
    raw = header.data_file_raw
    if "data_file_raw" in options:
        wanted = _flag("data_file_raw", options["data_file_raw"])
        if wanted and not raw:
            raise InvalidOptionError("data_file_raw", "data-file-raw cannot be set on existing images")
        raw = wanted
    if "backing_file" in options or "backing_fmt" in options:
        same = (
            options.get("backing_file") == header.backing_file and options.get("backing_fmt") == header.backing_format
        )
        if not same:
            raise InvalidOptionError(
                "backing_file", "Cannot amend the backing file (use 'imago rebase' or 'qemu-img rebase' instead)"
            )
    if version < 3 and lazy:
        raise InvalidOptionError(
            "lazy_refcounts", "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1)"
        )
    if version < 3 and refcount_bits != 16:
        raise InvalidOptionError(
            "refcount_bits" if refcount_bits != header.refcount_bits else "compat",
            "compat=0.10 requires refcount_bits=16",
        )
    return _Plan(version, size, lazy, refcount_bits, data_file, raw)


def _check_size(state: Qcow2State, size: int) -> None:
    """The driver's resize rules, checked before anything is written."""
    if size % 512:
        raise InvalidOptionError("size", "The new size must be a multiple of 512")
    if state.header.l1_entries_needed(size) * 8 > MAX_L1_BYTES:
        raise InvalidOptionError("size", f"{size} bytes is too large for this cluster size")
    if size < state.size:
        cut = [snapshot.name or snapshot.id for snapshot in state.snapshots if snapshot.disk_size > size]
        if cut:
            raise UnsupportedFeatureError(
                f"shrinking below the size of internal snapshots ({', '.join(cut)})", state.filename
            )


async def _check_downgrade(driver: Qcow2, state: Qcow2State, plan: _Plan) -> None:
    """QEMU's rules for compat=0.10, checked before anything is written."""
    header = state.header
    if header.has_data_file:
        raise InvalidOptionError("compat", "Cannot downgrade an image with a data file")
    size = plan.size if plan.size is not None else state.size
    for snapshot in state.snapshots:
        if snapshot.vm_state_size > 0xFFFFFFFF or snapshot.disk_size != size:
            raise InvalidOptionError("compat", "Internal snapshots prevent downgrade of image")
    kept = header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION)
    if kept:
        raise InvalidOptionError("compat", f"Cannot downgrade an image with incompatible features {kept:#x} set")
    if header.compression_type != 0 and await _has_compressed_clusters(driver):
        raise InvalidOptionError(
            "compat", "Cannot downgrade an image with zstd compression type and existing compressed clusters"
        )
    for snapshot in state.snapshots:
        view = await driver.read_snapshot(snapshot.id)
        try:
            if await _zero_ranges(view):
                raise UnsupportedFeatureError(
                    f"downgrading to compat=0.10 while internal snapshot {snapshot.name!r} holds zero clusters",
                    state.filename,
                )
        finally:
            await view.close()


# --- changing ------------------------------------------------------------------------------------


async def _upgrade(state: Qcow2State) -> None:
    """compat=1.1: the version 3 header (QEMU's length, the feature table)."""
    if any(len(snapshot.extra_data) < 16 for snapshot in state.snapshots):
        # Version 3 needs the disk size and the 64-bit VM state size in every snapshot entry.
        from .check import reload_state, rewrite_snapshot_table

        async with state.lock:
            await state.write_back()
            await rewrite_snapshot_table(state.storage, state.snapshots)
            await reload_state(state)
    await write_header(state, state.header.__replace__(version=3), option="compat")


async def _counts(state: Qcow2State, order: int) -> RefcountArray:
    """Every cluster's refcount as stored, in an array of the new width (the image written back).

    Raises :class:`~imago.InvalidOptionError` naming ``refcount_bits`` when a refcount does not
    fit the new width, as QEMU refuses it.
    """
    from .refcount_array import RefcountArray
    from .repair import DiskRefcounts

    header = state.header
    disk = await DiskRefcounts.load(state.storage, header)
    counts = RefcountArray(-(-state.storage.size >> header.cluster_bits), order)
    for index in range(len(disk.table)):
        values = await disk.block(index)
        if values is None:
            continue
        first = index << disk.block_bits
        for position, value in enumerate(values):
            if not value:
                continue
            if value > counts.maximum:
                raise InvalidOptionError(
                    "refcount_bits",
                    f"Cannot decrease refcount entry width to {1 << order} bits: Cluster at offset "
                    f"{(first + position) << header.cluster_bits:#x} has a refcount of {value}",
                )
            counts.grow(first + position + 1)
            counts.values[first + position] = value
    return counts


async def _change_refcount_order(state: Qcow2State, order: int) -> None:
    """New refcount blocks and table of the new width, switched to in one header write.

    The new structure goes to clusters the old one counts free (the repair's rebuild writes it
    and flushes); the header then names the new table and width in one write of its cluster,
    and only afterwards are the old table and blocks freed: a crash leaves either structure in
    charge, and at worst leaked clusters.
    """
    from .check import reload_state
    from .repair import REFT_OFFSET_MASK, DiskRefcounts, MetadataGuard, rebuild_refcount_structure

    async with state.lock:
        await state.write_back()
        header = state.header
        counts = await _counts(state, order)
        old = await DiskRefcounts.load(state.storage, header)
        old_clusters = [entry >> header.cluster_bits for entry in (e & REFT_OFFSET_MASK for e in old.table) if entry]
        first = header.refcount_table_offset >> header.cluster_bits
        old_clusters += range(first, first + header.refcount_table_clusters)
        guard = MetadataGuard(state.storage, header, state.snapshots, state.l1, old.table)
        deferred = _HeaderDeferred(state.storage, header.header_length)
        new = await rebuild_refcount_structure(deferred, counts, guard, cluster_bits=header.cluster_bits)
    table_clusters = -(-len(new.table) * 8 >> header.cluster_bits)
    await write_header(
        state,
        state.header.__replace__(
            refcount_table_offset=new.table_offset,
            refcount_table_clusters=table_clusters,
            refcount_order=order,
        ),
        option="refcount_bits",
    )
    async with state.lock:
        await reload_state(state)
        await state.refcounts.apply({cluster: -1 for cluster in old_clusters})
        await state.write_back()


class _HeaderDeferred(Storage):
    """The image file, with writes into the header held back (the caller writes the header itself)."""

    name = "header-deferred"

    def __init__(self, storage: Storage, header_length: int) -> None:
        self._storage = storage
        self._header_length = header_length

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> _HeaderDeferred:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self._storage.size

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        await self._storage.readv(bufs, offset)

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        if offset >= self._header_length:
            await self._storage.writev(bufs, offset)

    async def flush(self) -> None:
        await self._storage.flush()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        await self._storage.resize(new_size, prealloc)


async def _data_file(state: Qcow2State, plan: _Plan) -> None:
    header = state.header
    autoclear = header.autoclear_features & ~AUTOCLEAR_DATA_FILE_RAW
    autoclear |= AUTOCLEAR_DATA_FILE_RAW if plan.data_file_raw else 0
    if plan.data_file != header.data_file:
        await write_header(
            state, header.__replace__(data_file=plan.data_file, autoclear_features=autoclear), option="data_file"
        )
    elif autoclear != header.autoclear_features:
        await state.update_header(autoclear_features=autoclear)


async def _lazy_refcounts(state: Qcow2State, plan: _Plan) -> None:
    header = state.header
    if plan.lazy_refcounts == bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS):
        return
    if plan.lazy_refcounts:
        # The rest of this session keeps writing refcounts eagerly: safe either way.
        await state.update_header(compatible_features=header.compatible_features | COMPAT_LAZY_REFCOUNTS)
        return
    await state.flush()  # the refcounts on disk are exact and the image clean before the bit goes
    await state.update_header(compatible_features=header.compatible_features & ~COMPAT_LAZY_REFCOUNTS)
    if state.lazy:
        state.lazy = False
        state.tables.depends_on(state.refcounts.blocks)


async def _downgrade(driver: Qcow2, state: Qcow2State) -> None:
    """compat=0.10: zero clusters turned into what version 2 has, then the version 2 header.

    As QEMU does: a zero cluster keeping a host cluster gets zero bytes written there (so do
    all zero clusters over a backing file, which would show through otherwise); the others
    become unallocated, which reads as zero without a backing file.
    """
    backed = state.header.backing_file is not None
    for offset, length in await _zero_ranges(driver):
        for start, end, as_data in await _zero_runs(state, offset, offset + length, backed):
            while not as_data and start < end:
                _first, done = await driver.discard_to_backing(start, end - start)
                if done <= 0:
                    break
                start += done
            while start < end:
                stop = min(end, ((start >> state.cluster_bits) + 1) << state.cluster_bits)
                if not await _zero_in_place(driver, state, start):
                    await _write_zeroes_as_data(driver, start, stop - start)
                start = stop
    await state.flush()
    header = state.header
    await write_header(
        state,
        header.__replace__(
            version=2,
            compatible_features=0,
            autoclear_features=0,
            incompatible_features=0,
            compression_type=0,
        ),
        option="compat",
    )


async def _zero_runs(state: Qcow2State, start: int, end: int, backed: bool) -> list[tuple[int, int, bool]]:
    """``(start, end, as_data)`` runs of a zero range: whether its clusters need zero data written."""
    runs: list[tuple[int, int, bool]] = []
    cluster_bits = state.cluster_bits
    offset = start
    while offset < end:
        stop = min(end, ((offset >> cluster_bits) + 1) << cluster_bits)
        table = await state.table(offset)
        as_data = backed or (table is not None and bool(table.hosts[(offset >> cluster_bits) & state.l2_mask]))
        if runs and runs[-1][1] == offset and runs[-1][2] == as_data:
            runs[-1] = (runs[-1][0], stop, as_data)
        else:
            runs.append((offset, stop, as_data))
        offset = stop
    return runs


async def _zero_in_place(driver: Qcow2, state: Qcow2State, offset: int) -> bool:
    """Turn the allocated zero cluster at *offset* into a data cluster of zero bytes where it is.

    Only a cluster (and L2 table) that is the image's alone; ``False`` leaves the others to
    :func:`_write_zeroes_as_data`. The zero bytes reach the disk before the entry changes.
    """
    async with state.lock:
        l1_index = offset >> state.table_shift
        if not state.l1_copied[l1_index]:
            return False
        table = await state.table(offset)
        if table is None:
            return False
        index = (offset >> state.cluster_bits) & state.l2_mask
        entry, host = table.entries[index], table.hosts[index]
        if not host or not entry & OFLAG_COPIED or not entry & OFLAG_ZERO:
            return False
        data_storage = state.data_storage
        # As QEMU does: zeroes written the cheap way (the file system keeps the cluster allocated).
        await data_storage.write_zeroes(host, state.cluster_size)
        await data_storage.flush()
        state.entries.set(table, index, host | OFLAG_COPIED)
        state.tables.mark_dirty(table.offset)
    driver.mappings_changed()
    return True


async def _write_zeroes_as_data(driver: Qcow2, offset: int, length: int) -> None:
    """Allocate data clusters for a zero range and fill them with zero bytes."""
    end = offset + length
    while offset < end:
        mapping, done = await driver.ensure_data_mapping(offset, end - offset, True)
        assert isinstance(mapping, ShallowRaw)
        chunk = min(done, 1 << 20)
        buffer = io_buffers.aligned_buffer(chunk, mapping.storage.mem_align)
        await mapping.storage.writev([memoryview(buffer)], mapping.offset)
        offset += chunk


# --- reading ---------------------------------------------------------------------------------------


async def _zero_ranges(driver: FormatDriver) -> list[tuple[int, int]]:
    """The ranges the image records as zero (zero clusters), not those merely unallocated."""
    ranges: list[tuple[int, int]] = []
    offset, size = 0, driver.size
    while offset < size:
        mapping, length = await driver.get_mapping(offset, min(_STEP, size - offset))
        if length <= 0:
            break
        if isinstance(mapping, ShallowZero) and mapping.explicit:
            if ranges and sum(ranges[-1]) == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((offset, length))
        offset += length
    return ranges


async def _has_compressed_clusters(driver: Qcow2) -> bool:
    offset, size = 0, driver.size
    while offset < size:
        mapping, length = await driver.get_mapping(offset, min(_STEP, size - offset))
        if length <= 0:
            break
        if isinstance(mapping, ShallowSpecial):
            return True
        offset += length
    return False


# --- values ------------------------------------------------------------------------------------------


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
        return value.lower() in _TRUE
    raise InvalidOptionError(option, f"Parameter '{option}' expects 'on' or 'off'")


def _number(option: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise InvalidOptionError(option, f"Parameter '{option}' expects a number")


def _size(value: Any) -> int | None:
    size = _number("size", value)
    if size < 0:
        raise InvalidOptionError("size", f"the disk size must not be negative, got {size}")
    return size or None  # as in QEMU, size=0 changes nothing
