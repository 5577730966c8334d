"""``imago compare``: ``qemu-img compare``, whether two images show the guest the same disk.

Built on the public API only (``imago.open``, ``get_shallow_mapping``, ``read``). The disks are
walked by their mappings, as qemu-img walks block status: areas both images read as zero are
skipped without reading, areas allocated in both are read in large pieces (both images at once)
and compared with one ``memcmp`` each (bytes equality), and an area allocated in only one image
must read as zero. Messages, exit statuses and the reported offsets are qemu-img 7.2's: the
offset of the first differing 512-byte sector, so both tools name the same offset.

``-s`` compares QEMU's block status flags as far as mappings tell them. A storage cannot say
where a raw file has holes, so a raw file counts as data throughout (qemu-img sees its holes
as zero: ``-s`` between a sparse raw file and an image differs from qemu-img's verdict there).

Exit statuses: 0 identical, 1 different (or a usage error), 2 an image could not be opened, 3
reading a mapping failed, 4 reading data failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
from collections.abc import Callable

from ..api import open as open_image
from ..errors import ImagoError
from ..format.access import FormatAccess, SyncFormatAccess
from ..format.mapping import ShallowIndirect, ShallowMapping, ShallowRaw, ShallowSpecial, ShallowZero
from ..runtime import run_sync
from .common import (
    CliError,
    add_cache,
    add_force_share,
    add_format,
    add_gate_options,
    cache_flags,
    check_interrupt,
    describe_error,
    gate_for,
    interruptible,
)
from .progress import add_progress, progress_for

__all__ = [
    "ALLOCATED",
    "DATA",
    "EOF",
    "EXIT_DIFFERENT",
    "EXIT_IDENTICAL",
    "EXIT_MAPPING_ERROR",
    "EXIT_OPEN_ERROR",
    "EXIT_READ_ERROR",
    "OFFSET_VALID",
    "SECTOR",
    "ZERO",
    "block_status",
    "chain_status",
    "qemu_offset",
    "configure",
    "first_difference",
    "first_nonzero",
    "run",
]

EXIT_IDENTICAL = 0
EXIT_DIFFERENT = 1
EXIT_OPEN_ERROR = 2
EXIT_MAPPING_ERROR = 3
EXIT_READ_ERROR = 4

#: The unit in which qemu-img reports where content differs.
SECTOR = 512
#: What this command reads at once.
READ_SIZE = 8 << 20

# QEMU's block status flags, as far as a mapping tells them (``-s`` compares them).
DATA = 0x01
ZERO = 0x02
OFFSET_VALID = 0x04
ALLOCATED = 0x10
#: The area reaches the end of the image (QEMU reports it, and ``-s`` compares it too).
EOF = 0x20

_ZEROES = bytes(READ_SIZE)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago compare``, qemu-img's (``-f``, ``-F``, ``-s``, ``-p``, ``-q``, ``-T``, ``-U``)."""
    add_format(parser, what="the first image")
    add_format(parser, "-F", dest="format2", what="the second image")
    parser.add_argument(
        "-s",
        "--strict",
        dest="strict",
        action="store_true",
        help="strict mode: fail on different image sizes or different allocation (sector status)",
    )
    add_progress(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout; only the exit status")
    add_cache(parser, "-T", dest="cache", default="writeback")
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument("filenames", nargs="*", metavar="FILE", help="the two images (FILE1 FILE2)")


def run(args: argparse.Namespace) -> int:
    """Compare two images; qemu-img's exit status (0 identical, 1 different, 2-4 errors)."""
    filenames: list[str] = args.filenames
    if len(filenames) != 2:
        raise CliError("Expecting two image file names")
    try:
        direct, no_flush = cache_flags(args.cache, option="source cache")
    except CliError as error:
        raise CliError(str(error), EXIT_OPEN_ERROR) from None
    gate = gate_for(args, filenames)
    images: list[SyncFormatAccess] = []
    try:
        for filename, fmt in zip(filenames, (args.format, args.format2), strict=True):
            try:
                images.append(
                    open_image(
                        filename,
                        fmt,
                        force_share=args.force_share,
                        direct=direct,
                        no_flush=no_flush,
                        gate=gate,
                    )
                )
            except (ImagoError, OSError) as error:
                raise CliError(f"Could not open '{filename}': {describe_error(error)}", EXIT_OPEN_ERROR) from None
        with interruptible():
            comparison = _Comparison(images[0], images[1], filenames, args)
            try:
                return comparison.run()
            finally:
                if comparison.pool is not None:
                    comparison.pool.shutdown()
    finally:
        for image in images:
            image.close()


def block_status(mapping: ShallowMapping) -> int:
    """The QEMU block status flags of the layer mapping that answers for an area (what ``-s`` compares)."""
    if isinstance(mapping, ShallowRaw):
        return DATA | OFFSET_VALID | ALLOCATED
    if isinstance(mapping, ShallowSpecial):  # compressed: data, but no plain host offset
        return DATA | ALLOCATED
    if isinstance(mapping, ShallowZero) and mapping.explicit:
        return ZERO | ALLOCATED
    return ZERO  # unallocated in the whole chain


async def chain_status(image: FormatAccess, offset: int, length: int) -> tuple[int, int]:
    """QEMU's block status of *image* at *offset*, through its backing chain, and for how many bytes.

    The first layer that allocates the area answers; zeroes past the end of a shorter backing
    file count as allocated there, as QEMU counts them. (The end-of-image flag is the caller's.)
    """
    layer = image
    mapping, mapped = await image.get_shallow_mapping(offset, length)
    mapped = max(1, min(mapped, length))
    while isinstance(mapping, ShallowIndirect):
        below = mapping.layer
        if mapping.offset >= below.size:
            return ZERO | ALLOCATED, mapped
        layer = below
        mapping, deeper = await below.get_shallow_mapping(mapping.offset, mapped)
        mapped = max(1, min(mapped, deeper))
    driver = layer.driver
    if isinstance(mapping, ShallowRaw) and type(driver).identity_mapped and mapping.storage is driver.storage:
        # A raw layer's file: QEMU asks it, and its holes read as zeroes (nothing to read there).
        is_data, run = await mapping.storage.data_extent(mapping.offset, mapped)
        mapped = max(1, min(mapped, run))
        if not is_data:
            return ZERO | OFFSET_VALID | ALLOCATED, mapped
    return block_status(mapping), mapped


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """The index of the first byte where *a* and *b* (equally long, known to differ) differ.

    Bisection with bytes equality (``memcmp``): a few passes over the data, none in Python.
    """
    low, high = 0, len(a)
    while high - low > 64:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return next(i for i in range(low, high) if a[i] != b[i])


def first_nonzero(data: bytes | bytearray) -> int | None:
    """The index of the first non-zero byte of *data*, or ``None`` when it is all zeroes."""
    length = len(data)
    if data == (_ZEROES if length == READ_SIZE else bytes(length)):
        return None
    stripped = data.lstrip(b"\0")
    return length - len(stripped)


def qemu_offset(start: int, found: int) -> int:
    """The offset qemu-img reports for a difference at *found* in an area that begins at *start*.

    qemu-img compares whole 512-byte sectors (its block status is sector-aligned) and reports
    the start of the first differing one (not before the area compared).
    """
    return max(start, found // SECTOR * SECTOR)


class _Mismatch(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, message: str) -> None:
        self.message = message


class _ReadFailed(Exception):  # noqa: N818 - carries a CLI status, raised to unwind
    def __init__(self, message: str, status: int) -> None:
        self.message = message
        self.status = status


class _Comparison:
    """One ``compare`` run over two open images."""

    def __init__(
        self, first: SyncFormatAccess, second: SyncFormatAccess, names: list[str], args: argparse.Namespace
    ) -> None:
        self.images = (first, second)
        self.names = names
        self.strict: bool = args.strict
        self.quiet: bool = args.quiet
        self.args = args
        self.buffers = (bytearray(READ_SIZE), bytearray(READ_SIZE))
        #: A thread reading the second image while this one reads the first (made when needed).
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imago-compare")
        return self.pool

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line)

    def run(self) -> int:
        first, second = self.images
        size1, size2 = first.size, second.size
        common = min(size1, size2)
        if size1 != size2 and self.strict:
            self.say("Strict mode: Image size mismatch!")
            return EXIT_DIFFERENT
        # Messages go out before the progress display ends, in qemu-img's order.
        with progress_for(self.args, "compare", max(size1, size2)) as progress:
            try:
                self._compare_common(common, progress.update)
                if size1 != size2:
                    self.say("Warning: Image size mismatch!")
                    which = 0 if size1 > size2 else 1
                    self._check_tail(which, common, max(size1, size2), progress.update)
            except _Mismatch as mismatch:
                self.say(mismatch.message)
                return EXIT_DIFFERENT
            except _ReadFailed as failure:
                print(f"imago: {failure.message}", file=sys.stderr)
                return failure.status
            self.say("Images are identical.")
        return EXIT_IDENTICAL

    def _status(self, which: int, offset: int, length: int) -> tuple[int, int]:
        try:
            status, mapped = run_sync(chain_status(self.images[which].access, offset, length))
        except (ImagoError, OSError) as error:
            raise _ReadFailed(
                f"Sector allocation test failed for {self.names[which]}: {describe_error(error)}", EXIT_MAPPING_ERROR
            ) from None
        if offset + mapped >= self.images[which].size:
            status |= EOF
        return status, mapped

    def _read(self, which: int, offset: int, length: int) -> bytearray:
        buffer = self.buffers[which]
        view = memoryview(buffer)[:length]
        try:
            self.images[which].read(view, offset)
        except (ImagoError, OSError) as error:
            raise _ReadFailed(
                f"Error while reading offset {offset} of {self.names[which]}: {describe_error(error)}", EXIT_READ_ERROR
            ) from None
        return buffer if length == READ_SIZE else buffer[:length]

    def _compare_common(self, common: int, update: Callable[[int], None]) -> None:
        offset = 0
        while offset < common:
            check_interrupt()
            status1, length1 = self._status(0, offset, common - offset)
            status2, length2 = self._status(1, offset, common - offset)
            length = min(length1, length2)
            if self.strict and status1 != status2:
                raise _Mismatch(f"Strict mode: Offset {offset} block status mismatch!")
            if status1 & ZERO and status2 & ZERO:
                pass
            elif (status1 & ALLOCATED) == (status2 & ALLOCATED):
                if status1 & ALLOCATED:
                    self._compare_data(offset, length)
            else:
                self._check_zero(0 if status1 & ALLOCATED else 1, offset, length)
            offset += length
            update(offset)

    def _compare_data(self, start: int, length: int) -> None:
        offset, end = start, start + length
        while offset < end:
            check_interrupt()
            size = min(READ_SIZE, end - offset)
            # Both images are read at once (the reads release the GIL), then compared.
            other = self._pool().submit(self._read, 1, offset, size)
            a = self._read(0, offset, size)
            b = other.result()
            if a != b:
                found = offset + first_difference(a, b)
                raise _Mismatch(f"Content mismatch at offset {qemu_offset(start, found)}!")
            offset += size

    def _check_zero(self, which: int, start: int, length: int) -> None:
        offset, end = start, start + length
        while offset < end:
            check_interrupt()
            size = min(READ_SIZE, end - offset)
            index = first_nonzero(self._read(which, offset, size))
            if index is not None:
                raise _Mismatch(f"Content mismatch at offset {qemu_offset(start, offset + index)}!")
            offset += size

    def _check_tail(self, which: int, start: int, end: int, update: Callable[[int], None]) -> None:
        """The larger image past the common size must read as zero."""
        offset = start
        while offset < end:
            check_interrupt()
            status, length = self._status(which, offset, end - offset)
            if status & ALLOCATED and not status & ZERO:
                self._check_zero(which, offset, length)
            offset += length
            update(offset)
