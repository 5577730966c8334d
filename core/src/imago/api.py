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
    """Open the image file *filename*; the asynchronous form of :func:`open` (same parameters).

    Returns a :class:`FormatAccess`, whose methods are coroutines.
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
    """Open the image file *filename* and return a :class:`SyncFormatAccess` (blocking calls).

    Args:
        filename: the image file (a path).
        format: the format driver's name (``"raw"``, ``"qcow2"``, ...). ``None`` probes the
            file's content, which is unsafe for untrusted images: a guest can write another
            format's header into a raw disk (see :func:`probe`). Name the format when you know it.
        write: open for writing (default: read-only).
        gate: the :class:`ImplicitOpenGate` deciding which files the image may make us open
            (its backing file, an external data file, the image file itself). The default is a
            :class:`SandboxImplicitOpenGate` over the image's own directory; pass
            :class:`DenyImplicitOpenGate` to refuse every such file, or
            :class:`PermissiveImplicitOpenGate` for trusted images whose files live elsewhere.
        direct: bypass the host page cache (``O_DIRECT``), for every file opened.
        no_flush: ignore flushes (``qemu-img convert``'s default ``cache=unsafe``): faster, but a
            host crash may lose or corrupt what was written; ``sync()`` still makes it durable.
        storage_driver_name: the storage driver opening the files (default ``"file"``).

    The result is a context manager: leaving it (or ``close()``) flushes and closes the image,
    its backing chain and its files. Errors: :class:`DriverNotFoundError` for an unknown
    format, :class:`ImplicitOpenDeniedError` when the gate refuses a file,
    :class:`CorruptImageError` / :class:`UnsupportedFeatureError` for bad or unsupported
    images; OS errors (``FileNotFoundError``, ...) pass through unchanged.

    Example::

        with imago.open("vm.qcow2", format="qcow2", write=True) as disk:
            disk.write(b"hello", 0)
    """
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
    """Create an image file; the asynchronous form of :func:`create` (same parameters)."""
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
    """Create the image file *filename* of *format*, *size* bytes large, as ``qemu-img create`` does.

    An existing file is replaced, but only after every option was checked: bad options raise
    :class:`InvalidOptionError` (naming the option) and leave the file untouched.

    Args:
        filename: the file to create.
        format: the format driver's name (``"raw"``, ``"qcow2"``, ...).
        size: the virtual disk size in bytes.
        **options: the format's creation options by name, as the driver's create builder
            methods take them, or by ``qemu-img``'s names: ``preallocate`` /
            ``preallocation`` (``"off"``, ``"metadata"``, ``"falloc"``, ``"full"``) for every
            format; for qcow2 also ``cluster_size``, ``refcount_bits``, ``compat``,
            ``lazy_refcounts``, ``compression_type``, ``extended_l2``, ``backing_file``,
            ``backing_format``, ``data_file``, ``data_file_raw``. The builder's
            ``option_names`` lists them (``Qcow2.create_builder_class.option_names``).

    Names recorded in the image (a backing file) are not opened. For a storage you opened
    yourself, use the driver's builder: ``Qcow2.create_builder(storage).size(n)...create_sync()``.

    Example::

        imago.create("disk.qcow2", "qcow2", 1 << 30, cluster_size=65536, lazy_refcounts=True)
    """
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
