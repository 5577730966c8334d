#!/usr/bin/env python3
"""Reads from qcow2 images through imago: against bare ``os.preadv``, one thread, and qemu-img.

One run measures:

* a fully allocated qcow2 image (``--size``, 64 KiB clusters, made by ``qemu-img convert``),
  page-cached, through ``SyncFormatAccess.read``, against bare ``os.preadv`` of the same bytes of
  the image file (the host offsets imago's ``get_mapping`` reports):
  ``1M sequential`` (target >= 0.80), ``4K random`` (target >= 0.40), ``4K sequential``, and
  ``qemu-img bench -f qcow2`` reference figures;
* the same image through the async API (``imago.open_async``, on asyncio's own loop or on
  uvloop with ``--loop uvloop``): ``async 4K random QD16`` against bare ``os.preadv`` (target
  >= 0.30) and against ``qemu-img bench -f qcow2 -d 16`` (target >= 1.0), and ``async 1M
  sequential`` against bare ``os.preadv`` (target >= 0.80);
* compressed images (zlib and zstd) read whole with large requests, the driver decompressing the
  clusters of a request on all cores, against the same reads decompressing on one thread
  (target: >= 1.5 times faster), and ``qemu-img convert -O raw`` of the same image;
* the peak RSS of a child process reading a sparse 1 TiB qcow2 end to end (target < 150 MiB).

The last line of the output is one JSON object with every figure. Exit status 0, unless a
correctness check fails (1), or qemu-img/qemu-io, which create the images, are missing (2).
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import imago
import imago.runtime
from imago import FormatAccess, Mapping, SyncFormatAccess

# The shared machinery is the sibling module bench/_benchlib.py, found from any working directory.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as lib
from _benchlib import LARGE, SMALL, GiB, KiB, MiB, Row, Runner, TiB, parse_size

CLUSTER = 64 * KiB
COMPRESSIONS = ("zlib", "zstd")
RSS_TARGET_MIB = 150.0


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config(lib.ReadConfig):
    depth: int
    compressed_size: int
    request: int
    big_size: int
    big_stride: int
    big_buffer: int
    big_verify: str
    skip_big: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            **super().as_dict(),
            "depth": self.depth,
            "cluster_size": CLUSTER,
            "compressed_size": self.compressed_size,
            "request_size": self.request,
            "big_size": self.big_size,
            "big_stride": self.big_stride,
            "big_buffer": self.big_buffer,
            "big_verify": self.big_verify,
            "skip_big": self.skip_big,
            "cpus": os.cpu_count(),
        }


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark imago's qcow2 read path against bare os.preadv, one thread, and qemu-img.",
    )
    lib.add_read_options(
        parser,
        size_help="allocated image size (default 1G; --quick: 64M)",
        dir_help="directory for the temporary images (default: the system temp dir)",
        repeat_help="timed runs per test, best is reported (default 5; --quick: 3)",
    )
    parser.add_argument("--depth", type=int, default=16, help="reads in flight in the async test (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed for offsets and generated data (default 1)")
    parser.add_argument(
        "--compressed-size", type=parse_size, help="virtual size of the compressed images (default 256M; --quick: 16M)"
    )
    parser.add_argument(
        "--request-size", type=parse_size, help="request size for reading compressed images (default 16M; --quick: 4M)"
    )
    parser.add_argument("--big-size", type=parse_size, help="sparse image virtual size (default 1T; --quick: 4G)")
    parser.add_argument(
        "--big-stride", type=parse_size, help="one 1 MiB write per this many bytes (default 64G; --quick: 256M)"
    )
    parser.add_argument("--big-buffer", type=parse_size, help="request size for the sparse read (default 64M)")
    parser.add_argument(
        "--big-verify",
        choices=("sample", "full"),
        default="sample",
        help="sparse read: check written ranges and spots of every request (sample, default) or every byte (full)",
    )
    parser.add_argument("--skip-big", action="store_true", help="skip the sparse-image memory test")
    lib.add_final_options(
        parser,
        no_qemu_help="skip the qemu-img reference runs (images still use it)",
        quick_help="small images and few ops: a smoke run of seconds",
    )
    args = parser.parse_args(argv)

    pick = lib.picker(args)
    config = Config(
        **lib.ReadConfig.values(args),
        depth=args.depth,
        compressed_size=pick(args.compressed_size, 256 * MiB, 16 * MiB),
        request=pick(args.request_size, 16 * MiB, 4 * MiB),
        big_size=pick(args.big_size, TiB, 4 * GiB),
        big_stride=pick(args.big_stride, 64 * GiB, 256 * MiB),
        big_buffer=pick(args.big_buffer, 64 * MiB, 64 * MiB),
        big_verify=args.big_verify,
        skip_big=args.skip_big,
    )
    config.check_counts(parser, ("ops", "ops_1m", "qemu_ops", "repeat", "depth"))
    if config.size % CLUSTER or config.compressed_size % CLUSTER:
        parser.error("image sizes must be multiples of the 64 KiB cluster size")
    if config.big_stride < 4 * MiB or config.big_stride > config.big_size:
        parser.error("--big-stride must be at least 4M and at most --big-size")
    return config


# --- helpers -----------------------------------------------------------------------------------------


def run_tool(cmd: list[str], timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    """Run qemu-img/qemu-io; a failure raises with the tool's last line of output."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {out.returncode}): {lib.last_line(out, '')}")
    return out


