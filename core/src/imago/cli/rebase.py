"""``imago rebase``: ``qemu-img rebase``, changing the backing file an image names.

Built on the public API only. Safe mode (the default) keeps what the guest sees: every area the
image does not allocate itself, where the old backing chain's content differs from the new
one's, gets the old content written into the image first (large pieces are compared with one
``memcmp`` each; only the image's clusters that hold a difference are written, as qemu-img
writes them). Then the driver records the new name (:attr:`Capability.CHANGE_BACKING`).
``-b ""`` removes the backing file (everything the old chain shows is copied in). ``-u`` only
changes the name: the old backing file is not opened, the new one need not exist.

The new backing file is opened (safe mode) relative to the image's directory, as qemu-img opens
it, through the sandbox gate of the image's directory and the new backing file's. Ctrl-C stops
between pieces: the image then still names the old backing file and shows the same disk.
"""

from __future__ import annotations

import argparse
import os

from ..api import open_async
from ..errors import DriverNotFoundError, ImagoError
from ..format.access import FormatAccess
from ..format.capabilities import Capability
from ..format.mapping import MappingEof, MappingZero, ShallowIndirect, ShallowZero
from ..plugin.manager import format_driver
from ..runtime import run_sync
from .common import (
    CliError,
    OperationInterrupted,
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
from .progress import Progress, add_progress, progress_for

__all__ = ["configure", "differing_blocks", "run"]

#: Bytes compared at once.
COMPARE_SIZE = 8 << 20
#: The unit of comparison when the image's cluster size is unknown (QEMU's sector).
SECTOR = 512


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago rebase``, qemu-img's: ``-f -t -T -p -u -U -q -b -F``."""
    add_format(parser)
    add_cache(parser, "-t", dest="cache", default="writeback")
    add_cache(parser, "-T", dest="src_cache", default="writeback")
    add_progress(parser)
    parser.add_argument(
        "-u", dest="unsafe", action="store_true", help="unsafe mode: only change the name, copy nothing"
    )
    add_force_share(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout")
    parser.add_argument(
        "-b",
        dest="backing",
        metavar="BACKING",
        help='the new backing file, as the image will record it ("" removes the backing file)',
    )
    parser.add_argument("-F", dest="backing_format", metavar="BACKING_FMT", help="format of the new backing file")
    add_gate_options(parser)
    parser.add_argument("filenames", nargs="*", metavar="FILE", help="the image to rebase")


def run(args: argparse.Namespace) -> int:
    """Rebase the image; 0 on success, 1 (with one line on stderr) on failure."""
    filenames: list[str] = args.filenames
    if len(filenames) != 1:
        raise CliError("Expecting one image file name")
    if not args.unsafe and args.backing is None:
        raise CliError("Must specify backing file (-b) or use unsafe mode (-u)")
    direct, no_flush = cache_flags(args.cache)
    source_flags = cache_flags(args.src_cache, option="source cache")
    with interruptible():
        run_sync(_rebase(filenames[0], args, (direct, no_flush), source_flags))
    return 0


def differing_blocks(
    old: bytes | bytearray, new: bytes | bytearray, block: int, length: int | None = None
) -> list[tuple[int, int]]:
    """The ranges ``[start, end)`` of *block*-sized pieces where *old* and *new* differ, merged.

    Only the first *length* bytes count (default: all of *old*). Equal data costs one
    comparison (``memcmp``); otherwise each block is compared once.
    """
    size = len(old) if length is None else length
    if (old == new) if size == len(old) == len(new) else (old[:size] == new[:size]):
        return []
    ranges: list[tuple[int, int]] = []
    for start in range(0, size, block):
        end = min(size, start + block)
        if old[start:end] != new[start:end]:
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def _trim(old: bytearray, new: bytearray, start: int, end: int, block: int) -> tuple[int, int]:
    """A range of differing blocks narrowed to the sectors from its first to its last difference.

    The first difference lies in the first block, the last one in the last block: each is
    found by bisection inside its block.
    """
    low, high = start, min(end, start + block)
    while high - low > SECTOR:
        middle = (low + high) // 2
        if old[low:middle] == new[low:middle]:
            low = middle
        else:
            high = middle
    first = start + (low - start) // SECTOR * SECTOR
    low, high = max(start, end - block), end
    while high - low > SECTOR:
        middle = (low + high) // 2
        if old[middle:high] == new[middle:high]:
            high = middle
        else:
            low = middle
    stop = min(end, start + -(-(high - start) // SECTOR) * SECTOR)
    return first, max(stop, first + 1)


def _name_for_errors(args: argparse.Namespace) -> str:
    return args.backing or ""


async def _rebase(
    filename: str, args: argparse.Namespace, cache: tuple[bool, bool], source_cache: tuple[bool, bool]
) -> None:
    new_name: str | None = args.backing or None  # "" and no -b (with -u): no backing file
    new_format: str | None = args.backing_format if new_name else None
    direct, no_flush = cache
    gate_images = [filename]
    new_path = None
    if new_name is not None:
        new_path = new_name if os.path.isabs(new_name) else os.path.join(os.path.dirname(filename), new_name)
        gate_images.append(new_path)
    gate = gate_for(args, gate_images)
    try:
        image = await open_async(
            filename,
            args.format,
            write=True,
            backing=not args.unsafe,
            gate=gate,
            direct=direct,
            no_flush=no_flush,
        )
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    new: FormatAccess | None = None
    try:
        if args.backing_format is not None:
            try:
                format_driver(args.backing_format)
            except DriverNotFoundError:
                raise CliError(f"Invalid format name: '{args.backing_format}'") from None
        changer = Capability.CHANGE_BACKING.of(image.driver)
        if not args.unsafe and new_path is not None:
            try:
                new = await open_async(
                    new_path,
                    new_format,
                    gate=gate,
                    force_share=args.force_share,
                    direct=source_cache[0],
                    no_flush=source_cache[1],
                )
            except (ImagoError, OSError) as error:
                raise CliError(f"Could not open new backing file '{new_name}': {describe_error(error)}") from None
        # Refused before anything is copied (qemu-img finds out only when it changes the name).
        problem = None
        if new_name is not None and new_format is None:
            problem = "backing format must be specified"
        elif changer is None:
            problem = "Operation not supported"
        if problem is not None:
            raise CliError(f"Could not change the backing file to '{_name_for_errors(args)}': {problem}")
        assert changer is not None
        if not args.unsafe:
            with progress_for(args, "rebase", image.size) as progress:
                await _copy_differences(image, image.driver.backing, new, progress)
            await image.flush()
        try:
            await changer.change_backing_file(new_name, new_format)
        except (ImagoError, OSError) as error:
            raise CliError(
                f"Could not change the backing file to '{_name_for_errors(args)}': {describe_error(error)}"
            ) from None
        await image.flush()
    except (CliError, OperationInterrupted):
        raise
    except (ImagoError, OSError) as error:
        raise CliError(describe_error(error)) from None
    finally:
        if new is not None:
            await new.close()
        await image.close()


async def _zero_in(layer: FormatAccess | None, offset: int, length: int) -> int:
    """How many bytes from *offset* (at most *length*) *layer* surely reads as zero (0: maybe data)."""
    if layer is None or offset >= layer.size:
        return length
    mapping, mapped = await layer.get_mapping(offset, min(length, layer.size - offset))
    if isinstance(mapping, (MappingZero, MappingEof)):
        return max(1, min(mapped, length))
    return 0


async def _read(layer: FormatAccess | None, view: memoryview, offset: int) -> None:
    """Read *view* from *layer* at *offset*; zeroes past its end (or without a layer)."""
    inside = 0 if layer is None else max(0, min(len(view), layer.size - offset))
    if inside:
        assert layer is not None
        await layer.read(view[:inside], offset)
    if inside < len(view):
        view[inside:] = bytes(len(view) - inside)


def _cluster_size(image: FormatAccess) -> int:
    size = image.driver.info().get("cluster-size")
    return size if isinstance(size, int) and size > 0 else SECTOR


async def _copy_differences(
    image: FormatAccess, old: FormatAccess | None, new: FormatAccess | None, progress: Progress
) -> None:
    """Write into *image*, where it allocates nothing, the old chain's data wherever the new one differs."""
    size = image.size
    block = _cluster_size(image)
    old_buffer, new_buffer = bytearray(COMPARE_SIZE), bytearray(COMPARE_SIZE)
    offset = 0
    while offset < size:
        check_interrupt()
        mapping, length = await image.get_shallow_mapping(offset, min(size - offset, COMPARE_SIZE))
        length = max(1, min(length, size - offset))
        if not isinstance(mapping, (ShallowIndirect, ShallowZero)) or (
            isinstance(mapping, ShallowZero) and mapping.explicit
        ):
            offset += length  # the image's own data: the backing file does not show there
            progress.update(offset)
            continue
        # Past the old backing file's end (or without one) the old disk is zero: as qemu-img,
        # the differences are then written as zeroes (zero clusters, not data).
        old_size = 0 if old is None else old.size
        old_is_zero = offset >= old_size
        if not old_is_zero:
            length = min(length, old_size - offset)
        zero_old = length if old_is_zero else await _zero_in(old, offset, length)
        zero_new = await _zero_in(new, offset, length) if zero_old else 0
        if zero_old and zero_new:
            offset += min(zero_old, zero_new)
            progress.update(offset)
            continue
        # Compare in blocks of the image's clusters: a write allocates a whole cluster anyway.
        old_view, new_view = memoryview(old_buffer)[:length], memoryview(new_buffer)[:length]
        await _read(old, old_view, offset)
        await _read(new, new_view, offset)
        for first, stop in differing_blocks(old_buffer, new_buffer, block, length):
            if old_is_zero:
                # Whole clusters (they all read as zero in the old disk): zero clusters, as
                # QEMU makes of a zero write whose cluster reads as zero around it.
                await image.write_zeroes(offset + first, stop - first)
            else:
                # As qemu-img: from the first to the last differing sector only (the image
                # copies the rest of a cluster it allocates from the old backing file itself).
                first, stop = _trim(old_buffer, new_buffer, first, stop, block)
                await image.write(old_view[first:stop], offset + first)
        offset += length
        progress.update(offset)
