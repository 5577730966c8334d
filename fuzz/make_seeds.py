"""Build the seed corpora with qemu-img and qemu-io: ``python -m fuzz.make_seeds [--out DIR]``.

Small images of every kind the qcow2 driver reads (empty, written, zero clusters, discarded,
backing file names, compressed clusters with deflate and zstd, internal snapshots, extended L2,
lazy refcounts, a dirty image, version 2, refcount widths, an external data file name) go to
``corpus/qcow2``; a few of them with operation trailers (:mod:`fuzz.targets.qcow2_write`) to
``corpus/qcow2_write``; raw images to ``corpus/raw``; single-file VMDKs (hosted sparse, zeroed
grains, stream-optimized as qemu-img writes it and as imago writes it, footer and all) to
``corpus/vmdk``; VDIs (empty dynamic images of several sizes, one with discarded blocks) to
``corpus/vdi``; VHDs (empty dynamic, fixed, ``force_size``) to ``corpus/vpc``; VHDXs (qemu-img's
and imago's, a pending log, a differencing image, 4096-byte sectors) to ``corpus/vhdx``, encoded
as :mod:`fuzz.targets.vhdx_read` reads them (the non-zero pieces only: the smallest VHDX
qemu-img writes is 8 MiB). Virtual sizes are small and clusters 512 bytes to 16 KiB, so that the
committed corpus stays under 2 MB (a written VDI or dynamic VHD block is 1 or 2 MiB: those are
left out; the fuzzer reaches data blocks by mutating the maps). The output is committed (fuzzing
needs no QEMU); run this again to refresh it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .targets import CORPUS_DIR
from .targets.qcow2_write import Op, OpKind, encode

__all__ = [
    "QCOW2_SEEDS",
    "VDI_SEEDS",
    "VMDK_SEEDS",
    "VHDX_SEEDS",
    "VPC_SEEDS",
    "main",
    "make_qcow2_seeds",
    "make_raw_seeds",
    "make_vdi_seeds",
    "make_vhdx_seeds",
    "make_vmdk_seeds",
    "make_vpc_seeds",
    "make_write_seeds",
]


def _qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True)


def _qemu_io(image: str, *commands: str, cwd: Path, fmt: str = "qcow2", check: bool = True) -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, image], cwd=cwd, check=check, capture_output=True)


_WRITES = ("write -P 0x11 0 4k", "write -P 0x22 64k 8k", "write -P 0x33 300k 1k")

#: A VDI block map entry for a discarded block (reads as zeroes).
_VDI_DISCARDED = 0xFFFFFFFE

#: name -> (qemu-img create options, size, qemu-io commands run on it)
QCOW2_SEEDS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "empty-4k": (("cluster_size=4096",), "1M", ()),
    "written-4k": (("cluster_size=4096",), "1M", _WRITES),
    "written-512": (("cluster_size=512",), "256k", ("write -P 0x44 0 2k", "write -P 0x55 100k 1k")),
    "zero-discard-4k": (
        ("cluster_size=4096",),
        "1M",
        (*_WRITES, "write -z 0 4k", "write -z -u 64k 4k", "discard 300k 4k"),
    ),
    "backing-name": (("cluster_size=4096", "backing_file=base.qcow2", "backing_fmt=qcow2"), "1M", _WRITES[:1]),
    "backing-raw-name": (("cluster_size=4096", "backing_file=base.raw", "backing_fmt=raw"), "1M", ()),
    "snapshots-4k": (("cluster_size=4096",), "1M", ()),
    "extended-l2-16k": (("cluster_size=16384", "extended_l2=on"), "1M", (*_WRITES, "write -z 16k 2k")),
    "lazy-refcounts": (("cluster_size=4096", "lazy_refcounts=on"), "1M", _WRITES),
    "dirty": (("cluster_size=4096", "lazy_refcounts=on"), "1M", ()),
    "compat-0.10": (("cluster_size=4096", "compat=0.10"), "1M", _WRITES[:2]),
    "refcount-1": (("cluster_size=4096", "refcount_bits=1"), "1M", _WRITES),
    "refcount-64": (("cluster_size=4096", "refcount_bits=64"), "1M", _WRITES),
    "data-file-name": (("cluster_size=4096", "data_file=disk.data"), "1M", _WRITES[:1]),
}


def make_qcow2_seeds(out: Path, work: Path) -> list[Path]:
    """Write the qcow2 seeds into *out*; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    # The backing files the seeds name exist while qemu-io writes; they are not kept.
    _qemu_img("create", "-f", "qcow2", "base.qcow2", "1M", cwd=work)
    _qemu_img("create", "-f", "raw", "base.raw", "1M", cwd=work)
    made = []
    for name, (options, size, commands) in QCOW2_SEEDS.items():
        image = f"{name}.qcow2"
        _qemu_img("create", "-f", "qcow2", "-o", ",".join(options), image, size, cwd=work)
        if commands:
            _qemu_io(image, *commands, cwd=work)
        if name == "snapshots-4k":
            _qemu_io(image, "write -P 0x66 0 8k", cwd=work)
            _qemu_img("snapshot", "-c", "first", image, cwd=work)
            _qemu_io(image, "write -P 0x77 4k 8k", "discard 0 4k", cwd=work)
            _qemu_img("snapshot", "-c", "second", image, cwd=work)
            _qemu_io(image, "write -P 0x88 128k 4k", cwd=work)
        if name == "dirty":
            # Killed with lazy refcounts on: the dirty bit stays set and refcounts are stale.
            _qemu_io(image, "write -P 0x99 0 12k", "sigraise 9", cwd=work, check=False)
        made.append(_keep(work / image, out))
    source = work / "source.raw"
    source.write_bytes(b"compressible " * 20000 + bytes(range(256)) * 64)
    for codec in ("zlib", "zstd"):
        image = f"compressed-{codec}.qcow2"
        settings = f"cluster_size=4096,compression_type={codec}"
        _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", settings, "source.raw", image, cwd=work)
        made.append(_keep(work / image, out))
    return made


