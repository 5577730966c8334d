#!/usr/bin/env python3
"""Read throughput of a raw image on the file driver: imago vs bare ``os.preadv`` vs qemu-img.

One run measures, on the same page-cached image and the same precomputed offsets:

* ``sync 4K random``     - ``SyncFormatAccess.read`` vs a bare ``os.preadv`` loop (target >= 0.50)
* ``sync 1M sequential`` - ``SyncFormatAccess.read`` vs bare ``os.preadv``        (target >= 0.80)
* ``async 4K random QD16`` - ``FormatAccess.read`` in 16 asyncio tasks vs bare     (target >= 0.30)
  and vs ``qemu-img bench -d 16``                                                  (target >= 1.0)
* ``async 1M sequential`` - ``FormatAccess.read`` awaited in turn vs bare         (target >= 0.80)
* ``sync 4K sequential`` and qemu-img (``qemu-img bench``) reference figures.

The async rows run on asyncio's own event loop, or on uvloop with ``--loop uvloop``.

Every figure is the best of ``--repeat`` interleaved runs (the median is in the JSON line).
The last line of the output is one JSON object with every figure. Exit status 0, unless the
correctness check fails (1). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import imago
from imago import FormatAccess

# The shared machinery is the sibling module bench/_benchlib.py, found from any working directory.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as lib
from _benchlib import LARGE, SMALL, MiB, Row, Runner

# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config(lib.ReadConfig):
    depth: int

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "depth": self.depth}


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark imago's raw/file read path against bare os.preadv and qemu-img.",
    )
    lib.add_read_options(
        parser,
        size_help="image size (default 1G; --quick: 64M)",
        dir_help="directory for the temporary image (default: the system temp dir)",
        repeat_help="timed runs per measurement, best is reported (default 5)",
    )
    parser.add_argument("--depth", type=int, default=16, help="reads in flight in the async test (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the random offsets (default 1)")
    lib.add_final_options(
        parser,
        no_qemu_help="skip the qemu-img reference runs",
        quick_help="small image and few ops: a smoke run of seconds",
    )
    args = parser.parse_args(argv)
    config = Config(**lib.ReadConfig.values(args), depth=args.depth)
    config.check_counts(parser, ("ops", "ops_1m", "qemu_ops", "repeat", "depth"))
    return config


# --- the image ---------------------------------------------------------------------------------------


def create_image(path: str, size: int) -> None:
    """Write *size* random bytes, wait for writeback, then read it all once into the page cache."""
    lib.write_file(path, lib.random_chunks(size))
    # No writeback may run in the background while we measure.
    lib.settle_and_cache(path)


# --- qemu-img --------------------------------------------------------------------------------------------


@dataclass
class Qemu:
    binary: str | None
    version: str | None
    note: str | None = None

    @classmethod
    def find(cls, wanted: bool) -> Qemu:
        if not wanted:
            return cls(None, None, "qemu-img runs skipped (--no-qemu)")
        binary = shutil.which("qemu-img")
        if binary is None:
            return cls(None, None, "qemu-img not found on PATH: qemu-img reference figures skipped")
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            return cls(None, None, f"qemu-img --version failed ({error}): qemu-img reference figures skipped")
        return cls(binary, out.stdout.splitlines()[0] if out.stdout else "unknown")

    def bench(self, path: str, count: int, size: int, depth: int) -> tuple[float, float] | None:
        """qemu-img's own "Run completed in" seconds and the wall clock of the whole process.

        None (with a note) on failure.
        """
        if self.binary is None:
            return None
        try:
            return lib.run_qemu_bench(lib.qemu_bench_command(self.binary, "raw", path, count, size, depth))
        except lib.QemuError as error:
            self.disable(str(error))
            return None

    def disable(self, note: str) -> None:
        self.binary = None
        self.note = lib.skipped_note(note)


# --- the benchmark -------------------------------------------------------------------------------------------


ROWS = (
    Row("sync_4k_random", "sync 4K random QD1", "IOPS", ("4k_random", "imago"), ("4k_random", "bare"), 0.50),
    Row("sync_1m_sequential", "sync 1M sequential QD1", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "bare"), 0.80),
    Row("async_4k_random_qd16", "async 4K random QD16", "IOPS", ("async", "imago"), ("async", "bare"), 0.30),
    Row(
        "async_4k_random_qd16_qemu",
        "async 4K random QD16 vs qemu-img bench -d 16",
        "IOPS",
        ("async", "imago"),
        ("async", "qemu-img"),
        1.0,
    ),
    Row("async_1m_sequential", "async 1M sequential", "MiB/s", ("async_1m", "imago"), ("async_1m", "bare"), 0.80),
    Row("sync_4k_sequential", "sync 4K sequential QD1", "IOPS", ("4k_seq", "imago"), ("4k_seq", "bare"), None),
    Row("qemu_4k_sequential", "sync 4K seq vs qemu-img", "IOPS", ("4k_seq", "imago"), ("4k_seq", "qemu-img"), None),
    Row("qemu_1m_sequential", "sync 1M seq vs qemu-img", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "qemu-img"), None),
)
#: Groups measured in MiB/s (the others in IOPS).
MIB_GROUPS = ("1m_seq", "async_1m")


class Benchmark:
    def __init__(self, config: Config, path: str) -> None:
        self.config = config
        self.path = path
        self.size = config.size
        self.random_4k, self.seq_4k, self.seq_1m = lib.read_offsets(config.size, config.ops, config.ops_1m, config.seed)
        self.warm_count = lib.warm_count(config.ops)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.disk = imago.open(path, format="raw")
        self.runner = lib.event_loop_runner(config.loop)
        self.access: FormatAccess = self.runner.run(imago.open_async(path, format="raw"))
        self.qemu = Qemu.find(config.qemu)
        self.failures: list[str] = []
        self.groups: dict[str, list[Runner]] = {}

    def close(self) -> None:
        self.runner.run(self.access.close())
        self.runner.close()
        self.disk.close()
        os.close(self.fd)

    # correctness ---------------------------------------------------------------------------------------

    def check_correctness(self) -> bool:
        """imago (sync, twice: engine and fast path; and async) must read what ``os.preadv`` reads."""
        cases = lib.read_cases(self.size, random.Random(self.config.seed + 1), small=16, large=4)
        zero_blocks = 0
        for offset, length in cases:
            expected = lib.pread_exact(self.fd, length, offset)
            if expected.count(0) == length:
                zero_blocks += 1
            for attempt in ("sync", "sync again", "async"):
                buf = bytearray(length)
                if attempt == "async":
                    self.runner.run(self.access.read(buf, offset))
                else:
                    self.disk.read(buf, offset)
                if buf != expected:
                    self.failures.append(f"{attempt} imago read of {length} bytes at {offset} differs from os.preadv")
        if zero_blocks == len(cases):
            self.failures.append("every sampled block reads as zero: the image was not filled")
        return not self.failures

    def check_last(self, what: str, buf: bytearray, offset: int) -> None:
        """After a timed run, the buffer must hold the data at the run's last offset."""
        lib.check_last(self.failures, what, buf, self.fd, offset)

    # runners ----------------------------------------------------------------------------------------------

    def bare(self, offsets: list[int], block: int) -> Runner:
        return lib.bare_runner(self.fd, offsets, block, self.warm_count)

    def imago_sync(self, name: str, offsets: list[int], block: int) -> Runner:
        return lib.imago_sync_runner(
            self.disk, offsets, block, self.warm_count, lambda buf, offset: self.check_last(name, buf, offset)
        )

    def imago_async(self, name: str, offsets: list[int], block: int, depth: int) -> Runner:
        return lib.imago_async_runner(
            self.runner,
            self.access,
            offsets,
            block,
            depth,
            self.warm_count,
            lambda buf, offset: self.check_last(name, buf, offset),
        )

    def qemu_img(self, count: int, block: int, depth: int) -> Runner:
        return lib.qemu_bench_runner(count, block, lambda n: self.qemu.bench(self.path, n, block, depth))

    # all of it --------------------------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        qemu = self.qemu.binary is not None
        plan: dict[str, list[Runner]] = {
            "4k_random": [self.bare(self.random_4k, SMALL), self.imago_sync("sync 4K random", self.random_4k, SMALL)],
            "1m_seq": [self.bare(self.seq_1m, LARGE), self.imago_sync("sync 1M sequential", self.seq_1m, LARGE)],
            "async": [
                self.bare(self.random_4k, SMALL),
                self.imago_async("async 4K random", self.random_4k, SMALL, config.depth),
            ],
            "async_1m": [
                self.bare(self.seq_1m, LARGE),
                self.imago_async("async 1M sequential", self.seq_1m, LARGE, 1),
            ],
            "4k_seq": [self.bare(self.seq_4k, SMALL), self.imago_sync("sync 4K sequential", self.seq_4k, SMALL)],
        }
        if qemu:
            plan["1m_seq"].append(self.qemu_img(config.ops_1m, LARGE, 1))
            plan["async"].append(self.qemu_img(config.qemu_ops, SMALL, config.depth))
            plan["4k_seq"].append(self.qemu_img(config.qemu_ops, SMALL, 1))
        lib.measure_plan(plan, config.repeat, self.groups)


