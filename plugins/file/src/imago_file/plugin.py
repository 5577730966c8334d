"""Entry point of the ``imago-file`` plugin."""

from __future__ import annotations

from imago import StorageRegistrar, hookimpl

from .storage import File


@hookimpl
def imago_register_storage_drivers(register: StorageRegistrar) -> None:
    """Register the ``file`` storage driver."""
    register.register(File)
