"""``imago info``: ``qemu-img info`` for any format, from what the driver's ``info()`` reports.

The image is opened alone (its backing file is named, not opened) unless ``--backing-chain``
asks for the chain, which is then opened through the sandbox gate. Output is qemu-img 7.2's:
its JSON (field names, key order and text) or its human lines.

What the CLI adds to a driver's ``info()`` is format-agnostic: the file name as given,
``actual-size`` (the storages' allocated bytes), ``full-backing-filename`` (the backing name
resolved against the image's name, as QEMU resolves it) and the order QEMU prints keys in.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..api import open as open_image
from ..errors import ImagoError
from . import qjson
from .common import (
    add_force_share,
    add_format,
    add_gate_options,
    add_output,
    check_output,
    describe_error,
    gate_for,
    shown_name,
)

if TYPE_CHECKING:
    from ..format.access import FormatAccess
    from ..format.driver import FormatDriver

__all__ = ["configure", "format_human", "format_json", "image_info", "qdict_order", "run", "size_to_str"]

#: ``ImageInfo``'s fields in QEMU's schema order (the order they are put into the QDict).
IMAGE_FIELDS = (
    "filename",
    "format",
    "dirty-flag",
    "actual-size",
    "virtual-size",
    "cluster-size",
    "encrypted",
    "compressed",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "backing-image",
    "format-specific",
)

#: ``SnapshotInfo``'s fields in QEMU's schema order.
SNAPSHOT_FIELDS = ("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago info``: qemu-img's ``-f``, ``--output``, ``--backing-chain``, ``-U``."""
    add_format(parser)
    add_output(parser)
    parser.add_argument(
        "--backing-chain",
        dest="backing_chain",
        action="store_true",
        help="show every image of the backing chain (opens the backing files)",
    )
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file")


def run(args: argparse.Namespace) -> int:
    """Print the facts of one image (or of its backing chain); 0, or 1 on an error."""
    output = check_output(args)
    filename: str = args.filename
    try:
        disk = open_image(
            filename,
            args.format,
            backing=args.backing_chain,
            force_share=args.force_share,
            gate=gate_for(args, [filename]),
            metadata_only=True,  # as qemu-img info: data files stay closed
        )
    except (ImagoError, OSError) as error:
        return _fail(f"Could not open '{filename}': {describe_error(error)}")
    with disk:
        infos = list(_chain_infos(disk.access, filename, args.backing_chain))
    if output == "json":
        text = format_json(infos if args.backing_chain else infos[0])
    else:
        text = "\n".join(format_human(info) for info in infos)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _fail(message: str) -> int:
    print(f"imago: {message}", file=sys.stderr)
    return 1


def _chain_infos(top: FormatAccess, filename: str, chain: bool) -> Iterable[dict[str, Any]]:
    layer: FormatAccess | None = top
    name = filename
    while layer is not None:
        info = image_info(layer, name)
        yield info
        if not chain:
            return
        layer = layer.driver.backing
        name = info.get("full-backing-filename", "")


def _files_as_given(value: Any, driver: FormatDriver, filename: str) -> Any:
    """*value* with each ``filename`` naming one of the driver's files as qemu-img names it (VMDK extents).

    Drivers report their files by the names they were opened with (full paths); qemu-img shows
    them relative to the name the user gave.
    """
    if isinstance(value, Mapping):
        files = {s.filename for s in driver.storages() if s.filename}
        own = driver.storage.filename
        return {
            key: shown_name(filename, own, item)
            if key == "filename" and isinstance(item, str) and item in files
            else _files_as_given(item, driver, filename)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_files_as_given(item, driver, filename) for item in value]
    return value