def make_raw_seeds(out: Path) -> list[Path]:
    """Write the raw seeds into *out*; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = {
        "empty.raw": b"",
        "one-byte.raw": b"\x01",
        "sector.raw": bytes(range(256)) * 2,
        "sparse-64k.raw": b"\xaa" * 4096 + bytes(56 << 10) + b"\xbb" * 4096,
    }
    made = []
    for name, data in seeds.items():
        path = out / name
        path.write_bytes(data)
        made.append(path)
    return made


#: Operation sequences appended to some qcow2 seeds for the write target.
WRITE_SEQUENCES: dict[str, tuple[str, list[Op]]] = {
    "written-ops": (
        "written-4k",
        [
            Op(OpKind.WRITE, 3, 300, 7, 1),
            Op(OpKind.WRITE_ZEROES, 0, 4096, 0, 0),
            Op(OpKind.SNAPSHOT_CREATE, 0, 0, 1, 0),
            Op(OpKind.DISCARD_TO_ZERO, 128, 1024, 0, 1),
            Op(OpKind.WRITE, 130, 9000, 3, 1),
            Op(OpKind.FLUSH, 0, 0, 0, 0),
        ],
    ),
    "snapshot-ops": (
        "snapshots-4k",
        [
            Op(OpKind.WRITE, 0, 5000, 1, 0),
            Op(OpKind.SNAPSHOT_CREATE, 0, 0, 2, 0),
            Op(OpKind.WRITE, 8, 4096, 9, 1),
            Op(OpKind.SNAPSHOT_APPLY, 0, 0, 2, 0),
            Op(OpKind.SNAPSHOT_DELETE, 0, 0, 0, 0),
        ],
    ),
    "resize-ops": (
        "lazy-refcounts",
        [
            Op(OpKind.GROW, 0, 0, 15, 2),
            Op(OpKind.WRITE, 2100, 4096, 5, 1),
            Op(OpKind.SHRINK, 0, 0, 100, 0),
            Op(OpKind.DISCARD_TO_ANY, 0, 8192, 0, 0),
            Op(OpKind.REPAIR, 0, 0, 0, 0),
        ],
    ),
    "compressed-ops": (
        "compressed-zstd",
        [
            Op(OpKind.WRITE_COMPRESSED, 40, 0, 3, 1),
            Op(OpKind.WRITE, 20, 100, 4, 1),
            Op(OpKind.DISCARD_TO_BACKING, 0, 4096, 0, 0),
        ],
    ),
    "extended-ops": (
        "extended-l2-16k",
        [
            Op(OpKind.WRITE, 3, 700, 8, 1),
            Op(OpKind.WRITE_ZEROES, 40, 3000, 0, 1),
            Op(OpKind.DISCARD_TO_ZERO, 0, 2048, 0, 0),
        ],
    ),
    "dirty-ops": ("dirty", [Op(OpKind.WRITE, 1, 100, 2, 1), Op(OpKind.REPAIR, 0, 0, 0, 1)]),
    "backing-ops": ("backing-name", [Op(OpKind.DISCARD_TO_BACKING, 0, 4096, 0, 0), Op(OpKind.WRITE, 7, 10, 1, 1)]),
}


def make_write_seeds(out: Path, qcow2_dir: Path) -> list[Path]:
    """Write the write target's seeds (qcow2 seeds with operation trailers) into *out*."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, (image, ops) in WRITE_SEQUENCES.items():
        path = out / f"{name}.bin"
        path.write_bytes(encode((qcow2_dir / f"{image}.qcow2").read_bytes(), ops))
        made.append(path)
    return made


