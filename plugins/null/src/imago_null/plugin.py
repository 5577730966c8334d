"""Entry point of the ``imago-null`` plugin."""

from __future__ import annotations

from collections.abc import Callable

from imago import Storage, hookimpl

from .storage import Null


@hookimpl
def imago_register_storage_drivers(register: Callable[[type[Storage]], None]) -> None:
    """Register the ``null`` storage driver."""
    register(Null)
