"""Entry point of the ``imago-vpc`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Vpc


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``vpc`` format driver."""
    register.register(Vpc)
