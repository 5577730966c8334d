"""Linux calls the os module lacks: fallocate with flags, block device ioctls."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "UNSUPPORTED_ERRNOS",
    "block_device_sector_size",
    "block_device_size",
    "fallocate",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_BLKSSZGET = 0x1268
_BLKGETSIZE64 = 0x80081272

#: errno values meaning "this file system or device cannot do that", calling for a fallback.
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises :class:`OSError` on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def block_device_size(fd: int) -> int:
    """Size in bytes of the block device open as *fd*."""
    return int(struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0])


def block_device_sector_size(fd: int) -> int:
    """Logical sector size of the block device open as *fd*."""
    return int(struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0])
