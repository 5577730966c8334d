"""Implicit open gates: who decides which files an image may make us open.

Images name other files (a qcow2 backing file, an external data file). Opening those, and
opening an image by path through ``builder_path``, is an *implicit* open: it goes through the
gate passed to ``open()``. The file a caller names to :func:`imago.open` is an explicit open:
it is opened as asked, whatever its type and wherever it is, without the gate.

Every gate enforces that such names are local file names (never ``json:`` or ``protocol:``
strings); chains of images are checked for loops and depth by the builders
(:data:`~imago.format.builder.MAX_CHAIN_DEPTH`).
"""

from __future__ import annotations

import abc
import errno
import os
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .._record import Record, evolve, init
from ..errors import ImplicitOpenDeniedError
from ..storage import Storage, StorageOpenOptions
from .names import check_local_file_name

if TYPE_CHECKING:
    from .builder import FormatDriverBuilder
    from .driver import FormatDriver

__all__ = [
    "DenyImplicitOpenGate",
    "ImplicitOpenGate",
    "PermissiveImplicitOpenGate",
    "SandboxImplicitOpenGate",
]

# A bound named by a string costs a compile() at import (typing's ForwardRef): only mypy needs it.
if TYPE_CHECKING:
    D = TypeVar("D", bound=FormatDriver)
else:
    D = TypeVar("D")


class ImplicitOpenGate(abc.ABC):
    """Base of all gates.

    Subclasses implement :meth:`check_storage` (and may refine :meth:`check_format`);
    opening itself is done here, through the driver registry.
    """

    @abc.abstractmethod
    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        """Allow opening a storage as *options* say, or raise :class:`ImplicitOpenDeniedError`.

        Returns the options to open with (a gate may adjust them).
        """

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        """Allow opening an image (e.g. a backing file) as *builder* says, or raise.

        The default allows it; its file still passes :meth:`check_storage`.
        """

    async def open_storage(self, options: StorageOpenOptions) -> Storage:
        """Check, then open a storage implicitly."""
        check_local_file_name(options.filename)
        check_name_limits(options.filename)
        options = await self.check_storage(options)
        # The registry (and pluggy with it) is imported by the first open, not by drivers importing this module.
        from ..plugin.manager import storage_driver

        try:
            return await storage_driver(options.driver).open(options)
        except OSError as error:
            # A name the file system refuses (its limits may be below Linux's usual ones) is the
            # image's doing, not the system's: say so as a refusal naming it.
            if error.errno in _NAME_ERRNOS:
                raise _name_refused(str(options.filename), error) from error
            raise

    async def open_format(self, builder: FormatDriverBuilder[D]) -> D:
        """Check, then open an image implicitly (a backing file)."""
        await self.check_format(builder)
        return await builder.open(self)


class PermissiveImplicitOpenGate(ImplicitOpenGate):
    """Opens whatever the image names (local files only).

    Dangerous for untrusted images: a crafted image can make you read any file you can
    read (``/etc/shadow`` as a backing file) and expose it through the guest disk.
    """

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        """Allow everything (beyond the local-name rule every gate enforces)."""
        return options


class DenyImplicitOpenGate(ImplicitOpenGate):
    """Refuses every implicit open; images must be given all their storages explicitly."""

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        """Refuse."""
        raise ImplicitOpenDeniedError(str(options.filename), "implicit opens are denied by DenyImplicitOpenGate")

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        """Refuse."""
        raise ImplicitOpenDeniedError(
            str(builder.path or builder.identity()), "implicit opens are denied by DenyImplicitOpenGate"
        )


# Linux's limits (<linux/limits.h>): a component of NAME_MAX bytes, a path of PATH_MAX bytes with its NUL.
NAME_MAX = 255
PATH_MAX = 4096
# Errors that a file name causes, whatever the file system holds.
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP})


def _name_refused(name: str, error: OSError) -> ImplicitOpenDeniedError:
    reason = "the file name is too long" if error.errno == errno.ENAMETOOLONG else "the file name cannot be resolved"
    return ImplicitOpenDeniedError(name, f"{reason} ({os.strerror(error.errno or 0)})", allowable=False)


def check_name_limits(name: str | os.PathLike[str] | None) -> None:
    """Refuse a name no local file can have: not encodable, a component over NAME_MAX bytes, a path over PATH_MAX.

    Names come from images: each failure is an :class:`ImplicitOpenDeniedError` naming the name,
    never an ``OSError`` or ``UnicodeError`` from the system call that would have failed.
    """
    if name is None:
        return
    text = os.fspath(name)
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        raise ImplicitOpenDeniedError(
            repr(text), "the file name cannot be encoded for the file system (not valid text)", allowable=False
        ) from None
    if b"\0" in raw:
        raise ImplicitOpenDeniedError(repr(text), "file name contains a NUL byte", allowable=False)
    if len(raw) >= PATH_MAX:
        raise ImplicitOpenDeniedError(
            text, f"the file name of {len(raw)} bytes exceeds PATH_MAX ({PATH_MAX - 1} bytes)", allowable=False
        )
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ImplicitOpenDeniedError(
            text,
            f"a component of the file name has {len(longest)} bytes, more than NAME_MAX ({NAME_MAX})",
            allowable=False,
        )


def _real_dirs(
    directories: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
) -> tuple[str, ...]:
    if isinstance(directories, (str, os.PathLike)):
        # One directory, not an iterable of one-character names (which would include "/").
        directories = [directories]
    dirs = tuple(os.path.realpath(os.fspath(d)) for d in directories)
    if not dirs:
        raise ValueError("SandboxImplicitOpenGate needs at least one allowed directory")
    return dirs


class SandboxImplicitOpenGate(ImplicitOpenGate, Record):
    """Allows implicit opens only of regular local files under the given directories.

    The real path (symbolic links resolved) must lie under one of *directories*, and the
    file is opened through the ``file`` driver.
    """

    __slots__ = ("directories",)

    directories: tuple[str, ...]

    def __init__(self, directories: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> None:
        init(self, "directories", _real_dirs(directories))

    def allows(self, path: str) -> bool:
        """Whether the real path of *path* lies under an allowed directory."""
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.directories)

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        """Allow regular files under the allowed directories; open them by their real path."""
        name = str(options.filename)
        if options.driver != "file":
            raise ImplicitOpenDeniedError(
                name, f"the sandbox gate opens only local files, not {options.driver!r} storage"
            )
        real = os.path.realpath(name)
        if not self.allows(real):
            raise ImplicitOpenDeniedError(
                name, f"{real!r} is outside the allowed directories ({', '.join(self.directories)})"
            )
        # (Resolving symbolic links can make the name longer than the limits.)
        check_name_limits(real)
        # A missing file inside the allowed directories is the OS's FileNotFoundError (naming it),
        # as for any explicit open: nothing is revealed that the caller could not see anyway.
        try:
            mode = os.stat(real).st_mode
        except OSError as error:
            if error.errno in _NAME_ERRNOS:
                raise _name_refused(name, error) from error
            raise
        if not stat.S_ISREG(mode):
            raise ImplicitOpenDeniedError(name, "not a regular file")
        # Open the resolved name, so that the file checked is the file opened.
        return evolve(options, filename=real)
