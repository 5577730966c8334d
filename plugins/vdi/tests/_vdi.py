"""Helpers for the vdi tests: QEMU's tools as the reference, and VDI files built byte by byte.

``qemu_img``/``qemu_io`` run QEMU's tools with their status checked (a missing tool fails the
tests). :func:`craft_vdi` builds a VDI file from its fields independently of the driver under
test, so that hostile images (and layouts qemu-img does not make) can be tested.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imago import PermissiveImplicitOpenGate, SyncFormatAccess
from imago.cli import main as imago_main
from imago_vdi import Vdi

StrPath = str | os.PathLike[str]
MiB = 1 << 20
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is required for the vdi interoperability tests (Debian package qemu-utils)")
    return path


def run(argv: Sequence[StrPath]) -> subprocess.CompletedProcess[str]:
    """Run a command (unchecked), with a timeout."""
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, check=False, timeout=120)


def qemu_img(*args: StrPath) -> str:
    """``qemu-img ARGS`` (checked); its stdout."""
    proc = run([_tool("qemu-img"), *args])
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img {args} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def qemu_io(image: StrPath, *commands: str) -> None:
    """``qemu-io -f vdi -c CMD ... IMAGE``; any failed command fails the call."""
    argv: list[StrPath] = [_tool("qemu-io"), "-f", "vdi"]
    for command in commands:
        argv += ["-c", command]
    proc = run([*argv, image])
    if proc.returncode != 0 or "fail" in proc.stdout or "error" in proc.stdout.lower():
        raise AssertionError(f"qemu-io on {image}: {proc.stdout}{proc.stderr}")


def qemu_raw(image: Path) -> bytes:
    """The disk's bytes as ``qemu-img convert -f vdi -O raw`` writes them."""
    target = image.with_name(image.name + ".qemu.raw")
    qemu_img("convert", "-f", "vdi", "-O", "raw", image, target)
    data = target.read_bytes()
    target.unlink()
    return data


def qemu_json(*args: StrPath) -> Any:
    """qemu-img's JSON output of ``ARGS --output=json``."""
    return json.loads(qemu_img(*args, "--output=json"))


def imago_cli(*args: StrPath) -> tuple[int, str, str]:
    """``imago ARGS`` in this process: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = imago_main([os.fspath(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def open_vdi(path: StrPath, *, write: bool = False) -> SyncFormatAccess:
    """The image opened with the permissive gate (the tests' own files)."""
    return SyncFormatAccess(Vdi.builder_path(path).write(write).open_sync(PermissiveImplicitOpenGate()))


def read_all(path: StrPath) -> bytes:
    """Every byte of the disk, through imago."""
    with open_vdi(path) as disk:
        buf = bytearray(disk.size)
        disk.read(buf, 0)
        return bytes(buf)


def assert_qemu_clean_and_equal(image: Path, model: bytes) -> None:
    """``qemu-img check`` finds nothing and ``qemu-img compare`` finds *image* equal to the raw *model*."""
    qemu_img("check", "-q", "-f", "vdi", image)
    raw = image.with_name(image.name + ".model.raw")
    raw.write_bytes(model)
    try:
        qemu_img("compare", "-f", "vdi", "-F", "raw", image, raw)
    finally:
        raw.unlink()


# --- crafting images ------------------------------------------------------------------------------

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")


def craft_vdi(
    path: Path,
    disk_size: int,
    blocks: Mapping[int, bytes] | None = None,
    *,
    entries: Sequence[int] | None = None,
    image_type: int = 1,
    **fields: int | bytes,
) -> None:
    """Write a VDI file: *blocks* (guest block -> up to 1 MiB of data) stored in order, or raw *entries*.

    *fields* override header fields by their name (``signature``, ``version``, ``offset_bmap``,
    ``offset_data``, ``sector_size``, ``block_size``, ``block_extra``, ``blocks_in_image``,
    ``blocks_allocated``, ``uuid_link``, ``uuid_parent``, ``stored_disk_size``); ``file_size`` sets the file's length.
    """
    natural = -(-disk_size // MiB) if disk_size < 1 << 40 else 0
    count = int(fields.pop("blocks_in_image", natural))
    table = [UNALLOCATED] * min(count, natural)  # (a header claiming more entries gets no more written)
    offset_bmap = int(fields.pop("offset_bmap", 512))
    offset_data = int(fields.pop("offset_data", offset_bmap + -(-4 * len(table) // 512) * 512))
    data = bytearray()
    for index, (block, content) in enumerate(sorted((blocks or {}).items())):
        table[block] = index
        data += content.ljust(MiB, b"\0")
    if entries is not None:
        table = list(entries)
    values: dict[str, Any] = {
        "text": b"<<< test Virtual Disk Image >>>\n",
        "signature": 0xBEDA107F,
        "version": 0x00010001,
        "header_size": 0x180,
        "image_type": image_type,
        "flags": 0,
        "description": b"",
        "offset_bmap": offset_bmap,
        "offset_data": offset_data,
        "cylinders": 0,
        "heads": 0,
        "sectors": 0,
        "sector_size": 512,
        "unused1": 0,
        "disk_size": disk_size,
        "block_size": MiB,
        "block_extra": 0,
        "blocks_in_image": count,
        "blocks_allocated": sum(1 for e in table if e < DISCARDED),
        "uuid_image": os.urandom(16),
        "uuid_last_snap": os.urandom(16),
        "uuid_link": bytes(16),
        "uuid_parent": bytes(16),
        "unused2": b"",
    }
    file_size = fields.pop("file_size", None)
    if "stored_disk_size" in fields:  # (the header's disk_size, apart from the size the map is made for)
        fields["disk_size"] = fields.pop("stored_disk_size")
    for name, value in fields.items():
        assert name in values, name
        values[name] = value
    header = _HEADER.pack(*values.values())
    with open(path, "wb") as file:
        file.write(header)
        file.seek(offset_bmap)
        file.write(struct.pack(f"<{len(table)}I", *table))
        file.seek(offset_data)
        file.write(data)
        if file_size is not None:
            file.truncate(int(file_size))
