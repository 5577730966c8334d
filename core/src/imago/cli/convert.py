"""``imago convert``: ``qemu-img convert`` (7.2) on the public API, for every installed format.

The sources are opened with :func:`imago.open_async` and read as one concatenated disk; the
target is created with :func:`imago.create` (``-o`` options, the sources' size, ``-B``/``-F``
as its backing file) unless ``-n`` names an existing one, then filled by the copy engine
(:mod:`imago.cli.convert_copy`) with ``-m`` requests in flight on an event loop. Defaults are
qemu-img's: raw output, target cache ``unsafe`` (a flush at the end), source cache
``writeback``, ``-S 4k``, 8 requests written in order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

from ..api import create_async, open_async
from ..errors import (
    DriverNotFoundError,
    ImagoError,
    ImplicitOpenDeniedError,
    InvalidOptionError,
    SnapshotNotFoundError,
)
from ..format.access import FormatAccess
from ..format.capabilities import Capability
from ..format.driver import FormatDriver
from ..format.gates import ImplicitOpenGate
from ..format.mapping import ShallowRaw
from ..plugin.manager import format_driver
from .common import (
    MAX_SIZE,
    CliError,
    add_cache,
    add_force_share,
    add_format,
    add_gate_options,
    add_options,
    cache_flags,
    gate_for,
    interruptible,
    parse_options,
    parse_size,
    wants_help,
)
from .convert_copy import Copier, Source
from .convert_sparse import SECTOR
from .progress import add_progress, progress_for

__all__ = ["configure", "option_values", "run"]

#: qemu-img's limit of ``-m``.
MAX_REQUESTS = 16
#: qemu-img's largest ``-S`` (its largest buffer), in bytes.
MAX_SPARSE = 16 << 20
_SPARSE_ERROR = (
    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. "
    "Select 0 to disable sparse detection (fully allocates output)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago convert``, qemu-img's."""
    add_format(parser, what="the source images")
    parser.add_argument("-O", dest="output_format", default="raw", metavar="FMT", help="target format (default: raw)")
    add_options(parser, "target format options")
    parser.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters (qcow2)")
    add_progress(parser)
    parser.add_argument(
        "-S",
        dest="sparse",
        default="4k",
        metavar="SIZE",
        help="zero runs at least this long (a multiple of 512) are not written (default 4k; 0 allocates everything)",
    )
    parser.add_argument("-m", dest="requests", default="8", metavar="N", help="requests in flight, 1 to 16 (default 8)")
    parser.add_argument("-W", dest="out_of_order", action="store_true", help="allow writes out of order")
    parser.add_argument("-n", dest="no_create", action="store_true", help="the target exists: do not create it")
    parser.add_argument(
        "--target-is-zero",
        dest="target_is_zero",
        action="store_true",
        help="the existing target (-n) reads as zero: zeroes need not be written",
    )
    parser.add_argument("-B", dest="backing", metavar="BACKING", help="backing file of the target")
    parser.add_argument("-F", dest="backing_format", metavar="FMT", help="format of the backing file")
    parser.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="read an internal snapshot of the source (NAME, or snapshot.id=ID / snapshot.name=NAME)",
    )
    add_cache(parser, "-t", dest="cache", default="unsafe")
    add_cache(parser, "-T", dest="source_cache", default="writeback")
    add_force_share(parser)
    parser.add_argument("-q", dest="quiet", action="store_true", help="quiet: no progress")
    add_gate_options(parser)
    parser.add_argument("files", nargs="*", metavar="SRC... DST", help="the source images, then the target")


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 1 with a one-line error."""
    if wants_help(args.options):
        driver = _output_driver(args.output_format)
        _print_option_help(driver)
        return 0
    files: list[str] = list(args.files)
    if len(files) < 2:
        raise CliError("Must specify image file name")
    sources, target = files[:-1], files[-1]
    min_sparse = _sparse(args.sparse)
    requests = _requests(args.requests)
    options = parse_options(args.options)
    if args.target_is_zero and not args.no_create:
        raise CliError("--target-is-zero requires use of -n flag")
    if args.no_create and options:
        raise CliError("-o has no effect when skipping image creation")
    snapshot = _snapshot_name(args.snapshot)
    if snapshot is not None and len(sources) > 1:
        raise CliError("No support for concatenating multiple snapshot")
    backing = args.backing if args.backing is not None else options.pop("backing_file", None)
    backing_format = args.backing_format if args.backing_format is not None else options.pop("backing_fmt", None)
    options.pop("backing_file", None)
    options.pop("backing_fmt", None)
    if backing is not None and len(sources) > 1:
        raise CliError("Having a backing file for the target makes no sense when concatenating multiple input images")
    target_cache = cache_flags(args.cache, option="cache")
    source_cache = cache_flags(args.source_cache, option="source cache")
    output = _output_driver(args.output_format)
    if args.compress and not output.supports(Capability.COMPRESSED_WRITES):
        raise CliError("Compression not supported for this file format")
    if backing is not None and not args.no_create:
        if "backing_file" not in output.create_builder_class.option_names:
            raise CliError(f"Backing file not supported for file format '{output.name}'")
        if backing_format is None:
            raise CliError("Use of backing file requires explicit backing format")
    if backing_format is not None and backing is None and not args.no_create:
        raise CliError(
            f"{target}: error while converting {output.name}: Backing format cannot be used without backing file"
        )
    values = option_values(output, options)
    # Each side's implicit opens stay in its own directories: a source may not read what lies
    # next to the target (an image uploaded to one directory naming a file of the store it is
    # converted into), nor the target's new backing file what lies next to the sources.
    source_gate = gate_for(args, sources)
    target_gate = gate_for(args, [target] + ([] if backing is None else [_backing_path(target, backing)]))
    plan = _Plan(
        args=args,
        sources=sources,
        target=target,
        output=output,
        options=values,
        backing=backing,
        backing_format=backing_format,
        snapshot=snapshot,
        min_sparse=min_sparse,
        requests=requests,
        target_cache=target_cache,
        source_cache=source_cache,
        source_gate=source_gate,
        target_gate=target_gate,
    )
    with interruptible():
        asyncio.run(plan.convert())
    return 0


def _output_driver(name: str) -> type[FormatDriver]:
    try:
        return format_driver(name)
    except DriverNotFoundError:
        raise CliError(f"Unknown file format '{name}'") from None


def _print_option_help(driver: type[FormatDriver]) -> None:
    print("Supported options:")
    for option in driver.create_builder_class.options:
        kind = {"bool": "bool (on/off)"}.get(option.kind, option.kind)
        print(f"  {f'{option.name}=<{kind}>':<22} - {option.description}")


def _sparse(text: str) -> int:
    """``-S`` in sectors."""
    try:
        value = parse_size(text, what="buffer size for sparse output")
    except CliError:
        raise CliError(
            "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value % SECTOR or value > MAX_SPARSE:
        raise CliError(_SPARSE_ERROR)
    return value // SECTOR


def _requests(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_REQUESTS:
        raise CliError(f"Invalid number of coroutines. Allowed number of coroutines is between 1 and {MAX_REQUESTS}")
    return value


def _snapshot_name(text: str | None) -> str | None:
    """The snapshot ``-l`` names: ``NAME``, or qemu's ``snapshot.id=ID`` / ``snapshot.name=NAME`` list."""
    if text is None or not text.startswith("snapshot."):
        return text
    fields = parse_options([text])
    unknown = [key for key in fields if key not in ("snapshot.id", "snapshot.name")]
    if unknown:
        raise CliError(f"Invalid parameter '{unknown[0]}'")
    name = fields.get("snapshot.id") or fields.get("snapshot.name")
    if not name:
        raise CliError(f"Invalid snapshot option: {text}")
    return name