def path_combine(base: str, name: str) -> str:
    """*name* as QEMU resolves a name an image records: relative to the directory of *base*."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(base), name)


def image_info(disk: FormatAccess, filename: str) -> dict[str, Any]:
    """qemu-img's ``ImageInfo`` of *disk*, opened as *filename*, in QEMU's key order.

    Fields come from ``disk.driver.info()`` (qemu-img's names; keys qemu-img does not know are
    left out at the top level), plus the name, sizes and the resolved backing file name.
    """
    driver = disk.driver
    facts = driver.info()
    info: dict[str, Any] = {
        "filename": filename,
        "format": disk.format_name,
        "dirty-flag": bool(facts.get("dirty-flag", False)),
    }
    allocated = driver.allocated_size()  # the image's own file, as QEMU 7.2 counts it (VMDK: its extents too)
    if allocated is not None:
        info["actual-size"] = allocated
    # QEMU's block layer counts whole 512-byte sectors, whatever the format.
    info["virtual-size"] = -(-disk.size // 512) * 512
    if facts.get("cluster-size"):
        info["cluster-size"] = facts["cluster-size"]
    for flag in ("encrypted", "compressed"):
        if facts.get(flag):
            info[flag] = True
    backing = facts.get("backing-filename")
    if backing:
        info["backing-filename"] = backing
        info["full-backing-filename"] = path_combine(filename, backing)
        if facts.get("backing-filename-format"):
            info["backing-filename-format"] = facts["backing-filename-format"]
    snapshots = facts.get("snapshots")
    if snapshots:
        info["snapshots"] = [{k: s[k] for k in SNAPSHOT_FIELDS if k in s} for s in snapshots]
    specific = facts.get("format-specific")
    if specific is not None:
        data = _files_as_given(specific["data"], driver, filename)
        info["format-specific"] = {"type": specific["type"], "data": data}
    ordered: dict[str, Any] = qdict_order(info)
    return ordered


# --- QEMU's key order ------------------------------------------------------------------------

_BUCKETS = 512


def _qdict_hash(key: str) -> int:
    """The hash QEMU's QDict files *key* under (its bucket is this modulo 512)."""
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(value: Any) -> Any:
    """*value* with every mapping's keys in the order QEMU's QDict prints them, recursively.

    A QDict lists its hash buckets in order, and in a bucket the key put in last first; the
    order of *value*'s keys is taken as the order they were put in.
    """
    if isinstance(value, Mapping):
        keys = list(value)
        position = {key: index for index, key in enumerate(keys)}
        ordered = sorted(keys, key=lambda k: (_qdict_hash(str(k)) % _BUCKETS, -position[k]))
        return {key: qdict_order(value[key]) for key in ordered}
    if isinstance(value, list | tuple):
        return [qdict_order(item) for item in value]
    return value


# --- output --------------------------------------------------------------------------------


def format_json(info: dict[str, Any] | list[dict[str, Any]]) -> str:
    """``qemu-img info --output=json``'s text for an image's (or a chain's) info."""
    return qjson.dumps(info) + "\n"


_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(size: int) -> str:
    """A size as QEMU prints it for people: three significant digits, ``B``/``KiB``/``MiB``/..."""
    _, exponent = math.frexp(size / (1000.0 / 1024.0))
    index = int((exponent - 1) / 10)  # C's division: truncated towards zero
    return f"{_c_g3(size / (1 << (index * 10)))} {_SUFFIXES[index]}B"


def _c_g3(value: float) -> str:
    """C's ``%0.3g``."""
    return f"{value:.3g}"


def format_human(info: Mapping[str, Any]) -> str:
    """``qemu-img info``'s human text for one image."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size']) if 'actual-size' in info else 'unavailable'}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    backing = info.get("backing-filename")
    if backing:
        full = info.get("full-backing-filename")
        if full is None:
            lines.append(f"backing file: {backing} (cannot determine actual path)")
        elif full != backing:
            lines.append(f"backing file: {backing} (actual path: {full})")
        else:
            lines.append(f"backing file: {backing}")
        if info.get("backing-filename-format"):
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        lines.extend(_snapshot_line(snapshot) for snapshot in info["snapshots"])
    specific = info.get("format-specific")
    if specific is not None:
        lines.append("Format specific information:")
        lines.extend(_dump(specific["data"], 1))
    return "".join(f"{line}\n" for line in lines)


def _snapshot_line(snapshot: Mapping[str, Any]) -> str:
    """A row of qemu-img's snapshot table (the date in local time)."""
    import datetime  # only snapshot tables need it: not imported by every info

    date = datetime.datetime.fromtimestamp(snapshot["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
    seconds = snapshot["vm-clock-sec"]
    clock = (
        f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{snapshot['vm-clock-nsec'] // 1000000:03d}"
    )
    icount = str(snapshot["icount"]) if "icount" in snapshot else ""
    size = size_to_str(snapshot["vm-state-size"])
    return f"{snapshot['id']:<9} {snapshot['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dump(value: Any, level: int) -> list[str]:
    """QEMU's human dump of a QDict/QList: dashes in keys become spaces, four spaces a level."""
    lines: list[str] = []
    items: Iterable[tuple[str, Any]]
    if isinstance(value, Mapping):
        items = ((str(key).replace("-", " "), item) for key, item in value.items())
    else:
        items = ((f"[{index}]", item) for index, item in enumerate(value))
    indent = "    " * level
    for key, item in items:
        if isinstance(item, Mapping | list | tuple):
            lines.append(f"{indent}{key}:")
            lines.extend(_dump(item, level + 1))
        else:
            lines.append(f"{indent}{key}: {_scalar(item)}")
    return lines
