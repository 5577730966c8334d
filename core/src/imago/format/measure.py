"""``Measurement``: the file size a new image needs (``qemu-img measure``)."""

from __future__ import annotations

from typing import Any

from .._record import Record, init

__all__ = ["Measurement"]


class Measurement(Record):
    """What a format's create builder computes for ``qemu-img measure``, in bytes.

    ``required`` is the file size the image needs for the data given (only metadata when there
    is no source), ``fully_allocated`` the size with every cluster allocated; ``bitmaps`` the
    room for persistent dirty bitmaps, where the format has them (``None``: not reported).
    """

    __slots__ = ("bitmaps", "fully_allocated", "required")

    required: int
    fully_allocated: int
    bitmaps: int | None

    def __init__(self, required: int, fully_allocated: int, bitmaps: int | None = None) -> None:
        init(self, "required", required)
        init(self, "fully_allocated", fully_allocated)
        init(self, "bitmaps", bitmaps)

    def to_json(self) -> dict[str, Any]:
        """qemu-img's JSON fields, in its order (``bitmaps`` only where reported)."""
        fields: dict[str, Any] = {}
        if self.bitmaps is not None:
            fields["bitmaps"] = self.bitmaps
        fields["required"] = self.required
        fields["fully-allocated"] = self.fully_allocated
        return fields
