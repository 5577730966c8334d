"""Entry point of the ``imago-nbd`` plugin: the ``nbd`` storage driver and ``imago serve``."""

from __future__ import annotations

from imago import CliRegistrar, StorageRegistrar, hookimpl

from .client import Nbd
from .server import cli


@hookimpl
def imago_register_storage_drivers(register: StorageRegistrar) -> None:
    """Register the ``nbd`` storage driver (``nbd://``, ``nbd+unix://``, ``nbds://`` URIs)."""
    register.register(Nbd)


@hookimpl
def imago_register_cli_commands(register: CliRegistrar) -> None:
    """Register ``imago serve``."""
    register.command(name="serve", help=cli.HELP, configure=cli.configure, run=cli.run)
