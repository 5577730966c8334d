"""Convenience functions: open and create images by file name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import runtime
from .errors import InvalidOptionError, UnsupportedFeatureError
from .format.access import FormatAccess, SyncFormatAccess
from .format.builder import FormatCreateBuilder
from .format.driver import FormatDriver
from .format.gates import DenyImplicitOpenGate, ImplicitOpenGate, SandboxImplicitOpenGate
from .format.measure import Measurement
from .format.overlay import check_backing
from .plugin.manager import format_driver, format_drivers, storage_driver, storage_driver_for_uri
from .storage import Storage, StorageCreateOptions, StorageOpenOptions, uri_scheme

__all__ = ["create", "create_async", "measure", "open", "open_async", "probe", "probe_sync"]


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


def _explicit_file_name(filename: str | os.PathLike[str], storage_driver_name: str) -> str:
    """The name of a file the caller names explicitly, to be opened whatever and wherever it is.

    Local files are opened by their real path, so that the default gate's sandbox lies around
    the file that is opened.
    """
    name = _name(filename)
    if storage_driver_name == "file" and name:
        return os.path.realpath(name)
    return name


def _name(filename: str | os.PathLike[str]) -> str:
    name = os.fspath(filename)
    if not isinstance(name, str):
        raise InvalidOptionError("filename", f"must be a str or os.PathLike[str] path, got {filename!r}")
    if "\0" in name:
        raise InvalidOptionError("filename", f"{name!r} contains a NUL byte")
    return name


def _storage_driver_name(filename: str | os.PathLike[str], requested: str | None) -> str:
    """The storage driver for *filename*: *requested*, else the one claiming its URI scheme, else ``file``."""
    if requested is not None:
        return requested
    name = _name(filename)
    scheme = uri_scheme(name)
    if scheme is None:
        return "file"
    driver = storage_driver_for_uri(scheme)
    if driver is not None:
        return driver.name
    if os.path.lexists(name):  # a local file whose name merely looks like a URI
        return "file"
    raise UnsupportedFeatureError(f"{scheme}:// URIs (no installed storage driver opens them)", name)


def _default_gate(filename: str, storage_driver_name: str) -> ImplicitOpenGate:
    if storage_driver(storage_driver_name).uri_schemes:
        # An image reached through a URI has no local directory to sandbox: it opens no file.
        return DenyImplicitOpenGate()
    return SandboxImplicitOpenGate([os.path.dirname(os.path.realpath(filename)) or "."])


async def open_async(
    filename: str | os.PathLike[str],
    format: str | None = None,
    *,
    write: bool = False,
    gate: ImplicitOpenGate | None = None,
    direct: bool = False,
    no_flush: bool = False,
    force_share: bool = False,
    for_check: bool = False,
    backing: bool = True,
    storage_driver_name: str | None = None,
    metadata_only: bool = False,
    cache_size: int | None = None,
    memory_limit: int | None = None,
) -> FormatAccess:
    """Open the image file *filename*; the asynchronous form of :func:`open` (same parameters).

    Returns a :class:`FormatAccess`, whose methods are coroutines.
    """
    storage_driver_name = _storage_driver_name(filename, storage_driver_name)
    name = _explicit_file_name(filename, storage_driver_name)
    if gate is None:
        gate = _default_gate(name, storage_driver_name)
    options = StorageOpenOptions(
        filename=name,
        writable=write,
        direct=direct,
        no_flush=no_flush,
        force_share=force_share,
        driver=storage_driver_name,
    )
    if format is None:
        # The probe reads the header and closes again: it takes no lock that could stop a writer,
        # so a lock conflict is reported by the real open below, for the locks it needs.
        probe_storage = await storage_driver(storage_driver_name).open(
            StorageOpenOptions(filename=name, force_share=True, driver=storage_driver_name)
        )
        try:
            driver = await probe(probe_storage)
        finally:
            await probe_storage.close()
    else:
        if not isinstance(format, str):
            raise InvalidOptionError("format", f"must be a format name, got {format!r}")
        driver = format_driver(format)
    # The file the caller names is opened as asked, not through the gate: only the files the
    # image names (backing file, data file) are implicit opens.
    storage = await storage_driver(storage_driver_name).open(options)
    try:
        builder = driver.builder(storage).write(write).for_check(for_check).open_backing(backing)
        builder.metadata_only(metadata_only)
        if cache_size is not None:
            builder.cache_size(cache_size)
        if memory_limit is not None:
            builder.memory_limit(memory_limit)
        builder.storage_options(options)
        image = await builder.open(gate)
    except BaseException:
        await storage.close()
        raise
    return FormatAccess(image, probed=format is None)


def open(
    filename: str | os.PathLike[str],
    format: str | None = None,
    *,
    write: bool = False,
    gate: ImplicitOpenGate | None = None,
    direct: bool = False,
    no_flush: bool = False,
    force_share: bool = False,
    for_check: bool = False,
    backing: bool = True,
    storage_driver_name: str | None = None,
    metadata_only: bool = False,
    cache_size: int | None = None,
    memory_limit: int | None = None,
) -> SyncFormatAccess:
    """Open the image file *filename* and return a :class:`SyncFormatAccess` (blocking calls).

    Args:
        filename: the image file (a path).
        format: the format driver's name (``"raw"``, ``"qcow2"``, ...). ``None`` probes the
            file's content, which is unsafe for untrusted images: a guest can write another
            format's header into a raw disk (see :func:`probe`). Name the format when you know it.
            A disk probed as raw refuses writes that would make it probe as another format
            (:mod:`imago.format.probe_guard`).
        write: open for writing (default: read-only).
        gate: the :class:`ImplicitOpenGate` deciding which files the image may make us open
            (its backing file, an external data file). The default is a
            :class:`SandboxImplicitOpenGate` over the image's own directory; pass
            :class:`DenyImplicitOpenGate` to refuse every such file, or
            :class:`PermissiveImplicitOpenGate` for trusted images whose files live elsewhere.
            *filename* itself is the caller's explicit choice: it is opened whatever its type
            (a regular file, a block device) and wherever it is, without asking the gate.
        direct: bypass the host page cache (``O_DIRECT``), for every file opened.
        no_flush: ignore flushes (``qemu-img convert``'s default ``cache=unsafe``): faster, but a
            host crash may lose or corrupt what was written; ``sync()`` still makes it durable.
        force_share: open read-only without taking any lock that would stop a writer (``qemu-img
            -U``), for every file opened (backing and data files too). Another process may be
            changing the image, so what is read may be inconsistent. Refused with ``write=True``
            (:class:`InvalidOptionError`).
        for_check: open the image to check or repair it (``disk.check(fix)``), as ``qemu-img
            check`` does: damaged images that are otherwise refused (qcow2: marked corrupt) are
            opened, a dirty image is not repaired on opening, and writes other than a repair are
            refused until a repair succeeded.
        backing: open the backing file the image names (default). ``False`` opens the image
            alone, as ``qemu-img info`` does: the backing file is not opened (it need not
            exist), and what the image does not allocate reads as zeroes.
        storage_driver_name: the storage driver opening *filename* (default: the driver whose
            :attr:`Storage.uri_schemes` include the scheme of a *filename* written as a URI,
            such as ``nbd+unix:///export?socket=/run/nbd.sock`` with imago-nbd installed;
            otherwise ``"file"``). Through a driver with URI schemes the default gate is a
            :class:`DenyImplicitOpenGate`, and files the image names are never opened through
            that driver.
        metadata_only: open for the image's metadata alone, as ``qemu-img info`` does: files it
            names for its data (qcow2's external data file) are not opened nor shown to the gate,
            and reading guest data kept there fails (:meth:`FormatDriverBuilder.metadata_only`).
        cache_size: the bytes the metadata caches (qcow2: L2 tables, refcount blocks) of the
            image and its whole backing chain may hold together; ``None``: 32 MiB. Least
            recently used entries are evicted beyond it (:meth:`FormatDriverBuilder.cache_size`).
        memory_limit: the bytes the image and its chain may hold whole (qcow2: L1 and refcount
            tables), summed over every layer; ``None``: 512 MiB. An image that would pass it is
            refused with :class:`ResourceLimitError` naming the file
            (:meth:`FormatDriverBuilder.memory_limit`).

    The result is a context manager: leaving it (or ``close()``) flushes and closes the image,
    its backing chain and its files. An image dropped without closing is flushed and closed
    when it is garbage-collected (or at interpreter exit), with a :class:`ResourceWarning`.
    Errors: :class:`DriverNotFoundError` for an unknown
    format, :class:`ImplicitOpenDeniedError` when the gate refuses a file,
    :class:`ImageLockedError` when another process (QEMU, or imago) holds the image in a way
    that forbids this open (images are locked as QEMU locks them, until closed),
    :class:`CorruptImageError` / :class:`UnsupportedFeatureError` for bad or unsupported
    images, :class:`ResourceLimitError` for a chain holding more than *memory_limit*; OS errors
    (``FileNotFoundError``, ...) pass through unchanged.

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
                force_share=force_share,
                for_check=for_check,
                backing=backing,
                storage_driver_name=storage_driver_name,
                metadata_only=metadata_only,
                cache_size=cache_size,
                memory_limit=memory_limit,
            )
        )
    )


