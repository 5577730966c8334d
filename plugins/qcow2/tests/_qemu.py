"""Helpers for the qcow2 interoperability tests: qemu-img and qemu-io as the reference.

Everything here runs QEMU's tools with their exit status checked, builds test data, reads
``qemu-img map --output=json`` into comparable runs, and peeks at the L2 tables of an image
(to prove that an image really contains what a test claims to cover, e.g. compressed data
straddling host clusters, independently of the driver under test).

QEMU's tools are a hard requirement: when they are missing, every test using them fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import imago
from imago import CheckResult, PermissiveImplicitOpenGate

StrPath = str | os.PathLike[str]

MiB = 1 << 20


# --- running the tools ------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is required for the qcow2 interoperability tests (Debian package qemu-utils; "
            "`make test` installs it)"
        )
    return path


def run(args: Sequence[StrPath], *, cwd: StrPath | None = None) -> str:
    """Run a command; its stdout, or an AssertionError carrying its output when it fails."""
    argv = [os.fspath(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def qemu_img(*args: StrPath, cwd: StrPath | None = None) -> str:
    """``qemu-img ARGS...`` (checked)."""
    return run([_tool("qemu-img"), *args], cwd=cwd)


def qemu_io(image: StrPath, *commands: str, fmt: str = "qcow2", cwd: StrPath | None = None) -> str:
    """Run qemu-io *commands* (``-c``) on *image*; any failed command fails the call."""
    argv: list[StrPath] = [_tool("qemu-io"), "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    argv.append(image)
    out = run(argv, cwd=cwd)
    # qemu-io's exit status only reflects the last command.
    for line in out.splitlines():
        if "failed" in line or "error" in line.lower():
            raise AssertionError(f"qemu-io {commands!r} on {image}: {line}\n{out}")
    return out


def options_arg(options: dict[str, object]) -> list[str]:
    """``-o key=value,...`` for qemu-img (nothing for no options)."""
    if not options:
        return []
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key}={value}")
    return ["-o", ",".join(parts)]


def create(
    path: StrPath,
    size: int | None,
    *,
    fmt: str = "qcow2",
    options: dict[str, object] | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    cwd: StrPath | None = None,
) -> None:
    """``qemu-img create`` (*size* None takes the backing file's size)."""
    argv: list[StrPath] = ["create", "-q", "-f", fmt, *options_arg(options or {})]
    if backing is not None:
        argv += ["-b", backing]
    if backing_fmt is not None:
        argv += ["-F", backing_fmt]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    qemu_img(*argv, cwd=cwd)


def convert_to_raw(
    image: StrPath,
    out: StrPath,
    *,
    fmt: str = "qcow2",
    snapshot: str | None = None,
    cwd: StrPath | None = None,
) -> bytes:
    """The disk content as ``qemu-img convert -O raw`` sees it.

    *snapshot* is a ``-l`` option string (``snapshot.name=s1``, ``snapshot.id=1``).
    """
    argv: list[StrPath] = ["convert", "-f", fmt, "-O", "raw"]
    if snapshot is not None:
        argv += ["-l", snapshot]
    qemu_img(*argv, os.path.abspath(image), os.path.abspath(out), cwd=cwd)
    return Path(out).read_bytes()


def info(image: StrPath, *, fmt: str = "qcow2", cwd: StrPath | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json``."""
    result: dict[str, Any] = json.loads(qemu_img("info", "-f", fmt, "--output=json", image, cwd=cwd))
    return result


def check(image: StrPath, *, cwd: StrPath | None = None) -> dict[str, Any]:
    """``qemu-img check``: fails on leaks or corruption; imago's own check must say the same.

    Returns qemu-img's JSON report.
    """
    proc = subprocess.run(
        [_tool("qemu-img"), "check", "-f", "qcow2", "--output=json", os.fspath(image)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"qemu-img check {image} failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    report: dict[str, Any] = json.loads(proc.stdout)
    assert_imago_check_agrees(image, report, proc.returncode, proc.stderr, cwd=cwd)
    return report


def imago_check(image: StrPath, *, cwd: StrPath | None = None) -> CheckResult:
    """imago's own check of *image* (a relative name is relative to *cwd*), opened read-only.

    ``force_share``: the caller may still hold the image open (flushed) for writing.
    """
    path = Path(cwd or ".", image)
    with imago.open(path, "qcow2", gate=PermissiveImplicitOpenGate(), force_share=True) as disk:
        return disk.check()


def assert_imago_check_agrees(
    image: StrPath, report: dict[str, Any], status: int, stderr: str = "", *, cwd: StrPath | None = None
) -> CheckResult:
    """imago's check of *image* equals what ``qemu-img check`` said of it: the second oracle.

    *report*, *status* and *stderr* are qemu-img's JSON report, exit status and findings (one
    per line on stderr). Everything must be equal but the file name (which each tool spells
    its own way).
    """
    ours = imago_check(image, cwd=cwd)
    got = (ours.exit_status, _unnamed(ours.to_json()), {m for f in ours.findings for m in f.message.splitlines()})
    expected = (status, _unnamed(report), set(stderr.splitlines()))
    assert got == expected, (
        f"imago's check of {image} (status, JSON, findings) differs from qemu-img's:\n{got}\n{expected}"
    )
    return ours


def _unnamed(report: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in report.items() if key != "filename"}


def qemu_map(image: StrPath, *, fmt: str = "qcow2", cwd: StrPath | None = None) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``, parsed.

    QEMU resolves a relative external data file name against its working directory (backing
    file names against the image's directory): run it in the image's directory, *cwd*.
    """
    entries: list[dict[str, Any]] = json.loads(qemu_img("map", "-f", fmt, "--output=json", image, cwd=cwd))
    return entries


# --- runs: a comparable form of mappings --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """A guest range with one kind of mapping.

    *kind* is ``data`` (stored uncompressed at host *offset* of the layer at *depth*: its
    image file, or its external data file), ``compressed`` or ``zero``. *present* says
    whether some layer records the range (false: unallocated down the chain, or past the
    end of a shorter backing file). *offset* is None except for data.
    """

    start: int
    length: int
    depth: int
    kind: str
    present: bool
    offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def __repr__(self) -> str:
        where = f" @{self.offset:#x}" if self.offset is not None else ""
        present = "" if self.present else " absent"
        return f"Run([{self.start:#x}, {self.end:#x}) depth={self.depth} {self.kind}{where}{present})"


def _mergeable(a: Run, b: Run) -> bool:
    if (a.end, a.depth, a.kind, a.present) != (b.start, b.depth, b.kind, b.present):
        return False
    if a.kind == "data":
        assert a.offset is not None
        assert b.offset is not None
        return a.offset + a.length == b.offset
    return True


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Merge adjacent equivalent runs (data runs only where host offsets continue)."""
    merged: list[Run] = []
    for run_ in runs:
        if run_.length == 0:
            continue
        if merged and _mergeable(merged[-1], run_):
            last = merged[-1]
            merged[-1] = dataclasses.replace(last, length=last.length + run_.length)
        else:
            merged.append(run_)
    return merged


def qemu_runs(entries: Iterable[dict[str, Any]]) -> list[Run]:
    """Runs from ``qemu-img map --output=json`` entries.

    qemu says ``data`` for anything stored, with an ``offset`` unless compressed; ``zero``
    without ``data`` for zero clusters and unallocated ranges (``present`` tells those apart).
    A stored range that the host file has as a hole reports ``zero`` *and* ``data``: that is
    data. Offsets of zero ranges (preallocated zero clusters) are not compared.
    """
    runs = []
    for e in entries:
        if e["data"]:
            kind = "data" if "offset" in e else "compressed"
            offset = e.get("offset")
        else:
            assert e["zero"], e
            kind, offset = "zero", None
        runs.append(Run(e["start"], e["length"], e["depth"], kind, bool(e["present"]), offset))
    return merge_runs(runs)


# --- test data -----------------------------------------------------------------------------------


def random_bytes(size: int, seed: int) -> bytes:
    """Incompressible bytes."""
    return random.Random(seed).randbytes(size)


def restricted_bytes(size: int, seed: int, bits: int) -> bytes:
    """Random bytes from an alphabet of ``2**bits`` letters: compressible to about bits/8."""
    mask = (1 << bits) - 1
    alphabet = bytes(range(0x21, 0x21 + (1 << bits))) if bits < 7 else bytes(range(1 << bits))
    table = bytes(alphabet[b & mask] for b in range(256))
    return random_bytes(size, seed).translate(table)


def text_bytes(size: int, seed: int) -> bytes:
    """Text-like bytes (random words): compresses well, but not to nothing."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(1500)]
    chunk = " ".join(rng.choices(words, k=12000)).encode()
    out = bytearray()
    while len(out) < size:
        out += chunk[: size - len(out)]
        chunk = chunk[1:] + chunk[:1]  # no exact repeats at the chunk period
    return bytes(out)


def fill_bytes(size: int, value: int) -> bytes:
    """What ``qemu-io write -P value`` writes."""
    return bytes([value]) * size


# --- peeking at qcow2 metadata (independent of the driver under test) ----------------------------

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00


@dataclasses.dataclass(frozen=True)
class L2Entry:
    """One L2 entry of the active L1 table: guest cluster index, the entry, its bitmap."""

    guest_cluster: int
    entry: int
    bitmap: int  # 0 without extended L2 entries


@dataclasses.dataclass(frozen=True)
class Qcow2Layout:
    """Header facts and the active L2 entries of a qcow2 image."""

    version: int
    cluster_bits: int
    extended_l2: bool
    entries: list[L2Entry]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def compressed_ranges(self) -> Iterator[tuple[int, int, int]]:
        """``(guest_cluster, host_start, host_end)`` of compressed clusters (sector-rounded end)."""
        x = 62 - (self.cluster_bits - 8)
        for e in self.entries:
            if e.entry & QCOW_OFLAG_COMPRESSED:
                host = e.entry & ((1 << x) - 1)
                extra_sectors = (e.entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)
                end = (host & ~511) + (extra_sectors + 1) * 512
                yield e.guest_cluster, host, end

    def straddling_compressed(self) -> int:
        """How many compressed clusters have data in more than one host cluster."""
        cs = self.cluster_size
        return sum(1 for _, start, end in self.compressed_ranges() if start // cs != (end - 1) // cs)

    def allocated_zero_clusters(self) -> int:
        """How many zero clusters (standard L2 entries) keep a host cluster."""
        return sum(
            1
            for e in self.entries
            if not self.extended_l2
            and not e.entry & QCOW_OFLAG_COMPRESSED
            and e.entry & QCOW_OFLAG_ZERO
            and e.entry & L2E_OFFSET_MASK
        )

    def copied_clusters(self) -> dict[int, bool]:
        """For each standard (uncompressed, host-allocated) cluster: whether COPIED is set."""
        out = {}
        for e in self.entries:
            if e.entry & QCOW_OFLAG_COMPRESSED:
                continue
            if e.entry & L2E_OFFSET_MASK:
                out[e.guest_cluster] = bool(e.entry & QCOW_OFLAG_COPIED)
        return out


def qcow2_layout(path: StrPath) -> Qcow2Layout:
    """Read the header and the active L2 tables of a qcow2 file."""
    with open(path, "rb") as f:
        header = f.read(104)
        magic, version = struct.unpack_from(">4sI", header, 0)
        assert magic == b"QFI\xfb", magic
        (cluster_bits,) = struct.unpack_from(">I", header, 20)
        (l1_size,) = struct.unpack_from(">I", header, 36)
        (l1_offset,) = struct.unpack_from(">Q", header, 40)
        incompatible = struct.unpack_from(">Q", header, 72)[0] if version >= 3 else 0
        extended = bool(incompatible & (1 << 4))
        cs = 1 << cluster_bits
        entry_size = 16 if extended else 8
        per_table = cs // entry_size
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        entries = []
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & 0x00FFFFFFFFFFFE00
            if not l2_offset:
                continue
            f.seek(l2_offset)
            table = f.read(cs)
            for j in range(per_table):
                if extended:
                    entry, bitmap = struct.unpack_from(">QQ", table, j * 16)
                else:
                    (entry,) = struct.unpack_from(">Q", table, j * 8)
                    bitmap = 0
                if entry or bitmap:
                    entries.append(L2Entry(i * per_table + j, entry, bitmap))
    return Qcow2Layout(version, cluster_bits, extended, entries)
