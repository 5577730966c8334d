"""Writing stream-optimized VMDKs: to any binary file object (a pipe) and as new empty images.

:func:`write_stream` copies a disk (a :class:`~imago.FormatAccess` or a readable binary file)
into a stream-optimized VMDK written strictly front to back to a binary file object, so it can
go to a pipe, a socket or an HTTP upload. Grains are compressed on all cores, a window of them at
a time (memory stays bounded by the window, whatever the disk size); all-zero grains are left
out. :func:`create_stream_image` writes an empty image to a storage, which the VMDK driver then
fills through :class:`~imago_vmdk.stream_append.StreamAppender` (``imago convert``).

The layout is VMware's (see :mod:`.stream_format`): QEMU 7.2 instead writes the grain directory
and tables at the front with ``gdOffset`` set in the header, which ESXi imports have rejected.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, cast

from imago import FormatAccess, InvalidOptionError, InvalidRequestError, MappingRaw, MappingZero, Storage, runtime

from .stream_format import DEFAULT_GRAIN_SIZE, StreamEncoder, compress_grain, stream_descriptor

__all__ = ["DEFAULT_WINDOW", "create_stream_image", "write_stream"]

#: Bytes of guest data read and compressed per step (a whole number of grains).
DEFAULT_WINDOW = 16 * 1024 * 1024


def _encoder(
    size: int,
    extent_name: str,
    adapter_type: str,
    hwversion: str,
    toolsversion: str,
    grain_size: int,
) -> StreamEncoder:
    if size < 0:
        raise InvalidOptionError("size", f"negative disk size {size}")
    descriptor = stream_descriptor(
        size, extent_name, adapter_type=adapter_type, hwversion=hwversion, toolsversion=toolsversion
    )
    return StreamEncoder(size, descriptor, grain_size=grain_size)


async def create_stream_image(
    storage: Storage,
    size: int,
    *,
    adapter_type: str = "ide",
    hwversion: str = "4",
    toolsversion: str = "2147483647",
    grain_size: int = DEFAULT_GRAIN_SIZE,
    extent_name: str | None = None,
) -> None:
    """Write an empty stream-optimized VMDK of *size* bytes to *storage* (from offset 0, truncated).

    The image holds the header, the descriptor (``adapter_type``, ``ddb.virtualHWVersion`` =
    *hwversion*, ``ddb.toolsVersion`` = *toolsversion*, geometry), an empty grain directory, the
    footer and the end-of-stream marker. Opened for writing, the VMDK driver appends grains to it
    through :class:`~imago_vmdk.stream_append.StreamAppender`. *extent_name* (the name the
    descriptor's extent line gives, the file's own) defaults to the storage's base name.
    Bad values raise :class:`~imago.InvalidOptionError` naming the option.
    """
    if extent_name is None:
        extent_name = os.path.basename(storage.filename or "") or "disk.vmdk"
    encoder = _encoder(size, extent_name, adapter_type, hwversion, toolsversion, grain_size)
    data = encoder.head() + encoder.trailer()
    await storage.writev([memoryview(data)], 0)
    if storage.size != len(data):
        await storage.resize(len(data))
    await storage.flush()


async def _read_source(source: FormatAccess | BinaryIO, view: memoryview, offset: int, what: str) -> None:
    if isinstance(source, FormatAccess):
        await source.read(view, offset)
        return
    done = 0
    while done < len(view):
        got = await runtime.run_blocking(cast(Any, source).readinto, view[done:])
        if not got:
            raise InvalidRequestError(f"{what}: the source ended at byte {offset + done}, before the disk's end")
        done += got


async def _reads_as_zero(source: FormatAccess | BinaryIO, offset: int, length: int) -> bool:
    """Whether the image says the whole range reads as zeros (a file source is never asked)."""
    if not isinstance(source, FormatAccess):
        return False
    mapping, mapped = await source.get_mapping(offset, length)
    if mapped < length:
        return False
    if isinstance(mapping, MappingZero):
        return True
    if isinstance(mapping, MappingRaw):
        # Data in a file as it is (raw): the file's own holes read as zeros too.
        is_data, run = await mapping.storage.data_extent(mapping.offset, length)
        return not is_data and run >= length
    return False


async def write_stream(
    source: FormatAccess | BinaryIO,
    out: BinaryIO,
    *,
    size: int | None = None,
    adapter_type: str = "ide",
    hwversion: str = "4",
    toolsversion: str = "2147483647",
    extent_name: str = "disk.vmdk",
    grain_size: int = DEFAULT_GRAIN_SIZE,
    window: int = DEFAULT_WINDOW,
) -> int:
    """Write *source* as a stream-optimized VMDK to *out*, front to back, never seeking; the bytes written.

    *source* is an open image (its guest disk is copied; *size* defaults to its size) or a
    readable binary file read sequentially (a pipe; *size* is then required and the file must
    hold that many bytes). *out* only needs ``write``; it is not flushed or closed. Grains are
    compressed on all cores, *window* bytes of the disk at a time; all-zero grains are skipped.
    """
    if size is None:
        if not isinstance(source, FormatAccess):
            raise InvalidOptionError("size", "the size of a file source must be given")
        size = source.size
    if size <= 0:
        # A zero-sized VMDK opens in neither QEMU nor imago (its extent line would say 0 sectors).
        raise InvalidOptionError("size", f"a stream-optimized disk needs at least one sector ({size} bytes given)")
    if window < grain_size:
        raise InvalidOptionError("window", f"the window ({window} bytes) is smaller than a grain ({grain_size})")
    what = getattr(source, "filename", None) or getattr(source, "name", None) or "the source"
    encoder = _encoder(size, extent_name, adapter_type, hwversion, toolsversion, grain_size)
    window -= window % grain_size
    written = 0

    async def emit(data: bytes) -> None:
        nonlocal written
        await runtime.run_blocking(_write_all, out, data)
        written += len(data)

    await emit(encoder.head())
    buffer = bytearray(min(window, -(-size // grain_size) * grain_size))
    zero = bytes(grain_size)
    for start in range(0, size, window):
        length = min(window, size - start)
        if await _reads_as_zero(source, start, length):
            continue  # a hole: no grains, nothing read
        view = memoryview(buffer)[: -(-length // grain_size) * grain_size]
        await _read_source(source, view[:length], start, str(what))
        view[length:] = bytes(len(view) - length)  # the last grain is padded with zeros
        first = start // grain_size
        chosen = [
            (first + n, view[at : at + grain_size])
            for n, at in enumerate(range(0, len(view), grain_size))
            if view[at : at + grain_size] != zero
        ]
        indices = [index for index, _ in chosen]
        packed = await runtime.run_parallel(compress_grain, [grain for _, grain in chosen])
        del chosen, view  # release the views before the buffer is refilled
        await emit(b"".join(encoder.grain(index, data) for index, data in zip(indices, packed, strict=True)))
    await emit(encoder.trailer())
    return written


def _write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        done = out.write(view)
        # Raw (unbuffered) files may write less than asked; buffered ones return everything or raise.
        view = view[done if done is not None else len(view) :]
