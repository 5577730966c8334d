"""imago: virtual-machine disk images (raw, qcow2, ...) for Python.

The core defines the storage and format driver interfaces, the generic I/O engine
(:class:`FormatAccess`), the synchronous API (:class:`SyncFormatAccess`) and the gates that
decide which files an image may make us open. Drivers come from plugins (``imago-file``,
``imago-null``, ``imago-raw``, ``imago-qcow2``, or third-party ones) found through the
entry-point group ``imago``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import io_buffers, runtime
from .annotated import AnnotatedStorage
from .api import create, create_async, open, open_async, probe, probe_sync
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

try:
    __version__ = version("imago-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0"

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
    "MetadataCache",
    "MissingStorageError",
    "PermissiveImplicitOpenGate",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PreallocateMode",
    "RangeLock",
    "ReadOnlyError",
    "RepairMode",
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
    "open",
    "open_async",
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
