"""Changing the backing file a qcow2 image records (``qemu-img rebase -u``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imago import UnsupportedFeatureError

if TYPE_CHECKING:
    from .state import Qcow2State

__all__ = ["change_backing_file"]


async def change_backing_file(state: Qcow2State, filename: str | None, format: str | None) -> None:
    """Record *filename* of *format* as the backing file (work in progress: issue 10)."""
    raise UnsupportedFeatureError("qcow2: changing the backing file is not implemented yet")