def option_values(driver: type[FormatDriver], options: dict[str, str]) -> dict[str, Any]:
    """``-o`` texts as the values :func:`imago.create` takes, by the kinds the driver declares.

    Unknown keys raise :class:`CliError` naming the key (as qemu-img) and the valid ones.
    """
    builder = driver.create_builder_class
    values: dict[str, Any] = {}
    for key, text in options.items():
        if key == "size":
            continue  # the size comes from the sources, as in qemu-img
        option = builder.option(key)
        if option is None and key not in builder.option_names:
            known = ", ".join(o.name for o in builder.options)
            raise CliError(f"Invalid parameter '{key}' (the {driver.name} format's options: {known})")
        kind = option.kind if option is not None else "str"
        if kind == "bool":
            if text not in ("on", "off"):
                raise CliError(f"Parameter '{key}' expects 'on' or 'off'")
            values[key] = text == "on"
        elif kind == "size":
            values[key] = parse_size(text, what=f"value for {key}")
        elif kind == "int":
            try:
                values[key] = int(text, 0)
            except ValueError:
                raise CliError(f"Parameter '{key}' expects a number") from None
        else:
            values[key] = text
    return values


def _backing_path(target: str, backing: str) -> str:
    """Where a backing file name recorded in *target* points (relative to the target's directory)."""
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(target) or ".", backing)


