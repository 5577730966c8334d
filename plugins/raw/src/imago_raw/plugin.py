"""Entry point of the ``imago-raw`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Raw


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``raw`` format driver."""
    register.register(Raw)