#: name -> (how it is made: ``sparse`` qemu-img create + qemu-io, ``qemu-stream`` qemu-img convert,
#: ``imago-stream`` imago's stream writer; the create options; the size; qemu-io commands on the data)
VMDK_SEEDS: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "sparse-empty": ("sparse", (), "256k", ()),
    "sparse-written": ("sparse", (), "1M", ("write -P 0x11 0 4k", "write -P 0x22 9k 1k")),
    "zeroed-grain": ("sparse", ("zeroed_grain=on",), "1M", ("write -P 0x33 0 4k", "write -z 64k 64k")),
    "stream-qemu": ("qemu-stream", ("subformat=streamOptimized",), "1M", _WRITES),
    "stream-imago": ("imago-stream", (), "1M", _WRITES),
    "stream-imago-tables": ("imago-stream", (), "65M", ("write -P 0x44 0 1k", "write -P 0x55 64M 1k")),
}


def make_vmdk_seeds(out: Path, work: Path) -> list[Path]:
    """Write the VMDK seeds into *out*; returns their paths."""
    import asyncio

    import imago
    from imago_vmdk.stream import write_stream

    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, (how, options, size, commands) in VMDK_SEEDS.items():
        image = work / f"{name}.vmdk"
        if how == "sparse":
            _qemu_img(
                "create",
                "-f",
                "vmdk",
                "-o",
                ",".join(options) or "subformat=monolithicSparse",
                image.name,
                size,
                cwd=work,
            )
            _qemu_io(image.name, *commands, cwd=work, fmt="vmdk")
        else:
            raw = work / f"{name}.raw"
            _qemu_img("create", "-f", "raw", raw.name, size, cwd=work)
            _qemu_io(raw.name, *commands, cwd=work, fmt="raw")
            if how == "qemu-stream":
                _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", ",".join(options), raw.name, image.name, cwd=work)
            else:

                async def stream(source: Path, target: Path) -> None:
                    access = await imago.open_async(str(source), "raw")
                    try:
                        with target.open("wb") as sink:
                            await write_stream(access, sink, extent_name=target.name)
                    finally:
                        await access.close()

                asyncio.run(stream(raw, image))
        made.append(_keep(image, out))
    return made


