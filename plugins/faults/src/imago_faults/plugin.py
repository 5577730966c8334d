"""Entry point of the ``imago-faults`` plugin."""

from __future__ import annotations

from imago import StorageRegistrar, hookimpl

from .storage import FaultyStorage


@hookimpl
def imago_register_storage_drivers(register: StorageRegistrar) -> None:
    """Register the ``faults`` storage driver."""
    register.register(FaultyStorage)
