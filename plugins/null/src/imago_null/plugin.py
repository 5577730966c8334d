"""Entry point of the ``imago-null`` plugin."""

from __future__ import annotations

from imago import StorageRegistrar, hookimpl

from .storage import Null


@hookimpl
def imago_register_storage_drivers(register: StorageRegistrar) -> None:
    """Register the ``null`` storage driver."""
    register.register(Null)
