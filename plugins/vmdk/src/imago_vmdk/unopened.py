"""The flat extent files of an image opened for its metadata alone: named, never opened."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import NoReturn

from imago import MissingStorageError, PreallocateMode, Storage, StorageOpenOptions

__all__ = ["UnopenedExtentFile"]


class UnopenedExtentFile(Storage):
    """Stands in for the flat extent file *name* of the image *image*: I/O raises :class:`~imago.MissingStorageError`.

    A flat extent holds guest data only; ``qemu-img info`` (QEMU's ``BDRV_O_NO_IO``) needs none,
    so such files are neither opened nor shown to the gate.
    """

    name = "unopened-vmdk-extent"

    def __init__(self, name: str, image: str | None) -> None:
        self._name = name
        self._image = image

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> UnopenedExtentFile:
        """Never opened by name."""
        raise NotImplementedError("made by the vmdk driver for images opened for metadata only")

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
        """The extent file's name, resolved against the descriptor's directory."""
        return self._name

    def allocated_size(self) -> int | None:
        """The file's allocated bytes when it lies beside the image (``qemu-img info`` counts them).

        Looked up without opening it and without following a link (``lstat``), and only for a
        plain name in the image's own directory: nothing else is touched without the gate.
        """
        if self._image is None or os.path.dirname(self._name) != os.path.dirname(self._image):
            return None
        try:
            status = os.lstat(self._name)
        except OSError:
            return None
        return status.st_blocks * 512 if stat.S_ISREG(status.st_mode) else None

    def _refuse(self) -> NoReturn:
        raise MissingStorageError(
            self._image,
            "extent",
            f"the image was opened for its metadata only: its flat extent file {self._name!r} is not open",
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
