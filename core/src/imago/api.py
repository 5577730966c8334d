"""Convenience functions: open and create images by file name."""

from __future__ import annotations

import os
from typing import Any

from . import runtime
from .errors import InvalidOptionError, UnsupportedFeatureError
from .format.access import FormatAccess, SyncFormatAccess
from .format.driver import FormatDriver
from .format.gates import ImplicitOpenGate, SandboxImplicitOpenGate
from .plugin.manager import format_driver, format_drivers, storage_driver
from .storage import Storage, StorageCreateOptions, StorageOpenOptions

__all__ = ["create", "create_async", "open", "open_async", "probe", "probe_sync"]


async def probe(storage: Storage) -> type[FormatDriver]:
    """The format of the image in *storage*, by looking at its content.

    Unsafe for untrusted images: a guest can write another format's header into a raw
    disk, and probing would then trust it. Name the format whenever you know it.
    """
    drivers = sorted(format_drivers().values(), key=lambda cls: (cls.probe_fallback, cls.name))
    for cls in drivers:
        if cls.probe_fallback or await cls.probe(storage):
            return cls
    raise UnsupportedFeatureError("image of an unknown format", storage.filename)


def probe_sync(storage: Storage) -> type[FormatDriver]:
    """Synchronous :func:`probe`."""
    return runtime.run_sync(probe(storage))


def _default_gate(filename: str) -> ImplicitOpenGate:
    return SandboxImplicitOpenGate([os.path.dirname(os.path.realpath(filename)) or "."])


async def open_async(
    filename: str | os.PathLike[str],
    format: str | None = None,
    *,
    write: bool = False,
    gate: ImplicitOpenGate | None = None,
    direct: bool = False,
    no_flush: bool = False,
    storage_driver_name: str = "file",
) -> FormatAccess:
    """Open the image file *filename* and return a :class:`FormatAccess`.

    *format* names the format driver; ``None`` probes the content (unsafe for untrusted
    images, see :func:`probe`). *gate* decides which files the image may make us open,
    the image file included; the default only allows files in the image's own directory.
    *direct* bypasses the host page cache; *no_flush* ignores flushes (as ``qemu-img convert``
    writes its target by default: fast, but not crash-safe, see
    :attr:`StorageOpenOptions.no_flush`).
    """
    name = os.fspath(filename)
    if gate is None:
        gate = _default_gate(name)
    options = StorageOpenOptions(
        filename=name, writable=write, direct=direct, no_flush=no_flush, driver=storage_driver_name
    )
    if format is None:
        probe_storage = await gate.open_storage(StorageOpenOptions(filename=name, driver=storage_driver_name))
        try:
            driver = await probe(probe_storage)
        finally:
            await probe_storage.close()
    else:
        if not isinstance(format, str):
            raise InvalidOptionError("format", f"must be a format name, got {format!r}")
        driver = format_driver(format)
    image = await driver.builder_path(name).write(write).storage_options(options).open(gate)
    return FormatAccess(image)


def open(
    filename: str | os.PathLike[str],
    format: str | None = None,
    *,
    write: bool = False,
    gate: ImplicitOpenGate | None = None,
    direct: bool = False,
    no_flush: bool = False,
    storage_driver_name: str = "file",
) -> SyncFormatAccess:
    """Synchronous :func:`open_async`: returns a :class:`SyncFormatAccess`."""
    return SyncFormatAccess(
        runtime.run_sync(
            open_async(
                filename,
                format,
                write=write,
                gate=gate,
                direct=direct,
                no_flush=no_flush,
                storage_driver_name=storage_driver_name,
            )
        )
    )


async def create_async(filename: str | os.PathLike[str], format: str, size: int, **options: Any) -> None:
    """Create an image file (replacing an existing one, as ``qemu-img create`` does).

    *options* are the format's creation options by name (``preallocate="full"``,
    ``cluster_size=65536``, ...); unknown ones raise :class:`InvalidOptionError`.
    """
    driver = format_driver(format)
    storage_cls = storage_driver("file")
    # Validate every option before touching the file, so bad input loses no data.
    probe_builder = driver.create_builder(_NO_STORAGE).size(size)
    for key, value in options.items():
        probe_builder.set_option(key, value)
    probe_builder.validate()
    storage = await storage_cls.create(StorageCreateOptions(filename=os.fspath(filename), overwrite=True))
    try:
        builder = driver.create_builder(storage).size(size)
        for key, value in options.items():
            builder.set_option(key, value)
        await builder.create()
        await storage.flush()
    finally:
        await storage.close()


def create(filename: str | os.PathLike[str], format: str, size: int, **options: Any) -> None:
    """Synchronous :func:`create_async`."""
    runtime.run_sync(create_async(filename, format, size, **options))


class _NoStorage(Storage):
    """Stands in for a storage while options are validated; never does I/O."""

    name = "none"

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> _NoStorage:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0

    async def readv(self, bufs: Any, offset: int) -> None:
        raise NotImplementedError

    async def writev(self, bufs: Any, offset: int) -> None:
        raise NotImplementedError

    async def resize(self, new_size: int, prealloc: Any = None) -> None:
        raise NotImplementedError


_NO_STORAGE = _NoStorage()
