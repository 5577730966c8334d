"""Capabilities: what a format driver can do beyond reading, declared rather than discovered.

A driver class lists its capabilities in :attr:`FormatDriver.capabilities`; generic code (the
command line, the conformance suites) asks ``driver.supports(Capability.SNAPSHOTS)`` or gets the
driver typed as the capability's protocol with ``Capability.SNAPSHOTS.of(driver)`` (``None``
when the driver does not claim it), instead of calling and catching
:class:`~imago.UnsupportedFeatureError`. Registration checks that a driver claiming a capability
implements every method of its protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

from .._record import Record, init

if TYPE_CHECKING:
    from ..storage import PreallocateMode
    from .check import CheckResult, RepairMode
    from .driver import FormatDriver

__all__ = [
    "Capability",
    "SnapshotRecord",
    "SupportsAmend",
    "SupportsBackingChange",
    "SupportsCheck",
    "SupportsCompressedWrites",
    "SupportsResize",
    "SupportsSnapshots",
]

P = TypeVar("P")


class SnapshotRecord(Protocol):
    """An internal snapshot as a driver lists it (``qemu-img snapshot -l``'s columns)."""

    @property
    def id(self) -> str:
        """The snapshot's ID (unique in the image)."""

    @property
    def name(self) -> str:
        """The snapshot's name (need not be unique)."""

    @property
    def disk_size(self) -> int:
        """The virtual disk size the snapshot records."""

    def describe(self) -> dict[str, Any]:
        """The snapshot as ``qemu-img info --output=json`` lists it."""


class SupportsSnapshots(Protocol):
    """Internal snapshots: ``qemu-img snapshot -l/-c/-a/-d`` and reading one."""

    @property
    def snapshots(self) -> Sequence[SnapshotRecord]:
        """The snapshots, in table order."""

    async def create_snapshot(self, name: str, *, date_ns: int | None = None, vm_clock_nsec: int = 0) -> SnapshotRecord:
        """Record the current disk as a new snapshot."""

    async def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (ID first, then name)."""

    async def delete_snapshot(self, name_or_id: str) -> SnapshotRecord:
        """Delete a snapshot (name first, then ID); returns it."""

    async def read_snapshot(self, name_or_id: str) -> FormatDriver:
        """A read-only driver over a snapshot's disk."""


class SupportsCompressedWrites(Protocol):
    """Compressed writes of whole clusters (``qemu-img convert -c``)."""

    @property
    def cluster_size(self) -> int:
        """The granularity of compressed writes, in bytes."""

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Write whole clusters compressed."""


class SupportsResize(Protocol):
    """Changing the virtual disk size (``qemu-img resize``)."""

    async def resize(self, new_size: int, prealloc: PreallocateMode = ...) -> None:
        """Grow or shrink the disk."""


class SupportsCheck(Protocol):
    """Consistency checks and repairs (``qemu-img check [-r leaks|all]``)."""

    async def check(self, fix: RepairMode | None = None) -> CheckResult:
        """Check the image's metadata and report what is wrong; with *fix*, repair it first.

        With *fix*, the driver repairs what the mode allows, then checks again and returns
        the second check's counts with the fixed counts and the repair pass's findings
        (:attr:`CheckResult.repaired`), as ``qemu-img check -r`` does.
        """


class SupportsBackingChange(Protocol):
    """Changing the backing file an image records (``qemu-img rebase``, ``commit``, ``amend``)."""

    async def change_backing_file(self, filename: str | None, format: str | None) -> None:
        """Record *filename* (``None``: no backing file) of *format* (``None``: not recorded).

        Only the reference changes: guest data is neither copied nor dropped, so the caller
        (``rebase`` in safe mode) copies what must survive first. The backing layer opened
        with the image, if any, stays attached until the image is reopened.
        """


class SupportsAmend(Protocol):
    """Changing creation options of an existing image (``qemu-img amend -o``)."""

    #: The option names :meth:`amend` accepts (``qemu-img amend -o help`` lists them).
    amend_option_names: tuple[str, ...]

    async def amend(self, options: dict[str, Any], *, force: bool = False) -> None:
        """Change the options by name (qemu-img's names and values, strings or typed).

        Every option is validated before anything is written; an unknown or unchangeable one
        raises :class:`~imago.InvalidOptionError` naming it. *force* allows changes qemu-img
        guards with ``--force`` (qcow2: dropping a data file's raw flag is not one).
        """


class Capability(Record, Generic[P], uncompared=("protocol",), hidden=("protocol",)):
    """One capability: a name, the protocol a driver claiming it implements, and its methods.

    The instances are class attributes (``Capability.SNAPSHOTS``, ...); the type parameter is
    the protocol :meth:`of` returns.
    """

    __slots__ = ("methods", "name", "protocol")

    name: str
    #: Methods (and properties) of the protocol a driver claiming it must define itself.
    methods: tuple[str, ...]
    protocol: type[Any]

    SNAPSHOTS: ClassVar[Capability[SupportsSnapshots]]
    COMPRESSED_WRITES: ClassVar[Capability[SupportsCompressedWrites]]
    RESIZE: ClassVar[Capability[SupportsResize]]
    CHECK: ClassVar[Capability[SupportsCheck]]
    CHANGE_BACKING: ClassVar[Capability[SupportsBackingChange]]
    AMEND: ClassVar[Capability[SupportsAmend]]

    def __init__(self, name: str, methods: tuple[str, ...], protocol: type[Any]) -> None:
        init(self, "name", name)
        init(self, "methods", methods)
        init(self, "protocol", protocol)

    def of(self, driver: FormatDriver) -> P | None:
        """*driver*, typed as this capability's protocol, if its class claims it; else ``None``."""
        return cast(P, driver) if self in type(driver).capabilities else None

    def missing(self, cls: type[Any], base: type[Any]) -> list[str]:
        """The protocol methods *cls* leaves to *base* (the FormatDriver defaults) or lacks."""
        return [name for name in self.methods if getattr(cls, name, None) is getattr(base, name, None)]

    @classmethod
    def all(cls) -> tuple[Capability[Any], ...]:
        """Every capability imago defines."""
        return (cls.SNAPSHOTS, cls.COMPRESSED_WRITES, cls.RESIZE, cls.CHECK, cls.CHANGE_BACKING, cls.AMEND)

    def __str__(self) -> str:
        return self.name


Capability.SNAPSHOTS = Capability(
    "snapshots",
    ("snapshots", "create_snapshot", "apply_snapshot", "delete_snapshot", "read_snapshot"),
    SupportsSnapshots,
)
Capability.COMPRESSED_WRITES = Capability(
    "compressed-writes", ("cluster_size", "write_compressed"), SupportsCompressedWrites
)
Capability.RESIZE = Capability("resize", ("resize",), SupportsResize)
Capability.CHECK = Capability("check", ("check",), SupportsCheck)
Capability.CHANGE_BACKING = Capability("change-backing", ("change_backing_file",), SupportsBackingChange)
Capability.AMEND = Capability("amend", ("amend_option_names", "amend"), SupportsAmend)