def text_chunks(size: int, seed: int, chunk: int = 16 * MiB) -> Iterator[bytes]:
    """Text-like bytes that deflate about 3.5x per 64 KiB cluster.

    A pool of words (500 made-up words, Zipf-like weights, a number every 50 words) from which
    each cluster takes a window at a random place: no two clusters are alike, each compresses
    like prose, not like a run of one byte.
    """
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocabulary = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 9))) for _ in range(500)]
    words = rng.choices(vocabulary, weights=[1 / (i + 1) ** 1.2 for i in range(500)], k=400_000)
    for i in range(0, len(words), 50):
        words[i] = str(rng.randrange(10**6))
    pool = " ".join(words).encode()
    pos = 0
    while pos < size:
        step = min(chunk, size - pos)
        out = bytearray(step)
        for at in range(0, step, CLUSTER):
            start = rng.randrange(len(pool) - CLUSTER)
            out[at : at + CLUSTER] = pool[start : start + CLUSTER]
        yield bytes(out)
        pos += step


def tmpfs_dir(fallback: str) -> str:
    """Where qemu-img convert writes its raw output: /dev/shm if usable (memory, no disk)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return fallback


# --- qemu-img ----------------------------------------------------------------------------------------------


@dataclass
class Qemu:
    """qemu-img (and qemu-io) for creating images, and for reference figures unless disabled."""

    img: str | None
    io: str | None
    version: str | None
    reference: bool
    note: str | None = None

    @classmethod
    def find(cls, reference: bool) -> Qemu:
        img, io = shutil.which("qemu-img"), shutil.which("qemu-io")
        version = None
        if img is not None:
            version = lib.qemu_version(img)
        note = None if reference else "qemu-img reference runs skipped (--no-qemu)"
        return cls(img, io, version, reference and img is not None, note)

    def bench(self, path: str, count: int, size: int, depth: int) -> tuple[float, float] | None:
        """``qemu-img bench -d DEPTH``: its own "Run completed in" seconds and the process wall clock."""
        if not self.reference or self.img is None:
            return None
        try:
            return lib.run_qemu_bench(lib.qemu_bench_command(self.img, "qcow2", path, count, size, depth))
        except lib.QemuError as error:
            self.disable(str(error))
            return None

    def convert_to_raw(self, path: str, target: str) -> float | None:
        """Wall clock of ``qemu-img convert -O raw`` (process start-up included)."""
        if not self.reference or self.img is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        try:
            return lib.run_qemu_convert(self.img, ["-f", "qcow2", "-O", "raw", path, target])
        except lib.QemuError as error:
            self.disable(str(error))
            return None

    def disable(self, note: str) -> None:
        self.reference = False
        self.note = lib.skipped_note(note)


# --- the one-thread baseline ------------------------------------------------------------------------------


#: How often the one-thread stand-in was called (0 after a run: the driver no longer uses it).
_serial_calls = 0


async def _run_serially(func: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Stand-in for :func:`imago.runtime.run_parallel`: the same work, on the calling thread."""
    global _serial_calls
    _serial_calls += 1
    return [func(item) for item in items]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Make the qcow2 driver decompress on the calling thread only.

    ``imago_qcow2.compressed`` looks up ``runtime.run_parallel`` (``runtime`` is the ``imago.runtime`` module)
    at every call, so replacing the module attribute for the duration of the run is enough.
    """
    original = imago.runtime.run_parallel
    imago.runtime.run_parallel = _run_serially
    try:
        yield
    finally:
        imago.runtime.run_parallel = original


# --- part 1: an allocated image against bare reads of its host ranges -------------------------------------


@dataclass(frozen=True)
class Extent:
    guest: int
    length: int
    host: int


def merge_extents(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for ext in extents:
        last = merged[-1] if merged else None
        if last and last.guest + last.length == ext.guest and last.host + last.length == ext.host:
            merged[-1] = Extent(last.guest, last.length + ext.length, last.host)
        else:
            merged.append(ext)
    return merged


class Allocated:
    """The fully allocated image, its host extents, and the runners of its groups."""

    def __init__(self, config: Config, qemu: Qemu, tmp: str, failures: list[str]) -> None:
        self.config = config
        self.qemu = qemu
        self.failures = failures
        self.size = config.size
        self.source = os.path.join(tmp, "allocated.raw")
        self.path = os.path.join(tmp, "allocated.qcow2")
        lib.progress(f"creating a {config.size // MiB} MiB qcow2 image of random data (64 KiB clusters) ...")
        lib.write_file(self.source, lib.random_chunks(config.size))
        assert qemu.img is not None
        run_tool([
            qemu.img, "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", self.source, self.path,
        ])  # fmt: skip
        lib.settle_and_cache(self.path)
        self.residency = lib.cache_residency(self.path, 1024, random.Random(config.seed + 2))
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        self.disk = imago.open(self.path, format="qcow2")
        self.loop = lib.event_loop_runner(config.loop)
        self.access: FormatAccess = self.loop.run(imago.open_async(self.path, format="qcow2"))
        self.extents = self._extents()
        self._starts = [ext.guest for ext in self.extents]
        self.random_4k, self.seq_4k, self.seq_1m = lib.read_offsets(self.size, config.ops, config.ops_1m, config.seed)
        self.warm_count = lib.warm_count(config.ops)
        self.groups: dict[str, list[Runner]] = {}

    def close(self) -> None:
        self.disk.close()
        self.loop.run(self.access.close())
        self.loop.close()
        os.close(self.fd)
        os.close(self.source_fd)

    def _extents(self) -> list[Extent]:
        """Where the guest data lives in the image file, from imago's ``get_mapping`` (once)."""
        extents: list[Extent] = []
        offset = 0
        while offset < self.size:
            mapping, length = self.disk.get_mapping(offset, self.size - offset)
            if not isinstance(mapping, Mapping.Raw) or mapping.storage.filename != self.path:
                raise RuntimeError(f"{self.path}: guest offset {offset} is not allocated in the image file: {mapping}")
            extents.append(Extent(offset, length, mapping.offset))
            offset += length
        return merge_extents(extents)

    def host(self, guest: int, length: int) -> int:
        """The host offset of guest ``[guest, guest + length)``, which must lie in one extent."""
        ext = self.extents[bisect.bisect_right(self._starts, guest) - 1]
        if guest + length > ext.guest + ext.length:
            raise RuntimeError(f"request [{guest}, {guest + length}) straddles host extents: unexpected layout")
        return ext.host + guest - ext.guest

    def check_correctness(self) -> None:
        """imago's mapping must match ``qemu-img map``; its reads, the source data and the host bytes."""
        if self.qemu.img is not None:
            out = run_tool([self.qemu.img, "map", "--output=json", "-f", "qcow2", self.path])
            theirs = merge_extents(
                [Extent(e["start"], e["length"], e["offset"]) for e in json.loads(out.stdout) if e.get("data")]
            )
            if theirs != self.extents:
                self.failures.append(f"allocated: imago's mapping {self.extents} differs from qemu-img map's {theirs}")
        across = [(ext.guest - SMALL, 2 * SMALL) for ext in self.extents[1:]]  # across host extents
        cases = lib.read_cases(self.size, random.Random(self.config.seed + 1), small=32, large=8, extra=across)
        for offset, length in cases:
            expected = lib.pread_exact(self.source_fd, length, offset)
            for attempt in ("first", "again", "async"):
                buf = bytearray(length)
                if attempt == "async":
                    self.loop.run(self.access.read(buf, offset))
                else:
                    self.disk.read(buf, offset)
                if buf != expected:
                    self.failures.append(f"allocated: imago read ({attempt}) of {length} bytes at {offset} is wrong")
            ext = self.extents[bisect.bisect_right(self._starts, offset) - 1]
            inside = offset + length <= ext.guest + ext.length
            if inside and lib.pread_exact(self.fd, length, self.host(offset, length)) != expected:
                self.failures.append(f"allocated: host bytes for guest {offset} differ from the source data")

    def check_last(self, what: str, buf: bytearray, offset: int) -> None:
        lib.check_last(self.failures, what, buf, self.source_fd, offset)

    def bare(self, guest_offsets: list[int], block: int) -> Runner:
        hosts = [self.host(off, block) for off in guest_offsets]
        return lib.bare_runner(self.fd, hosts, block, self.warm_count)

    def imago(self, what: str, offsets: list[int], block: int) -> Runner:
        return lib.imago_sync_runner(
            self.disk, offsets, block, self.warm_count, lambda buf, offset: self.check_last(what, buf, offset)
        )

    def imago_async(self, what: str, offsets: list[int], block: int, depth: int) -> Runner:
        return lib.imago_async_runner(
            self.loop,
            self.access,
            offsets,
            block,
            depth,
            self.warm_count,
            lambda buf, offset: self.check_last(what, buf, offset),
        )

    def qemu_bench(self, count: int, block: int, depth: int = 1) -> Runner:
        return lib.qemu_bench_runner(count, block, lambda n: self.qemu.bench(self.path, n, block, depth))

    def run(self) -> None:
        config = self.config
        plan: dict[str, list[Runner]] = {
            "1m_seq": [self.bare(self.seq_1m, LARGE), self.imago("1M sequential", self.seq_1m, LARGE)],
            "4k_random": [self.bare(self.random_4k, SMALL), self.imago("4K random", self.random_4k, SMALL)],
            "4k_seq": [self.bare(self.seq_4k, SMALL), self.imago("4K sequential", self.seq_4k, SMALL)],
            "async": [
                self.bare(self.random_4k, SMALL),
                self.imago_async("async 4K random", self.random_4k, SMALL, config.depth),
            ],
            "async_1m": [
                self.bare(self.seq_1m, LARGE),
                self.imago_async("async 1M sequential", self.seq_1m, LARGE, 1),
            ],
        }
        if self.qemu.reference:
            plan["1m_seq"].append(self.qemu_bench(config.ops_1m, LARGE))
            plan["4k_seq"].append(self.qemu_bench(config.qemu_ops, SMALL))
            plan["async"].append(self.qemu_bench(config.qemu_ops, SMALL, config.depth))
        lib.measure_plan(plan, config.repeat, self.groups)


