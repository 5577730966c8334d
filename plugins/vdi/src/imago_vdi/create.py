"""Creating VDI images: ``Vdi.create_builder(storage).size(n).static(True).create()``.

As ``qemu-img create -f vdi`` (QEMU 7.2) makes them: the size rounded up to whole sectors,
1 MiB blocks, the header at 0 (QEMU's text, version 1.1, header size 0x180, two random UUIDs),
the block map at 512, the data after the map rounded up to a sector. Dynamic images map no
block; static ones (``static=on``) map every guest block to the image block of the same index
and the file is extended (sparsely) over the whole data area. As in QEMU, there is no
``measure`` for VDI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Self

from imago import FormatCreateBuilder, InvalidOptionError, PreallocateMode, Storage

from .blockmap import UNALLOCATED
from .header import BLOCK_SIZE, HEADER_SIZE, MAX_DISK_SIZE, SECTOR, build_header

if TYPE_CHECKING:
    from .driver import Vdi

__all__ = ["VdiCreateBuilder", "new_layout"]


def new_layout(size: int) -> tuple[int, int]:
    """``(blocks, offset_data)`` of a new image of *size* bytes."""
    blocks = -(-size // BLOCK_SIZE)
    map_size = -(-4 * blocks // SECTOR) * SECTOR
    return blocks, HEADER_SIZE + map_size


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise InvalidOptionError(option, f"must be on or off, got {value!r}")


class VdiCreateBuilder(FormatCreateBuilder["Vdi"]):
    """The options of a new VDI image (``qemu-img create -f vdi -o size=...,static=on|off``)."""

    option_names: ClassVar[tuple[str, ...]] = (*FormatCreateBuilder.option_names, "static")
    _O = FormatCreateBuilder.Option
    #: qemu-img's vdi creation options, in the order ``qemu-img create -o help`` lists them.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        _O("size", "size", "Virtual disk size"),
        _O("static", "bool", "VDI static (pre-allocated) image", "off"),
    )
    del _O

    def __init__(self, driver: type[Vdi], storage: Storage) -> None:
        super().__init__(driver, storage)
        self._static = False

    def size(self, size: int) -> Self:
        """Virtual disk size in bytes, rounded up to whole 512-byte sectors as ``qemu-img`` does."""
        super().size(size)
        return super().size(-(-self.virtual_size // SECTOR) * SECTOR)

    def static(self, enabled: bool | str) -> Self:
        """A static image: every block allocated when the image is made (default: dynamic)."""
        self._static = _flag("static", enabled)
        return self

    @property
    def is_static(self) -> bool:
        """Whether the new image is static."""
        return self._static

    def validate(self) -> None:
        """The size within VDI's limit; no preallocation mode (``static`` is VDI's preallocation)."""
        if self.virtual_size > MAX_DISK_SIZE:
            raise InvalidOptionError(
                "size", f"{self.virtual_size} bytes is more than a VDI image holds ({MAX_DISK_SIZE})"
            )
        if self.preallocation is not PreallocateMode.NONE:
            raise InvalidOptionError(
                "preallocation", "the vdi format has no preallocation modes (static=on allocates every block)"
            )

    async def write_image(self) -> None:
        """Write the image (called by ``Vdi.create_image`` after :meth:`validate`)."""
        storage = self.storage
        size = self.virtual_size
        blocks, offset_data = new_layout(size)
        header = build_header(disk_size=size, blocks=blocks, static=self._static, offset_data=offset_data)
        await storage.resize(0)
        await storage.writev([memoryview(header)], 0)
        if blocks:
            entries = bytearray(offset_data - HEADER_SIZE)
            if self._static:
                for index in range(blocks):
                    entries[4 * index : 4 * index + 4] = index.to_bytes(4, "little")
            else:
                entries[: 4 * blocks] = UNALLOCATED.to_bytes(4, "little") * blocks
            await storage.writev([memoryview(entries)], HEADER_SIZE)
        if self._static:
            await storage.resize(offset_data + blocks * BLOCK_SIZE)
        await storage.flush()
