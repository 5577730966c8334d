"""``imago commit``: ``qemu-img commit``, writing an overlay's data into its backing file.

Built on the public API only. The image is opened for writing with its backing chain; the base
(the immediate backing file, or ``-b BASE`` deeper in the chain) is opened for writing inside
that chain, as QEMU reopens it: a gate wrapping the command's sandbox gate marks the base's
builder writable when the chain reaches it. What the image and the layers above the base
allocate is read through the image and written into the base in large pieces (areas that read
as zero are zeroed, unmapped, as QEMU's commit job does); the base grows first when it is
smaller. Then, unless ``-d`` (which ``-b`` implies, as in qemu-img 7.2), the image is emptied
with ``discard_to_backing`` over the whole disk, so it reads its backing file again.
``-r RATE`` is accepted (and checked) for qemu-img's syntax but does not slow the copy.

Ctrl-C stops between pieces: the base holds some committed data (the image still reads the
same), and every image is flushed and closed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, TypeVar

from ..api import open_async
from ..errors import ImagoError, UnsupportedFeatureError
from ..format.access import FormatAccess
from ..format.builder import FormatDriverBuilder
from ..format.driver import FormatDriver
from ..format.gates import ImplicitOpenGate
from ..format.mapping import MappingEof, MappingZero, ShallowIndirect
from ..runtime import run_sync
from ..storage import Storage, StorageOpenOptions
from .common import (
    CliError,
    OperationInterrupted,
    add_cache,
    add_format,
    add_gate_options,
    cache_flags,
    check_interrupt,
    describe_error,
    gate_for,
    interruptible,
    parse_size,
)
from .progress import add_progress, progress_for

__all__ = ["BaseWritableGate", "allocated_above", "configure", "run"]

D = TypeVar("D", bound=FormatDriver)

#: Bytes copied at once.
COPY_SIZE = 8 << 20


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago commit``, qemu-img's (``-f``, ``-t``, ``-b``, ``-d``, ``-p``, ``-q``, ``-r``)."""
    add_format(parser)
    add_cache(parser, "-t", dest="cache", default="writeback")
    parser.add_argument(
        "-b",
        dest="base",
        metavar="BASE",
        help="the backing file to commit into (default: the immediate backing file); implies -d",
    )
    parser.add_argument("-d", dest="drop", action="store_true", help="do not empty the image after committing its data")
    parser.add_argument("-r", dest="rate", metavar="RATE", help="rate limit (accepted for qemu-img's syntax; ignored)")
    add_progress(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout")
    add_gate_options(parser)
    parser.add_argument("filenames", nargs="*", metavar="FILE", help="the image whose data is committed")


def run(args: argparse.Namespace) -> int:
    """Commit the image's data into its base; 0 on success, 1 (with one line on stderr) on failure."""
    filenames: list[str] = args.filenames
    if len(filenames) != 1:
        raise CliError("Expecting one image file name")
    filename = filenames[0]
    direct, no_flush = cache_flags(args.cache)
    if args.rate is not None:
        parse_size(args.rate, what="rate limit")
    with interruptible():
        run_sync(_commit(filename, args, direct=direct, no_flush=no_flush))
    if not args.quiet:
        print("Image committed.")
    return 0


class BaseWritableGate(ImplicitOpenGate):
    """Delegates every decision to *inner*, and opens the one layer that :meth:`is_base` picks writable.

    Layers are opened top down; the gate remembers each layer's path, so that a relative ``-b``
    name is resolved against the directory of the image that refers to the layer, as QEMU does.
    """

    def __init__(self, inner: ImplicitOpenGate, top: str, base: str | None) -> None:
        self.inner = inner
        self.base = base
        #: Paths of the layers opened so far, the image first.
        self.paths: list[str] = [top]
        #: How many images lie above the base (``None``: not found yet).
        self.base_depth: int | None = None

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions:
        """The inner gate's decision."""
        return await self.inner.check_storage(options)

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None:
        """The inner gate's decision."""
        await self.inner.check_format(builder)

    async def open_storage(self, options: StorageOpenOptions) -> Storage:
        """Opened as the inner gate opens it."""
        return await self.inner.open_storage(options)

    def is_base(self, depth: int, path: str | None) -> bool:
        """Whether the layer at *depth* (file *path*) is the base to commit into."""
        if self.base_depth is not None:
            return False
        if self.base is None:
            return depth == 1
        if path is None:
            return False
        overlay = self.paths[depth - 1] if depth - 1 < len(self.paths) else self.paths[-1]
        candidate = self.base if os.path.isabs(self.base) else os.path.join(os.path.dirname(overlay), self.base)
        return os.path.realpath(candidate) == os.path.realpath(path)

    async def open_format(self, builder: FormatDriverBuilder[D]) -> D:
        """Check, then open a backing layer; the base for writing."""
        await self.check_format(builder)
        depth = builder.depth
        path = builder.path
        del self.paths[depth:]
        self.paths.append(path or "")
        if self.is_base(depth, path):
            builder.write(True)
            self.base_depth = depth
        return await builder.open(self)


def _layers(image: FormatAccess) -> list[FormatAccess]:
    layers = [image]
    while (backing := layers[-1].driver.backing) is not None:
        layers.append(backing)
    return layers


async def allocated_above(layers: list[FormatAccess], offset: int, length: int) -> tuple[bool, int]:
    """Whether one of *layers* allocates the data at *offset*, and for how many bytes that holds.

    *layers* are an image and the layers below it, down to but not including a base; the
    length is at most *length*.
    """
    layer, position = layers[0], offset
    mapping, mapped = await layer.get_shallow_mapping(position, length)
    mapped = max(1, min(mapped, length))
    if not isinstance(mapping, ShallowIndirect):
        return True, mapped
    if len(layers) == 1:
        return False, mapped
    if mapping.offset >= layers[1].size:
        # Zeroes past the end of a shorter layer above the base: that layer's, as QEMU counts them.
        return True, mapped
    allocated, below = await allocated_above(layers[1:], mapping.offset, mapped)
    return allocated, min(mapped, below)


async def _commit(filename: str, args: argparse.Namespace, *, direct: bool, no_flush: bool) -> None:
    gate = BaseWritableGate(gate_for(args, [filename]), filename, args.base)
    try:
        image = await open_async(filename, args.format, write=True, gate=gate, direct=direct, no_flush=no_flush)
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    try:
        layers = _layers(image)
        depth = gate.base_depth
        if depth is None or depth >= len(layers):
            if args.base is not None:
                raise CliError(f"Did not find '{args.base}' in the backing chain of '{filename}'")
            raise CliError("Image does not have a backing file")
        base = layers[depth]
        await _copy(image, layers[:depth], base, args)
        if not (args.drop or args.base is not None):
            # As qemu-img: a format that cannot be emptied keeps its data.
            with contextlib.suppress(UnsupportedFeatureError):
                await image.discard_to_backing(0, image.size)
            await image.flush()
    except (ImagoError, OSError) as error:
        if isinstance(error, (CliError, OperationInterrupted)):
            raise
        raise CliError(describe_error(error)) from None
    finally:
        await image.close()


async def _copy(image: FormatAccess, above: list[FormatAccess], base: FormatAccess, args: argparse.Namespace) -> None:
    size = image.size
    if base.size < size:
        await base.resize(size)
    buffer = bytearray(COPY_SIZE)
    with progress_for(args, "commit", size) as progress:
        offset = 0
        while offset < size:
            check_interrupt()
            allocated, length = await allocated_above(above, offset, size - offset)
            if allocated:
                position, end = offset, offset + length
                while position < end:
                    check_interrupt()
                    mapping, step = await image.get_mapping(position, min(COPY_SIZE, end - position))
                    step = max(1, min(step, end - position))
                    if isinstance(mapping, (MappingZero, MappingEof)):
                        # As QEMU's commit (a mirror job): zeroes are written as zeroes, unmapped.
                        await base.discard_to_zero(position, step)
                    else:
                        view = memoryview(buffer)[:step]
                        await image.read(view, position)
                        await base.write(view, position)
                    position += step
                    progress.update(position)
            offset += length
            progress.update(offset)
    await base.flush()
