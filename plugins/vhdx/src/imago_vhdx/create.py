"""Creating VHDX images: ``Vhdx.create_builder(storage)...create()``.

Options, defaults and validation follow ``qemu-img create -f vhdx -o ...``: ``subformat``
(``dynamic``, the default, or ``fixed``), ``block_size`` (0: 8 MiB up to 1 GiB, 16 MiB up to
100 GiB, 32 MiB up to 32 TiB, 64 MiB above; rounded up to whole MiB, at most 256 MiB, a power
of two), ``log_size`` (1 MiB; rounded up to whole MiB, not 0, under 4 GiB), ``block_state_zero``
(on: a dynamic image's blocks start in the ZERO state), a size rounded up to 512 bytes and at
most 64 TiB. One departure: a fixed image's blocks are always present (QEMU marks them ZERO
under ``block_state_zero`` and then allocates again at the file's end when they are written).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Self

from imago import FormatCreateBuilder, InvalidOptionError, PreallocateMode, Storage

from .layout import MAX_BLOCK_SIZE, MAX_DISK_SIZE, MiB
from .new_layout import plan_image

if TYPE_CHECKING:
    from .driver import Vhdx

__all__ = ["SUBFORMATS", "VhdxCreateBuilder", "default_block_size"]

SUBFORMATS = ("dynamic", "fixed")
_GiB = 1024 * MiB
_TiB = 1024 * _GiB


def default_block_size(size: int) -> int:
    """qemu-img's block size for a disk of *size* bytes when none is asked for."""
    if size > 32 * _TiB:
        return 64 * MiB
    if size > 100 * _GiB:
        return 32 * MiB
    if size > _GiB:
        return 16 * MiB
    return 8 * MiB


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise InvalidOptionError(option, f"must be on or off, got {value!r}")


def _bytes(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(option, f"must be a size in bytes, got {value!r}")
    return value


class VhdxCreateBuilder(FormatCreateBuilder["Vhdx"]):
    """The options of a new VHDX image (``qemu-img create -f vhdx -o ...``)."""

    option_names: ClassVar[tuple[str, ...]] = (
        *FormatCreateBuilder.option_names,
        "subformat",
        "block_size",
        "log_size",
        "block_state_zero",
    )

    _O = FormatCreateBuilder.Option
    #: qemu-img's vhdx creation options, in the order ``qemu-img create`` reports them.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        _O("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.", "0"),
        _O(
            "block_state_zero",
            "bool",
            "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when "
            "using 'qemu-img convert' with subformat=dynamic.",
        ),
        _O("log_size", "size", "Log size; min 1MB.", "1048576"),
        _O("preallocation", "str", "Preallocation mode (allowed values: off)", choices=("off",)),
        _O("size", "size", "Virtual disk size; max of 64TB."),
        _O(
            "subformat",
            "str",
            "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
            choices=SUBFORMATS,
        ),
    )
    del _O

    def __init__(self, driver: type[Vhdx], storage: Storage) -> None:
        super().__init__(driver, storage)
        self._subformat = "dynamic"
        self._block_size = 0
        self._log_size = MiB
        self._block_state_zero = True

    def size(self, size: int) -> Self:
        """Virtual disk size in bytes, rounded up to whole 512-byte sectors as ``qemu-img`` does."""
        super().size(size)
        super().size(-(-self.virtual_size // 512) * 512)
        if self.virtual_size > MAX_DISK_SIZE:
            raise InvalidOptionError("size", f"{self.virtual_size} bytes: image size too large; max of 64TB")
        return self

    def subformat(self, name: str) -> Self:
        """``dynamic`` (the default) or ``fixed``."""
        if name not in SUBFORMATS:
            raise InvalidOptionError("subformat", f"must be dynamic or fixed, not {name!r}")
        self._subformat = name
        return self

    def block_size(self, nbytes: int) -> Self:
        """The payload block size (0: chosen from the disk size); rounded up to whole MiB, capped at 256 MiB."""
        value = -(-_bytes("block_size", nbytes) // MiB) * MiB
        value = min(value, MAX_BLOCK_SIZE)
        if value & (value - 1):
            raise InvalidOptionError("block_size", f"{nbytes}: block size must be a power of two")
        self._block_size = value
        return self

    def log_size(self, nbytes: int) -> Self:
        """The log's size, rounded up to whole MiB (at least 1 MiB, under 4 GiB)."""
        value = _bytes("log_size", nbytes)
        if value == 0:
            raise InvalidOptionError("log_size", "log size must be a multiple of 1 MB")
        value = -(-value // MiB) * MiB
        if value >= 1 << 32:
            raise InvalidOptionError("log_size", f"{nbytes}: log size must be smaller than 4 GB")
        self._log_size = value
        return self

    def block_state_zero(self, on: bool | str) -> Self:
        """Whether a dynamic image's blocks start in the ZERO state (default on) rather than NOT_PRESENT."""
        self._block_state_zero = _flag("block_state_zero", on)
        return self

    @property
    def chosen_block_size(self) -> int:
        """The block size the image gets (the automatic one when none was given)."""
        return self._block_size or default_block_size(self.virtual_size)

    def validate(self) -> None:
        """Preallocation: only ``off``."""
        if self.preallocation is not PreallocateMode.NONE:
            raise InvalidOptionError("preallocation", f"vhdx accepts only off, not {self.preallocation.value!r}")

    async def write_image(self) -> None:
        """Write the image (called by ``Vhdx.create_image`` after :meth:`validate`)."""
        plan = plan_image(
            self.virtual_size,
            self.chosen_block_size,
            self._log_size,
            fixed=self._subformat == "fixed",
            zero_blocks=self._block_state_zero,
        )
        storage = self.storage
        await storage.resize(0)
        await storage.resize(plan.file_size)
        for offset, data in plan.writes:
            await storage.writev([memoryview(data)], offset)
        await storage.flush()
