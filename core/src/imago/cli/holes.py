"""Holes under raw layers: what QEMU learns by asking the file beneath a raw image.

A format whose disk is its storage's bytes as they are (``FormatDriver.identity_mapped``: raw)
has the storage's holes as its own: a sparse raw file's holes read as zeroes and hold nothing.
qemu-img asks the file for them (``SEEK_DATA``/``SEEK_HOLE``), so its ``map`` reports them as
zero, ``convert`` skips them, ``measure`` does not count them. :class:`Holes` gives the
subcommands the same answer through :meth:`imago.Storage.data_extent`, for the raw mappings of
an image's chain that point into such a layer's storage; mappings of formats that allocate
(qcow2 data clusters) are data, as in QEMU.
"""

from __future__ import annotations

from ..format.access import FormatAccess
from ..format.mapping import MappingRaw, ShallowRaw
from ..storage import Storage

__all__ = ["Holes"]


class Holes:
    """The storages of the identity-mapped layers of *top*'s chain, asked for their holes."""

    def __init__(self, top: FormatAccess) -> None:
        self._storages: dict[int, Storage] = {}
        layer: FormatAccess | None = top
        while layer is not None:
            driver = layer.driver
            if type(driver).identity_mapped:
                self._storages[id(driver.storage)] = driver.storage
            layer = driver.backing

    async def data_run(self, mapping: MappingRaw | ShallowRaw, length: int) -> tuple[bool, int]:
        """``(is_data, run)`` for *length* bytes of a raw mapping: a hole of a raw layer's file is not data."""
        if length <= 0 or id(mapping.storage) not in self._storages:
            return True, length
        return await mapping.storage.data_extent(mapping.offset, length)
