"""Block status of a served disk: ``base:allocation`` and ``qemu:allocation-depth`` extents.

Both come from one walk down the backing chain, layer by layer on
:meth:`imago.FormatAccess.get_shallow_mapping`, as ``qemu-img map`` walks it and as QEMU asks
each image of a chain: the layer that answers gives the depth (1 for the top image, 0 where no
layer allocates the range), and how it answers gives the allocation flags (no data: ``HOLE``;
reads as zero: ``ZERO``). Where a layer's disk is its file as it is (raw), the file's holes read
as zero and are not data, as QEMU reports them.
"""

from __future__ import annotations

from imago import FormatAccess, ShallowEof, ShallowIndirect, ShallowRaw, ShallowSpecial, ShallowZero

from ..constants import StateFlag

__all__ = ["Status", "chain_status", "descriptors"]

_HOLE = int(StateFlag.HOLE)
_ZERO = int(StateFlag.ZERO)
#: Each descriptor's length is a 32-bit field.
_MAX_DESCRIPTOR = 0xFFFFFFFF


class Status:
    """One run of the walk: *length* bytes with the same allocation *flags* and *depth*."""

    __slots__ = ("depth", "flags", "length")

    def __init__(self, length: int, flags: int, depth: int) -> None:
        self.length = length
        self.flags = flags
        self.depth = depth


async def _status_at(top: FormatAccess, offset: int, length: int) -> Status:
    """The status of the run at *offset* of *top* (at most *length* bytes)."""
    layer, depth, position = top, 1, offset
    while True:
        mapping, mapped = await layer.get_shallow_mapping(position, length)
        length = min(length, mapped)
        kind = type(mapping)
        if kind is ShallowIndirect:
            assert isinstance(mapping, ShallowIndirect)
            below = mapping.layer
            if mapping.offset >= below.size:
                # Past a shorter backing file's end: zeroes, allocated (as QEMU counts them) in
                # that backing layer.
                return Status(length, _HOLE | _ZERO, depth + 1)
            length = min(length, below.size - mapping.offset)
            layer, depth, position = below, depth + 1, mapping.offset
            continue
        if kind is ShallowRaw:
            assert isinstance(mapping, ShallowRaw)
            storage = layer.driver.storage
            if mapping.storage is storage and mapping.offset == position and type(layer.driver).identity_mapped:
                is_data, run = await storage.data_extent(position, length)
                return Status(min(length, max(1, run)), 0 if is_data else _HOLE | _ZERO, depth)
            return Status(length, 0, depth)
        if kind is ShallowZero:
            assert isinstance(mapping, ShallowZero)
            return Status(length, _HOLE | _ZERO, depth if mapping.explicit else 0)
        if kind is ShallowSpecial:
            return Status(length, 0, depth)
        assert kind is ShallowEof
        return Status(length, _HOLE | _ZERO, 0)


async def chain_status(top: FormatAccess, offset: int, length: int, *, max_runs: int) -> list[Status]:
    """The runs of ``[offset, offset + length)``, at most *max_runs* of them (the rest left out)."""
    runs: list[Status] = []
    end = offset + length
    position = offset
    while position < end and len(runs) < max_runs:
        status = await _status_at(top, position, end - position)
        runs.append(status)
        position += status.length
    return runs


def descriptors(runs: list[Status], *, depth: bool, one: bool) -> list[tuple[int, int]]:
    """The (length, value) descriptors of one context: adjacent runs with one value merged.

    *depth* selects ``qemu:allocation-depth`` values, else ``base:allocation`` flags; *one*
    (``REQ_ONE``) keeps only the first descriptor.
    """
    result: list[tuple[int, int]] = []
    for run in runs:
        value = run.depth if depth else run.flags
        if result and result[-1][1] == value and result[-1][0] + run.length <= _MAX_DESCRIPTOR:
            result[-1] = (result[-1][0] + run.length, value)
            continue
        if one and result:
            break
        result.append((run.length, value))
    return result[:1] if one else result
