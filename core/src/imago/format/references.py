"""Opening the images an image names (a backing file, a parent), through the gate.

Every format driver that follows a recorded name does the same: the name must be a plain local
file name, it is resolved next to the image's file, the named image is opened read-only below the
image (so that loops and over-deep chains are found) and locked as the image's reader asked
(``force_share``), and the gate decides. A refusal of the named file then also names the image and
what the file is to it, since the gate only knows the name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

from ..errors import ImplicitOpenDeniedError
from ..storage import Storage, StorageOpenOptions
from .builder import FormatDriverBuilder
from .driver import FormatDriver
from .gates import ImplicitOpenGate
from .names import check_local_file_name

__all__ = ["naming_the_referrer", "open_named_image"]

D = TypeVar("D", bound=FormatDriver)


@contextlib.contextmanager
def naming_the_referrer(storage: Storage, recorded: str, role: str) -> Iterator[None]:
    """A gate's refusal of the file *storage*'s image records as *recorded* also names the image and *role*.

    Refusals of files further down a chain pass unchanged: the image naming them is named there.
    """
    try:
        yield
    except ImplicitOpenDeniedError as error:
        if error.filename not in (recorded, repr(recorded), storage.resolve_relative_path(recorded)):
            raise
        raise ImplicitOpenDeniedError(
            error.filename,
            f"{error.reason} (named as the {role} of {storage.filename or 'the image'})",
            allowable=error.allowable,
        ) from error


async def open_named_image(
    builder: FormatDriverBuilder[Any],
    gate: ImplicitOpenGate,
    storage: Storage,
    recorded: str,
    driver: type[D],
    *,
    role: str = "backing file",
) -> D:
    """Open, as *driver*, the image that the image of *builder* (its file *storage*) records as *recorded*.

    Read-only, below *builder* in the chain, with its reader's ``force_share``, through *gate*;
    a name that is not a plain local file name, or a refusal by the gate, is an
    :class:`~imago.ImplicitOpenDeniedError` naming the image and *role* (``"parent"``, say).
    """
    with naming_the_referrer(storage, recorded, role):
        path = storage.resolve_relative_path(check_local_file_name(recorded))
        child = driver.builder_path(path).below(builder)
        child.storage_options(StorageOpenOptions(force_share=builder.given_storage_options.force_share))
        return await gate.open_format(child)
