"""QEMU's image locking: open-file-description byte-range locks on the image file.

QEMU (``block/file-posix.c``) shares an image between processes by permissions. For each
permission *n* it may take a shared (read) lock on byte ``100 + n`` ("I hold permission *n*")
and on byte ``200 + n`` ("I do not let others hold permission *n*"). Opening locks its bytes,
then tests with ``F_OFD_GETLK`` whether any other open file description holds a lock on the
bytes that say it must not: the "not shared" byte of each permission it takes, the "held" byte
of each permission it does not share. Locking first and testing second means two processes
racing to open the same image see each other; the loser drops its locks again.

The locks are OFD locks (``F_OFD_SETLK``): they belong to the open file description, so a second
open of the same file in the same process conflicts like another process does, and a child that
inherits the descriptor through ``fork`` shares the parent's locks rather than taking its own.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import sys

from imago import ImageLockedError

__all__ = [
    "LOCK_BYTES",
    "NOT_SHARED_BASE",
    "PERMISSION_BASE",
    "Permission",
    "lock_image",
    "locked_bytes",
    "permissions",
    "unlock_image",
]

#: Byte ``PERMISSION_BASE + n`` is locked by every open holding permission *n*.
PERMISSION_BASE = 100
#: Byte ``NOT_SHARED_BASE + n`` is locked by every open that does not share permission *n*.
NOT_SHARED_BASE = 200


class Permission(enum.IntFlag):
    """QEMU's block permissions (``BLK_PERM_*``), by bit: bit *n* maps to bytes 100+n and 200+n."""

    CONSISTENT_READ = 1 << 0
    WRITE = 1 << 1
    WRITE_UNCHANGED = 1 << 2
    RESIZE = 1 << 3

    @property
    def qemu_name(self) -> str:
        """The name QEMU's messages use (``Failed to get "write" lock``)."""
        return (self.name or "").lower().replace("_", " ")

    @property
    def bit(self) -> int:
        """The bit number *n*: the permission's bytes are ``100 + n`` and ``200 + n``."""
        return int(self).bit_length() - 1


#: The single permissions, in bit order.
_PERMISSIONS = tuple(Permission)
#: Every byte the protocol may lock, as one range to release in one call.
LOCK_BYTES = range(PERMISSION_BASE, NOT_SHARED_BASE + len(_PERMISSIONS))

_NONE = Permission(0)


def permissions(*, writable: bool, force_share: bool, share_write: bool = False) -> tuple[Permission, Permission]:
    """What an open holds and what it does not share: ``(held, not_shared)``.

    As QEMU 7.2 takes them for the files of a qcow2 image (read in ``/proc/locks`` while
    ``qemu-io`` holds one): a read-write open holds consistent read, write and resize and
    shares neither write nor resize; a read-only open holds consistent read and shares neither
    write nor resize (the metadata it reads must not change); ``share_write`` (an external data
    file) shares write but not resize; ``force_share`` (``-U``) holds consistent read and shares
    everything, so it never stops a writer.
    """
    held = Permission.CONSISTENT_READ
    if writable:
        held |= Permission.WRITE | Permission.RESIZE
    if force_share:
        not_shared = _NONE
    elif share_write:
        not_shared = Permission.RESIZE
    else:
        not_shared = Permission.WRITE | Permission.RESIZE
    return held, not_shared


class _Flock(ctypes.Structure):
    """``struct flock`` (Linux, 64-bit ``off_t``, as OFD locks require)."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int32),
    )


def _fcntl_lock(fd: int, command: int, lock_type: int, start: int, length: int) -> int:
    """One ``F_OFD_*`` call on ``[start, start + length)``; returns the ``l_type`` the kernel answers."""
    # l_pid must be 0 for OFD locks; l_whence is SEEK_SET.
    request = _Flock(lock_type, 0, start, length, 0)
    answer = fcntl.fcntl(fd, command, bytes(request))
    return int(_Flock.from_buffer_copy(answer).l_type)


def _lock_byte(fd: int, offset: int) -> None:
    _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset, 1)


def _byte_locked_by_others(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte *offset* (``F_OFD_GETLK``)."""
    return _fcntl_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset, 1) != fcntl.F_UNLCK


def _conflict(fd: int, held: Permission, not_shared: Permission) -> tuple[Permission, bool] | None:
    """The first permission another open forbids us, and whether it is one we do not share."""
    for permission in _PERMISSIONS:
        if permission in held and _byte_locked_by_others(fd, NOT_SHARED_BASE + permission.bit):
            return permission, False
    for permission in _PERMISSIONS:
        if permission in not_shared and _byte_locked_by_others(fd, PERMISSION_BASE + permission.bit):
            return permission, True
    return None


def lock_image(fd: int, filename: str, *, writable: bool, force_share: bool, share_write: bool = False) -> None:
    """Take QEMU's locks for an open of *filename* on *fd*, or raise :class:`ImageLockedError`.

    The locks are those :func:`permissions` names. On any failure the locks taken so far are
    released again.
    """
    held, not_shared = permissions(writable=writable, force_share=force_share, share_write=share_write)
    wanted = [(PERMISSION_BASE + p.bit, p, False) for p in _PERMISSIONS if p in held]
    wanted += [(NOT_SHARED_BASE + p.bit, p, True) for p in _PERMISSIONS if p in not_shared]
    try:
        for offset, permission, shared in wanted:
            try:
                _lock_byte(fd, offset)
            except OSError as error:
                # Nobody takes write locks on these bytes: only a foreign exclusive lock (a POSIX
                # lock on the whole file, say) makes taking ours fail.
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise ImageLockedError(filename, permission.qemu_name, shared=shared) from error
                raise
        conflict = _conflict(fd, held, not_shared)
        if conflict is not None:
            permission, shared = conflict
            raise ImageLockedError(filename, permission.qemu_name, shared=shared)
    except BaseException:
        unlock_image(fd)
        raise


def unlock_image(fd: int) -> None:
    """Release every lock of the protocol held through *fd*'s open file description."""
    _fcntl_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, LOCK_BYTES.start, len(LOCK_BYTES))


# What locked_bytes reports: every byte a QEMU of any version may use (up to 100 permissions).
_REPORTED = range(PERMISSION_BASE, NOT_SHARED_BASE + 100)


def locked_bytes(path: str | os.PathLike[str]) -> dict[int, int]:
    """Which protocol bytes of the file *path* are locked, by anyone, and by how many locks.

    Read from ``/proc/locks`` (a diagnostic: which processes hold an image, and how). That file
    is produced in chunks and may repeat or miss a lock while other processes lock and unlock:
    it is read until two reads agree.
    """
    previous = _read_locked_bytes(path)
    for _ in range(50):
        current = _read_locked_bytes(path)
        if current == previous:
            return current
        previous = current
    return previous


def _read_locked_bytes(path: str | os.PathLike[str]) -> dict[int, int]:
    st = os.stat(path)
    # Block device nodes are locked on their own inode, like any file.
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    counts: dict[int, int] = {}
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields or device not in fields:
                continue  # "->" marks a waiter, not a held lock
            start, end = int(fields[-2]), fields[-1]
            last = sys.maxsize if end == "EOF" else int(end)
            for byte in range(max(start, _REPORTED.start), min(last, _REPORTED.stop - 1) + 1):
                counts[byte] = counts.get(byte, 0) + 1
    return counts