# --- report -----------------------------------------------------------------------------------------------------


def report(bench: Benchmark, residency: tuple[int, int] | None, elapsed: float) -> dict[str, Any]:
    config = bench.config
    results = lib.group_results(bench.groups, lambda group: "MiB/s" if group in MIB_GROUPS else "IOPS")
    ratios, lines = lib.ratio_rows(ROWS, bench.groups, qemu=bench.qemu.binary is not None, overhead_column=True)
    lib.print_table(
        f"imago raw/file read benchmark: image {config.size // MiB} MiB, best of {config.repeat} interleaved runs,"
        f" ratio = imago / reference (higher is better); async rows on the {config.loop} loop",
        (*lib.HEADER, "overhead/op"),
        lines,
    )
    if residency is not None:
        print(f"page cache: {residency[0]}/{residency[1]} sampled pages resident before measuring")
    lib.print_qemu(
        bench.qemu.note,
        bench.qemu.version,
        "timed by its own 'Run completed in' figure (process start-up and image open excluded, nothing subtracted)",
    )
    print(
        "qemu-img bench has no random pattern: its rows compare imago's sequential sync figures (QD1) and"
        " imago's random async figure (QD16) with qemu-img's sequential runs."
    )
    lib.print_verdict(bench.failures, elapsed)
    return lib.summary(
        "imago-raw-file-read",
        config,
        qemu_version=bench.qemu.version,
        qemu_note=bench.qemu.note,
        residency=residency,
        failures=bench.failures,
        results=results,
        ratios=ratios,
        elapsed=elapsed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    with lib.temporary_directory(config.directory) as tmp:
        path = os.path.join(tmp, "bench.raw")
        lib.progress(f"creating {config.size // MiB} MiB raw image of random data in {tmp} ...")
        create_image(path, config.size)
        bench = Benchmark(config, path)
        try:
            residency = lib.cache_residency(path, 1024, random.Random(config.seed + 2))
            lib.warn_if_not_resident(residency)
            if bench.check_correctness():
                bench.run()
            else:
                print("correctness check FAILED: not measuring", file=sys.stderr)
        finally:
            bench.close()
    return lib.print_summary(report(bench, residency, time.perf_counter() - started))


if __name__ == "__main__":
    sys.exit(main())
