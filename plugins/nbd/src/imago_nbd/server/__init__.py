"""The NBD server: ``imago serve`` and serving an open image from the library.

:func:`serve` makes an :class:`NbdServer` of an open :class:`imago.FormatAccess`; ``async with``
it (or ``await server.start()``) and ``await server.serve_forever()``. :func:`server_context`
builds the TLS context from a directory of X.509 certificates as QEMU lays it out.

The names are imported on first use: loading the plugin (which registers ``imago serve``) must
not cost every ``imago`` command the server's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .export import Export
    from .listener import DEFAULT_PORT, NbdServer, serve
    from .tls import server_context

__all__ = ["DEFAULT_PORT", "Export", "NbdServer", "serve", "server_context"]

_HOMES = {
    "DEFAULT_PORT": "listener",
    "Export": "export",
    "NbdServer": "listener",
    "serve": "listener",
    "server_context": "tls",
}


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
