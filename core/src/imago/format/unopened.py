"""A file an image names for its guest data, left closed when the image is opened for its metadata only.

``qemu-img info`` opens no guest data (QEMU's ``BDRV_O_NO_IO``; CVE-2024-4467 showed why), and
neither does an image opened with :meth:`~imago.FormatDriverBuilder.metadata_only`: a driver puts
an :class:`UnopenedFile` where the file's storage would be, so the image's facts are there and any
I/O on its data is a clear :class:`~imago.MissingStorageError`. The file is never shown to the gate.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import NoReturn

from ..errors import MissingStorageError
from ..storage import PreallocateMode, Storage, StorageOpenOptions

__all__ = ["UnopenedFile"]


class UnopenedFile(Storage):
    """Stands in for the file *name* that the image *image* names as its *what* (option *role*).

    *what* says what the file is in messages (``"external data file"``), *role* is the
    :class:`~imago.MissingStorageError`'s (``"data_file"``). With *counted*, the file's allocated
    bytes count in :meth:`allocated_size` as ``qemu-img info`` counts them (a VMDK's flat extents).
    """

    name = "unopened"

    def __init__(self, name: str | None, image: str | None, *, role: str, what: str, counted: bool = False) -> None:
        self._name = name
        self._image = image
        self._role = role
        self._what = what
        self._counted = counted

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> UnopenedFile:
        """Never opened by name: drivers make these for images opened for metadata only."""
        raise NotImplementedError("made by format drivers for images opened for metadata only")

    @property
    def size(self) -> int:
        """Unknown: the file is not open."""
        return 0

    @property
    def writable(self) -> bool:
        """Nothing can be written."""
        return False

    @property
    def filename(self) -> str | None:
        """The file's name as the driver gave it."""
        return self._name

    def allocated_size(self) -> int | None:
        """With *counted*, the file's allocated bytes when it lies beside the image; else ``None``.

        Looked up without opening it and without following a link (``lstat``), and only for a
        name in the image's own directory: nothing else is touched without the gate.
        """
        if not self._counted or self._name is None or self._image is None:
            return None
        if os.path.dirname(self._name) != os.path.dirname(self._image):
            return None
        try:
            status = os.lstat(self._name)
        except OSError:
            return None
        return status.st_blocks * 512 if stat.S_ISREG(status.st_mode) else None

    def _refuse(self) -> NoReturn:
        raise MissingStorageError(
            self._image,
            self._role,
            f"the image was opened for its metadata only: its {self._what} {self._name!r} is not open",
        )

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Refuse: the guest data is not available."""
        self._refuse()

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Refuse: the guest data is not available."""
        self._refuse()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Refuse: the guest data is not available."""
        self._refuse()
