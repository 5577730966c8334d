"""Entry point of the ``imago-vdi`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Vdi


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``vdi`` format driver."""
    register.register(Vdi)
