"""Implicit open gates: who decides which files an image may make us open.

Images name other files (a qcow2 backing file, an external data file). Opening those, and
opening an image by path through ``builder_path``, is an *implicit* open: it goes through the
gate passed to ``open()``. The file a caller names to :func:`imago.open` is an explicit open:
it is opened as asked, whatever its type and wherever it is, without the gate.

Every gate enforces that such names are local file names (never ``json:`` or ``protocol:``
strings); chains of images are checked for loops and depth by the builders
(:data:`~imago.format.builder.MAX_CHAIN_DEPTH`).

The sandbox gate closes the race between its check and the open (someone writing inside an
allowed directory swaps a checked file for a symbolic link, a FIFO or another file): the check
walks down from the allowed directory one component at a time without following symbolic links
(what ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` does, without ctypes), and records the
file's ``(st_dev, st_ino)``; the ``file`` driver then opens only that file (option
:data:`FILE_IDENTITY`), and the gate compares the opened descriptor with it once more.
"""

from __future__ import annotations

import abc
import errno
import os
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .._record import Record, evolve, init
from ..errors import ImplicitOpenDeniedError, InvalidOptionError
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

        driver = storage_driver(options.driver)
        if driver.uri_schemes:
            # Such a driver reaches other machines: a name an image records must never make us connect.
            raise ImplicitOpenDeniedError(
                str(options.filename),
                f"files an image names are never opened through the {driver.name!r} storage driver",
                allowable=False,
            )
        try:
            storage = await driver.open(options)
        except OSError as error:
            # A name the file system refuses (its limits may be below Linux's usual ones) is the
            # image's doing, not the system's: say so as a refusal naming it.
            if error.errno in _NAME_ERRNOS:
                raise _name_refused(str(options.filename), error) from error
            raise
        try:
            self._check_opened(storage, options)
        except BaseException:
            await storage.close()
            raise
        return storage

    def _check_opened(self, storage: Storage, options: StorageOpenOptions) -> None:
        """Raise if *storage*, just opened as *options* (from :meth:`check_storage`) say, is not what was allowed.

        The default accepts it; on a refusal the storage is closed.
        """

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

#: The ``file`` driver's option (in ``driver_options``) naming the file an open must reach, as
#: ``(st_dev, st_ino)``: the driver then neither follows a symbolic link in the last component
#: nor blocks on a FIFO, and refuses any other file with :class:`ImplicitOpenDeniedError`.
FILE_IDENTITY = "file_identity"

# How the walk down from an allowed directory opens each component: a handle on the name only
# (O_PATH: no device is opened, no FIFO waited for), never through a symbolic link.
_WALK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _is_under(real: str, directory: str) -> bool:
    return real == directory or real.startswith(directory.rstrip(os.sep) + os.sep)


def _changed(name: str, real: str) -> ImplicitOpenDeniedError:
    checked = "" if real == name else f" (checked as {real!r})"
    # Not allowable: no wider sandbox would help (the permissive gate would open whatever is there now).
    return ImplicitOpenDeniedError(name, f"the file changed while it was being opened{checked}", allowable=False)


class SandboxImplicitOpenGate(ImplicitOpenGate, Record):
    """Allows implicit opens only of regular local files under the given directories.

    The real path (symbolic links resolved) must lie under one of *directories*, and the
    file is opened through the ``file`` driver. The file opened is the file checked: a name
    changed in between (a symbolic link, a FIFO or another file put in its place, a directory
    swapped for a link) is refused as "changed while it was being opened", and nothing is read
    from what was put there.

    A hard link inside the directories to a file elsewhere cannot be told from the file's own
    name; with ``refuse_hard_links=True`` files with more than one name (``st_nlink > 1``) are
    refused (Linux's ``fs.protected_hardlinks``, on by default, already stops users linking
    files they could not read and write themselves).
    """

    __slots__ = ("directories", "refuse_hard_links")

    directories: tuple[str, ...]
    refuse_hard_links: bool

    def __init__(
        self,
        directories: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        refuse_hard_links: bool = False,
    ) -> None:
        init(self, "directories", _real_dirs(directories))
        if not isinstance(refuse_hard_links, bool):
            raise InvalidOptionError("refuse_hard_links", f"must be True or False, got {refuse_hard_links!r}")
        init(self, "refuse_hard_links", refuse_hard_links)

    def allows(self, path: str) -> bool:
        """Whether the real path of *path* lies under an allowed directory."""
        real = os.path.realpath(path)
        return any(_is_under(real, d) for d in self.directories)

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
        st = self._stat_beneath(name, real)
        if not stat.S_ISREG(st.st_mode):
            raise ImplicitOpenDeniedError(name, "not a regular file")
        if self.refuse_hard_links and st.st_nlink > 1:
            raise ImplicitOpenDeniedError(
                name, f"the file has {st.st_nlink} names (hard links), and this gate refuses hard-linked files"
            )
        # Open the resolved name, and only the file found here (whatever the name leads to by then).
        identity = (st.st_dev, st.st_ino)
        return evolve(options, filename=real, driver_options={**options.driver_options, FILE_IDENTITY: identity})

    def _stat_beneath(self, name: str, real: str) -> os.stat_result:
        """The status of the file at *real* (a resolved path), reached from its allowed directory without links.

        *real* holds no symbolic link, so a link met on the way was put there since it was resolved:
        the name changed. A missing file inside the allowed directories is the OS's
        FileNotFoundError (naming it), as for any explicit open: nothing is revealed that the caller
        could not see anyway.
        """
        base = max((d for d in self.directories if _is_under(real, d)), key=len)
        parts = [part for part in real[len(base) :].split(os.sep) if part]
        fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                try:
                    child = os.open(part, _WALK_FLAGS if last else _WALK_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                except OSError as error:
                    raise self._walk_error(name, real, fd, part, error) from error
                os.close(fd)
                fd = child
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if stat.S_ISLNK(st.st_mode):
            raise self._link_met(name, real)
        return st

    def _walk_error(self, name: str, real: str, dir_fd: int, part: str, error: OSError) -> Exception:
        """What to raise when the walk cannot open *part* in *dir_fd*: *error* about *real*, or a refusal."""
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            try:
                is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                return self._link_met(name, real)
        if error.errno in _NAME_ERRNOS:
            return _name_refused(name, error)
        return OSError(error.errno, error.strerror, real)

    @staticmethod
    def _link_met(name: str, real: str) -> ImplicitOpenDeniedError:
        """A symbolic link on the resolved path: a loop resolution left in place, or one put there since."""
        try:
            os.stat(real)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return _name_refused(name, error)
        return _changed(name, real)

    def _check_opened(self, storage: Storage, options: StorageOpenOptions) -> None:
        """Refuse a storage that is not the file checked (a ``file`` driver that ignored :data:`FILE_IDENTITY`)."""
        name = str(options.filename)
        fileno = getattr(storage, "fileno", None)
        if not callable(fileno):
            raise ImplicitOpenDeniedError(name, "the opened storage has no file descriptor to verify it by")
        identity = options.driver_options.get(FILE_IDENTITY)
        if identity is None:
            raise ImplicitOpenDeniedError(name, "the sandbox's check recorded no file identity to verify the open by")
        st = os.fstat(fileno())
        if (st.st_dev, st.st_ino) != identity:
            raise _changed(name, name)
