#!/usr/bin/env python3
"""Writes of new qcow2 images through imago, against ``qemu-img convert`` of the same data.

One run measures, each time the whole job (creating, writing, closing) by the wall clock:

* a sequential copy of ``--size`` bytes of random (incompressible) data, read from a page-cached
  raw file with ``os.preadv`` into one reused buffer and written in ``--request-size`` requests
  through ``SyncFormatAccess.write`` into a new image (``imago.create``, ``imago.open(...,
  write=True, no_flush=True)`` and the final ``close`` included), against ``qemu-img convert -f
  raw -O qcow2`` of the same file (target: imago time / qemu-img time <= 1.25). qemu-img writes
  its target with ``cache=unsafe`` (no flushes) by default; ``no_flush=True`` is imago's same
  mode. For information, imago with flushes (``no_flush=False``, the default of ``imago.open``)
  against ``qemu-img convert -t writeback``, which flushes too;
* a compressed copy of ``--compressed-size`` bytes of text-like data through
  ``SyncFormatAccess.write_compressed`` in ``--compressed-request`` requests (the driver
  compresses the clusters of a request on all cores), against ``qemu-img convert -c -O qcow2 -o
  compression_type=zlib`` (target <= 0.70); for information the same with ``-W`` (out-of-order
  writes, which let qemu-img compress on several threads), and zstd against qemu-img.

Ratio = imago time / qemu-img time: lower is better. Every output is verified once (imago's
read-back against the source, ``qemu-img compare`` against qemu-img's output, ``qemu-img
check``). The last line of the output is one JSON object with every figure. Exit status 0
unless a correctness check fails (1). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import imago

# The shared machinery is the sibling module bench/_benchlib.py, found from any working directory.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as lib
from _benchlib import GiB, KiB, MiB, Runner, parse_size

# The text-like data of bench_qcow2.py's compressed images (about 3.5x per 64 KiB cluster).
from bench_qcow2 import CLUSTER, text_chunks

SEQUENTIAL_TARGET = 1.25
ZLIB_TARGET = 0.70
CHECK_CHUNK = 16 * MiB


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    size: int
    request: int
    compressed_size: int
    compressed_request: int
    repeat: int
    seed: int
    directory: str | None
    qemu: bool
    sync: bool
    quick: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "request_size": self.request,
            "compressed_size": self.compressed_size,
            "compressed_request_size": self.compressed_request,
            "cluster_size": CLUSTER,
            "repeat": self.repeat,
            "seed": self.seed,
            "sync_before_runs": self.sync,
            "quick": self.quick,
            "statistic": "best",
            "cpus": os.cpu_count(),
        }


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark imago's qcow2 write paths (sequential, compressed) against qemu-img convert.",
    )
    parser.add_argument("--size", type=parse_size, help="data of the sequential copy (default 1G; --quick: 64M)")
    parser.add_argument("--request-size", type=parse_size, help="request size of the sequential copy (default 1M)")
    parser.add_argument(
        "--compressed-size", type=parse_size, help="data of the compressed copies (default 256M; --quick: 16M)"
    )
    parser.add_argument(
        "--compressed-request",
        type=parse_size,
        help="request size of the compressed copies, whole clusters (default 16M; --quick: 4M)",
    )
    parser.add_argument("--repeat", type=int, help="timed runs per contender, best is reported (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated text (default 1)")
    parser.add_argument("--dir", help="directory for the temporary files (default: the system temp dir)")
    parser.add_argument("--no-sync", action="store_true", help="do not call os.sync() (untimed) before each timed run")
    lib.add_final_options(
        parser,
        no_qemu_help="skip the qemu-img reference runs (qemu-img check still verifies imago's images)",
        quick_help="small sizes: a smoke run of seconds",
    )
    args = parser.parse_args(argv)

    pick = lib.picker(args)
    config = Config(
        size=pick(args.size, GiB, 64 * MiB),
        request=pick(args.request_size, MiB, MiB),
        compressed_size=pick(args.compressed_size, 256 * MiB, 16 * MiB),
        compressed_request=pick(args.compressed_request, 16 * MiB, 4 * MiB),
        repeat=pick(args.repeat, 3, 3),
        seed=args.seed,
        directory=args.dir,
        qemu=not args.no_qemu,
        sync=not args.no_sync,
        quick=args.quick,
    )
    if config.repeat < 1:
        parser.error("--repeat must be at least 1")
    return config


# --- qemu-img --------------------------------------------------------------------------------------


@dataclass
class Qemu:
    """qemu-img for the reference runs (unless disabled) and for checking imago's images."""

    img: str | None
    version: str | None
    reference: bool
    note: str | None = None

    @classmethod
    def find(cls, reference: bool) -> Qemu:
        img = shutil.which("qemu-img")
        version = None
        note = None if reference else "qemu-img reference runs skipped (--no-qemu)"
        if img is None:
            note = "qemu-img not found on PATH: no reference figures, no qemu-img compare/check"
        else:
            version = lib.qemu_version(img)
        return cls(img, version, reference and img is not None, note)

    def convert(self, args: Sequence[str], source: str, target: str) -> float | None:
        """Wall clock of ``qemu-img convert ARGS SOURCE TARGET`` (process start-up included)."""
        if not self.reference or self.img is None:
            return None
        try:
            return lib.run_qemu_convert(self.img, [*args, source, target])
        except lib.QemuError as error:
            self.disable(str(error))
            return None

    def disable(self, note: str) -> None:
        self.reference = False
        self.note = lib.skipped_note(note)

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.img is not None
        return subprocess.run([self.img, *args], capture_output=True, text=True, timeout=3600, check=False)


