"""The ``file`` storage driver: local files and block devices.

Reads and writes go with ``os.preadv``/``os.pwritev`` straight between the file and the
caller's buffers. Without a running event loop (or under the synchronous API) I/O happens in
place; under a loop a non-blocking attempt (``RWF_NOWAIT``) serves what the page cache
holds (reads up to 4 MiB, writes up to 256 KiB), and the rest moves to imago's I/O threads.
In a memory file system (tmpfs, where ``RWF_NOWAIT`` is unsupported and nothing waits for a
device) requests of those sizes are done in place under a loop too. ``O_DIRECT`` I/O always
waits for the device: under a loop it always moves to a thread. With ``direct=True`` the file is opened
``O_DIRECT``; requests that miss the alignment are served through aligned bounce buffers
(read-modify-write for writes, serialised against overlapping writes).

Opening takes QEMU's image locks (see :mod:`imago_file.locking`), so imago and QEMU processes
sharing a host exclude each other as QEMU processes do; closing releases them.

``driver_options={"file_identity": (st_dev, st_ino)}`` (what the sandbox gate passes) opens
only that file: the name is first opened as a handle (``O_PATH``, never through a symbolic link
in its last component: no device opened, no FIFO waited for), compared with the identity, and
only then reopened for I/O through ``/proc/self/fd`` (the same file, whatever the name leads to
by then). Without ``/proc`` the name itself is opened non-blocking and not following a link,
and compared after opening. Another file is refused with :class:`~imago.ImplicitOpenDeniedError`.
"""

from __future__ import annotations

import _thread
import errno
import mmap
import os
import stat
from collections.abc import Sequence

from imago import (
    ClosedError,
    ImplicitOpenDeniedError,
    InvalidOptionError,
    PreallocateMode,
    RangeLock,
    ReadOnlyError,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    UnsupportedFeatureError,
    UnsupportedFileTypeError,
    runtime,
)
from imago.io_buffers import aligned_buffer, iovec_length, is_aligned, slice_iovec, zero_fill

from . import locking, syscalls

__all__ = ["File"]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Largest bounce buffer and zero-write chunk, to keep memory bounded for large requests.
_CHUNK = 4 << 20
# Writes up to this size are tried in place with RWF_NOWAIT (the page cache takes them faster
# than a thread hand-off); larger ones go to the thread pool, so that many of them (a copy's
# writes) run on all cores at once instead of one after another in the loop's thread.
_NOWAIT_MAX = 256 << 10
# Reads up to this size are tried in place too. A page-cache hit is a memory copy, and the
# hand-off to a thread and back costs as much as copying a few hundred KiB (1 MiB reads through
# the pool reached half the speed of bare preadv, also 16 in flight on 2 cores); io_uring does
# such copies in the submitting thread as well. Past this, the loop would stall too long.
_NOWAIT_READ_MAX = 4 << 20
# The window of a file that map_read keeps mapped (the requests of a sequential reader fall in it).
_WINDOW = 128 << 20
# madvise(2) advice that maps a range's pages in at once (Linux 5.14); Python 3.11 lacks the name.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# What QEMU allocates of a file it creates (a block O_DIRECT alignment probing can read).
_FIRST_BLOCK = 4096

# Alignments tried when probing what O_DIRECT needs; the largest is the safe fallback.
_ALIGNMENTS = (1, 512, 1024, 2048, 4096)
# End of the range a write locks when it must own everything from its start to the end of the file.
_TO_EOF = 1 << 63
# The driver option naming the only file an open may reach (imago.format.gates.FILE_IDENTITY).
_FILE_IDENTITY = "file_identity"
# Where a descriptor is reopened: the magic link reaches its very file, whatever its name now is.
_PROC_FD = "/proc/self/fd/"


