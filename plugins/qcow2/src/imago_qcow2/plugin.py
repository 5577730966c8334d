"""Entry point of the ``imago-qcow2`` plugin."""

from __future__ import annotations

from imago import FormatRegistrar, hookimpl

from .driver import Qcow2


@hookimpl
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register the ``qcow2`` format driver."""
    register.register(Qcow2)
