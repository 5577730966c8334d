"""The storage layer: objects that move bytes at offsets.

A :class:`Storage` knows nothing of image formats. Its I/O methods take vectors of flat byte
views (see :mod:`imago.io_buffers`); bounds and read-only state are checked by the format
layer above, but storages check what they must for their own safety.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Mapping as MappingType
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import runtime
from ._record import Record, init
from .errors import InvalidOptionError, UnsupportedFeatureError

__all__ = [
    "PreallocateMode",
    "Storage",
    "StorageCreateOptions",
    "StorageOpenOptions",
]

# A bound named by a string costs a compile() at import (typing's ForwardRef): only mypy needs it.
if TYPE_CHECKING:
    S = TypeVar("S", bound="Storage")
else:
    S = TypeVar("S")


class PreallocateMode(enum.Enum):
    """How new space is prepared when an image or storage is created or grown.

    The values are the names ``qemu-img`` uses where it has one.
    """

    #: Only change the size; new space may stay unallocated (sparse) and reads as zero.
    NONE = "off"
    #: New space must read as zero; nothing needs to be allocated.
    ZERO = "zero"
    #: Formats allocate their metadata; storages treat it like ``ZERO``.
    METADATA = "metadata"
    #: Reserve the space (``fallocate``) without writing it.
    FALLOC = "falloc"
    #: Write zeroes to all new space.
    FULL = "full"

    @classmethod
    def parse(cls, value: PreallocateMode | str) -> PreallocateMode:
        """A mode from itself or from its ``qemu-img`` name (``off``, ``metadata``, ...)."""
        if isinstance(value, PreallocateMode):
            return value
        aliases = {"none": cls.NONE, "off": cls.NONE}
        for mode in cls:
            aliases[mode.value] = mode
            aliases[mode.name.lower()] = mode
        try:
            if not isinstance(value, str):
                raise KeyError(value)  # None, numbers, ...: not a mode name
            return aliases[value.lower()]
        except KeyError:
            names = ", ".join(sorted({m.value for m in cls}))
            raise InvalidOptionError("preallocation", f"unknown mode {value!r} (choose from {names})") from None


def _preallocate_mode(value: PreallocateMode | str) -> PreallocateMode:
    try:
        return PreallocateMode.parse(value)
    except InvalidOptionError as error:
        # Name the field, not qemu-img's option name.
        raise InvalidOptionError("preallocate", error.problem) from None


def _optional_path(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise InvalidOptionError("filename", f"must be a str or os.PathLike path, got {value!r}")
    return path


def _non_empty(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidOptionError(name, f"must be a non-empty string, got {value!r}")
    return value


def _non_negative(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidOptionError(name, f"must be a non-negative integer, got {value!r}")
    return value


def _bool(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(name, f"must be True or False, got {value!r}")
    return value


class StorageOpenOptions(Record, kw_only=True):
    """What to open and how: the input of :meth:`Storage.open`."""

    __slots__ = ("direct", "driver", "driver_options", "filename", "force_share", "no_flush", "share_write", "writable")

    #: Name of the file (or other object) to open; its meaning is the driver's.
    filename: str | None
    #: Open for writing.
    writable: bool
    #: Bypass the host page cache (``O_DIRECT``), where the driver supports it.
    direct: bool
    #: Ignore :meth:`Storage.flush` (QEMU's ``cache.no-flush``, ``cache=unsafe``): faster, as
    #: ``qemu-img convert`` writes by default, but a host crash may lose or corrupt what was
    #: written. :meth:`Storage.sync` still makes everything durable.
    no_flush: bool
    #: Read without taking any lock that would stop a writer (QEMU's ``force-share``,
    #: ``qemu-img -U``): the image may change underneath, so what is read may be inconsistent.
    #: Only for read-only opens; refused together with :attr:`writable`.
    force_share: bool
    #: Let other processes write to (but not resize) the file while this open holds it: how
    #: QEMU locks an external data file, whose bytes carry no metadata of the image.
    share_write: bool
    #: Which storage driver to use when opening through the registry.
    driver: str
    #: Driver-specific options (for example ``{"size": ...}`` for ``null``).
    driver_options: MappingType[str, Any]

    def __init__(
        self,
        *,
        filename: str | os.PathLike[str] | None = None,
        writable: bool = False,
        direct: bool = False,
        no_flush: bool = False,
        force_share: bool = False,
        share_write: bool = False,
        driver: str = "file",
        driver_options: MappingType[str, Any] | None = None,
    ) -> None:
        init(self, "filename", _optional_path(filename))
        init(self, "writable", _bool("writable", writable))
        init(self, "direct", _bool("direct", direct))
        init(self, "no_flush", _bool("no_flush", no_flush))
        init(self, "force_share", _bool("force_share", force_share))
        init(self, "share_write", _bool("share_write", share_write))
        init(self, "driver", _non_empty("driver", driver))
        init(self, "driver_options", {} if driver_options is None else driver_options)
        if force_share and writable:
            raise InvalidOptionError(
                "force_share", "only read-only opens can share the image with writers; it cannot be used with writable"
            )


class StorageCreateOptions(Record, kw_only=True):
    """What to create and how: the input of :meth:`Storage.create`."""

    __slots__ = ("driver", "driver_options", "filename", "overwrite", "preallocate", "size")

    filename: str | None
    #: Initial size in bytes.
    size: int
    preallocate: PreallocateMode
    #: Replace an existing file (its contents are lost); otherwise an existing file is an error.
    overwrite: bool
    driver: str
    driver_options: MappingType[str, Any]

    def __init__(
        self,
        *,
        filename: str | os.PathLike[str] | None = None,
        size: int = 0,
        preallocate: PreallocateMode | str = PreallocateMode.NONE,
        overwrite: bool = False,
        driver: str = "file",
        driver_options: MappingType[str, Any] | None = None,
    ) -> None:
        init(self, "filename", _optional_path(filename))
        init(self, "size", _non_negative("size", size))
        init(self, "preallocate", _preallocate_mode(preallocate))
        init(self, "overwrite", _bool("overwrite", overwrite))
        init(self, "driver", _non_empty("driver", driver))
        init(self, "driver_options", {} if driver_options is None else driver_options)

    def open_options(self) -> StorageOpenOptions:
        """Options to open the storage just created, writable."""
        return StorageOpenOptions(
            filename=self.filename, writable=True, driver=self.driver, driver_options=self.driver_options
        )


class Storage(abc.ABC):
    """Abstract byte storage: the bottom layer under every image format.

    Subclasses set :attr:`name` and implement the abstract coroutines. Storage I/O methods
    take lists of flat byte memoryviews. Reads of ranges past the end of the storage yield
    zeroes. Use :mod:`imago.runtime` helpers (``run_blocking``) for blocking work so that the
    synchronous API never needs an event loop.
    """

    #: Driver name, as registered and as named in :attr:`StorageOpenOptions.driver`.
    name: ClassVar[str] = ""

    #: URI schemes the driver opens (``("nbd", "nbd+unix")``): a name given to :func:`imago.open`
    #: (and so to the command line) that starts with one of them and ``://`` selects this
    #: driver. A driver with schemes reaches other machines or services, so it is never used
    #: for implicit opens (files an image names): the gates refuse it.
    uri_schemes: ClassVar[tuple[str, ...]] = ()

    # --- construction -------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    async def open(cls: type[S], options: StorageOpenOptions) -> S:
        """Open a storage as *options* say."""

    @classmethod
    def open_sync(cls: type[S], options: StorageOpenOptions) -> S:
        """Synchronous :meth:`open`."""
        return runtime.run_sync(cls.open(options))

    @classmethod
    async def create(cls: type[S], options: StorageCreateOptions) -> S:
        """Create a new storage and return it opened for writing.

        The default says the driver cannot create storages.
        """
        raise UnsupportedFeatureError(f"creating storages with the {cls.name!r} driver")

    @classmethod
    def create_sync(cls: type[S], options: StorageCreateOptions) -> S:
        """Synchronous :meth:`create`."""
        return runtime.run_sync(cls.create(options))

    # --- properties -----------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Current size in bytes."""

    @property
    def writable(self) -> bool:
        """Whether the storage was opened for writing."""
        return True

    @property
    def filename(self) -> str | None:
        """The name the storage was opened with, if it has one."""
        return None

    def allocated_size(self) -> int | None:
        """Bytes the storage occupies on its medium (``qemu-img info``'s ``actual-size``).

        ``None`` when the storage cannot tell (the default).
        """
        return None

    @property
    def mem_align(self) -> int:
        """Required alignment of buffer addresses for efficient I/O (1: none)."""
        return 1

    @property
    def req_align(self) -> int:
        """Required alignment of offsets and lengths for efficient I/O (1: none)."""
        return 1

    # --- I/O ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill *bufs* with the bytes at *offset*; bytes past the end read as zero."""

    @abc.abstractmethod
    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write all of *bufs* at *offset*, growing the storage if needed."""

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Synchronous :meth:`readv`, used by the synchronous API's fast path.

        The default drives :meth:`readv` by hand; a storage can override it with direct
        blocking I/O to save the coroutine overhead.
        """
        runtime.run_sync(self.readv(bufs, offset))

    async def data_extent(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether the bytes at *offset* hold data or are a hole, and how far that run reaches.

        Returns ``(is_data, run)`` with ``1 <= run <= length`` (*length* > 0): a hole reads as
        zeroes and occupies nothing (a sparse file's hole, an unmapped range). Tools that copy
        or map a format whose data lies in the storage as it is (raw) skip holes with it, as
        QEMU asks the file for its block status. The default knows of no holes: all data.
        """
        return True, length

    def map_read(self, offset: int, length: int) -> memoryview | None:
        """A read-only view of ``[offset, offset + length)`` straight from the medium, or ``None``.

        For copies that look at data before writing it elsewhere (``imago convert``): the bytes
        are not copied into a buffer first. The view shows the storage as it is, later writes
        included (it is not a snapshot), and stays valid while referenced; the range must lie
        inside the storage, and views must be dropped before the storage shrinks (a memory map
        of a truncated file faults). ``None`` (the default) means the storage cannot map it: read
        into a buffer instead. It may be called from imago's I/O threads (``imago convert`` maps
        and scans there): implementations must be thread-safe.
        """
        return None

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zero.

        ``unmap`` allows releasing the space (holes). The default writes zero buffers.
        """
        chunk = bytes(min(length, 1 << 20))
        view = memoryview(chunk)
        pos = 0
        while pos < length:
            step = min(length - pos, len(chunk))
            await self.writev([view[:step]], offset + pos)
            pos += step

    async def discard(self, offset: int, length: int) -> None:
        """Hint that the range is no longer needed; its contents become undefined. Default: no-op."""

    async def flush(self) -> None:
        """Write back volatile caches (``fdatasync`` for files). Default: no-op."""

    async def sync(self) -> None:
        """Make everything durable, metadata included (``fsync`` for files). Default: :meth:`flush`."""
        await self.flush()

    @abc.abstractmethod
    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow or shrink to *new_size*, preparing new space as *prealloc* says."""

    async def close(self) -> None:
        """Release the storage's resources. Further I/O raises. Default: no-op."""

    def resolve_relative_path(self, name: str) -> str:
        """Turn a file name recorded in an image on this storage into one that can be opened.

        The default keeps absolute names and resolves relative ones against the directory of
        :attr:`filename` (or the working directory if the storage has no name).
        """
        if os.path.isabs(name):
            return name
        base = self.filename
        directory = os.path.dirname(base) if base else ""
        return os.path.join(directory, name) if directory else name

    def __repr__(self) -> str:
        name = self.filename
        return f"<{type(self).__name__} {name!r}>" if name else f"<{type(self).__name__}>"


_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")


def uri_scheme(name: str) -> str | None:
    """The scheme of *name* if it is written as a URI (``scheme://...``, RFC 3986's scheme syntax), else ``None``.

    Lower-cased, as schemes compare case-insensitively. Syntax only: whether a storage driver
    opens that scheme is the plugin manager's to say (:attr:`Storage.uri_schemes`).
    """
    scheme, sep, _ = name.partition("://")
    if not sep or not scheme or not scheme[0].isascii() or not scheme[0].isalpha():
        return None
    if not _SCHEME_CHARS.issuperset(scheme):
        return None
    return scheme.lower()
