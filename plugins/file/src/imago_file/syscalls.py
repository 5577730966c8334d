"""Linux calls the os module lacks: fallocate with flags, block device ioctls."""

from __future__ import annotations

import ctypes
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
    "direct_io_alignment",
    "fallocate",
    "in_memory_file_system",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_BLKSSZGET = 0x1268
_BLKGETSIZE64 = 0x80081272

#: errno values meaning "this file system or device cannot do that", calling for a fallback.
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY})

# The C library is already loaded into every Python process: no find_library (it runs ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# f_type of the file systems that keep files in memory: tmpfs, ramfs, hugetlbfs (statfs(2)).
_MEMORY_FILE_SYSTEMS = frozenset({0x01021994, 0x858458F6, 0x958458F6})
_fstatfs = getattr(_libc, "fstatfs", None)
if _fstatfs is not None:
    _fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _fstatfs.restype = ctypes.c_int


def in_memory_file_system(fd: int) -> bool:
    """Whether the file of *fd* lives in a memory file system (tmpfs, ramfs, hugetlbfs).

    I/O there never waits for a device. ``False`` when ``fstatfs(2)`` is unavailable or fails.
    """
    if _fstatfs is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FILE_SYSTEMS  # f_type, the first field (a long)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises :class:`OSError` on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 256
_STATX_DIO_MEM_ALIGN = 152  # byte offsets of stx_dio_mem_align and stx_dio_offset_align
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int


def direct_io_alignment(fd: int) -> tuple[int, int] | None:
    """``(memory, offset)`` alignment O_DIRECT needs, from ``statx(STATX_DIOALIGN)``.

    ``None`` when the kernel or file system does not report it (before Linux 6.1).
    """
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    mask = struct.unpack_from("I", buf, 0)[0]
    mem_align, offset_align = struct.unpack_from("II", buf, _STATX_DIO_MEM_ALIGN)
    if not mask & _STATX_DIOALIGN or not mem_align or not offset_align:
        return None
    return int(mem_align), int(offset_align)


def block_device_size(fd: int) -> int:
    """Size in bytes of the block device open as *fd*."""
    return int(struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0])


def block_device_sector_size(fd: int) -> int:
    """Logical sector size of the block device open as *fd*."""
    return int(struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0])
