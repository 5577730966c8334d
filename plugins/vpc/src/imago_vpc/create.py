"""Creating VHD images: ``Vpc.create_builder(storage)...create()``.

Options follow ``qemu-img create -f vpc -o ...`` (QEMU 7.2): ``subformat`` (``dynamic``, the
default, or ``fixed``) and ``force_size``. Without ``force_size`` the size is rounded up to
the smallest CHS geometry that holds it (as ``qemu-img`` does, so that a conversion never
truncates); with it, the size is recorded as given (creator ``qem2``, geometry 65535/16/255)
and must be a whole number of MiB for a fixed image, which Azure requires of uploaded disks.
Dynamic images get 2 MiB blocks: the footer's copy, the dynamic header at 512, the BAT at
1536, then the footer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Self

from imago import FormatCreateBuilder, InvalidOptionError, PreallocateMode, Storage

from .dynamic import new_dynamic_header
from .footer import MAX_SECTORS, NO_OFFSET, SECTOR, TYPE_DYNAMIC, TYPE_FIXED, chs_size, new_footer

if TYPE_CHECKING:
    from .driver import Vpc

__all__ = ["SUBFORMATS", "VpcCreateBuilder"]

SUBFORMATS = ("dynamic", "fixed")
BLOCK_SIZE = 2 << 20
MiB = 1 << 20
_TABLE_AT = 3 * SECTOR


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise InvalidOptionError(option, f"must be on or off, got {value!r}")


class VpcCreateBuilder(FormatCreateBuilder["Vpc"]):
    """The options of a new VHD image (``qemu-img create -f vpc -o ...``)."""

    # (No preallocation: qemu-img's vpc driver has no such option.)
    option_names: ClassVar[tuple[str, ...]] = ("size", "subformat", "force_size")
    option_aliases: ClassVar[dict[str, str]] = {}

    _O = FormatCreateBuilder.Option
    #: qemu-img's vpc creation options, in the order ``qemu-img create`` reports them.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        _O(
            "force_size",
            "bool",
            "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based "
            "calculation",
            "off",
        ),
        _O("size", "size", "Virtual disk size"),
        _O(
            "subformat",
            "str",
            "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
            choices=SUBFORMATS,
        ),
    )
    del _O

    def __init__(self, driver: type[Vpc], storage: Storage) -> None:
        super().__init__(driver, storage)
        self._subformat = "dynamic"
        self._force_size = False

    def subformat(self, name: str) -> Self:
        """``dynamic`` (the default: blocks allocated as written) or ``fixed`` (the disk, then the footer)."""
        if name not in SUBFORMATS:
            raise InvalidOptionError("subformat", f"must be one of {', '.join(SUBFORMATS)}, got {name!r}")
        self._subformat = name
        return self

    def force_size(self, enabled: bool | str) -> Self:
        """Record the size as given instead of rounding it up to a CHS geometry."""
        self._force_size = _flag("force_size", enabled)
        return self

    @property
    def disk_size(self) -> int:
        """The size the image will have (rounded as ``qemu-img`` rounds it)."""
        size = -(-self.virtual_size // SECTOR) * SECTOR
        if self._force_size:
            return size
        return chs_size(size)[0]

    def validate(self) -> None:
        """The rules of ``qemu-img create -f vpc``, and Azure's whole MiB for fixed forced sizes."""
        if self.preallocation is not PreallocateMode.NONE:
            raise InvalidOptionError("preallocation", "vpc images are not preallocated (the option is not qemu-img's)")
        if self.disk_size // SECTOR > MAX_SECTORS:
            raise InvalidOptionError("size", f"{self.virtual_size} bytes: the largest VHD is 2040 GiB")
        if self._force_size and self._subformat == "fixed" and self.virtual_size % MiB:
            raise InvalidOptionError(
                "size",
                f"{self.virtual_size} bytes is not a whole number of MiB: Azure refuses such fixed VHDs "
                f"(round it up to {-(-self.virtual_size // MiB) * MiB})",
            )

    async def write_image(self) -> None:
        """Write the image (called by ``Vpc.create_image`` after :meth:`validate`)."""
        storage = self.storage
        size = self.disk_size
        await storage.resize(0)
        if self._subformat == "fixed":
            footer = new_footer(size=size, disk_type=TYPE_FIXED, force_size=self._force_size, data_offset=NO_OFFSET)
            await storage.resize(size + SECTOR)
            await storage.writev([memoryview(footer.pack())], size)
            await storage.flush()
            return
        entries = -(-size // BLOCK_SIZE)
        table_bytes = -(-4 * entries // SECTOR) * SECTOR
        footer = new_footer(size=size, disk_type=TYPE_DYNAMIC, force_size=self._force_size, data_offset=SECTOR)
        raw = footer.pack()
        header = new_dynamic_header(table_offset=_TABLE_AT, entries=entries, block_size=BLOCK_SIZE)
        await storage.writev([memoryview(raw), memoryview(header)], 0)
        await storage.writev([memoryview(b"\xff" * table_bytes)], _TABLE_AT)
        await storage.writev([memoryview(raw)], _TABLE_AT + table_bytes)
        await storage.flush()