def _create_builder(
    driver: type[FormatDriver], storage: Storage, size: int | None, options: dict[str, Any]
) -> FormatCreateBuilder[Any]:
    builder = driver.create_builder(storage)
    if size is not None:
        builder.size(size)
    for key, value in options.items():
        builder.set_option(key, value)
    return builder


async def create_async(
    filename: str | os.PathLike[str],
    format: str,
    size: int | None = None,
    *,
    unsafe: bool = False,
    gate: ImplicitOpenGate | None = None,
    **options: Any,
) -> None:
    """Create an image file; the asynchronous form of :func:`create` (same parameters)."""
    driver = format_driver(format)
    storage_cls = storage_driver("file")
    name = os.fspath(filename)
    if not isinstance(unsafe, bool):
        raise InvalidOptionError("unsafe", f"must be True or False, got {unsafe!r}")
    if gate is None:
        gate = _default_gate(name, "file")
    elif not isinstance(gate, ImplicitOpenGate):
        raise InvalidOptionError("gate", f"expected an ImplicitOpenGate, got {type(gate).__name__}")
    # Validate every option, and the backing file, before touching the file: bad input loses no data.
    probe_builder = _create_builder(driver, _NO_STORAGE, size, options)
    probe_builder.validate()
    backing_size = await check_backing(name, probe_builder, gate, unsafe=unsafe)
    if size is None:
        if backing_size is None:
            because = (
                "unsafe=True does not open the backing file to take it from"
                if probe_builder.backing_file_name is not None
                else "there is no backing file to take it from"
            )
            raise InvalidOptionError("size", f"the disk size is needed: {because}")
        size = backing_size
        _create_builder(driver, _NO_STORAGE, size, options).validate()
    storage = await storage_cls.create(StorageCreateOptions(filename=name, overwrite=True))
    try:
        builder = _create_builder(driver, storage, size, options)
        await builder.create()
        await storage.flush()
    finally:
        await storage.close()


