"""imago: virtual-machine disk images (raw, qcow2, ...) for Python.

The core defines the storage and format driver interfaces, the generic I/O engine
(:class:`FormatAccess`), the synchronous API (:class:`SyncFormatAccess`) and the gates that
decide which files an image may make us open. Drivers come from plugins (``imago-file``,
``imago-null``, ``imago-raw``, ``imago-qcow2``, or third-party ones) found through the
entry-point group ``imago``.

Importing :mod:`imago` is cheap: every public name is imported from its module the first time
it is used (``imago.open``, ``from imago import Storage``), so a command line tool that needs
a few of them does not pay for the rest (asyncio, pluggy, importlib.metadata...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as static type checkers see them; at run time __getattr__ imports them
    from . import io_buffers, runtime
    from ._record import Record
    from .annotated import AnnotatedStorage
    from .api import create, create_async, measure, open, open_async, probe, probe_sync
    from .budget import MemoryBudget
    from .cache import MetadataCache
    from .errors import (
        AllocationError,
        BackingChainError,
        ClosedError,
        CorruptImageError,
        DirtyImageError,
        DriverContractError,
        DriverNotFoundError,
        DuplicateDriverError,
        ImageLockedError,
        ImagoError,
        ImplicitOpenDeniedError,
        InvalidBufferError,
        InvalidDriverError,
        InvalidOptionError,
        InvalidRequestError,
        MissingStorageError,
        PluginError,
        PluginLoadError,
        ReadOnlyError,
        ResourceLimitError,
        SnapshotNotFoundError,
        SuspendedInSyncModeError,
        UnsupportedFeatureError,
        UnsupportedFileTypeError,
    )
    from .fileobj import ImageFile
    from .format.access import FormatAccess, SyncFormatAccess, read_through
    from .format.builder import MAX_CHAIN_DEPTH, FormatCreateBuilder, FormatDriverBuilder
    from .format.capabilities import (
        Capability,
        SnapshotRecord,
        SupportsAmend,
        SupportsBackingChange,
        SupportsCheck,
        SupportsCompressedWrites,
        SupportsResize,
        SupportsSnapshots,
    )
    from .format.check import CheckFinding, CheckResult, FindingKind, RepairMode
    from .format.driver import FormatDriver
    from .format.gates import (
        DenyImplicitOpenGate,
        ImplicitOpenGate,
        PermissiveImplicitOpenGate,
        SandboxImplicitOpenGate,
    )
    from .format.mapping import (
        Mapping,
        MappingEof,
        MappingRaw,
        MappingSpecial,
        MappingZero,
        ShallowEof,
        ShallowIndirect,
        ShallowMapping,
        ShallowRaw,
        ShallowSpecial,
        ShallowZero,
    )
    from .format.measure import Measurement
    from .format.names import check_local_file_name
    from .format.references import naming_the_referrer, open_named_image
    from .format.unopened import UnopenedFile
    from .locks import RangeLock
    from .plugin.hookspecs import hookimpl
    from .plugin.manager import (
        PluginInfo,
        format_driver,
        format_drivers,
        plugins,
        register_plugin,
        storage_driver,
        storage_drivers,
        unregister_plugin,
    )
    from .plugin.registrars import CliRegistrar, FormatRegistrar, StorageRegistrar
    from .storage import PreallocateMode, Storage, StorageCreateOptions, StorageOpenOptions

    __version__: str

# Module (relative to this package) -> the public names it defines. A module named with an
# empty tuple is itself the public name (``imago.runtime``).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "io_buffers": (),
    "runtime": (),
    "_record": ("Record",),
    "annotated": ("AnnotatedStorage",),
    "api": (
        "create",
        "create_async",
        "measure",
        "open",
        "open_async",
        "probe",
        "probe_sync",
    ),
    "budget": ("MemoryBudget",),
    "cache": ("MetadataCache",),
    "errors": (
        "AllocationError",
        "BackingChainError",
        "ClosedError",
        "CorruptImageError",
        "DirtyImageError",
        "DriverContractError",
        "DriverNotFoundError",
        "DuplicateDriverError",
        "ImageLockedError",
        "ImagoError",
        "ImplicitOpenDeniedError",
        "InvalidBufferError",
        "InvalidDriverError",
        "InvalidOptionError",
        "InvalidRequestError",
        "MissingStorageError",
        "PluginError",
        "PluginLoadError",
        "ReadOnlyError",
        "ResourceLimitError",
        "SnapshotNotFoundError",
        "SuspendedInSyncModeError",
        "UnsupportedFeatureError",
        "UnsupportedFileTypeError",
    ),
    "fileobj": ("ImageFile",),
    "format.access": (
        "FormatAccess",
        "SyncFormatAccess",
        "read_through",
    ),
    "format.builder": (
        "MAX_CHAIN_DEPTH",
        "FormatCreateBuilder",
        "FormatDriverBuilder",
    ),
    "format.capabilities": (
        "Capability",
        "SnapshotRecord",
        "SupportsAmend",
        "SupportsBackingChange",
        "SupportsCheck",
        "SupportsCompressedWrites",
        "SupportsResize",
        "SupportsSnapshots",
    ),
    "format.check": (
        "CheckFinding",
        "CheckResult",
        "FindingKind",
        "RepairMode",
    ),
    "format.driver": ("FormatDriver",),
    "format.gates": (
        "DenyImplicitOpenGate",
        "ImplicitOpenGate",
        "PermissiveImplicitOpenGate",
        "SandboxImplicitOpenGate",
    ),
    "format.mapping": (
        "Mapping",
        "MappingEof",
        "MappingRaw",
        "MappingSpecial",
        "MappingZero",
        "ShallowEof",
        "ShallowIndirect",
        "ShallowMapping",
        "ShallowRaw",
        "ShallowSpecial",
        "ShallowZero",
    ),
    "format.measure": ("Measurement",),
    "format.names": ("check_local_file_name",),
    "format.references": ("naming_the_referrer", "open_named_image"),
    "format.unopened": ("UnopenedFile",),
    "locks": ("RangeLock",),
    "plugin.hookspecs": ("hookimpl",),
    "plugin.manager": (
        "PluginInfo",
        "format_driver",
        "format_drivers",
        "plugins",
        "register_plugin",
        "storage_driver",
        "storage_drivers",
        "unregister_plugin",
    ),
    "plugin.registrars": (
        "CliRegistrar",
        "FormatRegistrar",
        "StorageRegistrar",
    ),
    "storage": (
        "PreallocateMode",
        "Storage",
        "StorageCreateOptions",
        "StorageOpenOptions",
    ),
}

# Public name -> the module to import it from.
_ORIGIN = {name: module for module, names in _EXPORTS.items() for name in (names or (module,))}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imago-core")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


if not TYPE_CHECKING:  # hidden from type checkers, which would take any unknown name for one of these

    def __getattr__(name: str) -> Any:
        """Import the public *name* on first use and keep it as a module attribute."""
        module = _ORIGIN.get(name)
        if module is not None:
            imported = importlib.import_module(f".{module}", __name__)
            value = getattr(imported, name) if _EXPORTS[module] else imported
        elif name == "__version__":
            value = _version()
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))


__all__ = [
    "MAX_CHAIN_DEPTH",
    "AllocationError",
    "AnnotatedStorage",
    "BackingChainError",
    "Capability",
    "CheckFinding",
    "CheckResult",
    "CliRegistrar",
    "ClosedError",
    "CorruptImageError",
    "DenyImplicitOpenGate",
    "DirtyImageError",
    "DriverContractError",
    "DriverNotFoundError",
    "DuplicateDriverError",
    "FindingKind",
    "FormatAccess",
    "FormatCreateBuilder",
    "FormatDriver",
    "FormatDriverBuilder",
    "FormatRegistrar",
    "ImageFile",
    "ImageLockedError",
    "ImagoError",
    "ImplicitOpenDeniedError",
    "ImplicitOpenGate",
    "InvalidBufferError",
    "InvalidDriverError",
    "InvalidOptionError",
    "InvalidRequestError",
    "Mapping",
    "MappingEof",
    "MappingRaw",
    "MappingSpecial",
    "MappingZero",
    "Measurement",
    "MemoryBudget",
    "MetadataCache",
    "MissingStorageError",
    "PermissiveImplicitOpenGate",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PreallocateMode",
    "RangeLock",
    "ReadOnlyError",
    "Record",
    "RepairMode",
    "ResourceLimitError",
    "SandboxImplicitOpenGate",
    "ShallowEof",
    "ShallowIndirect",
    "ShallowMapping",
    "ShallowRaw",
    "ShallowSpecial",
    "ShallowZero",
    "SnapshotNotFoundError",
    "SnapshotRecord",
    "Storage",
    "StorageCreateOptions",
    "StorageOpenOptions",
    "StorageRegistrar",
    "SupportsAmend",
    "SupportsBackingChange",
    "SupportsCheck",
    "SupportsCompressedWrites",
    "SupportsResize",
    "SupportsSnapshots",
    "SuspendedInSyncModeError",
    "SyncFormatAccess",
    "UnopenedFile",
    "UnsupportedFeatureError",
    "UnsupportedFileTypeError",
    "__version__",
    "check_local_file_name",
    "create",
    "create_async",
    "format_driver",
    "format_drivers",
    "hookimpl",
    "io_buffers",
    "measure",
    "naming_the_referrer",
    "open",
    "open_async",
    "open_named_image",
    "plugins",
    "probe",
    "probe_sync",
    "read_through",
    "register_plugin",
    "runtime",
    "storage_driver",
    "storage_drivers",
    "unregister_plugin",
]