# --- part 2: compressed images, all cores against one thread ------------------------------------------------


class Compressed:
    """Compressed images (one per compression type) of the same text-like data."""

    def __init__(self, config: Config, qemu: Qemu, tmp: str, failures: list[str]) -> None:
        self.config = config
        self.qemu = qemu
        self.failures = failures
        self.tmp = tmp
        self.size = config.compressed_size
        self.source = os.path.join(tmp, "text.raw")
        lib.progress(f"creating {self.size // MiB} MiB of text-like data ...")
        digest = hashlib.sha256()
        lib.write_file(self.source, text_chunks(self.size, config.seed), digest.update)
        self.source_sha256 = digest.hexdigest()
        self.source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        self.raw_dir = tmpfs_dir(tmp)
        self.raw_target = os.path.join(self.raw_dir, f"imago-bench-{os.getpid()}.raw")
        self.offsets = list(range(0, self.size, config.request))
        self.groups: dict[str, list[Runner]] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.notes: set[str] = set()

    def close(self) -> None:
        os.close(self.source_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.raw_target)

    def create(self, compression: str) -> str:
        path = os.path.join(self.tmp, f"text-{compression}.qcow2")
        lib.progress(f"compressing it with qemu-img convert -c -o compression_type={compression} ...")
        assert self.qemu.img is not None
        run_tool([
            self.qemu.img, "convert", "-f", "raw", "-O", "qcow2", "-c",
            "-o", f"compression_type={compression},cluster_size={CLUSTER}", self.source, path,
        ])  # fmt: skip
        lib.settle_and_cache(path)
        return path

    def read_all(self, disk: SyncFormatAccess, buf: bytearray, offsets: Sequence[int]) -> float:
        read = disk.read
        request = len(buf)
        size = self.size
        start = time.perf_counter()
        for off in offsets:
            # The last request may be shorter (a disk size that is no multiple of the request).
            read(buf if off + request <= size else memoryview(buf)[: size - off], off)
        return time.perf_counter() - start

    def check(self, compression: str, disk: SyncFormatAccess) -> dict[str, Any]:
        """The image is compressed; imago's whole read equals the source and qemu-img's (sha256)."""
        special = 0
        offset = 0
        while offset < self.size:
            mapping, length = disk.get_mapping(offset, self.size - offset)
            if isinstance(mapping, Mapping.Special):
                special += length
            offset += length
        digest = hashlib.sha256()
        buf = bytearray(self.config.request)
        for off in self.offsets:
            view = memoryview(buf)[: min(len(buf), self.size - off)]
            disk.read(view, off)
            digest.update(view)
        ours = digest.hexdigest()
        theirs = None
        if self.qemu.img is not None:
            run_tool([self.qemu.img, "convert", "-f", "qcow2", "-O", "raw", disk.filename or "", self.raw_target])
            with open(self.raw_target, "rb") as file:
                theirs = hashlib.file_digest(file, "sha256").hexdigest()
        if special == 0:
            self.failures.append(f"{compression}: no compressed cluster in the image: nothing measured of interest")
        if ours != self.source_sha256:
            self.failures.append(f"{compression}: sha256 of imago's read {ours} differs from the source data's")
        if theirs is not None and theirs != ours:
            self.failures.append(
                f"{compression}: sha256 of imago's read {ours} differs from qemu-img convert's {theirs}"
            )
        return {
            "compressed_fraction": special / self.size,
            "sha256_imago": ours,
            "sha256_qemu_img": theirs,
            "sha256_source": self.source_sha256,
        }

    def run(self) -> None:
        config = self.config
        for compression in COMPRESSIONS:
            path = self.create(compression)
            disk = imago.open(path, format="qcow2")
            try:
                info = self.check(compression, disk)
                info["file_size"] = os.path.getsize(path)
                info["compression_ratio"] = self.size / info["file_size"]
                self.images[compression] = info
                if self.failures:
                    return
                runners = [self.imago(compression, disk, parallel=True), self.imago(compression, disk, parallel=False)]
                if self.qemu.reference:
                    runners.append(self.qemu_convert(path))
                lib.measure(f"{compression} whole-disk reads", runners, config.repeat)
                self.groups[compression] = runners
            finally:
                disk.close()
            os.unlink(path)

    def imago(self, compression: str, disk: SyncFormatAccess, *, parallel: bool) -> Runner:
        buf = bytearray(self.config.request)
        offsets = self.offsets
        name = "parallel" if parallel else "one-thread"

        def run(warm: bool) -> float:
            todo = offsets[:2] if warm else offsets
            calls = _serial_calls
            with contextlib.nullcontext() if parallel else one_thread():
                seconds = self.read_all(disk, buf, todo)
            if not parallel and _serial_calls == calls:
                self.notes.add(
                    "the qcow2 driver did not call imago.runtime.run_parallel: the one-thread baseline"
                    " may not be one thread"
                )
            last = todo[-1]
            length = min(len(buf), self.size - last)
            if memoryview(buf)[:length] != lib.pread_exact(self.source_fd, length, last):
                self.failures.append(f"{compression} {name}: buffer after the run does not hold the data at {last}")
            return seconds

        return Runner(name, len(offsets), self.config.request, run)

    def qemu_convert(self, path: str) -> Runner:
        def run(warm: bool) -> float | None:
            return None if warm else self.qemu.convert_to_raw(path, self.raw_target)

        # One "request" of the whole disk: the rate is the disk size over the process's wall clock.
        return Runner("qemu-img", 1, self.size, run)


