"""Entry point of the ``imago-file`` plugin."""

from __future__ import annotations

from collections.abc import Callable

from imago import Storage, hookimpl

from .storage import File


@hookimpl
def imago_register_storage_drivers(register: Callable[[type[Storage]], None]) -> None:
    """Register the ``file`` storage driver."""
    register(File)
