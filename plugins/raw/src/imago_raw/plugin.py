"""Entry point of the ``imago-raw`` plugin."""

from __future__ import annotations

from collections.abc import Callable

from imago import FormatDriver, hookimpl

from .driver import Raw


@hookimpl
def imago_register_format_drivers(register: Callable[[type[FormatDriver]], None]) -> None:
    """Register the ``raw`` format driver."""
    register(Raw)
