"""``qemu-img amend -o`` for qcow2: changing creation options of an existing image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imago import UnsupportedFeatureError

if TYPE_CHECKING:
    from .driver import Qcow2
    from .state import Qcow2State

__all__ = ["AMEND_OPTION_NAMES", "amend_image"]

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


async def amend_image(driver: Qcow2, state: Qcow2State, options: dict[str, Any], *, force: bool = False) -> None:
    """Change *options* of the open image (work in progress: issue 10)."""
    raise UnsupportedFeatureError("qcow2: amend is not implemented yet")