# --- the imago side ------------------------------------------------------------------------------


def imago_copy(
    source_fd: int, path: str, size: int, buf: bytearray, compression: str | None, *, no_flush: bool
) -> float:
    """Copy the raw source into a new qcow2 image at *path*; the seconds of the whole job.

    ``imago.create``, ``imago.open(write=True, no_flush=...)``, the ``os.preadv`` + ``write``
    (or ``write_compressed``) loop with one reused buffer, and ``close`` are timed.
    """
    preadv = os.preadv
    request = len(buf)
    view = memoryview(buf)
    options = {} if compression is None else {"compression_type": compression}
    start = time.perf_counter()
    imago.create(path, "qcow2", size, **options)
    disk = imago.open(path, "qcow2", write=True, no_flush=no_flush)
    try:
        write = disk.write if compression is None else disk.write_compressed
        for off in range(0, size, request):
            chunk = view if off + request <= size else view[: size - off]
            if preadv(source_fd, [chunk], off) != len(chunk):
                raise OSError(f"short read from the source at {off}")
            write(chunk, off)
    finally:
        disk.close()
    return time.perf_counter() - start


def imago_sha256(path: str, size: int) -> str:
    """SHA-256 of the guest data of the image at *path*, read back through imago."""
    digest = hashlib.sha256()
    buf = bytearray(CHECK_CHUNK)
    with imago.open(path, "qcow2") as disk:
        if disk.size != size:
            return f"(disk size {disk.size}, expected {size})"
        for off in range(0, size, len(buf)):
            view = memoryview(buf)[: min(len(buf), size - off)]
            disk.read(view, off)
            digest.update(view)
    return digest.hexdigest()


# --- one part: a source file, imago and qemu-img writing it ------------------------------------------


