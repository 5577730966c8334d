"""Creating VMDK images: ``Vmdk.create_builder(storage)...create()``.

Options, defaults and validation follow ``qemu-img create -f vmdk -o ...`` (QEMU 7.2):
``subformat`` (monolithicSparse, the default; monolithicFlat; twoGbMaxExtentSparse;
twoGbMaxExtentFlat; streamOptimized), ``adapter_type`` (ide, the default; buslogic; lsilogic;
legacyESX), ``hwversion``, ``toolsversion``, ``compat6``, ``zeroed_grain``, ``backing_file``
and ``backing_fmt`` (vmdk only). Sparse extents are laid out as QEMU lays them out
(:mod:`imago_vmdk.layout_new`); multi-file subformats create their extent files next to the
descriptor (``NAME-flat.vmdk``, ``NAME-s001.vmdk``, ``NAME-f001.vmdk``, ...), through the
``file`` storage driver as the qcow2 plugin creates an external data file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar, Self

from imago import (
    FormatCreateBuilder,
    ImagoError,
    InvalidOptionError,
    PreallocateMode,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    UnsupportedFeatureError,
    check_local_file_name,
)

from .descriptor import NO_PARENT_CID, looks_like_descriptor, parse_descriptor
from .descriptor_text import new_cid, render_descriptor
from .header import KDMV_MAGIC, SECTOR, parse_kdmv
from .layout_new import DESCRIPTOR_AREA, plan_sparse_extent

if TYPE_CHECKING:
    from .driver import Vmdk

__all__ = ["ADAPTER_TYPES", "SUBFORMATS", "VmdkCreateBuilder"]

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
#: The size of each extent of the twoGbMaxExtent subformats (the last one may be smaller).
SPLIT_SIZE = 1 << 31
#: The largest disk a sparse extent's grain directory can map (32 Mi tables of 512 grains of 64 KiB).
MAX_SPARSE_SIZE = (32 << 20) * 512 * 65536
_DEFAULT_HW_VERSION = "4"
_DEFAULT_TOOLS_VERSION = "2147483647"


def _flag(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off", "true", "false", "yes", "no"):
        return value.lower() in ("on", "true", "yes")
    raise InvalidOptionError(option, f"must be on or off, got {value!r}")


def _text(option: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in '"\n\r\0'):
        raise InvalidOptionError(option, f"must be a non-empty string without quotes or line breaks, got {value!r}")
    return value


def _number_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class VmdkCreateBuilder(FormatCreateBuilder["Vmdk"]):
    """The options of a new VMDK image (``qemu-img create -f vmdk -o ...``)."""

    option_names: ClassVar[tuple[str, ...]] = (
        *FormatCreateBuilder.option_names,
        "subformat",
        "adapter_type",
        "hwversion",
        "toolsversion",
        "compat6",
        "zeroed_grain",
        "backing_file",
        "backing_format",
    )
    option_aliases: ClassVar[dict[str, str]] = {
        **FormatCreateBuilder.option_aliases,
        "backing_fmt": "backing_format",
    }

    _O = FormatCreateBuilder.Option
    #: qemu-img's vmdk creation options, in the order ``qemu-img create`` reports them.
    options: ClassVar[tuple[FormatCreateBuilder.Option, ...]] = (
        _O(
            "adapter_type",
            "str",
            "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
            choices=ADAPTER_TYPES,
        ),
        _O("backing_file", "str", "File name of a base image"),
        _O("backing_fmt", "str", "Must be 'vmdk' if present"),
        _O("compat6", "bool", "VMDK version 6 image", "off"),
        _O("hwversion", "str", "VMDK hardware version", "undefined"),
        _O(
            "preallocation",
            "str",
            "Preallocation mode (allowed values: off, falloc, full)",
            choices=("off", "falloc", "full"),
        ),
        _O("size", "size", "Virtual disk size"),
        _O(
            "subformat",
            "str",
            "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
            "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized}",
            choices=SUBFORMATS,
        ),
        _O("toolsversion", "str", "VMware guest tools version"),
        _O("zeroed_grain", "bool", "Enable efficient zero writes using the zeroed-grain GTE feature", "off"),
    )
    del _O

    def __init__(self, driver: type[Vmdk], storage: Storage) -> None:
        super().__init__(driver, storage)
        self._subformat = "monolithicSparse"
        self._adapter_type = "ide"
        self._hw_version: str | None = None
        self._tools_version: str | None = None
        self._compat6 = False
        self._zeroed_grain = False
        self._backing_file: str | None = None
        self._backing_format: str | None = None
        self._parent_cid: int | None = None

    # --- options --------------------------------------------------------------------------------

    def size(self, size: int) -> Self:
        """Virtual disk size in bytes, rounded up to whole 512-byte sectors as ``qemu-img`` does."""
        super().size(size)
        return super().size(-(-self.virtual_size // SECTOR) * SECTOR)

    def subformat(self, name: str) -> Self:
        """The subformat (``monolithicSparse``, the default, or one of :data:`SUBFORMATS`)."""
        if name not in SUBFORMATS:
            raise InvalidOptionError("subformat", f"must be one of {', '.join(SUBFORMATS)}, got {name!r}")
        self._subformat = name
        return self

    def adapter_type(self, name: str) -> Self:
        """The virtual adapter: ``ide`` (default, 16 heads), ``buslogic``, ``lsilogic``, ``legacyESX`` (255 heads)."""
        if name not in ADAPTER_TYPES:
            raise InvalidOptionError("adapter_type", f"must be one of {', '.join(ADAPTER_TYPES)}, got {name!r}")
        self._adapter_type = name
        return self

    def hwversion(self, version: str | int) -> Self:
        """The virtual hardware version recorded (``ddb.virtualHWVersion``; default 4, ``undefined``: default)."""
        text = _text("hwversion", _number_text(version))
        self._hw_version = None if text == "undefined" else text
        return self

    def toolsversion(self, version: str | int) -> Self:
        """The guest tools version recorded (``ddb.toolsVersion``; default 2147483647)."""
        self._tools_version = _text("toolsversion", _number_text(version))
        return self

    def compat6(self, enabled: bool | str) -> Self:
        """Record hardware version 6 (not together with ``hwversion``)."""
        self._compat6 = _flag("compat6", enabled)
        return self

    def zeroed_grain(self, enabled: bool | str) -> Self:
        """Zeroed-grain entries (version 2 sparse extents): zero writes change metadata only."""
        self._zeroed_grain = _flag("zeroed_grain", enabled)
        return self

    def backing_file(self, name: str) -> Self:
        """The parent image (a vmdk file, resolved relative to the new image) of a delta image."""
        if not isinstance(name, str) or not name or any(c in name for c in '"\n\r'):
            raise InvalidOptionError("backing_file", f"must be a file name without quotes or line breaks, got {name!r}")
        try:
            check_local_file_name(name)
        except ImagoError as error:
            raise InvalidOptionError("backing_file", str(error)) from None
        self._backing_file = name
        return self

    def backing_format(self, name: str) -> Self:
        """The parent's format: ``vmdk`` is the only one a VMDK delta can have."""
        if name != "vmdk":
            raise InvalidOptionError("backing_fmt", f"the backing file must be a vmdk image, not {name!r}")
        self._backing_format = name
        return self

    def backing(self, name: str, format: str = "vmdk") -> Self:
        """Record the parent image *name* (its format must be ``vmdk``)."""
        return self.backing_file(name).backing_format(format)

    def parent_cid(self, cid: int) -> Self:
        """The parent's CID to record (default: read from the parent when the image is written)."""
        if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid <= 0xFFFFFFFF:
            raise InvalidOptionError("parent_cid", f"must be a 32-bit number, got {cid!r}")
        self._parent_cid = cid
        return self

    # --- what validation and writing read -----------------------------------------------------

    @property
    def backing_file_name(self) -> str | None:
        """The parent image name to record, if any."""
        return self._backing_file

    @property
    def backing_format_name(self) -> str | None:
        """``vmdk`` when there is a parent (a VMDK delta's parent is a VMDK image)."""
        return "vmdk" if self._backing_file is not None else None

    @property
    def flat(self) -> bool:
        """Whether the subformat keeps the disk in flat extents."""
        return self._subformat in ("monolithicFlat", "twoGbMaxExtentFlat")

    @property
    def hw_version(self) -> str:
        """The hardware version to record."""
        return "6" if self._compat6 else self._hw_version or _DEFAULT_HW_VERSION

    @property
    def tools_version(self) -> str:
        """The tools version to record."""
        return self._tools_version or _DEFAULT_TOOLS_VERSION

    @property
    def heads(self) -> int:
        """Heads of the recorded geometry: 16 for IDE, 255 for the SCSI adapters (VMware's rule)."""
        return 16 if self._adapter_type == "ide" else 255

    @property
    def adapter(self) -> str:
        """The adapter type to record."""
        return self._adapter_type

    @property
    def subformat_name(self) -> str:
        """The subformat to write."""
        return self._subformat

    @property
    def zeroed_grains(self) -> bool:
        """Whether sparse extents get zeroed-grain support."""
        return self._zeroed_grain

    def validate(self) -> None:
        """The cross-option rules of ``qemu-img create -f vmdk``."""
        if self._compat6 and self._hw_version is not None:
            raise InvalidOptionError("compat6", "compat6 cannot be enabled with hwversion set")
        if self.flat and self._backing_file is not None:
            raise InvalidOptionError("backing_file", f"a flat image ({self._subformat}) cannot have a backing file")
        if self.flat and self._zeroed_grain:
            raise InvalidOptionError("zeroed_grain", f"a flat image ({self._subformat}) cannot enable zeroed grains")
        if self.preallocation not in (PreallocateMode.NONE, PreallocateMode.FALLOC, PreallocateMode.FULL):
            raise InvalidOptionError(
                "preallocation", f"vmdk accepts off, falloc or full, not {self.preallocation.value!r}"
            )
        if not self.flat and self.virtual_size > MAX_SPARSE_SIZE:
            raise InvalidOptionError("size", f"{self.virtual_size} bytes is more than a sparse VMDK extent can map")

    # --- writing ---------------------------------------------------------------------------------

    def _descriptor(self, parent_cid: int, extent_lines: list[str]) -> bytes:
        return render_descriptor(
            cid=new_cid(),
            parent_cid=parent_cid,
            create_type=self._subformat,
            parent_hint=self._backing_file,
            extent_lines=extent_lines,
            hw_version=self.hw_version,
            cylinders=self.virtual_size // (63 * self.heads * SECTOR),
            heads=self.heads,
            adapter_type=self._adapter_type,
            tools_version=self.tools_version,
        ).encode()

    async def _read_parent_cid(self) -> int:
        """The CID the parent records (in its descriptor file or its embedded descriptor)."""
        assert self._backing_file is not None
        if self._parent_cid is not None:
            return self._parent_cid
        from imago import storage_driver  # the registry: needed only here

        name = self.storage.resolve_relative_path(self._backing_file)
        try:
            options = StorageOpenOptions(filename=name, writable=False, force_share=True)
            parent = await storage_driver("file").open(options)
        except OSError as error:
            raise InvalidOptionError("backing_file", f"could not open {name!r}: {error.strerror or error}") from None
        try:
            head = bytearray(min(parent.size, 1 << 20))
            if head:
                await parent.readv([memoryview(head)], 0)
            data = bytes(head)
            if data[:4] == KDMV_MAGIC:
                layout = parse_kdmv(data[:SECTOR].ljust(SECTOR, b"\0"), None, parent.size, name)
                start = layout.descriptor_offset
                text = data[start : start + layout.descriptor_size] if start else b""
            elif looks_like_descriptor(data[:2048], strict=False):
                text = data
            else:
                raise InvalidOptionError("backing_file", f"{name!r} is not a vmdk image")
            try:
                return parse_descriptor(text, name).cid
            except ImagoError as error:
                raise InvalidOptionError("backing_file", f"could not read the CID of {name!r}: {error}") from None
        except LookupError:
            raise InvalidOptionError(
                "backing_file", f"could not read the CID of {name!r} (its header is in a footer)"
            ) from None
        finally:
            await parent.close()

    def _extent_name(self, index: int) -> str:
        filename = self.storage.filename
        if not filename:
            raise InvalidOptionError("subformat", f"{self._subformat} needs the image's file name to name its extents")
        base = os.path.basename(filename)
        stem, dot, suffix = base.rpartition(".")
        prefix, postfix = (stem, dot + suffix) if dot else (base, "")
        if self._subformat == "monolithicFlat":
            return f"{prefix}-flat{postfix}"
        return f"{prefix}-{'f' if self.flat else 's'}{index:03d}{postfix}"

    async def write_image(self) -> None:
        """Write the image (called by ``Vmdk.create_image`` after :meth:`validate`)."""
        if self._subformat == "streamOptimized":
            await self._write_stream()
            return
        storage = self.storage
        size = self.virtual_size
        parent_cid = await self._read_parent_cid() if self._backing_file is not None else NO_PARENT_CID
        await storage.resize(0)
        if self._subformat == "monolithicSparse":
            plan = plan_sparse_extent(size, zeroed_grain=self._zeroed_grain, descriptor=True)
            own_name = os.path.basename(storage.filename or "")
            text = self._descriptor(parent_cid, [f'RW {size // SECTOR} SPARSE "{own_name}"'])
            if len(text) > DESCRIPTOR_AREA:
                raise InvalidOptionError(
                    "backing_file", f"the descriptor ({len(text)} bytes) does not fit in {DESCRIPTOR_AREA} bytes"
                )
            await storage.resize(plan.file_size)
            for offset, data in plan.writes:
                await storage.writev([memoryview(data)], offset)
            await storage.writev([memoryview(text)], SECTOR)
            await storage.flush()
            return
        lines = []
        extent_size = SPLIT_SIZE if self._subformat.startswith("twoGb") else max(size, 0)
        created = 0
        index = 1
        while created < size:
            part = min(size - created, extent_size)
            name = self._extent_name(index)
            await self._write_extent(name, part)
            kind = f'FLAT "{name}" 0' if self.flat else f'SPARSE "{name}"'
            lines.append(f"RW {part // SECTOR} {kind}")
            created += part
            index += 1
        text = self._descriptor(parent_cid, lines)
        await storage.writev([memoryview(text)], 0)
        await storage.resize(len(text))
        await storage.flush()

    async def _write_extent(self, name: str, size: int) -> None:
        from imago import storage_driver  # the registry: imported when needed, not with the driver

        path = self.storage.resolve_relative_path(name)
        extent = await storage_driver("file").create(StorageCreateOptions(filename=path, overwrite=True))
        try:
            await extent.resize(0)
            if self.flat:
                mode = self.preallocation if self.preallocation is not PreallocateMode.NONE else PreallocateMode.NONE
                await extent.resize(size, mode)
            else:
                plan = plan_sparse_extent(size, zeroed_grain=self._zeroed_grain, descriptor=False)
                await extent.resize(plan.file_size)
                for offset, data in plan.writes:
                    await extent.writev([memoryview(data)], offset)
            await extent.flush()
        finally:
            await extent.close()

    async def _write_stream(self) -> None:
        try:
            from . import stream
        except ImportError:  # (the stream writer is a module of its own; absent, the subformat is)
            raise UnsupportedFeatureError("creating streamOptimized vmdk images") from None
        if self._backing_file is not None:
            raise UnsupportedFeatureError("streamOptimized vmdk images with a backing file")
        if self._zeroed_grain:
            raise UnsupportedFeatureError("streamOptimized vmdk images with zeroed grains")
        await stream.create_stream_image(
            self.storage,
            self.virtual_size,
            adapter_type=self._adapter_type,
            hwversion=self.hw_version,
            toolsversion=self.tools_version,
        )
