from pathlib import Path

from imago import Storage, StorageCreateOptions, StorageOpenOptions
from imago.testing import StorageConformance
from imago_file import File


class TestFileConformance(StorageConformance):
    def create_storage(self, directory: Path, size: int) -> Storage:
        return File.create_sync(StorageCreateOptions(filename=directory / "storage.img", size=size, overwrite=True))

    def reopen_read_only(self, storage: Storage) -> Storage:
        return File.open_sync(StorageOpenOptions(filename=storage.filename, force_share=True))


class TestDirectFileConformance(StorageConformance):
    def create_storage(self, directory: Path, size: int) -> Storage:
        path = directory / "storage.img"
        File.create_sync(StorageCreateOptions(filename=path, size=size, overwrite=True))
        return File.open_sync(StorageOpenOptions(filename=path, writable=True, direct=True))

    def reopen_read_only(self, storage: Storage) -> Storage:
        return File.open_sync(StorageOpenOptions(filename=storage.filename, direct=True, force_share=True))