@dataclass
class Part:
    """One group of the table: copying one raw source into a new image, by imago and by qemu-img."""

    group: str
    what: str
    compression: str | None  # None: plain writes
    source: str
    sha256: str
    size: int
    request: int
    #: qemu-img contenders: runner name and the ``qemu-img convert`` options.
    qemu_variants: list[tuple[str, list[str]]]
    #: imago contenders: runner name and ``no_flush`` (the first is verified).
    imago_variants: list[tuple[str, bool]] = field(default_factory=lambda: [("imago", True)])
    info: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, config: Config, qemu: Qemu, tmp: str, failures: list[str]) -> None:
        self.config = config
        self.qemu = qemu
        self.tmp = tmp
        self.failures = failures
        self.groups: dict[str, list[Runner]] = {}
        self.parts: list[Part] = []
        self.residency: dict[str, tuple[int, int] | None] = {}

    def out(self, part: Part, who: str) -> str:
        return os.path.join(self.tmp, f"{part.group}-{who.replace(' ', '')}.qcow2")

    def source(self, name: str, chunks: Iterable[bytes]) -> tuple[str, str]:
        """Write a raw source file, fsync it and read it into the page cache; its path and SHA-256."""
        path = os.path.join(self.tmp, name)
        digest = hashlib.sha256()
        lib.write_file(path, chunks, digest.update)
        lib.settle_and_cache(path)
        residency = lib.cache_residency(path, 1024, random.Random(self.config.seed + 2))
        lib.warn_if_not_resident(residency)
        self.residency[name] = residency
        return path, digest.hexdigest()

    def before_run(self, *paths: str) -> None:
        """No outputs left, and (unless --no-sync) no dirty pages: every run starts alike."""
        for path in paths:
            lib.remove_file(path)
        if self.config.sync:
            os.sync()

    # --- correctness, once per part, on a first (untimed) run of each side

    def verify(self, part: Part) -> None:
        mine, theirs = self.out(part, "imago"), self.out(part, "qemu-img")
        fd = os.open(part.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.before_run(mine, theirs)
            lib.progress(f"  verifying {part.group}: a first run of each side ...")
            buf = bytearray(part.request)
            no_flush = part.imago_variants[0][1]
            part.info["first_run_seconds_imago"] = imago_copy(
                fd, mine, part.size, buf, part.compression, no_flush=no_flush
            )
        finally:
            os.close(fd)
        info = part.info
        info["file_size_imago"] = os.path.getsize(mine)
        qemu_args = part.qemu_variants[0][1] if part.qemu_variants else []
        qemu_wall = self.qemu.convert(qemu_args, part.source, theirs)
        info["first_run_seconds_qemu_img"] = qemu_wall
        info["file_size_qemu_img"] = os.path.getsize(theirs) if qemu_wall is not None else None

        read_back = imago_sha256(mine, part.size)
        info["sha256_source"] = part.sha256
        info["sha256_imago_read_back"] = read_back
        if read_back != part.sha256:
            self.failures.append(f"{part.group}: imago's image reads back {read_back}, the source is {part.sha256}")
        info["qemu_img_compare"] = None
        info["qemu_img_check"] = None
        if self.qemu.img is not None:
            self.check_image(part, mine)
            if qemu_wall is not None:
                out = self.qemu.tool("compare", "-f", "qcow2", "-F", "qcow2", mine, theirs)
                info["qemu_img_compare"] = lib.last_line(out, "no output")
                if out.returncode != 0:
                    self.failures.append(
                        f"{part.group}: qemu-img compare of imago's and qemu-img's images: exit {out.returncode}"
                        f" ({lib.last_line(out, 'no output')})"
                    )
        lib.remove_file(mine)
        lib.remove_file(theirs)

    def check_image(self, part: Part, path: str) -> None:
        out = self.qemu.tool("check", "--output=json", "-f", "qcow2", path)
        try:
            check = json.loads(out.stdout)
        except json.JSONDecodeError:
            check = {}
        part.info["qemu_img_check"] = check
        problems = {key: check.get(key, 0) for key in ("check-errors", "corruptions", "leaks")}
        if out.returncode != 0 or not check or any(problems.values()):
            self.failures.append(
                f"{part.group}: qemu-img check of imago's image: exit {out.returncode}, {problems}"
                f" ({lib.last_line(out, 'no output')})"
            )
        if part.compression is not None and not check.get("compressed-clusters"):
            self.failures.append(f"{part.group}: imago's image has no compressed cluster")

    # --- the timed runs

    def imago_runner(self, part: Part, name: str, no_flush: bool) -> Runner:
        buf = bytearray(part.request)
        path = self.out(part, name)
        expected = part.info["file_size_imago"]

        def run(warm: bool) -> float | None:
            if warm:  # the verification run was the warm-up
                return None
            self.before_run(path)
            fd = os.open(part.source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                seconds = imago_copy(fd, path, part.size, buf, part.compression, no_flush=no_flush)
            finally:
                os.close(fd)
            actual = os.path.getsize(path)
            # ISA-L's deflate is not byte-for-byte repeatable (seen in CI: the same data, another
            # few bytes per cluster), so compressed images may differ a little; plain ones must not.
            slack = 0 if part.compression is None else expected // 50
            if abs(actual - expected) > slack:
                self.failures.append(
                    f"{part.group}: a timed run's image is {actual} bytes, the verified one {expected}"
                )
            lib.remove_file(path)
            return seconds

        return Runner(name, -(-part.size // part.request), part.request, run)

    def qemu_runner(self, part: Part, name: str, args: list[str]) -> Runner:
        path = self.out(part, name)

        def run(warm: bool) -> float | None:
            if warm:
                return None
            self.before_run(path)
            seconds = self.qemu.convert(args, part.source, path)
            lib.remove_file(path)
            return seconds

        # One "request" of the whole data: the rate is the size over the process's wall clock.
        return Runner(name, 1, part.size, run)

    def run_part(self, part: Part) -> None:
        self.parts.append(part)
        self.verify(part)
        if self.failures:
            return
        runners = [self.imago_runner(part, name, no_flush) for name, no_flush in part.imago_variants]
        if self.qemu.reference:
            runners += [self.qemu_runner(part, name, args) for name, args in part.qemu_variants]
        lib.measure(f"{part.group} ({part.what})", runners, self.config.repeat)
        self.groups[part.group] = runners

    def run(self) -> None:
        config = self.config
        lib.progress(f"writing {fmt_bytes(config.size)} of random data to a raw file ...")
        source, sha = self.source("random.raw", lib.random_chunks(config.size))
        plain = ["-f", "raw", "-O", "qcow2"]
        self.run_part(
            Part(
                "sequential",
                f"{fmt_bytes(config.request)} writes",
                None,
                source,
                sha,
                config.size,
                config.request,
                [("qemu-img", plain), ("qemu-img -t writeback", [*plain, "-t", "writeback"])],
                [("imago", True), ("imago flushing", False)],
            )
        )
        lib.remove_file(source)
        if self.failures:
            return
        lib.progress(f"writing {fmt_bytes(config.compressed_size)} of text-like data to a raw file ...")
        source, sha = self.source("text.raw", text_chunks(config.compressed_size, config.seed))
        for compression in ("zlib", "zstd"):
            convert = [*plain, "-c", "-o", f"compression_type={compression}"]
            variants = [("qemu-img", convert)]
            if compression == "zlib":
                variants.append(("qemu-img -W", [*convert, "-W"]))
            self.run_part(
                Part(
                    compression,
                    f"{fmt_bytes(config.compressed_request)} compressed writes",
                    compression,
                    source,
                    sha,
                    config.compressed_size,
                    config.compressed_request,
                    variants,
                )
            )
            if self.failures:
                break
        lib.remove_file(source)


# --- report ------------------------------------------------------------------------------------------


def fmt_bytes(value: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= scale and value % scale == 0:
            return f"{value // scale} {unit}"
    return f"{value} B"


@dataclass(frozen=True)
class TimeRow:
    """A table row: imago's best time in *group* over the *reference* runner's (lower is better)."""

    key: str
    label: str
    group: str
    reference: str
    target: float | None  # an upper bound
    imago: str = "imago"  # imago's runner


ROWS = (
    TimeRow("sequential_write", "sequential write vs qemu-img convert", "sequential", "qemu-img", SEQUENTIAL_TARGET),
    TimeRow(
        "sequential_writeback",
        "flushing write vs -t writeback",
        "sequential",
        "qemu-img -t writeback",
        None,
        "imago flushing",
    ),
    TimeRow("zlib_compressed_write", "zlib compressed vs convert -c", "zlib", "qemu-img", ZLIB_TARGET),
    TimeRow("zlib_compressed_write_w", "zlib compressed vs convert -c -W", "zlib", "qemu-img -W", None),
    TimeRow("zstd_compressed_write", "zstd compressed vs convert -c", "zstd", "qemu-img", None),
)


def find_runner(groups: dict[str, list[Runner]], where: tuple[str, str]) -> Runner | None:
    group, name = where
    for runner in groups.get(group, []):
        if runner.name == name and runner.seconds:
            return runner
    return None


def fmt_time(runner: Runner) -> str:
    best = min(runner.seconds)
    return f"{best:.3f} s ({runner.ops * runner.block / MiB / best:,.0f} MiB/s)"


def time_rows(groups: dict[str, list[Runner]], *, qemu: bool) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The ``ratios`` of the JSON line and the table lines (rows missing a side: ``n/a`` or left out)."""
    ratios: dict[str, Any] = {}
    lines: list[tuple[str, ...]] = []
    for row in ROWS:
        mine, theirs = find_runner(groups, (row.group, row.imago)), find_runner(groups, (row.group, row.reference))
        ref_name = row.reference
        target = "-" if row.target is None else f"<= {row.target:.2f}"
        if mine is None or theirs is None:
            ratios[row.key] = None
            if row.target is not None or qemu:
                lines.append((row.label, "-" if mine is None else fmt_time(mine), f"{ref_name}: -", "-", target, "n/a"))
            continue
        ratio = min(mine.seconds) / min(theirs.seconds)
        meets = None if row.target is None else ratio <= row.target
        ratios[row.key] = {
            "ratio": ratio,
            "median_ratio": statistics.median(mine.seconds) / statistics.median(theirs.seconds),
            "target": row.target,
            "target_is_upper_bound": True,
            "meets_target": meets,
            "imago_seconds": min(mine.seconds),
            "reference_seconds": min(theirs.seconds),
            "imago": mine.ops * mine.block / MiB / min(mine.seconds),
            "reference": theirs.ops * theirs.block / MiB / min(theirs.seconds),
            "reference_name": ref_name,
            "unit": "MiB/s",
        }
        result = "(reference)" if meets is None else ("PASS" if meets else "FAIL-above-target")
        lines.append((row.label, fmt_time(mine), f"{ref_name}: {fmt_time(theirs)}", f"{ratio:.3f}", target, result))
    return ratios, lines


def results_json(groups: dict[str, list[Runner]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for group, runners in groups.items():
        results[group] = {}
        for runner in runners:
            figure = runner.figure("MiB/s")
            if figure is not None:
                figure["seconds"] = runner.seconds
                figure["best_seconds"] = min(runner.seconds)
                figure["median_seconds"] = statistics.median(runner.seconds)
            results[group][runner.name] = figure
    return results


def report(
    config: Config,
    qemu: Qemu,
    bench: Bench,
    failures: list[str],
    elapsed: float,
    load: tuple[float | None, float | None],
) -> dict[str, Any]:
    ratios, lines = time_rows(bench.groups, qemu=qemu.reference)
    lib.print_table(
        f"imago qcow2 write benchmark: best of {config.repeat} interleaved runs, ratio = imago time / qemu-img time"
        f" (lower is better); {os.cpu_count()} CPUs",
        lib.HEADER,
        lines,
    )
    images: dict[str, Any] = {}
    for part in bench.parts:
        info = part.info
        images[part.group] = info
        if part.compression is None:
            print(
                f"sequential: {fmt_bytes(part.size)} of random data copied from a page-cached raw file in"
                f" {fmt_bytes(part.request)} requests"
            )
        else:
            print(
                f"{part.group}: {fmt_bytes(part.size)} of text-like data compressed in"
                f" {fmt_bytes(part.request)} requests"
            )
        sizes = f"file: imago {info['file_size_imago'] / MiB:.1f} MiB"
        if info.get("file_size_qemu_img") is not None:
            sizes += f", qemu-img {info['file_size_qemu_img'] / MiB:.1f} MiB"
        if part.compression is not None:
            sizes += f" (imago {part.size / info['file_size_imago']:.2f}x"
            if info.get("file_size_qemu_img"):
                sizes += f", qemu-img {part.size / info['file_size_qemu_img']:.2f}x"
            sizes += ")"
        check = info.get("qemu_img_check") or {}
        verdict = [
            "imago read-back == source" if info.get("sha256_imago_read_back") == part.sha256 else "read-back DIFFERS",
        ]
        if info.get("qemu_img_compare") is not None:
            verdict.append(f"qemu-img compare: {info['qemu_img_compare'].rstrip('.')}")
        if check:
            clean = not any(check.get(k, 0) for k in ("check-errors", "corruptions", "leaks"))
            verdict.append(f"qemu-img check: {'clean' if clean else 'PROBLEMS'}")
            if part.compression is not None and check.get("allocated-clusters"):
                share = check.get("compressed-clusters", 0) / check["allocated-clusters"]
                verdict.append(f"{100 * share:.0f}% compressed clusters")
        print(f"  {sizes}; {'; '.join(verdict)}")
    print(
        "imago = imago.create + imago.open(write=True, no_flush=True) + os.preadv/write loop + close;"
        " imago flushing = the same with no_flush=False (fdatasync at flushes and close);"
        " qemu-img = wall clock of `qemu-img convert` (default cache=unsafe: no flush; -t writeback flushes;"
        " -c writes in order unless -W)"
    )
    if config.sync:
        print("before every timed run: outputs deleted, os.sync() (untimed)")
    for name, residency in bench.residency.items():
        if residency is not None:
            print(f"page cache: {name}: {residency[0]}/{residency[1]} sampled pages resident")
    before, after = load
    if before is not None and after is not None:
        busy = " (other processes compete for the CPUs)" if max(before, after) > 0.5 else ""
        print(f"load average (1 min) before the run: {before:.2f}, after: {after:.2f}{busy}")
    lib.print_qemu(qemu.note, qemu.version, "timed by the wall clock of the process")
    lib.print_verdict(failures, elapsed)
    random_residency = bench.residency.get("random.raw")
    return lib.summary(
        "imago-qcow2-write",
        config,
        qemu_version=qemu.version,
        qemu_note=qemu.note,
        residency=random_residency,
        failures=failures,
        results=results_json(bench.groups),
        ratios=ratios,
        elapsed=elapsed,
        images=images,
        load_average_1min={"before": load[0], "after": load[1]},
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    load_before = lib.load_average()
    qemu = Qemu.find(config.qemu)
    failures: list[str] = []
    with lib.temporary_directory(config.directory) as tmp:
        bench = Bench(config, qemu, tmp, failures)
        bench.run()
        if failures:
            lib.progress("correctness check FAILED: not measuring further")
    elapsed = time.perf_counter() - started
    load = (load_before, lib.load_average())
    return lib.print_summary(report(config, qemu, bench, failures, elapsed, load))


if __name__ == "__main__":
    sys.exit(main())
