"""Creating and measuring raw images: ``Raw.create_builder(storage).size(n)...``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from imago import FormatCreateBuilder, Measurement

if TYPE_CHECKING:
    from .driver import Raw  # noqa: F401 - the builder's type parameter names it

__all__ = ["RawCreateBuilder"]

_SECTOR = 512


class RawCreateBuilder(FormatCreateBuilder["Raw"]):
    """The options of a new raw image: ``size`` and ``preallocation``."""

    def measure(self, data: Sequence[tuple[int, int]] | None) -> Measurement:
        """The file size of a raw image: the disk, in whole 512-byte sectors (``qemu-img measure -O raw``).

        Unallocated areas count too (a raw file cannot leave them out), so the required and
        fully allocated sizes are the same with or without a source.
        """
        size = -(-self.virtual_size // _SECTOR) * _SECTOR
        return Measurement(required=size, fully_allocated=size)