#: name -> (qemu-img create options, size, block map entries to set: {guest block: entry}). A
#: VDI block is 1 MiB, so no seed holds one: the entries naming blocks 0 and 1 lie past the end
#: of the file (refused; the target also opens short inputs padded, where they hold zeroes).
VDI_SEEDS: dict[str, tuple[tuple[str, ...], str, dict[int, int]]] = {
    "empty-4m": ((), "4M", {}),
    "empty-odd": ((), "3073k", {}),
    "empty-2g": ((), "2G", {}),
    "discarded": ((), "8M", {1: _VDI_DISCARDED, 3: _VDI_DISCARDED, 4: _VDI_DISCARDED}),
    "allocated": ((), "8M", {0: 1, 2: 0, 5: _VDI_DISCARDED}),
}
#: Where the header gives the block map's offset (a little-endian u32).
_VDI_MAP_OFFSET_FIELD = 0x154
#: Where the header counts the allocated blocks (a little-endian u32).
_VDI_ALLOCATED_FIELD = 0x184


def make_vdi_seeds(out: Path, work: Path) -> list[Path]:
    """Write the VDI seeds into *out*; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, (options, size, entries) in VDI_SEEDS.items():
        image = work / f"{name}.vdi"
        _qemu_img("create", "-f", "vdi", *(["-o", ",".join(options)] if options else []), image.name, size, cwd=work)
        if entries:
            # qemu-io cannot discard in a VDI, and a written block would not fit the corpus: set the entries.
            data = bytearray(image.read_bytes())
            start = int.from_bytes(data[_VDI_MAP_OFFSET_FIELD : _VDI_MAP_OFFSET_FIELD + 4], "little")
            for index, entry in entries.items():
                data[start + 4 * index : start + 4 * index + 4] = entry.to_bytes(4, "little")
            allocated = sum(entry < _VDI_DISCARDED for entry in entries.values())
            data[_VDI_ALLOCATED_FIELD : _VDI_ALLOCATED_FIELD + 4] = allocated.to_bytes(4, "little")
            image.write_bytes(bytes(data))
        made.append(_keep(image, out))
    return made


#: name -> (qemu-img create options, size, qemu-io commands run on it, BAT entries to set: {block:
#: padded block}). A dynamic VHD block is 2 MiB, so only the fixed seeds hold data; padded block
#: *k* is the *k*-th block of the padding :mod:`fuzz.targets.vpc_read` inserts before the footer.
VPC_SEEDS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...], dict[int, int]]] = {
    "dynamic-empty": ((), "4M", (), {}),
    "dynamic-force-size": (("force_size=on",), "100M", (), {}),
    "dynamic-empty-2g": ((), "2G", (), {}),
    "dynamic-allocated": ((), "8M", (), {0: 0, 2: 1}),
    "fixed-written": (("subformat=fixed",), "64k", ("write -P 0x11 0 4k", "write -P 0x22 9k 1k"), {}),
    "fixed-force-size": (("subformat=fixed", "force_size=on"), "64k", ("write -P 0x33 60k 4k",), {}),
}
#: A VHD dynamic header's field giving the BAT's offset (big-endian u64), from the header's start.
_VHD_TABLE_OFFSET_FIELD = 16
#: A dynamic VHD block in sectors: its sector bitmap, then 2 MiB.
_VHD_BLOCK_SECTORS = 1 + (2 << 20) // 512


def make_vpc_seeds(out: Path, work: Path) -> list[Path]:
    """Write the VHD seeds into *out*; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, (options, size, commands, entries) in VPC_SEEDS.items():
        image = work / f"{name}.vhd"
        _qemu_img("create", "-f", "vpc", *(["-o", ",".join(options)] if options else []), image.name, size, cwd=work)
        _qemu_io(image.name, *commands, cwd=work, fmt="vpc")
        if entries:
            # Point BAT entries at the padding: a written block would not fit the corpus.
            data = bytearray(image.read_bytes())
            header = int.from_bytes(data[16:24], "big")  # the footer's data offset: the dynamic header
            field = header + _VHD_TABLE_OFFSET_FIELD
            table = int.from_bytes(data[field : field + 8], "big")
            footer_sector = (len(data) - 512) // 512
            for block, padded in entries.items():
                sector = footer_sector + padded * _VHD_BLOCK_SECTORS
                data[table + 4 * block : table + 4 * block + 4] = sector.to_bytes(4, "big")
            image.write_bytes(bytes(data))
        made.append(_keep(image, out))
    return made