@contextmanager
def _naming(filename: str, what: str, fmt: str | None) -> Iterator[None]:
    """Errors of an open name the file, as qemu-img's ``Could not open 'X': ...``."""
    try:
        yield
    except DriverNotFoundError:
        raise CliError(f"Could not open '{filename}': Unknown driver '{fmt}'") from None
    except FileNotFoundError:
        raise CliError(f"Could not open '{filename}': No such file or directory") from None
    except ImagoError as error:
        if isinstance(error, (CliError, ImplicitOpenDeniedError)):
            raise
        raise CliError(f"Could not open '{filename}' ({what}): {error}") from None


class _Plan:
    """One conversion, its options checked."""

    def __init__(
        self,
        *,
        args: argparse.Namespace,
        sources: list[str],
        target: str,
        output: type[FormatDriver],
        options: dict[str, Any],
        backing: str | None,
        backing_format: str | None,
        snapshot: str | None,
        min_sparse: int,
        requests: int,
        target_cache: tuple[bool, bool],
        source_cache: tuple[bool, bool],
        source_gate: ImplicitOpenGate,
        target_gate: ImplicitOpenGate,
    ) -> None:
        self.args = args
        self.sources = sources
        self.target = target
        self.output = output
        self.options = options
        self.backing = backing
        self.backing_format = backing_format
        self.snapshot = snapshot
        self.min_sparse = min_sparse
        self.requests = requests
        self.target_cache = target_cache
        self.source_cache = source_cache
        self.source_gate = source_gate
        self.target_gate = target_gate

    async def convert(self) -> None:
        args = self.args
        async with AsyncExitStack() as stack:
            sources: list[Source] = []
            for filename in self.sources:
                with _naming(filename, "source", args.format):
                    access = await open_async(
                        filename,
                        args.format,
                        gate=self.source_gate,
                        direct=self.source_cache[0],
                        force_share=args.force_share,
                    )
                stack.push_async_callback(access.close)
                if self.snapshot is not None:
                    access = await self._snapshot(access)
                    stack.push_async_callback(access.close)
                sources.append(Source(access, -(-access.size // SECTOR), _cluster_sectors(access.driver)))
            total = sum(source.sectors for source in sources)
            if not args.no_create:
                await self._create(total * SECTOR)
            with _naming(self.target, "target", self.output.name):
                target = await open_async(
                    self.target,
                    self.output.name,
                    write=True,
                    gate=self.target_gate,
                    direct=self.target_cache[0],
                    no_flush=self.target_cache[1],
                )
            stack.push_async_callback(target.close)
            if args.no_create and target.size < total * SECTOR:
                raise CliError("output file is smaller than input file")
            backing_sectors = self._backing_sectors(target)
            if args.target_is_zero and backing_sectors is not None:
                raise CliError("Cannot use --target-is-zero when the destination image has a backing file")
            # A target that takes data only compressed and in order (a stream-optimized VMDK) is
            # written as with -c, in disk order, its unwritten ranges left to read as zeros.
            sequential = target.driver.writes_compressed
            compressed = bool(args.compress) or sequential
            cluster_sectors = 1
            if compressed:
                writer = Capability.COMPRESSED_WRITES.of(target.driver)
                if writer is None:
                    raise CliError("Compression not supported for this file format")
                cluster_sectors = max(1, writer.cluster_size // SECTOR)
            zero_init = bool(args.target_is_zero) if args.no_create else self.min_sparse > 0 and backing_sectors is None
            zero_init = zero_init or (sequential and not args.no_create)
            in_order = sequential or (not args.out_of_order and not await _writes_in_place(target))
            copier = Copier(
                sources,
                target,
                min_sparse=self.min_sparse,
                alignment=_pow2_floor(max(self.min_sparse, target.req_align // SECTOR, 1)),
                has_zero_init=zero_init,
                target_backing_sectors=backing_sectors,
                compressed=compressed,
                cluster_sectors=cluster_sectors,
                requests=self.requests,
                in_order=in_order,
                # A source shared with a writer (-U) may shrink under a memory map: read it instead.
                zero_copy=not args.force_share,
                # Writes into one file through the page cache take its lock in turn (the kernel's
                # i_rwsem): more than one at a time only spin on it. Reads and scans still overlap.
                data_writes=1 if not in_order and not compressed and not self.target_cache[0] else None,
            )
            progress_args = args if not args.quiet else argparse.Namespace(progress=None)
            with progress_for(progress_args, "convert", total * SECTOR) as progress:
                copier.on_progress = progress.advance
                await copier.run()
            await target.flush()

    async def _snapshot(self, access: FormatAccess) -> FormatAccess:
        assert self.snapshot is not None
        snapshots = Capability.SNAPSHOTS.of(access.driver)
        if snapshots is None:
            raise CliError("Failed to load snapshot: the format has no internal snapshots")
        try:
            view = await snapshots.read_snapshot(self.snapshot)
        except SnapshotNotFoundError:
            raise CliError("Failed to load snapshot: Can't find snapshot") from None
        # The view shares the image's storages: it is closed first (the exit stack unwinds in reverse).
        return FormatAccess(view)

    async def _create(self, size: int) -> None:
        options = dict(self.options)
        if self.backing is not None:
            options["backing_file"] = self.backing
            options["backing_fmt"] = self.backing_format
        try:
            await create_async(self.target, self.output.name, size, gate=self.target_gate, **options)
        except InvalidOptionError as error:
            raise CliError(f"{self.target}: error while converting {self.output.name}: {error}") from None

    def _backing_sectors(self, target: FormatAccess) -> int | None:
        """The size of the target's backing file in sectors when the target has one (``-B``)."""
        if self.backing is None:
            return None
        layer = target.driver.backing
        if self.args.no_create or layer is None:
            # As qemu-img: an existing target's backing size is not used (no end to the backing file).
            return MAX_SIZE // SECTOR
        return -(-layer.size // SECTOR)


async def _writes_in_place(target: FormatAccess) -> bool:
    """Whether the whole target maps straight onto its storage (raw), each byte in its place.

    Then the order of the writes changes nothing in the result, so they need not wait for each
    other as qemu-img's do (which keeps the layout of formats that allocate as they go).
    """
    if target.size == 0:
        return True
    mapping, length = await target.get_shallow_mapping(0, target.size)
    return isinstance(mapping, ShallowRaw) and mapping.writable and mapping.offset == 0 and length >= target.size


def _cluster_sectors(driver: FormatDriver) -> int:
    """The source's cluster size in sectors (1 for formats without clusters)."""
    size = driver.info().get("cluster-size")
    if isinstance(size, int) and size >= SECTOR:
        return size // SECTOR
    return 1


def _pow2_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1)
