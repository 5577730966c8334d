"""Entry point of the ``imago-qcow2`` plugin."""

from __future__ import annotations

from collections.abc import Callable

from imago import FormatDriver, hookimpl

from .driver import Qcow2


@hookimpl
def imago_register_format_drivers(register: Callable[[type[FormatDriver]], None]) -> None:
    """Register the ``qcow2`` format driver."""
    register(Qcow2)