#: name -> (how it is made: ``qemu``, qemu-img create and qemu-io; ``imago``, imago's writer, the
#: commands (``write [-P BYTE | -z] OFFSET LENGTH`` only) written through imago; the create
#: options; the size; the qemu-io commands). Written blocks hold a few KiB of data: the rest of a
#: block is zeroes, which the encoding (:mod:`fuzz.targets.vhdx_read`) leaves out.
VHDX_SEEDS: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "dynamic-empty": ("qemu", (), "4M", ()),
    "dynamic-written": ("qemu", (), "4M", ("write -P 0x11 0 4k", "write -P 0x22 3M 1k")),
    "block-1m-written": (
        "qemu",
        ("block_size=1M",),
        "4M",
        ("write -P 0x11 0 4k", "write -P 0x22 3M 1k", "write -z 1M 1M", "write -P 0x44 1536k 512"),
    ),
    "block-2m-log-2m": ("qemu", ("block_size=2M", "log_size=2M"), "6M", ("write -P 0x55 2M 8k",)),
    "block-16m-empty": ("qemu", ("block_size=16M",), "64M", ()),
    "no-zero-state": ("qemu", ("block_size=1M", "block_state_zero=off"), "3M", ("write -z 0 1M",)),
    "fixed": ("qemu", ("subformat=fixed", "block_size=1M"), "2M", ("write -P 0x33 4k 4k",)),
    "imago-dynamic": (
        "imago",
        ("block_size=1M",),
        "5M",
        ("write -P 0x66 0 2k", "write -P 0x77 4M 4k", "write -z 2M 1M"),
    ),
    "imago-default-block": ("imago", (), "5M", ("write -P 0x99 1M 4k",)),
    "imago-fixed": ("imago", ("subformat=fixed",), "1M", ("write -P 0x88 8k 4k",)),
}
#: The log GUID of the crafted seed whose log is pending.
_VHDX_LOG_GUID = "11111111-2222-3333-4444-555555555555"