def create(
    filename: str | os.PathLike[str],
    format: str,
    size: int | None = None,
    *,
    unsafe: bool = False,
    gate: ImplicitOpenGate | None = None,
    **options: Any,
) -> None:
    """Create the image file *filename* of *format*, *size* bytes large, as ``qemu-img create`` does.

    An existing file is replaced, but only after every option (and the backing file) was
    checked: bad options raise :class:`InvalidOptionError` (naming the option) and leave the
    file untouched.

    Args:
        filename: the file to create.
        format: the format driver's name (``"raw"``, ``"qcow2"``, ...).
        size: the virtual disk size in bytes; ``None`` takes the backing file's size (an
            :class:`InvalidOptionError` naming ``size`` when there is no backing file to take
            it from).
        unsafe: do not open the backing file (``qemu-img create -u``): it need not exist yet,
            and *size* must be given.
        gate: the :class:`ImplicitOpenGate` the backing file is opened through (default: a
            :class:`SandboxImplicitOpenGate` over the new image's directory, as for
            :func:`open`).
        **options: the format's creation options by name, as the driver's create builder
            methods take them, or by ``qemu-img``'s names: ``preallocate`` /
            ``preallocation`` (``"off"``, ``"metadata"``, ``"falloc"``, ``"full"``) for every
            format; for qcow2 also ``cluster_size``, ``refcount_bits``, ``compat``,
            ``lazy_refcounts``, ``compression_type``, ``extended_l2``, ``backing_file``,
            ``backing_format``, ``data_file``, ``data_file_raw``. The builder's
            ``option_names`` lists them (``Qcow2.create_builder_class.option_names``).

    A backing file is checked as ``qemu-img create`` checks it: found relative to the new
    image's directory, it must exist and open as ``backing_format`` (it is opened read-only,
    with its own backing chain, and closed again); otherwise :class:`InvalidOptionError` names
    ``backing_file``. A backing file outside the gate's rules raises
    :class:`ImplicitOpenDeniedError`. For a storage you opened yourself, use the driver's
    builder (which opens nothing): ``Qcow2.create_builder(storage).size(n)...create_sync()``.

    Example::

        imago.create("disk.qcow2", "qcow2", 1 << 30, cluster_size=65536, lazy_refcounts=True)
        imago.create("overlay.qcow2", "qcow2", backing_file="disk.qcow2", backing_format="qcow2")
    """
    runtime.run_sync(create_async(filename, format, size, unsafe=unsafe, gate=gate, **options))


def measure(format: str, size: int, data: Sequence[tuple[int, int]] | None = None, **options: Any) -> Measurement:
    """The file size a new *format* image of *size* bytes needs, as ``qemu-img measure`` computes it.

    *data* lists the guest ranges ``(offset, length)`` that will hold data (sorted, not
    overlapping), ``None`` for an image with no data yet (``qemu-img measure --size``).
    *options* are the creation options :func:`create` takes. Nothing is written. Raises
    :class:`InvalidOptionError` for bad options and :class:`UnsupportedFeatureError` for a
    format that cannot measure.

    Example::

        imago.measure("qcow2", 1 << 40, cluster_size=65536).required  # metadata only
    """
    return _create_builder(format_driver(format), _NO_STORAGE, size, options).measure(data)


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
