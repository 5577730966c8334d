"""Mappings: where the data of a guest range lives.

A format driver answers ``get_mapping`` with a :class:`ShallowMapping` of its own layer; the
engine (:class:`~imago.FormatAccess`) resolves ``Indirect`` ones through backing layers into a
:class:`Mapping`. Each variant is a frozen record (:class:`imago._record.Record`), reachable as an attribute of its base
(``ShallowMapping.Raw``) and under its own module-level name (``ShallowRaw``), so both
``isinstance`` and ``match`` work::

    match mapping:
        case Mapping.Raw(storage=storage, offset=offset): ...
        case Mapping.Zero(): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .._record import Record, init

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


class ShallowMapping(Record):
    """Base of the mappings a format driver reports for its own layer."""

    __slots__ = ()

    Raw: ClassVar[type[ShallowRaw]]
    Indirect: ClassVar[type[ShallowIndirect]]
    Zero: ClassVar[type[ShallowZero]]
    Eof: ClassVar[type[ShallowEof]]
    Special: ClassVar[type[ShallowSpecial]]


class ShallowRaw(ShallowMapping):
    """Data lives in *storage* at *offset*; *writable* says it may be written in place."""

    __slots__ = ("offset", "storage", "writable")

    storage: Storage
    offset: int
    writable: bool

    def __init__(self, storage: Storage, offset: int, writable: bool) -> None:
        init(self, "storage", storage)
        init(self, "offset", offset)
        init(self, "writable", writable)


class ShallowIndirect(ShallowMapping):
    """Data comes from another layer (a backing image) at *offset* of that layer."""

    __slots__ = ("layer", "offset", "writable")

    layer: FormatAccess
    offset: int
    writable: bool

    def __init__(self, layer: FormatAccess, offset: int, writable: bool = False) -> None:
        init(self, "layer", layer)
        init(self, "offset", offset)
        init(self, "writable", writable)


class ShallowZero(ShallowMapping):
    """Reads as zero; *explicit* is true when the image records zero, false when unallocated.

    Where the range keeps host space of its own (a zeroed cluster that stays allocated), *storage*
    and *offset* say where (as ``qemu-img map`` shows them); ``None`` otherwise.
    """

    __slots__ = ("explicit", "offset", "storage")

    explicit: bool
    storage: Storage | None
    offset: int | None

    def __init__(self, explicit: bool, storage: Storage | None = None, offset: int | None = None) -> None:
        init(self, "explicit", explicit)
        init(self, "storage", storage)
        init(self, "offset", offset)


class ShallowEof(ShallowMapping):
    """Past the end of the layer; reads as zero."""

    __slots__ = ()


class ShallowSpecial(ShallowMapping):
    """Data needs the driver's own handling (compressed clusters); *offset* is the guest offset."""

    __slots__ = ("offset",)

    offset: int

    def __init__(self, offset: int) -> None:
        init(self, "offset", offset)


ShallowMapping.Raw = ShallowRaw
ShallowMapping.Indirect = ShallowIndirect
ShallowMapping.Zero = ShallowZero
ShallowMapping.Eof = ShallowEof
ShallowMapping.Special = ShallowSpecial


class Mapping(Record):
    """Base of the mappings :meth:`FormatAccess.get_mapping` reports, resolved through all layers."""

    __slots__ = ()

    Raw: ClassVar[type[MappingRaw]]
    Zero: ClassVar[type[MappingZero]]
    Eof: ClassVar[type[MappingEof]]
    Special: ClassVar[type[MappingSpecial]]


class MappingRaw(Mapping):
    """Data lives in *storage* at *offset*; *writable* says it may be written in place."""

    __slots__ = ("offset", "storage", "writable")

    storage: Storage
    offset: int
    writable: bool

    def __init__(self, storage: Storage, offset: int, writable: bool) -> None:
        init(self, "storage", storage)
        init(self, "offset", offset)
        init(self, "writable", writable)


class MappingZero(Mapping):
    """Reads as zero; *explicit* is true when some layer records zero, false when unallocated."""

    __slots__ = ("explicit",)

    explicit: bool

    def __init__(self, explicit: bool) -> None:
        init(self, "explicit", explicit)


class MappingEof(Mapping):
    """Past the end of the disk."""

    __slots__ = ()


class MappingSpecial(Mapping):
    """Data needs the format driver of *layer* to read it; *offset* is a guest offset in that layer."""

    __slots__ = ("layer", "offset")

    layer: FormatAccess
    offset: int

    def __init__(self, layer: FormatAccess, offset: int) -> None:
        init(self, "layer", layer)
        init(self, "offset", offset)


Mapping.Raw = MappingRaw
Mapping.Zero = MappingZero
Mapping.Eof = MappingEof
Mapping.Special = MappingSpecial
