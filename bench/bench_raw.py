#!/usr/bin/env python3
"""Read throughput of a raw image on the file driver: imago vs bare ``os.preadv`` vs qemu-img.

One run measures, on the same page-cached image and the same precomputed offsets:

* ``sync 4K random``     - ``SyncFormatAccess.read`` vs a bare ``os.preadv`` loop (target >= 0.50)
* ``sync 1M sequential`` - ``SyncFormatAccess.read`` vs bare ``os.preadv``        (target >= 0.80)
* ``async 4K random QD16`` - ``FormatAccess.read`` in 16 asyncio tasks vs bare     (target >= 0.30)
* ``sync 4K sequential`` and qemu-img (``qemu-img bench``) reference figures.

Every figure is the best of ``--repeat`` interleaved runs (the median is in the JSON line).
The last line of the output is one JSON object with every figure. Exit status 0, unless the
correctness check fails (1). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import imago
from imago import FormatAccess, SyncFormatAccess

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SMALL = 4 * KiB
LARGE = 1 * MiB

_QEMU_TIME = re.compile(r"Run completed in ([0-9.]+) seconds")


# --- options ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``65536``, ``2GiB``... as bytes; a positive multiple of 1 MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    value = int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))
    if value <= 0 or value % MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB, got {value}")
    return value


@dataclass(frozen=True)
class Config:
    size: int
    ops: int
    ops_1m: int
    qemu_ops: int
    repeat: int
    depth: int
    seed: int
    directory: str | None
    qemu: bool
    quick: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "ops_4k": self.ops,
            "ops_1m": self.ops_1m,
            "qemu_ops_4k": self.qemu_ops,
            "repeat": self.repeat,
            "depth": self.depth,
            "seed": self.seed,
            "quick": self.quick,
            "statistic": "best",
        }


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark imago's raw/file read path against bare os.preadv and qemu-img.",
    )
    parser.add_argument("--size", type=parse_size, help="image size (default 1G; --quick: 64M)")
    parser.add_argument("--dir", help="directory for the temporary image (default: the system temp dir)")
    parser.add_argument("--ops", type=int, help="4 KiB reads per run (default 200000; --quick: 20000)")
    parser.add_argument("--ops-1m", type=int, help="1 MiB reads per run (default 2000; --quick: 200)")
    parser.add_argument("--qemu-ops", type=int, help="4 KiB requests per qemu-img run (default 50000; --quick: 5000)")
    parser.add_argument("--repeat", type=int, help="timed runs per measurement, best is reported (default 5)")
    parser.add_argument("--depth", type=int, default=16, help="reads in flight in the async test (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the random offsets (default 1)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the qemu-img reference runs")
    parser.add_argument("--quick", action="store_true", help="small image and few ops: a smoke run of seconds")
    args = parser.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    config = Config(
        size=pick(args.size, GiB, 64 * MiB),
        ops=pick(args.ops, 200_000, 20_000),
        ops_1m=pick(args.ops_1m, 2_000, 200),
        qemu_ops=pick(args.qemu_ops, 50_000, 5_000),
        repeat=pick(args.repeat, 5, 3),
        depth=args.depth,
        seed=args.seed,
        directory=args.dir,
        qemu=not args.no_qemu,
        quick=args.quick,
    )
    for name in ("ops", "ops_1m", "qemu_ops", "repeat", "depth"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return config


# --- the image ---------------------------------------------------------------------------------------


def create_image(path: str, size: int) -> None:
    """Write *size* random bytes, wait for writeback, then read it all once into the page cache."""
    chunk = 16 * MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pos = 0
        while pos < size:
            step = min(chunk, size - pos)
            data = os.urandom(step)
            done = 0
            while done < step:
                done += os.pwrite(fd, memoryview(data)[done:], pos + done)
            pos += step
        # No writeback may run in the background while we measure.
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(chunk)
        pos = 0
        while pos < size:
            count = os.preadv(fd, [buf], pos)
            if count <= 0:
                raise OSError(f"{path}: short read at {pos} while warming the page cache")
            pos += count
    finally:
        os.close(fd)


def cache_residency(fd: int, size: int, samples: int, rng: random.Random) -> tuple[int, int] | None:
    """How many of *samples* random pages are in the page cache (``RWF_NOWAIT`` probes)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    buf = bytearray(SMALL)
    resident = 0
    for _ in range(samples):
        try:
            if os.preadv(fd, [buf], rng.randrange(size // SMALL) * SMALL, flag) == SMALL:
                resident += 1
        except BlockingIOError:
            pass
        except OSError:
            return None
    return resident, samples


# --- timed loops ---------------------------------------------------------------------------------------
#
# Each returns the seconds the loop itself took (time.perf_counter), nothing else.


def bare_loop(fd: int, buf: bytearray, offsets: Sequence[int]) -> float:
    """The baseline: ``os.preadv(fd, [buf], off)`` over the offsets, one buffer reused."""
    preadv = os.preadv
    start = time.perf_counter()
    for off in offsets:
        preadv(fd, [buf], off)
    return time.perf_counter() - start


def imago_sync_loop(disk: SyncFormatAccess, buf: bytearray, offsets: Sequence[int]) -> float:
    """``SyncFormatAccess.read(buf, off)`` over the offsets, one buffer reused."""
    read = disk.read
    start = time.perf_counter()
    for off in offsets:
        read(buf, off)
    return time.perf_counter() - start


async def imago_async_round(access: FormatAccess, chunks: Sequence[Sequence[int]], bufs: Sequence[bytearray]) -> float:
    """``len(chunks)`` tasks, each awaiting ``FormatAccess.read`` over its share of the offsets."""

    async def worker(chunk: Sequence[int], buf: bytearray) -> None:
        read = access.read
        for off in chunk:
            await read(buf, off)

    start = time.perf_counter()
    await asyncio.gather(*(worker(chunk, buf) for chunk, buf in zip(chunks, bufs, strict=True)))
    return time.perf_counter() - start


def partition(offsets: Sequence[int], parts: int) -> list[list[int]]:
    """Deal the offsets round-robin into *parts* lists (every offset read exactly once)."""
    return [list(offsets[i::parts]) for i in range(parts)]


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

    def command(self, path: str, count: int, size: int, depth: int) -> list[str]:
        assert self.binary is not None
        # -t writeback is qemu-img bench's default: reads come from the page cache, like ours.
        return [
            self.binary, "bench", "-f", "raw", "-t", "writeback",
            "-c", str(count), "-d", str(depth), "-s", str(size), "-S", str(size), path,
        ]  # fmt: skip

    def bench(self, path: str, count: int, size: int, depth: int) -> tuple[float, float] | None:
        """qemu-img's own "Run completed in" seconds and the wall clock of the whole process.

        None (with a note) on failure.
        """
        if self.binary is None:
            return None
        cmd = self.command(path, count, size, depth)
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as error:
            self.disable(f"qemu-img bench failed to run ({error})")
            return None
        wall = time.perf_counter() - start
        match = _QEMU_TIME.search(out.stdout)
        if out.returncode != 0 or match is None:
            detail = (out.stderr or out.stdout).strip().splitlines()
            self.disable(f"qemu-img bench failed (exit {out.returncode}: {detail[-1] if detail else 'no output'})")
            return None
        return float(match.group(1)), wall

    def disable(self, note: str) -> None:
        self.binary = None
        self.note = f"{note}: remaining qemu-img reference figures skipped"


# --- measurement groups ------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One contender of a group: ``run(warm)`` returns seconds for ``ops`` requests of ``block`` bytes."""

    name: str
    ops: int
    block: int
    run: Callable[[bool], float | None]
    seconds: list[float] = field(default_factory=list)
    #: qemu-img only: wall clock of the whole process (start-up and image open included).
    wall_seconds: list[float] = field(default_factory=list)

    def rates(self) -> list[float]:
        """Requests per second (IOPS) of each timed run."""
        return [self.ops / s for s in self.seconds if s > 0]

    def figure(self, unit: str) -> dict[str, Any] | None:
        rates = self.rates()
        if not rates:
            return None
        scale = 1.0 if unit == "IOPS" else self.block / MiB
        values = [r * scale for r in rates]
        figure: dict[str, Any] = {
            "unit": unit,
            "best": max(values),
            "median": statistics.median(values),
            "runs": values,
            "ops": self.ops,
            "block": self.block,
        }
        if self.wall_seconds:
            figure["best_by_wall_clock"] = max(self.ops / s for s in self.wall_seconds) * scale
        return figure


def measure(group: str, runners: list[Runner], repeat: int) -> None:
    """Warm every runner up, then time ``repeat`` rounds, rotating the order each round."""
    print(f"  measuring {group} ...", file=sys.stderr, flush=True)
    for runner in runners:
        runner.run(True)
    for round_no in range(repeat):
        shift = round_no % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            seconds = runner.run(False)
            if seconds is not None:
                runner.seconds.append(seconds)


# --- the benchmark -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    imago: tuple[str, str]  # (group, runner)
    reference: tuple[str, str]
    target: float | None


ROWS = (
    Row("sync_4k_random", "sync 4K random QD1", "IOPS", ("4k_random", "imago"), ("4k_random", "bare"), 0.50),
    Row("sync_1m_sequential", "sync 1M sequential QD1", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "bare"), 0.80),
    Row("async_4k_random_qd16", "async 4K random QD16", "IOPS", ("async", "imago"), ("async", "bare"), 0.30),
    Row("sync_4k_sequential", "sync 4K sequential QD1", "IOPS", ("4k_seq", "imago"), ("4k_seq", "bare"), None),
    Row("qemu_4k_sequential", "sync 4K seq vs qemu-img", "IOPS", ("4k_seq", "imago"), ("4k_seq", "qemu-img"), None),
    Row("qemu_1m_sequential", "sync 1M seq vs qemu-img", "MiB/s", ("1m_seq", "imago"), ("1m_seq", "qemu-img"), None),
    Row("qemu_async_qd16", "async 4K QD16 vs qemu-img", "IOPS", ("async", "imago"), ("async", "qemu-img"), None),
)


class Benchmark:
    def __init__(self, config: Config, path: str) -> None:
        self.config = config
        self.path = path
        self.size = config.size
        rng = random.Random(config.seed)
        pages = config.size // SMALL
        self.random_4k = [rng.randrange(pages) * SMALL for _ in range(config.ops)]
        self.seq_4k = [(i * SMALL) % config.size for i in range(config.ops)]
        self.seq_1m = [(i * LARGE) % config.size for i in range(config.ops_1m)]
        self.warm_count = max(1, min(config.ops // 10, 20_000))
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.disk = imago.open(path, format="raw")
        self.runner = asyncio.Runner()
        self.access: FormatAccess = self.runner.run(imago.open_async(path, format="raw"))
        self.qemu = Qemu.find(config.qemu)
        self.failures: list[str] = []
        self.groups: dict[str, list[Runner]] = {}

    def close(self) -> None:
        self.runner.run(self.access.close())
        self.runner.close()
        self.disk.close()
        os.close(self.fd)

    def reference(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if os.preadv(self.fd, [buf], offset) != length:
            raise OSError(f"short bare read at {offset}")
        return bytes(buf)

    # correctness ---------------------------------------------------------------------------------------

    def check_correctness(self) -> bool:
        """imago (sync, twice: engine and fast path; and async) must read what ``os.preadv`` reads."""
        rng = random.Random(self.config.seed + 1)
        size = self.size
        cases = [(0, SMALL), (size - SMALL, SMALL), (0, LARGE), (size - LARGE, LARGE), (12345, 6789)]
        cases += [(rng.randrange(size // SMALL) * SMALL, SMALL) for _ in range(16)]
        cases += [(rng.randrange(size // LARGE) * LARGE, LARGE) for _ in range(4)]
        cases += [(rng.randrange(size - 3 * SMALL), rng.randrange(1, 3 * SMALL)) for _ in range(8)]
        zero_blocks = 0
        for offset, length in cases:
            expected = self.reference(offset, length)
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
        if buf != self.reference(offset, len(buf)):
            self.failures.append(f"{what}: buffer after the timed run does not hold the data at {offset}")

    # runners ----------------------------------------------------------------------------------------------

    def bare(self, offsets: list[int], block: int) -> Runner:
        buf = bytearray(block)

        def run(warm: bool) -> float:
            return bare_loop(self.fd, buf, offsets[: self.warm_count] if warm else offsets)

        return Runner("bare", len(offsets), block, run)

    def imago_sync(self, name: str, offsets: list[int], block: int) -> Runner:
        buf = bytearray(block)

        def run(warm: bool) -> float:
            buf[:] = bytes(block)
            seconds = imago_sync_loop(self.disk, buf, offsets[: self.warm_count] if warm else offsets)
            if not warm:
                self.check_last(name, buf, offsets[-1])
            return seconds

        return Runner("imago", len(offsets), block, run)

    def imago_async(self, offsets: list[int], block: int) -> Runner:
        depth = self.config.depth
        chunks = [c for c in partition(offsets, depth) if c]
        warm_chunks = [c for c in partition(offsets[: self.warm_count], depth) if c]
        bufs = [bytearray(block) for _ in chunks]

        def run(warm: bool) -> float:
            for buf in bufs:
                buf[:] = bytes(block)
            todo = warm_chunks if warm else chunks
            seconds = self.runner.run(imago_async_round(self.access, todo, bufs[: len(todo)]))
            if not warm:
                for chunk, buf in zip(chunks, bufs, strict=True):
                    self.check_last("async", buf, chunk[-1])
            return seconds

        return Runner("imago", len(offsets), block, run)

    def qemu_img(self, count: int, block: int, depth: int) -> Runner:
        def run(warm: bool) -> float | None:
            timed = self.qemu.bench(self.path, min(count, 1000) if warm else count, block, depth)
            if timed is None:
                return None
            if not warm:
                runner.wall_seconds.append(timed[1])
            return timed[0]

        runner = Runner("qemu-img", count, block, run)
        return runner

    # all of it --------------------------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        qemu = self.qemu.binary is not None
        plan: dict[str, list[Runner]] = {
            "4k_random": [self.bare(self.random_4k, SMALL), self.imago_sync("sync 4K random", self.random_4k, SMALL)],
            "1m_seq": [self.bare(self.seq_1m, LARGE), self.imago_sync("sync 1M sequential", self.seq_1m, LARGE)],
            "async": [self.bare(self.random_4k, SMALL), self.imago_async(self.random_4k, SMALL)],
            "4k_seq": [self.bare(self.seq_4k, SMALL), self.imago_sync("sync 4K sequential", self.seq_4k, SMALL)],
        }
        if qemu:
            plan["1m_seq"].append(self.qemu_img(config.ops_1m, LARGE, 1))
            plan["async"].append(self.qemu_img(config.qemu_ops, SMALL, config.depth))
            plan["4k_seq"].append(self.qemu_img(config.qemu_ops, SMALL, 1))
        for group, runners in plan.items():
            measure(group, runners, config.repeat)
            self.groups[group] = runners

    def figure(self, where: tuple[str, str], unit: str) -> dict[str, Any] | None:
        group, name = where
        for runner in self.groups.get(group, []):
            if runner.name == name:
                return runner.figure(unit)
        return None


# --- report -----------------------------------------------------------------------------------------------------


def fmt_rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}"


def report(bench: Benchmark, residency: tuple[int, int] | None, elapsed: float) -> dict[str, Any]:
    config = bench.config
    results: dict[str, Any] = {}
    for group, runners in bench.groups.items():
        unit = "MiB/s" if group == "1m_seq" else "IOPS"
        results[group] = {runner.name: runner.figure(unit) for runner in runners}

    ratios: dict[str, Any] = {}
    lines = []
    header = ("test", "imago", "reference", "ratio", "target", "result", "overhead/op")
    for row in ROWS:
        mine = bench.figure(row.imago, row.unit)
        theirs = bench.figure(row.reference, row.unit)
        ref_name = row.reference[1]
        if mine is None or theirs is None:
            ratios[row.key] = None
            if row.target is not None or bench.qemu.binary is not None:
                best = None if mine is None else mine["best"]
                lines.append((row.label, fmt_rate(best, row.unit), f"{ref_name}: -", "-", "-", "n/a", ""))
            continue
        ratio = mine["best"] / theirs["best"]
        median_ratio = mine["median"] / theirs["median"]
        meets = None if row.target is None else ratio >= row.target
        # Extra cost of one imago request over one reference request, from the best runs.
        per_op = 1e6 * (mine["block"] / MiB if row.unit == "MiB/s" else 1.0)
        overhead_us = per_op / mine["best"] - per_op / theirs["best"]
        ratios[row.key] = {
            "ratio": ratio,
            "median_ratio": median_ratio,
            "target": row.target,
            "meets_target": meets,
            "imago": mine["best"],
            "reference": theirs["best"],
            "reference_name": ref_name,
            "unit": row.unit,
            "overhead_us_per_op": overhead_us,
        }
        target = "-" if row.target is None else f">= {row.target:.2f}"
        result = "(reference)" if meets is None else ("PASS" if meets else "FAIL-below-target")
        lines.append(
            (
                row.label,
                fmt_rate(mine["best"], row.unit),
                f"{ref_name}: {fmt_rate(theirs['best'], row.unit)}",
                f"{ratio:.3f}",
                target,
                result,
                f"{overhead_us:+.2f} us",
            )
        )

    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    print()
    print(
        f"imago raw/file read benchmark: image {config.size // MiB} MiB, best of {config.repeat} interleaved runs,"
        f" ratio = imago / reference (higher is better)"
    )
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  " + "  ".join("-" * w for w in widths))
    for line in lines:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print()
    if residency is not None:
        print(f"page cache: {residency[0]}/{residency[1]} sampled pages resident before measuring")
    if bench.qemu.note:
        print(f"NOTE: {bench.qemu.note}")
    elif bench.qemu.version:
        print(
            f"qemu-img: {bench.qemu.version}; timed by its own 'Run completed in' figure"
            " (process start-up and image open excluded, nothing subtracted)"
        )
    print(
        "qemu-img bench has no random pattern: its rows compare imago's sequential sync figures (QD1) and"
        " imago's random async figure (QD16) with qemu-img's sequential runs."
    )
    verdict = "OK" if not bench.failures else "FAILED"
    print(f"correctness: {verdict}")
    for failure in bench.failures:
        print(f"  {failure}")
    print(f"total time: {elapsed:.1f} s")

    return {
        "benchmark": "imago-raw-file-read",
        "config": config.as_dict(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "imago_version": imago.__version__,
        "qemu_img": bench.qemu.version,
        "qemu_note": bench.qemu.note,
        "page_cache_resident": None if residency is None else {"resident": residency[0], "sampled": residency[1]},
        "correct": not bench.failures,
        "failures": bench.failures,
        "results": results,
        "ratios": ratios,
        "elapsed_s": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imago-bench-", dir=config.directory) as tmp:
        path = os.path.join(tmp, "bench.raw")
        print(f"creating {config.size // MiB} MiB raw image of random data in {tmp} ...", file=sys.stderr, flush=True)
        create_image(path, config.size)
        bench = Benchmark(config, path)
        try:
            residency = cache_residency(bench.fd, config.size, 1024, random.Random(config.seed + 2))
            if residency is not None and residency[0] < residency[1]:
                print(
                    f"WARNING: only {residency[0]}/{residency[1]} sampled pages are in the page cache;"
                    " figures may include disk I/O",
                    file=sys.stderr,
                )
            if bench.check_correctness():
                bench.run()
            else:
                print("correctness check FAILED: not measuring", file=sys.stderr)
        finally:
            bench.close()
    summary = report(bench, residency, time.perf_counter() - started)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
