"""The exception tree: every error imago raises derives from :class:`ImagoError`.

Subclasses also derive from the builtin exception that fits, so callers that catch
``ValueError`` or ``PermissionError`` keep working. Errors carry the facts that explain them
(file name, offset, option) as attributes, and name them in their message.
"""

from __future__ import annotations

import errno
import os

__all__ = [
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
]


class ImagoError(Exception):
    """Root of every error raised by imago itself (OS errors pass through unchanged)."""


class PluginError(ImagoError):
    """A plugin could not be loaded or registered something invalid."""


class PluginLoadError(PluginError):
    """Importing or running a plugin's registration hooks failed.

    ``plugin`` is the entry-point name, ``distribution`` the distribution that declares it.
    The original exception is chained as ``__cause__``.
    """

    def __init__(self, plugin: str, distribution: str | None, reason: str) -> None:
        self.plugin = plugin
        self.distribution = distribution
        self.reason = reason
        source = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"plugin {plugin!r}{source} failed to load: {reason}")


class DuplicateDriverError(PluginError):
    """Two plugins registered a driver of the same kind under the same name."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind = kind
        self.name = name
        self.plugins = (first, second)
        super().__init__(f"{kind} driver {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}")


class InvalidDriverError(PluginError, TypeError):
    """A plugin tried to register something that is not a valid driver class."""


class DriverNotFoundError(ImagoError, LookupError):
    """No installed plugin provides the requested driver.

    ``distribution`` names the distribution that would provide it. ``suggestion`` is the name
    of a driver differing only in case (driver names are case-sensitive), which
    ``distribution`` provides.
    """

    def __init__(
        self, kind: str, name: str, distribution: str, detail: str = "", *, suggestion: str | None = None
    ) -> None:
        self.kind = kind
        self.name = name
        self.distribution = distribution
        self.suggestion = suggestion
        if suggestion is None:
            message = f"no {kind} driver named {name!r} is installed (install the distribution {distribution!r})"
        else:
            message = (
                f"no {kind} driver named {name!r} is installed (did you mean {suggestion!r}? driver names are "
                f"case-sensitive; {suggestion!r} comes from the distribution {distribution!r})"
            )
        super().__init__(message + (f"; {detail}" if detail else ""))


class ImplicitOpenDeniedError(ImagoError, PermissionError):
    """An open gate refused to open a file that an image refers to.

    ``allowable``: whether a wider gate would open it (``False`` for names no gate opens: over
    the file system's limits, with NUL bytes, ...).
    """

    def __init__(self, filename: str, reason: str, *, allowable: bool = True) -> None:
        self.filename = filename
        self.reason = reason
        self.allowable = allowable
        ImagoError.__init__(self, f"implicit open of {filename!r} denied: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class BackingChainError(ImagoError, ValueError):
    """A chain of images referring to each other loops or is deeper than allowed."""

    def __init__(self, filename: str, reason: str) -> None:
        self.filename = filename
        self.reason = reason
        super().__init__(f"{filename}: {reason}")


class CorruptImageError(ImagoError, ValueError):
    """An image's metadata is invalid; ``offset`` is where in the file the problem lies."""

    def __init__(self, filename: str | None, offset: int | None, problem: str) -> None:
        self.filename = filename
        self.offset = offset
        self.problem = problem
        where = filename or "<image>"
        if offset is not None:
            where += f" at offset {offset:#x}"
        super().__init__(f"{where}: {problem}")


class UnsupportedFeatureError(ImagoError, NotImplementedError):
    """The image or request uses a feature this driver does not implement."""

    def __init__(self, feature: str, filename: str | None = None) -> None:
        self.feature = feature
        self.filename = filename
        prefix = f"{filename}: " if filename else ""
        super().__init__(f"{prefix}unsupported feature: {feature}")


class DirtyImageError(ImagoError, ValueError):
    """An image a crash left dirty (refcounts possibly stale) was opened for writing.

    ``filename`` names the image; ``repair`` says how to make it writable again.
    """

    def __init__(self, filename: str | None, repair: str) -> None:
        self.filename = filename
        self.repair = repair
        super().__init__(
            f"{describe(filename)}: the image is dirty (its refcounts may be stale); {repair} before writing to it"
        )


class SnapshotNotFoundError(ImagoError, LookupError):
    """No internal snapshot has the ID or name asked for (``snapshot``) in the image ``filename``."""

    def __init__(self, filename: str | None, snapshot: str) -> None:
        self.filename = filename
        self.snapshot = snapshot
        super().__init__(f"{describe(filename)}: no snapshot with ID or name {snapshot!r}")

    def __str__(self) -> str:
        return str(self.args[0])


class MissingStorageError(ImagoError, ValueError):
    """An image needs a further file (``role``: an external data file, say) that was not given."""

    def __init__(self, filename: str | None, role: str, problem: str) -> None:
        self.filename = filename
        self.role = role
        self.problem = problem
        super().__init__(f"{describe(filename)}: {problem}")


class AllocationError(ImagoError, RuntimeError):
    """Space for metadata could not be found where the format needs it (``what`` was being placed)."""

    def __init__(self, filename: str | None, what: str, problem: str) -> None:
        self.filename = filename
        self.what = what
        self.problem = problem
        super().__init__(f"{describe(filename)}: cannot place {what}: {problem}")


class ResourceLimitError(ImagoError, ValueError):
    """Opening or using an image would hold more memory than the chain's limit allows.

    ``filename`` is the image, ``what`` what it would have held (``"its L1 table"``),
    ``nbytes`` how much, ``held`` what the chain held already and ``limit`` the limit
    (:meth:`~imago.FormatDriverBuilder.memory_limit`, ``imago.open(memory_limit=...)``).
    """

    def __init__(self, filename: str | None, what: str, nbytes: int, *, held: int, limit: int) -> None:
        self.filename = filename
        self.what = what
        self.nbytes = nbytes
        self.held = held
        self.limit = limit
        super().__init__(
            f"{describe(filename)}: {what} would take {nbytes} bytes of memory; with the {held} bytes the "
            f"chain holds already that exceeds its memory limit of {limit} bytes"
        )


class DriverContractError(ImagoError, RuntimeError):
    """A driver broke the interface contract (an empty mapping, a range outside the request, ...).

    ``driver`` names the driver, ``offset`` the guest offset concerned (if any). This is a bug in
    the driver, not in the image.
    """

    def __init__(self, driver: str, problem: str, offset: int | None = None) -> None:
        self.driver = driver
        self.problem = problem
        self.offset = offset
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{driver} driver{where}: {problem}")


class UnsupportedFileTypeError(ImagoError, OSError):
    """A storage driver was asked to open a kind of file it cannot use (a FIFO, a character device)."""

    def __init__(self, filename: str, kind: str, expected: str) -> None:
        ImagoError.__init__(self, f"{filename}: {kind}, not {expected}")
        self.filename = filename
        self.kind = kind
        self.expected = expected

    def __str__(self) -> str:
        return str(self.args[0])


class ImageLockedError(ImagoError, OSError):
    """Another process (QEMU, or imago elsewhere) holds a lock on ``filename`` that this open conflicts with.

    ``lock`` names the permission as QEMU does (``"write"``, ``"consistent read"``, ``"resize"``);
    ``shared`` is true when the other process holds that permission and this open would not
    share it (QEMU's ``Failed to get shared "write" lock``), false when this open needs the
    permission and the other process does not share it (``Failed to get "write" lock``).
    ``errno`` is ``EAGAIN``, as the lock call reports.
    """

    def __init__(self, filename: str, lock: str, *, shared: bool = False) -> None:
        kind = "shared " if shared else ""
        message = (
            f'{filename}: Failed to get {kind}"{lock}" lock; is another process using the image? '
            "To read it while it may change, open it read-only with force_share=True (-U)"
        )
        ImagoError.__init__(self, message)
        self.errno = errno.EAGAIN
        self.strerror = message
        self.filename = filename
        self.lock = lock
        self.shared = shared

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidRequestError(ImagoError, ValueError):
    """An I/O request is malformed: negative offset, past the end of the disk, and the like."""


class InvalidBufferError(ImagoError, TypeError):
    """A buffer argument does not support the buffer protocol, or is read-only where it must be written."""


class InvalidOptionError(ImagoError, ValueError):
    """An option has a bad value; ``option`` names it."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"option {option!r}: {problem}")


class ReadOnlyError(ImagoError, PermissionError):
    """A write was attempted on an image or storage opened read-only."""

    def __init__(self, what: str) -> None:
        ImagoError.__init__(self, f"{what} is opened read-only")

    def __str__(self) -> str:
        return str(self.args[0])


class ClosedError(ImagoError, ValueError):
    """The image or storage has been closed."""


class SuspendedInSyncModeError(ImagoError, RuntimeError):
    """A coroutine driven by the synchronous API had to wait for something.

    Synchronous calls run their coroutine by hand and cannot wait; this happens when a
    driver awaits something other than imago's own I/O helpers, or when the same image is
    busy in asynchronous tasks at the same time.
    """


def describe(path: str | os.PathLike[str] | None) -> str:
    """A printable name for a file, for messages."""
    return os.fspath(path) if path is not None else "<anonymous>"
