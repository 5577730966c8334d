"""Changing the backing file a qcow2 image records (``qemu-img rebase -u``, ``amend -o backing_file``).

Only the reference changes: the name is stored as given (relative names stay relative, resolved
against the image's directory when the image is opened), the data is not touched. The header
cluster is rewritten in one write (:func:`~imago_qcow2.header_rewrite.write_header`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imago import InvalidOptionError

from .header_rewrite import write_header
from .layout import MAX_NAME_BYTES

if TYPE_CHECKING:
    from .state import Qcow2State

__all__ = ["change_backing_file"]


async def change_backing_file(state: Qcow2State, filename: str | None, format: str | None) -> None:
    """Record *filename* of *format* as the backing file; ``None`` (or ``""``): no backing file.

    A format of ``None`` removes the backing format extension (the backing file is then probed
    when opened). Refused, with nothing written, as QEMU refuses it: a name longer than 1023
    bytes, a format without a file name, a backing file for an image whose external data file
    is kept valid as a raw image (``data_file_raw``), a header that would not fit its cluster.
    """
    if filename == "":
        filename = None
    if filename is not None:
        if "\0" in filename:
            raise InvalidOptionError("backing_file", "the backing file name contains a NUL byte")
        size = len(filename.encode())
        if size > MAX_NAME_BYTES:
            raise InvalidOptionError(
                "backing_file", f"the backing file name is {size} bytes long (at most {MAX_NAME_BYTES})"
            )
        if state.header.data_file_raw:
            raise InvalidOptionError(
                "backing_file",
                f"{state.filename or 'the image'} keeps its external data file as a raw image (data_file_raw): "
                "it cannot have a backing file",
            )
    if format is not None:
        if filename is None:
            raise InvalidOptionError("backing_fmt", "a backing format needs a backing file")
        if not format or "\0" in format or len(format.encode()) > MAX_NAME_BYTES:
            raise InvalidOptionError("backing_fmt", f"invalid backing format name {format!r}")
    header = state.header.__replace__(backing_file=filename, backing_format=format)
    await write_header(state, header, option="backing_file")
