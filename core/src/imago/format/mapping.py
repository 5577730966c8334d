"""Mappings: where the data of a guest range lives.

A format driver answers ``get_mapping`` with a :class:`ShallowMapping` of its own layer; the
engine (:class:`~imago.FormatAccess`) resolves ``Indirect`` ones through backing layers into a
:class:`Mapping`. Each variant is a frozen attrs class, reachable as an attribute of its base
(``ShallowMapping.Raw``) and under its own module-level name (``ShallowRaw``), so both
``isinstance`` and ``match`` work::

    match mapping:
        case Mapping.Raw(storage=storage, offset=offset): ...
        case Mapping.Zero(): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

if TYPE_CHECKING:
    from ..storage import Storage
    from .access import FormatAccess

__all__ = [
    "Mapping",
    "MappingEof",
    "MappingRaw",
    "MappingSpecial",
    "MappingZero",
    "ShallowEof",
    "ShallowIndirect",
    "ShallowMapping",
    "ShallowRaw",
    "ShallowSpecial",
    "ShallowZero",
]


@attrs.frozen
class ShallowMapping:
    """Base of the mappings a format driver reports for its own layer."""

    Raw: ClassVar[type[ShallowRaw]]
    Indirect: ClassVar[type[ShallowIndirect]]
    Zero: ClassVar[type[ShallowZero]]
    Eof: ClassVar[type[ShallowEof]]
    Special: ClassVar[type[ShallowSpecial]]


@attrs.frozen
class ShallowRaw(ShallowMapping):
    """Data lives in *storage* at *offset*; *writable* says it may be written in place."""

    storage: Storage
    offset: int
    writable: bool


@attrs.frozen
class ShallowIndirect(ShallowMapping):
    """Data comes from another layer (a backing image) at *offset* of that layer."""

    layer: FormatAccess
    offset: int
    writable: bool = False


@attrs.frozen
class ShallowZero(ShallowMapping):
    """Reads as zero; *explicit* is true when the image records zero, false when unallocated.

    Where the range keeps host space of its own (a zeroed cluster that stays allocated), *storage*
    and *offset* say where (as ``qemu-img map`` shows them); ``None`` otherwise.
    """

    explicit: bool
    storage: Storage | None = None
    offset: int | None = None


@attrs.frozen
class ShallowEof(ShallowMapping):
    """Past the end of the layer; reads as zero."""


@attrs.frozen
class ShallowSpecial(ShallowMapping):
    """Data needs the driver's own handling (compressed clusters); *offset* is the guest offset."""

    offset: int


ShallowMapping.Raw = ShallowRaw
ShallowMapping.Indirect = ShallowIndirect
ShallowMapping.Zero = ShallowZero
ShallowMapping.Eof = ShallowEof
ShallowMapping.Special = ShallowSpecial


@attrs.frozen
class Mapping:
    """Base of the mappings :meth:`FormatAccess.get_mapping` reports, resolved through all layers."""

    Raw: ClassVar[type[MappingRaw]]
    Zero: ClassVar[type[MappingZero]]
    Eof: ClassVar[type[MappingEof]]
    Special: ClassVar[type[MappingSpecial]]


@attrs.frozen
class MappingRaw(Mapping):
    """Data lives in *storage* at *offset*; *writable* says it may be written in place."""

    storage: Storage
    offset: int
    writable: bool


@attrs.frozen
class MappingZero(Mapping):
    """Reads as zero; *explicit* is true when some layer records zero, false when unallocated."""

    explicit: bool


@attrs.frozen
class MappingEof(Mapping):
    """Past the end of the disk."""


@attrs.frozen
class MappingSpecial(Mapping):
    """Data needs the format driver of *layer* to read it; *offset* is a guest offset in that layer."""

    layer: FormatAccess
    offset: int


Mapping.Raw = MappingRaw
Mapping.Zero = MappingZero
Mapping.Eof = MappingEof
Mapping.Special = MappingSpecial