def _file_kind(mode: int) -> str:
    """What kind of file *mode* describes, for messages."""
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_file_type(filename: str, mode: int) -> None:
    """Refuse what is neither a regular file nor a block device."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), filename)
    raise UnsupportedFileTypeError(filename, _file_kind(mode), "a regular file or block device")


def _file_identity(options: StorageOpenOptions) -> tuple[int, int] | None:
    """The ``(st_dev, st_ino)`` the open must reach, if the options name one."""
    identity = options.driver_options.get(_FILE_IDENTITY)
    if identity is None:
        return None
    if (
        not isinstance(identity, tuple)
        or len(identity) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in identity)
    ):
        raise InvalidOptionError(
            "driver_options", f"{_FILE_IDENTITY!r} must be a (st_dev, st_ino) pair of integers, got {identity!r}"
        )
    return identity


def _changed(filename: str) -> ImplicitOpenDeniedError:
    return ImplicitOpenDeniedError(filename, "the file changed while it was being opened", allowable=False)


def _open_identified(filename: str, flags: int, identity: tuple[int, int]) -> int:
    """Open *filename* with *flags* only if it is the file *identity* names; never blocks on a FIFO."""
    # No controlling terminal, no waiting for a FIFO's other end (cleared again once the file is known).
    flags |= os.O_NONBLOCK | os.O_NOCTTY
    handle = os.open(filename, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(handle)
        # (A symbolic link in the last component is its own file here, so it never matches.)
        if (st.st_dev, st.st_ino) != identity:
            raise _changed(filename)
        # Refused before opening it for I/O: what the driver would refuse after a plain open.
        _check_file_type(filename, st.st_mode)
        try:
            fd = os.open(f"{_PROC_FD}{handle}", flags)
        except FileNotFoundError:
            # No /proc: the name once more, compared after opening (a device put there meanwhile is opened, unread).
            try:
                fd = os.open(filename, flags | os.O_NOFOLLOW)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise _changed(filename) from error
                raise
    finally:
        os.close(handle)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != identity:
            raise _changed(filename)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class File(Storage):
    """A local file or block device.

    Open with ``File.open_sync(StorageOpenOptions(filename=..., writable=..., direct=...))``;
    create with ``File.create_sync(StorageCreateOptions(filename=..., size=..., overwrite=...))``.
    """

    name = "file"

    def __init__(self, fd: int, filename: str, *, writable: bool, direct: bool, block_device: bool, size: int) -> None:
        self._fd = fd
        self._filename = filename
        self._writable = writable
        self._direct = direct
        self._block_device = block_device
        self._size = size
        self._nowait_read = True
        self._nowait_write = True
        # tmpfs and the like: no request waits for a device, so under a loop small ones are done in
        # place (where RWF_NOWAIT is unsupported and would send every one to a thread).
        self._in_memory = not direct and not block_device and syscalls.in_memory_file_system(fd)
        self._mem_align = 1
        self._req_align = 1
        self._locks = RangeLock()
        self._no_flush = False
        self._force_share = False
        # map_read's current window: (file offset, map); dropped (not closed: views may live) on shrink and close.
        self._window: tuple[int, mmap.mmap] | None = None
        self._window_lock = _thread.allocate_lock()
        self._populate = True
        # The process that took the image locks: only it releases them (a forked child shares
        # the open file description, and unlocking there would drop the parent's locks).
        self._lock_owner: int | None = None
        if direct:
            try:
                self._mem_align, self._req_align = self._probe_alignment()
            except BaseException:
                self._fd = -1  # the opener closes the descriptor; __del__ must not close it again
                raise

    # --- construction -------------------------------------------------------------------------

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> File:
        """Open ``options.filename`` (read-only unless ``writable``; ``O_DIRECT`` if ``direct``).

        Takes QEMU's image locks (fewer with ``force_share``); :class:`~imago.ImageLockedError`
        if another process's locks forbid this open.
        """
        return await runtime.run_blocking(cls._open_blocking, options, 0)

    @classmethod
    async def create(cls, options: StorageCreateOptions) -> File:
        """Create the file (``overwrite`` replaces an existing one), sized and preallocated as asked.

        An existing file is emptied only once its locks are ours: an image another process
        holds is left untouched (:class:`~imago.ImageLockedError`).
        """
        flags = os.O_CREAT | (0 if options.overwrite else os.O_EXCL)
        storage = await runtime.run_blocking(cls._open_blocking, options.open_options(), flags, options.overwrite)
        try:
            if storage._block_device:
                raise UnsupportedFeatureError("creating a block device", options.filename)
            if options.size or options.preallocate is not PreallocateMode.NONE:
                await storage.resize(options.size, options.preallocate)
        except BaseException:
            await storage.close()
            raise
        return storage

    @classmethod
    def _open_blocking(cls, options: StorageOpenOptions, extra_flags: int, truncate: bool = False) -> File:
        filename = options.filename
        if not filename:
            raise InvalidOptionError("filename", "the file driver needs a file name")
        flags = (os.O_RDWR if options.writable else os.O_RDONLY) | os.O_CLOEXEC | extra_flags
        if options.direct:
            flags |= os.O_DIRECT
        identity = _file_identity(options)
        if identity is None:
            fd = os.open(filename, flags, 0o644)
        elif extra_flags & os.O_CREAT:
            raise InvalidOptionError(
                "driver_options", f"{_FILE_IDENTITY!r} opens an existing file; it cannot create one"
            )
        else:
            fd = _open_identified(filename, flags, identity)
        try:
            st = os.fstat(fd)
            _check_file_type(filename, st.st_mode)
            if stat.S_ISBLK(st.st_mode):
                block_device, size = True, syscalls.block_device_size(fd)
            else:
                block_device, size = False, st.st_size
            locking.lock_image(
                fd,
                filename,
                writable=options.writable,
                force_share=options.force_share,
                share_write=options.share_write,
            )
            if truncate and not block_device:
                os.ftruncate(fd, 0)
                size = 0
            storage = cls(
                fd, filename, writable=options.writable, direct=options.direct, block_device=block_device, size=size
            )
            storage._no_flush = options.no_flush
            storage._force_share = options.force_share
            storage._lock_owner = os.getpid()
            return storage
        except BaseException:
            os.close(fd)  # closing the last descriptor of the open file description drops its locks
            raise

    def _probe_alignment(self) -> tuple[int, int]:
        """Find O_DIRECT's memory and request alignment without ever writing to the file.

        The kernel says it where it can (``statx``); otherwise aligned reads are tried where
        the file has data (reads of holes and past the end succeed at any alignment, so they
        teach nothing), and the largest candidate is the safe fallback.
        """
        if self._block_device:
            sector = syscalls.block_device_sector_size(self._fd)
            return max(sector, 512), sector
        reported = syscalls.direct_io_alignment(self._fd)
        if reported is not None:
            return reported
        largest = _ALIGNMENTS[-1]
        try:
            data = os.lseek(self._fd, 0, os.SEEK_DATA)
        except OSError:
            return largest, largest
        position = -(-data // largest) * largest
        if position + largest > self._size or os.lseek(self._fd, position, os.SEEK_HOLE) < position + largest:
            return largest, largest
        buf = aligned_buffer(2 * largest, largest)
        req_align = largest
        for align in _ALIGNMENTS:
            if self._aligned_read_works(buf[:align], position):
                req_align = align
                break
        mem_align = largest
        for align in _ALIGNMENTS:
            if self._aligned_read_works(buf[align : align + req_align], position):
                mem_align = align
                break
        return mem_align, req_align

    def _aligned_read_works(self, view: memoryview, position: int) -> bool:
        try:
            os.preadv(self._fd, [view], position)
        except OSError as error:
            if error.errno == errno.EINVAL:
                return False
            raise
        return True

    # --- facts -----------------------------------------------------------------------------------

    def allocated_size(self) -> int | None:
        """Bytes allocated to the file on its filesystem (``st_blocks``); ``None`` for a block device."""
        st = os.fstat(self._fd)
        return None if stat.S_ISBLK(st.st_mode) else st.st_blocks * 512

    @property
    def size(self) -> int:
        """Size in bytes (block devices: as the kernel reports it)."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the file was opened for writing."""
        return self._writable

    @property
    def filename(self) -> str:
        """The file name it was opened with."""
        return self._filename

    @property
    def direct(self) -> bool:
        """Whether the page cache is bypassed (``O_DIRECT``)."""
        return self._direct

    @property
    def block_device(self) -> bool:
        """Whether this is a block device rather than a regular file."""
        return self._block_device

    @property
    def mem_align(self) -> int:
        """Buffer address alignment O_DIRECT needs (1 without ``direct``)."""
        return self._mem_align

    @property
    def req_align(self) -> int:
        """Offset and length alignment O_DIRECT needs (1 without ``direct``)."""
        return self._req_align

    def fileno(self) -> int:
        """The file descriptor."""
        return self._live_fd()

    def _live_fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ClosedError(f"{self._filename} is closed")
        return fd

    def _writable_fd(self) -> int:
        fd = self._live_fd()
        if not self._writable:
            raise ReadOnlyError(self._filename)
        return fd

    # --- reading -----------------------------------------------------------------------------------

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Blocking read in place (the synchronous API's fast path)."""
        fd = self._live_fd()
        if self._direct:
            runtime.run_sync(self.readv(bufs, offset))
            return
        if len(bufs) == 1 and os.preadv(fd, bufs, offset) == bufs[0].nbytes:
            return
        self._preadv_full(fd, bufs, offset)

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill *bufs* from *offset*; bytes past the end of the file read as zero."""
        # The hot path of every read under a loop, kept to a few attribute look-ups.
        fd = self._fd
        if fd < 0 or self._direct:
            await self._readv_unbuffered(bufs, offset)
            return
        total = bufs[0].nbytes if len(bufs) == 1 else iovec_length(bufs)
        if total <= _NOWAIT_READ_MAX and len(bufs) <= _IOV_MAX:
            if self._in_memory:
                # Nothing to wait for: in place, to the end (and the zeroes past the end of the file).
                if os.preadv(fd, bufs, offset) != total:
                    self._preadv_full(fd, bufs, offset)
                return
            # What the page cache holds is read in place whatever the mode; only the rest needs
            # the inline-or-thread decision (which costs a loop look-up).
            if self._nowait_read:
                try:
                    done = os.preadv(fd, bufs, offset, os.RWF_NOWAIT)
                except BlockingIOError:
                    done = 0
                except OSError as error:
                    if error.errno not in syscalls.UNSUPPORTED_ERRNOS:
                        raise
                    self._nowait_read = False
                    done = 0
                if done == total:
                    return
                if done:
                    bufs, offset = slice_iovec(bufs, done, total - done), offset + done
        await runtime.run_blocking(self._preadv_full, fd, bufs, offset)

    async def _readv_unbuffered(self, bufs: Sequence[memoryview], offset: int) -> None:
        """A read of a closed file (the error) or with ``O_DIRECT``: never in the loop's thread."""
        fd = self._live_fd()
        # RWF_NOWAIT does not make an O_DIRECT read return early: it would wait for the device
        # in the loop's thread.
        if is_aligned(bufs, offset, self._mem_align, self._req_align):
            await runtime.run_blocking(self._preadv_full, fd, bufs, offset)
        else:
            await self._readv_bounced(bufs, offset)

    def _preadv_full(self, fd: int, bufs: Sequence[memoryview], offset: int) -> None:
        """Read until every buffer is full; zero-fill past the end of the file."""
        total = iovec_length(bufs)
        done = 0
        iov = bufs if len(bufs) <= _IOV_MAX else bufs[:_IOV_MAX]
        while done < total:
            if done:
                rest = slice_iovec(bufs, done, total - done)
                iov = rest[:_IOV_MAX]
            count = os.preadv(fd, iov, offset + done)
            # With O_DIRECT a short read means the end of the file; retrying at its (unaligned)
            # end would fail with EINVAL.
            if count == 0 or (self._direct and count < iovec_length(iov)):
                zero_fill(slice_iovec(bufs, done + count, total - done - count))
                return
            done += count

    async def _readv_bounced(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Direct read of a misaligned request through an aligned buffer."""
        align = self._req_align
        total = iovec_length(bufs)
        done = 0
        while done < total:
            step = min(total - done, _CHUNK)
            start = (offset + done) // align * align
            end = -(-(offset + done + step) // align) * align
            bounce = aligned_buffer(end - start, max(self._mem_align, mmap.PAGESIZE))
            await self._direct_read(bounce, start)
            skip = offset + done - start
            pos = 0
            for view in slice_iovec(bufs, done, step):
                view[:] = bounce[skip + pos : skip + pos + view.nbytes]
                pos += view.nbytes
            done += step

    async def _direct_read(self, bounce: memoryview, offset: int) -> None:
        await runtime.run_blocking(self._preadv_full, self._live_fd(), [bounce], offset)

    async def data_extent(self, offset: int, length: int) -> tuple[bool, int]:
        """Data or hole at *offset*, from ``SEEK_DATA``/``SEEK_HOLE``; all data where they are unsupported."""
        fd = self._live_fd()
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data from *offset* to the end of the file
                return False, length
            return True, length  # EINVAL: a file system (or device) without holes
        if data > offset:
            return False, min(length, data - offset)
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            return True, length
        return True, max(1, min(length, hole - offset))

    def map_read(self, offset: int, length: int) -> memoryview | None:
        """A read-only memory map of the range (pages from the page cache, no copy); ``None`` with O_DIRECT.

        Ranges are served from one mapped window of the file (:data:`_WINDOW` bytes from the
        page of the first range that did not fit the last window), so that a sequential reader
        maps and unmaps once per window rather than once per request; a range behind the
        window, or longer than one, gets a map of its own. Only the pages of the range are
        mapped in at once (``MADV_POPULATE_READ``, ``MAP_POPULATE``), whatever the window's
        size; a map is unmapped when the last view of it is dropped. Safe to call from several
        threads. Only for ranges inside the file: a file shrunk while mapped would fault
        (SIGBUS), so a file opened with ``force_share`` (another process may be writing it) is
        never mapped.
        """
        if self._direct or self._force_share or length <= 0 or offset < 0 or offset + length > self._size:
            return None
        fd = self._live_fd()
        with self._window_lock:
            window = self._window
            fits = window is not None and window[0] <= offset and offset + length <= window[0] + len(window[1])
            own = not fits and (length > _WINDOW or (window is not None and offset < window[0]))
            if not fits and not own:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                size = min(_WINDOW, self._size - start)
                try:
                    window = self._window = (
                        start,
                        mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start),
                    )
                except (OSError, ValueError):
                    return None
        if own or window is None:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            try:
                area = mmap.mmap(fd, offset + length - start, flags=flags, prot=mmap.PROT_READ, offset=start)
            except (OSError, ValueError):
                return None
            return memoryview(area)[offset - start :]
        start, area = window
        within = offset - start
        if self._populate:
            page = within - within % mmap.PAGESIZE
            try:
                area.madvise(_MADV_POPULATE_READ, page, within + length - page)
            except (OSError, ValueError):
                self._populate = False  # before Linux 5.14: the pages come in by faults
        return memoryview(area)[within : within + length]

    # --- writing -----------------------------------------------------------------------------------

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write all of *bufs* at *offset*, growing the file if needed."""
        fd = self._writable_fd()
        total = iovec_length(bufs)
        if not total:
            return  # like pwrite(2): writing nothing changes nothing, not even the size
        if self._direct:
            await self._writev_direct(fd, bufs, offset, total)
        elif runtime.inline():
            self._pwritev_full(fd, bufs, offset)
        else:
            done = self._try_nowait_write(fd, bufs, offset)
            if done < total:
                await runtime.run_blocking(self._pwritev_full, fd, slice_iovec(bufs, done, total - done), offset + done)
        if offset + total > self._size:
            self._size = offset + total

    def _try_nowait_write(self, fd: int, bufs: Sequence[memoryview], offset: int) -> int:
        if not self._nowait_write or len(bufs) > _IOV_MAX or iovec_length(bufs) > _NOWAIT_MAX:
            return 0
        if self._in_memory:
            return os.pwritev(fd, bufs, offset)
        try:
            return os.pwritev(fd, bufs, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as error:
            if error.errno in syscalls.UNSUPPORTED_ERRNOS:
                self._nowait_write = False
                return 0
            raise

    def _pwritev_full(self, fd: int, bufs: Sequence[memoryview], offset: int) -> None:
        total = iovec_length(bufs)
        done = 0
        iov = bufs[:_IOV_MAX]
        while done < total:
            if done:
                iov = slice_iovec(bufs, done, total - done)[:_IOV_MAX]
            count = os.pwritev(fd, iov, offset + done)
            if count <= 0:
                raise OSError(errno.EIO, f"{self._filename}: write made no progress at offset {offset + done}")
            done += count

    async def _writev_direct(self, fd: int, bufs: Sequence[memoryview], offset: int, total: int) -> None:
        """O_DIRECT write: aligned requests as they are, others by read-modify-write."""
        align = self._req_align
        start = offset // align * align
        end = -(-(offset + total) // align) * align
        aligned = is_aligned(bufs, offset, self._mem_align, align)
        # A bounced write past the end cuts its padding off afterwards; holding everything from its
        # start on keeps that truncation from cutting off data concurrent writes put further on.
        token = await self._locks.acquire(start, end if aligned or end <= self._size else _TO_EOF)
        try:
            if aligned:
                await runtime.run_blocking(self._pwritev_full, fd, bufs, offset)
                return
            done = 0
            while done < total:
                step = min(total - done, _CHUNK)
                await self._write_bounced(fd, slice_iovec(bufs, done, step), offset + done, step)
                done += step
            if end > max(self._size, offset + total):
                # The aligned write ran past the intended end of the file: cut the padding off.
                await runtime.run_blocking(os.ftruncate, fd, max(self._size, offset + total))
        finally:
            self._locks.release(token)

    async def _write_bounced(self, fd: int, bufs: Sequence[memoryview], offset: int, length: int) -> None:
        align = self._req_align
        start = offset // align * align
        end = -(-(offset + length) // align) * align
        bounce = aligned_buffer(end - start, max(self._mem_align, mmap.PAGESIZE))
        if start < offset:
            await self._direct_read(bounce[:align], start)
        if end > offset + length and (end - align >= start + align or start == offset):
            await self._direct_read(bounce[end - start - align :], end - align)
        pos = offset - start
        for view in bufs:
            bounce[pos : pos + view.nbytes] = view
            pos += view.nbytes
        await runtime.run_blocking(self._pwritev_full, fd, [bounce], start)

    # --- zeroes, discards, maintenance -------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero the range: ``fallocate`` (punching a hole if *unmap*), else by writing zeroes."""
        fd = self._writable_fd()
        if length <= 0:
            return
        end = offset + length
        inside = min(end, self._size) - offset  # punching holes cannot extend the file
        try:
            if unmap and inside > 0:
                await self._zero_fallocate(
                    fd, syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE, offset, inside
                )
                if end > self._size:
                    await self._grow_sparse(fd, offset + inside, end)
            else:
                await self._zero_fallocate(fd, syscalls.FALLOC_FL_ZERO_RANGE, offset, length)
                self._size = max(self._size, end)
            return
        except OSError as error:
            if error.errno not in syscalls.UNSUPPORTED_ERRNOS:
                raise
        await super().write_zeroes(offset, length, unmap=unmap)

    async def _zero_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """``fallocate`` that zeroes a range, serialised with O_DIRECT against overlapping writes.

        A read-modify-write cycle on a shared block would otherwise write stale data back over
        the zeroes.
        """
        if not self._direct:
            await runtime.run_blocking(syscalls.fallocate, fd, mode, offset, length)
            return
        align = self._req_align
        token = await self._locks.acquire(offset // align * align, -(-(offset + length) // align) * align)
        try:
            await runtime.run_blocking(syscalls.fallocate, fd, mode, offset, length)
        finally:
            self._locks.release(token)

    async def _grow_sparse(self, fd: int, start: int, end: int) -> None:
        if self._block_device:
            await super().write_zeroes(start, end - start)
        else:
            # One zero byte at the end grows the file sparsely; unlike ftruncate it can never cut off
            # what concurrent writes put past *end* meanwhile.
            await self.writev([memoryview(bytes(1))], end - 1)

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole where the file system can; a no-op where it cannot."""
        fd = self._writable_fd()
        inside = min(offset + length, self._size) - offset
        if inside <= 0:
            return
        try:
            await runtime.run_blocking(
                syscalls.fallocate, fd, syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE, offset, inside
            )
        except OSError as error:
            if error.errno not in syscalls.UNSUPPORTED_ERRNOS:
                raise

    async def flush(self) -> None:
        """``fdatasync`` (nothing when opened with ``no_flush``)."""
        fd = self._live_fd()
        if self._writable and not self._no_flush:
            await runtime.run_blocking(os.fdatasync, fd)

    async def sync(self) -> None:
        """``fsync``."""
        fd = self._live_fd()
        if self._writable:
            await runtime.run_blocking(os.fsync, fd)

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow or shrink the file; grown space is prepared as *prealloc* says.

        ``NONE``/``ZERO``/``METADATA``: sparse; ``FALLOC``: reserved with ``fallocate``;
        ``FULL``: zeroes written. Block devices cannot change size.
        """
        fd = self._writable_fd()
        if new_size < 0:
            raise InvalidOptionError("size", f"must not be negative, got {new_size}")
        old_size = self._size
        self._window = None  # a shrunk file must not be read through an old map (it would fault)
        if self._block_device:
            if new_size != old_size:
                raise UnsupportedFeatureError(
                    f"resizing a block device ({old_size} -> {new_size} bytes)", self._filename
                )
            return
        if new_size <= old_size or prealloc in (PreallocateMode.NONE, PreallocateMode.ZERO, PreallocateMode.METADATA):
            await runtime.run_blocking(os.ftruncate, fd, new_size)
            self._size = new_size
            if old_size == 0 and new_size > 0 and prealloc is PreallocateMode.NONE and not self._direct:
                # As QEMU does for a new file: its first block is allocated (zeroes), so that
                # the O_DIRECT alignment can be probed on it later, and maps equal qemu-img's.
                await runtime.run_blocking(os.pwrite, fd, bytes(min(new_size, _FIRST_BLOCK)), 0)
        elif prealloc is PreallocateMode.FALLOC:
            try:
                await runtime.run_blocking(syscalls.fallocate, fd, 0, old_size, new_size - old_size)
            except OSError as error:
                if error.errno not in syscalls.UNSUPPORTED_ERRNOS:
                    raise
                await runtime.run_blocking(os.posix_fallocate, fd, old_size, new_size - old_size)
            self._size = new_size
        else:
            await self._write_zero_data(old_size, new_size)

    async def _write_zero_data(self, start: int, end: int) -> None:
        """Write real zero bytes to ``[start, end)`` (``FULL`` preallocation)."""
        chunk = aligned_buffer(min(_CHUNK, end - start))
        pos = start
        while pos < end:
            step = min(end - pos, chunk.nbytes)
            await self.writev([chunk[:step]], pos)
            pos += step

    async def close(self) -> None:
        """Release the image locks and close the file descriptor; closing twice does nothing."""
        self._release()

    def _release(self) -> None:
        self._window = None
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            # Unlocking explicitly frees the image even while a forked child still holds a copy
            # of the descriptor; in such a child only the copy is closed, the parent keeps its locks.
            if self._lock_owner == os.getpid():
                locking.unlock_image(fd)
        finally:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self._release()

    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        return f"<File {self._filename!r} {mode}{' direct' if self._direct else ''}>"
