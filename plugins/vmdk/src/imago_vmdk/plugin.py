"""Entry point of the ``imago-vmdk`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Vmdk


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``vmdk`` format driver."""
    register.register(Vmdk)