# --- part 3: peak memory of reading a huge sparse image ----------------------------------------------------------


def big_writes(config: Config) -> list[tuple[int, int, int]]:
    """``(offset, length, pattern byte)``: 1 MiB at a scattered place in every stride, and at the end."""
    stride, size = config.big_stride, config.big_size
    slots = (stride - 2 * MiB) // SMALL
    writes = []
    for k in range(size // stride):
        jitter = (k * 2654435761 + 12345) % slots * SMALL
        writes.append((k * stride + jitter, MiB, 1 + (k * 37) % 255))
    if writes[-1][0] + MiB <= size - MiB:
        writes.append((size - MiB, MiB, 0xEE))
    return writes


def peak_rss_kib() -> dict[str, int]:
    """This process's peak and current RSS, in KiB (``ru_maxrss`` and /proc's VmHWM/VmRSS).

    VmHWM is the figure to use: it belongs to this process's address space, while ``ru_maxrss``
    is kept across ``execve`` and so starts, in a child, at the parent's RSS when it forked.
    """
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def is_zero(buf: bytearray, start: int, end: int, zeros: memoryview) -> bool:
    """Whether ``buf[start:end]`` is all zero (compared in place, *zeros* at a time: no copies)."""
    step = len(zeros)
    return all(buf.startswith(zeros[: min(step, end - pos)], pos) for pos in range(start, end, step))


def fill(view: memoryview, block: bytes) -> None:
    """Fill *view* with copies of *block* (no temporary of the view's size)."""
    step = len(block)
    for pos in range(0, len(view), step):
        count = min(step, len(view) - pos)
        view[pos : pos + count] = block[:count]


def big_child(spec_text: str) -> int:
    """The child of the memory test: read the sparse image end to end, check it, print JSON.

    Every request's buffer is first poisoned where it will be checked (so that a read which leaves
    the buffer alone cannot pass): all of it for requests that overlap a written range (then every
    byte is checked: the pattern inside the written ranges, zeroes elsewhere) and, with ``sample``
    verification, the first and last 64 KiB of the others (checked to be zero); ``full`` checks
    every byte of every request. Only the ``disk.read`` calls are timed as read time.
    """
    spec = json.loads(spec_text)
    size, request, full = spec["size"], spec["buffer"], spec["verify"] == "full"
    writes = [tuple(w) for w in spec["writes"]]
    disk = imago.open(spec["path"], format="qcow2")
    before = peak_rss_kib()
    buf = bytearray(request)
    spot = 64 * KiB
    zeros = memoryview(bytes(MiB))
    poison = b"\xa5" * MiB
    errors: list[str] = []
    read_seconds = check_seconds = 0.0
    next_write = 0
    for off in range(0, size, request):
        end = min(off + request, size)
        view = memoryview(buf)[: end - off]
        while next_write < len(writes) and writes[next_write][0] + writes[next_write][1] <= off:
            next_write += 1
        mine = [w for w in writes[next_write:] if w[0] < end]
        started = time.perf_counter()
        spots = [] if full or mine else [(0, spot), (len(view) - spot, len(view))]
        if spots:
            for lo, hi in spots:
                view[lo:hi] = poison[: hi - lo]
        else:
            fill(view, poison)
        poisoned = time.perf_counter()
        disk.read(view, off)
        done = time.perf_counter()
        read_seconds += done - poisoned
        if spots:
            for lo, hi in spots:
                if not is_zero(buf, lo, hi, zeros):
                    errors.append(f"non-zero bytes in [{off + lo}, {off + hi})")
        else:
            pos = off
            for w_off, w_len, pattern in mine:
                lo, hi = max(w_off, off), min(w_off + w_len, end)
                if not is_zero(buf, pos - off, lo - off, zeros):
                    errors.append(f"non-zero bytes in [{pos}, {lo})")
                if buf.count(pattern, lo - off, hi - off) != hi - lo:
                    errors.append(f"write of {w_len} bytes at {w_off} (pattern {pattern:#04x}) reads wrong")
                pos = max(pos, hi)
            if not is_zero(buf, pos - off, end - off, zeros):
                errors.append(f"non-zero bytes in [{pos}, {end})")
        check_seconds += time.perf_counter() - done + poisoned - started
        if len(errors) > 20:
            errors.append("(stopped reading after 20 errors)")
            break
    disk.close()
    result = {
        "rss_before_kib": before,
        "rss_after_kib": peak_rss_kib(),
        "read_seconds": read_seconds,
        "check_seconds": check_seconds,
        "bytes": size,
        "errors": errors,
    }
    print(json.dumps(result))
    return 0


class Big:
    def __init__(self, config: Config, qemu: Qemu, tmp: str, failures: list[str]) -> None:
        self.config = config
        self.qemu = qemu
        self.tmp = tmp
        self.failures = failures
        self.result: dict[str, Any] | None = None

    def run(self) -> None:
        config = self.config
        path = os.path.join(self.tmp, "sparse.qcow2")
        writes = big_writes(config)
        lib.progress(
            f"creating a {fmt_bytes(config.big_size)} sparse qcow2 image with {len(writes)} scattered 1 MiB writes ..."
        )
        assert self.qemu.img is not None
        assert self.qemu.io is not None
        run_tool([self.qemu.img, "create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, str(config.big_size)])
        commands = [arg for off, length, p in writes for arg in ("-c", f"write -P {p} {off} {length}")]
        run_tool([self.qemu.io, "-f", "qcow2", *commands, path])
        lib.settle_and_cache(path)
        spec = {
            "path": path,
            "size": config.big_size,
            "buffer": config.big_buffer,
            "verify": config.big_verify,
            "writes": writes,
        }
        lib.progress(f"  reading it end to end in a child process ({fmt_bytes(config.big_buffer)} requests) ...")
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--big-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=24 * 3600,
            check=False,
        )
        wall = time.perf_counter() - started
        file_size = os.path.getsize(path)
        os.unlink(path)
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            tail = (out.stderr or out.stdout).strip().splitlines()
            self.failures.append(f"sparse read: child failed (exit {out.returncode}): {tail[-1] if tail else ''}")
            return
        result = json.loads(lines[-1])
        result["wall_seconds"] = wall
        result["file_size"] = file_size
        result["writes"] = len(writes)
        self.result = result
        for error in result["errors"]:
            self.failures.append(f"sparse read: {error}")


# --- report -----------------------------------------------------------------------------------------------------


def fmt_bytes(value: int) -> str:
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= scale and value % scale == 0:
            return f"{value // scale} {unit}"
    return f"{value} B"


ROWS = (
    Row("sync_1m_sequential", "qcow2 1M sequential QD1", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "bare"), 0.80),
    Row("sync_4k_random", "qcow2 4K random QD1", "IOPS", ("4k_random", "imago"), ("4k_random", "bare"), 0.40),
    Row("sync_4k_sequential", "qcow2 4K sequential QD1", "IOPS", ("4k_seq", "imago"), ("4k_seq", "bare"), None),
    Row("qemu_4k_sequential", "qcow2 4K seq vs qemu-img", "IOPS", ("4k_seq", "imago"), ("4k_seq", "qemu-img"), None),
    Row("qemu_1m_sequential", "qcow2 1M seq vs qemu-img", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "qemu-img"), None),
    Row("async_4k_random_qd16", "qcow2 async 4K random QD16", "IOPS", ("async", "imago"), ("async", "bare"), 0.30),
    Row(
        "async_4k_random_qd16_qemu",
        "qcow2 async 4K random QD16 vs qemu-img bench -d 16",
        "IOPS",
        ("async", "imago"),
        ("async", "qemu-img"),
        1.0,
    ),
    Row("async_1m_sequential", "qcow2 async 1M sequential", "MiB/s", ("async_1m", "imago"), ("async_1m", "bare"), 0.80),
    Row("zlib_parallel", "zlib all cores vs 1 thread", "MiB/s", ("zlib", "parallel"), ("zlib", "one-thread"), 1.5),
    Row("zstd_parallel", "zstd all cores vs 1 thread", "MiB/s", ("zstd", "parallel"), ("zstd", "one-thread"), 1.5),
    Row("zlib_qemu", "zlib vs qemu-img convert", "MiB/s", ("zlib", "parallel"), ("zlib", "qemu-img"), None),
    Row("zstd_qemu", "zstd vs qemu-img convert", "MiB/s", ("zstd", "parallel"), ("zstd", "qemu-img"), None),
)


