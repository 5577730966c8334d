"""Checking the backing file of a new overlay before it is created, as ``qemu-img create`` does.

``qemu-img create -b BACKING -F FORMAT`` opens the backing file (relative to the new image's
directory, read-only, sharing it with writers) to check that it exists and opens as the named
format, and takes the disk size from it when none is given; ``-u`` skips all that. This module
does the same for any format whose create builder records a backing file
(:attr:`~imago.FormatCreateBuilder.backing_file_name`).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import DriverNotFoundError, ImagoError, ImplicitOpenDeniedError, InvalidOptionError
from ..plugin.manager import format_driver
from ..storage import StorageOpenOptions
from .builder import FormatCreateBuilder
from .gates import ImplicitOpenGate

__all__ = ["backing_path", "check_backing"]


def backing_path(image_name: str, backing_name: str) -> str:
    """Where the backing file *backing_name*, recorded in the image *image_name*, is found.

    Relative names are relative to the image's directory, as they are when the image is opened
    (by its real path).
    """
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(os.path.realpath(image_name)), backing_name)


async def check_backing(
    image_name: str, builder: FormatCreateBuilder[Any], gate: ImplicitOpenGate, *, unsafe: bool
) -> int | None:
    """Check the backing file *builder* records for the new image *image_name*; its disk size.

    Returns ``None`` when there is no backing file, or when *unsafe* skips opening it. The
    backing file is opened through *gate* (with its own backing chain), read-only and without
    locks that would stop a writer, and closed again. Raises :class:`InvalidOptionError`
    naming ``backing_file`` when it is the new image itself, is missing or does not open as
    ``backing_format``; the gate's :class:`ImplicitOpenDeniedError` and
    :class:`DriverNotFoundError` for an unknown format pass through.
    """
    name = builder.backing_file_name
    if name is None:
        return None
    path = backing_path(image_name, name)
    if os.path.realpath(path) == os.path.realpath(image_name):
        raise InvalidOptionError("backing_file", f"{name!r} is the image being created ({image_name!r})")
    if unsafe:
        return None
    format_name = builder.backing_format_name
    if format_name is None:
        # qemu-img refuses to record a backing file without its format (it would be probed).
        raise InvalidOptionError("backing_format", f"the backing file {name!r} needs its format named")
    driver = format_driver(format_name)
    child = driver.builder_path(path).storage_options(StorageOpenOptions(force_share=True))
    try:
        image = await gate.open_format(child)
    except (ImplicitOpenDeniedError, DriverNotFoundError):
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        if error.filename and error.filename != path:
            reason = f"{error.filename!r}: {reason}"  # a file further down its backing chain
        raise InvalidOptionError("backing_file", f"could not open the backing file {path!r}: {reason}") from error
    except ImagoError as error:
        raise InvalidOptionError(
            "backing_file", f"could not open the backing file {path!r} as a {format_name} image: {error}"
        ) from error
    try:
        return image.size
    finally:
        await image.close()
