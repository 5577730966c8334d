"""Builders that open and create images: ``Raw.builder(storage).write(True).open(gate)``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar, runtime_checkable

from .. import runtime
from .._record import Record, evolve, init
from ..budget import DEFAULT_CACHE_SIZE, DEFAULT_MEMORY_LIMIT, MIN_CACHE_SIZE, MemoryBudget, check_size
from ..errors import BackingChainError, InvalidOptionError, UnsupportedFeatureError
from ..storage import PreallocateMode, Storage, StorageOpenOptions
from .measure import Measurement
from .names import check_local_file_name

if TYPE_CHECKING:
    from .driver import FormatDriver
    from .gates import ImplicitOpenGate

__all__ = ["MAX_CHAIN_DEPTH", "FormatCreateBuilder", "FormatDriverBuilder"]

# A bound named by a string costs a compile() at import (typing's ForwardRef): only mypy needs it.
if TYPE_CHECKING:
    D = TypeVar("D", bound=FormatDriver)
else:
    D = TypeVar("D")

#: How many images may be stacked on top of each other through backing references.
MAX_CHAIN_DEPTH = 64


class FormatDriverBuilder(Generic[D]):
    """Collects how to open an image, then opens it with :meth:`open` (or :meth:`open_sync`).

    Made by ``Driver.builder(storage)`` (the caller's storage, used as it is, and owned by the
    driver afterwards) or ``Driver.builder_path(path)`` (the file is opened through the gate
    passed to :meth:`open`). Options are methods returning the builder, so they chain:

    * :meth:`write` -- open for writing (default: read-only);
    * :meth:`for_check` -- open a damaged image to check or repair it (``qemu-img check``);
    * :meth:`storage_options` (also :meth:`storage_open_options`) -- how files are opened by
      path: storage driver, ``direct``, ``no_flush``, driver options;
    * :meth:`cache_size`, :meth:`memory_limit` -- the memory the image and its backing chain
      may use (:attr:`budget`);
    * :meth:`below` -- for drivers opening backing files: the image above, for loop detection.

    ``open(gate)`` returns the format driver (wrap it in :class:`~imago.FormatAccess` or
    :class:`~imago.SyncFormatAccess` for I/O); the gate decides which files the image may make
    us open. Format drivers with more options (qcow2's ``backing``, ``data_file``) subclass this
    and set ``FormatDriver.builder_class``. Example::

        image = Raw.builder_path("disk.img").write(True).open_sync(SandboxImplicitOpenGate(["."]))
    """

    def __init__(
        self, driver: type[D], *, storage: Storage | None = None, path: str | os.PathLike[str] | None = None
    ) -> None:
        if (storage is None) == (path is None):
            raise InvalidOptionError("storage", "give exactly one of a storage or a path")
        if storage is not None and not isinstance(storage, Storage):
            raise InvalidOptionError("storage", f"expected a Storage, got {type(storage).__name__}")
        self._driver = driver
        self._storage = storage
        self._path = None if path is None else os.fspath(path)
        self._writable = False
        self._for_check = False
        self._open_backing = True
        self._metadata_only = False
        self._storage_options = StorageOpenOptions()
        self._chain: tuple[str, ...] = ()
        self._cache_size = DEFAULT_CACHE_SIZE
        self._memory_limit = DEFAULT_MEMORY_LIMIT
        self._budget: MemoryBudget | None = None

    # --- options ---------------------------------------------------------------------------

    def write(self, writable: bool = True) -> Self:
        """Open for writing (default: read-only)."""
        if not isinstance(writable, bool):
            raise InvalidOptionError("write", f"must be True or False, got {writable!r}")
        self._writable = writable
        return self

    def for_check(self, check: bool = True) -> Self:
        """Open the image to check or repair it, as ``qemu-img check`` opens images.

        Damaged images that a normal open refuses (qcow2: marked corrupt) are opened; opened for
        writing, nothing but a repair may write to them until it succeeded, and nothing is
        repaired implicitly (a dirty image is left as it is, for the check to report).
        """
        if not isinstance(check, bool):
            raise InvalidOptionError("for_check", f"must be True or False, got {check!r}")
        self._for_check = check
        return self

    def open_backing(self, open_backing: bool = True) -> Self:
        """Whether to open the backing file the image names (default: yes).

        Without it (QEMU's ``BDRV_O_NO_BACKING``, as ``qemu-img info`` and ``rebase -u`` open
        images) the image is opened alone: its backing file is not opened, need not exist and is
        not shown to the gate; areas the image does not allocate read as zeroes. The image still
        reports the name it records (``info()``).
        """
        if not isinstance(open_backing, bool):
            raise InvalidOptionError("open_backing", f"must be True or False, got {open_backing!r}")
        self._open_backing = open_backing
        return self

    def metadata_only(self, metadata_only: bool = True) -> Self:
        """Open the image for its metadata alone (QEMU's ``BDRV_O_NO_IO``, as ``qemu-img info`` opens).

        Files the image names for its data (qcow2's external data file) are not opened and not
        shown to the gate; reading or writing guest data stored there fails. Facts (``info()``,
        mappings, snapshots) stay available.
        """
        if not isinstance(metadata_only, bool):
            raise InvalidOptionError("metadata_only", f"must be True or False, got {metadata_only!r}")
        self._metadata_only = metadata_only
        return self

    def cache_size(self, nbytes: int) -> Self:
        """Cap the metadata caches of the image and its whole backing chain at *nbytes* together.

        Every layer's caches (qcow2: L2 tables and refcount blocks) count against this one cap,
        whatever the cluster size, the chain's depth or the access pattern; what does not fit
        is evicted, least recently used first. Default: 32 MiB (:data:`imago.budget.DEFAULT_CACHE_SIZE`).
        At least 64 KiB; opening refuses a cap that cannot hold two of an image's largest cache
        entries (two clusters, for qcow2). Errors name the option (:class:`~imago.InvalidOptionError`).
        Smaller caches read metadata more often; larger ones let a crafted image use more memory.
        """
        self._cache_size = check_size("cache_size", nbytes, MIN_CACHE_SIZE)
        self._budget = None
        return self

    def memory_limit(self, nbytes: int) -> Self:
        """Cap what the image and its backing chain hold whole in memory at *nbytes* together.

        Tables a driver keeps whole rather than cached (qcow2: each layer's L1 table and
        refcount table) are summed over the chain; a layer that would pass the limit is refused
        with :class:`~imago.ResourceLimitError` naming its file, before the table is read.
        Default: 512 MiB (:data:`imago.budget.DEFAULT_MEMORY_LIMIT`), more than any legitimate
        image needs (a 1 EiB qcow2 image with 2 MiB clusters holds an 18 MiB L1 table).
        """
        self._memory_limit = check_size("memory_limit", nbytes, 1)
        self._budget = None
        return self

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget of the image and its chain (:meth:`cache_size`, :meth:`memory_limit`).

        Made on first use; a backing file's builder shares its parent's (:meth:`below`), and so
        do images opened again with the same builder. Drivers make their caches in it and
        charge the tables they hold whole to it.
        """
        if self._budget is None:
            self._budget = MemoryBudget(cache_size=self._cache_size, memory_limit=self._memory_limit)
        return self._budget

    def storage_options(self, options: StorageOpenOptions) -> Self:
        """Options for opening the file by path (driver, ``direct``, driver options).

        ``filename`` and ``writable`` are taken from the builder itself.
        """
        return self._set_storage_options(options, "storage_options")

    def storage_open_options(self, options: StorageOpenOptions) -> Self:
        """Another name for :meth:`storage_options` (the Rust crate's)."""
        return self._set_storage_options(options, "storage_open_options")

    def _set_storage_options(self, options: StorageOpenOptions, option: str) -> Self:
        if not isinstance(options, StorageOpenOptions):
            raise InvalidOptionError(option, f"expected StorageOpenOptions, got {type(options).__name__}")
        self._storage_options = options
        return self

    @property
    def given_storage_options(self) -> StorageOpenOptions:
        """The options :meth:`storage_options` set (``filename`` and ``writable`` not filled in).

        Drivers open further files of the image (an external data file, say) with them.
        """
        return self._storage_options

    def below(self, parent: FormatDriverBuilder[Any] | str | None) -> Self:
        """Mark this image as referenced by *parent* (an image's builder or file name).

        Used by format drivers opening backing files: the chain of parents is how loops and
        over-deep chains are detected. A parent opened for its metadata only
        (:meth:`metadata_only`) passes that on, and every parent its memory :attr:`budget`.
        """
        if isinstance(parent, FormatDriverBuilder):
            self._chain = (*parent._chain, parent.identity())
            self._metadata_only = self._metadata_only or parent._metadata_only
            self._budget = parent.budget
        elif parent is not None:
            self._chain = (os.path.realpath(parent),)
        return self

    # --- what drivers read -----------------------------------------------------------------

    @property
    def driver(self) -> type[D]:
        """The format driver class this builder opens."""
        return self._driver

    @property
    def writable(self) -> bool:
        """Whether the image is to be opened for writing."""
        return self._writable

    @property
    def opens_backing(self) -> bool:
        """Whether the driver should open the image's backing file (:meth:`open_backing`)."""
        return self._open_backing

    @property
    def opens_metadata_only(self) -> bool:
        """Whether files the image names for its data stay closed (:meth:`metadata_only`)."""
        return self._metadata_only

    @property
    def checking(self) -> bool:
        """Whether the image is opened to be checked or repaired (:meth:`for_check`)."""
        return self._for_check

    @property
    def path(self) -> str | None:
        """The path given to ``builder_path``, if any."""
        return self._path

    @property
    def depth(self) -> int:
        """How many images lie above this one in a chain."""
        return len(self._chain)

    def identity(self) -> str:
        """What identifies this image in a chain: the real path of its file, or an object id."""
        if self._path is not None:
            return os.path.realpath(self._path)
        assert self._storage is not None
        name = self._storage.filename
        return os.path.realpath(name) if name else f"<storage {id(self._storage):#x}>"

    async def open_storage(self, gate: ImplicitOpenGate) -> Storage:
        """The storage to open the image on: the given one, or the path opened through *gate*."""
        if self._path is not None:
            # Before identity(): realpath fails on a NUL byte with a bare ValueError.
            check_local_file_name(self._path)
        identity = self.identity()
        if identity in self._chain:
            raise BackingChainError(identity, "the chain of backing files loops back to this file")
        if len(self._chain) >= MAX_CHAIN_DEPTH:
            raise BackingChainError(identity, f"the chain of backing files is deeper than {MAX_CHAIN_DEPTH}")
        if self._storage is not None:
            return self._storage
        options = evolve(self._storage_options, filename=self._path, writable=self._writable)
        return await gate.open_storage(options)

    # --- opening -------------------------------------------------------------------------------

    async def open(self, gate: ImplicitOpenGate) -> D:
        """Open the image; *gate* decides which files it may make us open."""
        if not isinstance(gate, _Gate):
            raise InvalidOptionError("gate", f"expected an ImplicitOpenGate, got {type(gate).__name__}")
        return await self._driver.open_image(self, gate)

    def open_sync(self, gate: ImplicitOpenGate) -> D:
        """Synchronous :meth:`open`."""
        return runtime.run_sync(self.open(gate))


@runtime_checkable
class _Gate(Protocol):
    """What :meth:`FormatDriverBuilder.open` needs of a gate (an :class:`~imago.ImplicitOpenGate`).

    Checked structurally: the gate classes build on this module, not the other way round.
    """

    async def check_storage(self, options: StorageOpenOptions) -> StorageOpenOptions: ...

    async def check_format(self, builder: FormatDriverBuilder[Any]) -> None: ...

    async def open_storage(self, options: StorageOpenOptions) -> Storage: ...

    async def open_format(self, builder: FormatDriverBuilder[D]) -> D: ...


def _size_value(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidOptionError("size", f"must be a non-negative integer, got {value!r}")
    return value


class FormatCreateBuilder(Generic[D]):
    """Collects the options of a new image, then writes it with :meth:`create` (or :meth:`create_sync`).

    Made by ``Driver.create_builder(storage)``: the image is written into *storage* (emptied
    first), which stays the caller's to close. Options are methods returning the builder:
    :meth:`size` (the virtual size in bytes) and :meth:`preallocate` for every format, and the
    format's own (qcow2: ``cluster_size``, ``refcount_width``, ``backing``, ...).
    :meth:`set_option` sets one by name (as ``imago.create(**options)`` does), also under
    ``qemu-img``'s names (:attr:`option_aliases`); the names it accepts are listed in
    :attr:`option_names`. Each option is checked when it is set and :meth:`validate` checks
    them together before anything is written, raising :class:`~imago.InvalidOptionError` naming
    the option. Example::

        Raw.create_builder(storage).size(1 << 30).preallocate("falloc").create_sync()
    """

    class Option(Record):
        """One creation option as ``qemu-img`` names and types it (``qemu-img create -o help``).

        ``kind`` says how a command line's text becomes the value :meth:`set_option` takes:
        ``bool`` (on/off), ``size`` (bytes, with qemu's suffixes), ``int`` or ``str`` (one of
        ``choices`` when those are given). ``default`` is the value ``qemu-img create`` reports
        when the option is not given (``None``: not reported).
        """

        __slots__ = ("choices", "default", "description", "kind", "name")

        name: str
        kind: str
        description: str
        default: str | None
        choices: tuple[str, ...]

        def __init__(
            self, name: str, kind: str, description: str, default: str | None = None, choices: tuple[str, ...] = ()
        ) -> None:
            init(self, "name", name)
            init(self, "kind", kind)
            init(self, "description", description)
            init(self, "default", default)
            init(self, "choices", choices)

    #: Names accepted by :meth:`set_option`; subclasses extend it with their own methods.
    option_names: ClassVar[tuple[str, ...]] = ("size", "preallocate")
    #: Other names for options (``qemu-img``'s), mapped to the method they set.
    option_aliases: ClassVar[dict[str, str]] = {"preallocation": "preallocate"}
    #: The options under ``qemu-img``'s names, in the order ``qemu-img create`` reports them;
    #: the command line lists (``-o help``) and converts (``-o k=v``) options with it.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        Option("size", "size", "Virtual disk size"),
        Option(
            "preallocation",
            "str",
            "Preallocation mode (allowed values: off, falloc, full)",
            choices=("off", "falloc", "full"),
        ),
    )

    def __init__(self, driver: type[D], storage: Storage) -> None:
        if not isinstance(storage, Storage):
            raise InvalidOptionError("storage", f"expected a Storage, got {type(storage).__name__}")
        self._driver = driver
        self._storage = storage
        self._size = 0
        self._preallocate = PreallocateMode.NONE

    def size(self, size: int) -> Self:
        """Virtual disk size in bytes."""
        self._size = _size_value(size)
        return self

    def preallocate(self, mode: PreallocateMode | str) -> Self:
        """Preallocation mode (:class:`PreallocateMode` or its ``qemu-img`` name)."""
        self._preallocate = PreallocateMode.parse(mode)
        return self

    def set_option(self, name: str, value: Any) -> Self:
        """Set the option *name* (or a ``qemu-img`` alias of it), as the method of that name would."""
        method_name = self.option_aliases.get(name, name)
        if method_name not in self.option_names:
            known = ", ".join(sorted({*self.option_names, *self.option_aliases}))
            raise InvalidOptionError(name, f"not an option of the {self._driver.name} format (options: {known})")
        method: Callable[[Any], Self] = getattr(self, method_name)
        return method(value)

    @classmethod
    def option(cls, name: str) -> FormatCreateBuilder.Option | None:
        """The declared option *name* (``qemu-img``'s name), if any."""
        return next((option for option in cls.options if option.name == name), None)

    def validate(self) -> None:
        """Check the options together (each is checked alone when it is set).

        Raises :class:`InvalidOptionError` naming the option at fault; runs before anything
        is written. The default has nothing to check.
        """

    @property
    def storage(self) -> Storage:
        """The storage the image is written to."""
        return self._storage

    @property
    def virtual_size(self) -> int:
        """The requested disk size."""
        return self._size

    @property
    def preallocation(self) -> PreallocateMode:
        """The requested preallocation mode."""
        return self._preallocate

    @property
    def backing_file_name(self) -> str | None:
        """The backing file name the new image will record (``None``: no backing file).

        Formats with backing files override it: ``imago.create`` then checks the backing file
        as ``qemu-img create`` does (it exists and opens as :attr:`backing_format_name`) and
        takes the disk size from it when none is given.
        """
        return None

    @property
    def backing_format_name(self) -> str | None:
        """The backing file's format the new image will record, if any."""
        return None

    def measure(self, data: Sequence[tuple[int, int]] | None) -> Measurement:
        """The file size the image with these options needs (``qemu-img measure``).

        *data* lists the guest ranges ``(offset, length)`` that will hold data (sorted, not
        overlapping; zero and unallocated areas left out), ``None`` when there is no source
        (``qemu-img measure --size``). Formats that can tell override it; the default raises
        :class:`~imago.UnsupportedFeatureError`.
        """
        raise UnsupportedFeatureError(f"the {self._driver.name} format cannot measure the size of new images")

    async def create(self) -> None:
        """Check the options, then write the new image to the storage (emptying it first)."""
        self.validate()
        await self._driver.create_image(self)

    def create_sync(self) -> None:
        """Synchronous :meth:`create`."""
        runtime.run_sync(self.create())