def report(
    config: Config,
    qemu: Qemu,
    groups: dict[str, list[Runner]],
    allocated: Allocated | None,
    compressed: Compressed | None,
    big: Big | None,
    failures: list[str],
    elapsed: float,
    load: tuple[float, float] | None,
) -> dict[str, Any]:
    results = lib.group_results(groups, lambda group: "IOPS" if group.startswith("4k") or group == "async" else "MiB/s")
    ratios, lines = lib.ratio_rows(ROWS, groups, qemu=qemu.reference, overhead_column=False)

    memory: dict[str, Any] | None = None
    big_label = f"{fmt_bytes(config.big_size)} sparse read peak RSS"
    if big is not None and big.result is not None:
        res = big.result
        # VmHWM: ru_maxrss survives execve, so in a child it can show the parent's peak at fork time.
        peak = res["rss_after_kib"].get("VmHWM", res["rss_after_kib"]["ru_maxrss"]) / KiB
        before = res["rss_before_kib"].get("VmHWM", res["rss_before_kib"]["ru_maxrss"]) / KiB
        memory = {
            "peak_rss_mib": peak,
            "rss_after_open_mib": before,
            "target_mib": RSS_TARGET_MIB,
            "meets_target": peak < RSS_TARGET_MIB,
            **res,
        }
        lines.append(
            (
                big_label,
                f"{peak:,.1f} MiB",
                f"after open: {before:,.1f} MiB",
                "-",
                f"< {RSS_TARGET_MIB:.0f} MiB",
                "PASS" if peak < RSS_TARGET_MIB else "FAIL-above-target",
            )
        )
    else:
        lines.append((big_label, "-", "-", "-", f"< {RSS_TARGET_MIB:.0f} MiB", "skipped" if big is None else "n/a"))

    lib.print_table(
        f"imago qcow2 read benchmark: best of {config.repeat} interleaved runs, ratio = imago / reference"
        f" (higher is better); {os.cpu_count()} CPUs; async rows on the {config.loop} loop",
        lib.HEADER,
        lines,
    )
    if allocated is not None:
        extents = ", ".join(
            f"guest {fmt_bytes(e.guest)}+{fmt_bytes(e.length)} at host {e.host:#x}" for e in allocated.extents
        )
        print(f"allocated image: {fmt_bytes(config.size)}, 64 KiB clusters; host extents (get_mapping): {extents}")
        if allocated.residency is not None:
            print(f"  page cache: {allocated.residency[0]}/{allocated.residency[1]} sampled pages resident")
    if compressed is not None:
        print(
            f"compressed images: {fmt_bytes(config.compressed_size)} of text-like data, read in"
            f" {fmt_bytes(config.request)} requests; one-thread = imago.runtime.run_parallel replaced by a serial loop;"
            f" qemu-img convert -O raw to {compressed.raw_dir}, timed by its wall clock"
        )
        for compression, info in compressed.images.items():
            same = info["sha256_qemu_img"] == info["sha256_imago"] == info["sha256_source"]
            print(
                f"  {compression}: file {info['file_size'] / MiB:.1f} MiB ({info['compression_ratio']:.2f}x),"
                f" {100 * info['compressed_fraction']:.0f}% of the disk compressed clusters;"
                f" sha256 imago {'==' if same else '!='} qemu-img convert == source: {info['sha256_imago'][:16]}..."
            )
    if memory is not None:
        gib = memory["bytes"] / GiB
        print(
            f"sparse image: {fmt_bytes(config.big_size)} virtual, {memory['writes']} scattered 1 MiB writes,"
            f" read in {fmt_bytes(config.big_buffer)} requests in a child: reads {memory['read_seconds']:.1f} s"
            f" ({gib / memory['read_seconds']:.1f} GiB/s),"
            f" checks ({config.big_verify}) {memory['check_seconds']:.1f} s,"
            f" child wall clock {memory['wall_seconds']:.1f} s"
        )
    if compressed is not None:
        for note in sorted(compressed.notes):
            print(f"NOTE: {note}")
    if load is not None:
        busy = " (other processes compete for the CPUs: the all-cores figures suffer most)" if load[0] > 0.5 else ""
        print(f"load average (1 min) before the run: {load[0]:.2f}, after: {load[1]:.2f}{busy}")
    lib.print_qemu(
        qemu.note,
        qemu.version,
        "bench timed by its own 'Run completed in' figure (QD1, QD16 for the async row; -t writeback),"
        " convert by the wall clock of the process",
    )
    lib.print_verdict(failures, elapsed)

    return lib.summary(
        "imago-qcow2-read",
        config,
        qemu_version=qemu.version,
        qemu_note=qemu.note,
        residency=None if allocated is None else allocated.residency,
        failures=failures,
        results=results,
        ratios=ratios,
        elapsed=elapsed,
        allocated_extents=None
        if allocated is None
        else [{"guest": e.guest, "length": e.length, "host": e.host} for e in allocated.extents],
        compressed_images=None if compressed is None else compressed.images,
        memory=memory,
        notes=[] if compressed is None else sorted(compressed.notes),
        load_average_1min=None if load is None else {"before": load[0], "after": load[1]},
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--big-child"] and len(args) == 2:
        return big_child(args[1])
    config = parse_args(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    qemu = Qemu.find(config.qemu)
    if qemu.img is None or qemu.io is None:
        print("qemu-img and qemu-io are needed to create the images; not found on PATH", file=sys.stderr)
        return 2
    failures: list[str] = []
    groups: dict[str, list[Runner]] = {}
    allocated: Allocated | None = None
    compressed: Compressed | None = None
    big: Big | None = None
    with lib.temporary_directory(config.directory) as tmp:
        allocated = Allocated(config, qemu, tmp, failures)
        try:
            lib.warn_if_not_resident(allocated.residency)
            allocated.check_correctness()
            if not failures:
                allocated.run()
                groups.update(allocated.groups)
        finally:
            allocated.close()
        os.unlink(allocated.source)
        os.unlink(allocated.path)
        if not failures:
            compressed = Compressed(config, qemu, tmp, failures)
            try:
                compressed.run()
                groups.update(compressed.groups)
            finally:
                compressed.close()
        if not failures and not config.skip_big:
            big = Big(config, qemu, tmp, failures)
            big.run()
        if failures:
            lib.progress("correctness check FAILED: not measuring further")
    load = None if load_before is None else (load_before, os.getloadavg()[0])
    elapsed = time.perf_counter() - started
    return lib.print_summary(report(config, qemu, groups, allocated, compressed, big, failures, elapsed, load))


if __name__ == "__main__":
    sys.exit(main())
