"""imago: virtual-machine disk images (raw, qcow2, ...) for Python.

The core defines the storage and format driver interfaces, the generic I/O engine
(:class:`FormatAccess`), the synchronous API (:class:`SyncFormatAccess`) and the gates that
decide which files an image may make us open. Drivers come from plugins (``imago-file``,
``imago-null``, ``imago-raw``, ``imago-qcow2``, or third-party ones) found through the
entry-point group ``imago``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import aio, io_buffers
from ._plugins import (
    PluginInfo,
    format_driver,
    format_drivers,
    plugins,
    register_plugin,
    storage_driver,
    storage_drivers,
    unregister_plugin,
)
from .annotated import Annotated
from .api import create, create_async, open, open_async, probe, probe_sync
from .errors import (
    BackingChainError,
    ClosedError,
    CorruptImageError,
    DriverNotFoundError,
    DuplicateDriverError,
    ImagoError,
    ImplicitOpenDeniedError,
    InvalidBufferError,
    InvalidDriverError,
    InvalidOptionError,
    InvalidRequestError,
    PluginError,
    PluginLoadError,
    ReadOnlyError,
    SuspendedInSyncModeError,
    UnsupportedFeatureError,
)
from .format import (
    MAX_CHAIN_DEPTH,
    DenyImplicitOpenGate,
    FormatAccess,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    Mapping,
    PermissiveImplicitOpenGate,
    SandboxImplicitOpenGate,
    ShallowMapping,
)
from .hookspecs import hookimpl
from .storage import PreallocateMode, Storage, StorageCreateOptions, StorageOpenOptions
from .sync import ImageFile, SyncFormatAccess

try:
    __version__ = version("imago-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0"

__all__ = [
    "MAX_CHAIN_DEPTH",
    "Annotated",
    "BackingChainError",
    "ClosedError",
    "CorruptImageError",
    "DenyImplicitOpenGate",
    "DriverNotFoundError",
    "DuplicateDriverError",
    "FormatAccess",
    "FormatCreateBuilder",
    "FormatDriver",
    "FormatDriverBuilder",
    "ImageFile",
    "ImagoError",
    "ImplicitOpenDeniedError",
    "ImplicitOpenGate",
    "InvalidBufferError",
    "InvalidDriverError",
    "InvalidOptionError",
    "InvalidRequestError",
    "Mapping",
    "PermissiveImplicitOpenGate",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PreallocateMode",
    "ReadOnlyError",
    "SandboxImplicitOpenGate",
    "ShallowMapping",
    "Storage",
    "StorageCreateOptions",
    "StorageOpenOptions",
    "SuspendedInSyncModeError",
    "SyncFormatAccess",
    "UnsupportedFeatureError",
    "__version__",
    "aio",
    "create",
    "create_async",
    "format_driver",
    "format_drivers",
    "hookimpl",
    "io_buffers",
    "open",
    "open_async",
    "plugins",
    "probe",
    "probe_sync",
    "register_plugin",
    "storage_driver",
    "storage_drivers",
    "unregister_plugin",
]