def _vhdx_helpers() -> Any:
    """The vhdx plugin tests' image builder (``craft_vhdx``, ``log_entry``), loaded from its file."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "plugins" / "vhdx" / "tests" / "_vhdx.py"
    spec = importlib.util.spec_from_file_location("_fuzz_vhdx_helpers", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _crafted_vhdx_seeds(work: Path) -> list[Path]:
    """Images qemu-img cannot make: a pending log, a differencing image, 4096-byte logical sectors."""
    import struct
    import uuid

    vhdx = _vhdx_helpers()
    mib = 1 << 20
    made = []
    # A pending log: it rewrites a BAT sector (block 2 mapped to a new block at the file's end),
    # 4 KiB of block 0 and zeroes 8 KiB after them.
    logged = work / "log-pending.vhdx"
    guid = uuid.UUID(_VHDX_LOG_GUID)
    facts = vhdx.craft_vhdx(
        logged, 4 * mib, blocks={0: (vhdx.FULL, b"\xa1" * 16384), 1: (vhdx.ZERO, None)}, log_guid=guid
    )
    data = bytearray(logged.read_bytes())
    new_block = len(data)
    data += b"\xc3" * 4096 + bytes(mib - 4096)
    bat_sector = bytearray(data[facts.bat_offset : facts.bat_offset + 4096])
    struct.pack_into("<Q", bat_sector, 16, (new_block // mib) << 20 | vhdx.FULL)
    writes = [(facts.bat_offset, bytes(bat_sector)), (facts.data_offset, b"\xd4" * 4096)]
    log = vhdx.log_entry(
        10, 0, guid, writes=writes, zeroes=[(facts.data_offset + 4096, 8192)], flushed=len(data), last=len(data)
    )
    data[facts.log_offset : facts.log_offset + len(log)] = log
    logged.write_bytes(bytes(data))
    made.append(logged)
    # A differencing image: block 0 present, block 1 partly (sectors 0-7 and 1024-1031), the rest the parent's.
    differencing = work / "differencing.vhdx"
    per_block = mib // 512 // 8  # the bitmap bytes of one 1 MiB block (the chunk's blocks in order)
    bitmap = bytearray(2 * per_block)
    bitmap[per_block] = 0xFF
    bitmap[per_block + per_block // 2] = 0xFF
    part = bytearray(mib)
    part[:4096] = b"\xb2" * 4096
    part[1024 * 512 : 1024 * 512 + 4096] = b"\xb3" * 4096
    vhdx.craft_vhdx(
        differencing,
        4 * mib,
        blocks={0: (vhdx.FULL, b"\xb1" * 4096), 1: (vhdx.PARTIAL, bytes(part)), 2: (vhdx.ZERO, None)},
        bitmaps={0: bytes(bitmap)},
        parent={
            "parent_linkage": "{83ea7d41-04c2-4d3b-9f51-2f1c1d7e3a52}",
            "relative_path": ".\\parent.vhdx",
            "absolute_win32_path": "\\\\?\\C:\\images\\parent.vhdx",
        },
    )
    made.append(differencing)
    # 4096-byte logical sectors (qemu-img cannot choose them): block 1 present.
    sectors = work / "sector-4k.vhdx"
    vhdx.craft_vhdx(sectors, 3 * mib, sector_size=4096, blocks={1: (vhdx.FULL, b"\xe5" * 8192), 2: (vhdx.ZERO, None)})
    made.append(sectors)
    return made


def _size(text: str) -> int:
    """A qemu-io size: a number of bytes, or with a ``k``/``M`` suffix."""
    shift = {"k": 10, "M": 20}.get(text[-1], 0)
    return int(text[:-1] if shift else text) << shift


def make_vhdx_seeds(out: Path, work: Path) -> list[Path]:
    """Write the VHDX seeds into *out*, encoded for :mod:`fuzz.targets.vhdx_read`; returns their paths."""
    import imago

    from .targets.vhdx_read import encode

    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name, (how, options, size, commands) in VHDX_SEEDS.items():
        image = work / f"{name}.vhdx"
        if how == "qemu":
            _qemu_img(
                "create", "-f", "vhdx", *(["-o", ",".join(options)] if options else []), image.name, size, cwd=work
            )
            if commands:
                _qemu_io(image.name, *commands, cwd=work, fmt="vhdx")
        else:
            settings: dict[str, Any] = {}
            for option in options:
                key, _, value = option.partition("=")
                settings[key] = _size(value) if key == "block_size" else value
            imago.create(image, "vhdx", size=_size(size), **settings)
            with imago.open(image, "vhdx", write=True) as disk:
                for command in commands:
                    words = command.split()
                    offset, length = _size(words[-2]), _size(words[-1])
                    if words[1] == "-z":
                        disk.write_zeroes(offset, length)
                    else:
                        disk.write(bytes([int(words[2], 16)]) * length, offset)
        images.append(image)
    images += _crafted_vhdx_seeds(work)
    made = []
    for image in images:
        target = out / f"{image.stem}.bin"
        target.write_bytes(encode(image.read_bytes()))
        made.append(target)
    return made


def _keep(image: Path, out: Path) -> Path:
    target = out / image.name
    shutil.copyfile(image, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the seed corpora (replacing the directories' files)."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.make_seeds", description=__doc__)
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus root (default: %(default)s)")
    args = parser.parse_args(argv)
    out: Path = args.out
    for kind in ("qcow2", "qcow2_write", "raw", "vmdk", "vdi", "vpc", "vhdx"):
        shutil.rmtree(out / kind, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="imago-seeds-") as work:
        made = make_qcow2_seeds(out / "qcow2", Path(work))
        made += make_vmdk_seeds(out / "vmdk", Path(work))
        made += make_vdi_seeds(out / "vdi", Path(work))
        made += make_vpc_seeds(out / "vpc", Path(work))
        made += make_vhdx_seeds(out / "vhdx", Path(work))
    made += make_write_seeds(out / "qcow2_write", out / "qcow2")
    made += make_raw_seeds(out / "raw")
    total = sum(path.stat().st_size for path in made)
    print(f"{len(made)} seeds, {total} bytes, in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
