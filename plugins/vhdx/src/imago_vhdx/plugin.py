"""Entry point of the ``imago-vhdx`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Vhdx


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``vhdx`` format driver."""
    register.register(Vhdx)
