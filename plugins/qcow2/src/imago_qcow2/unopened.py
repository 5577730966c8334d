"""The external data file of an image opened for its metadata alone: named, never opened."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from imago import MissingStorageError, PreallocateMode, Storage, StorageOpenOptions

__all__ = ["UnopenedDataFile"]


class UnopenedDataFile(Storage):
    """Stands in for the data file *name* of the image *image*: any I/O raises :class:`~imago.MissingStorageError`.

    ``qemu-img info`` does not open data files (QEMU's ``BDRV_O_NO_IO``; CVE-2024-4467 showed
    why): facts about the image need none of its guest data.
    """

    name = "unopened-data-file"

    def __init__(self, name: str | None, image: str | None) -> None:
        self._name = name
        self._image = image

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> UnopenedDataFile:
        """Never opened by name."""
        raise NotImplementedError("made by the qcow2 driver for images opened for metadata only")

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
        """The data file's name as the image records it."""
        return self._name

    def _refuse(self) -> NoReturn:
        raise MissingStorageError(
            self._image,
            "data_file",
            f"the image was opened for its metadata only: its external data file {self._name!r} is not open",
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
