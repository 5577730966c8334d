"""What the benchmark scripts share: options, images, timed loops, qemu-img, report.

Not a benchmark of its own. The scripts import it as a sibling module (they put their own
directory on ``sys.path``), so they run from any working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import imago
from imago import FormatAccess, SyncFormatAccess

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SMALL = 4 * KiB
LARGE = 1 * MiB

QEMU_TIME = re.compile(r"Run completed in ([0-9.]+) seconds")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- options ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``1T``, ``65536``, ``2GiB``... as bytes; a positive multiple of 1 MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    value = int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))
    if value <= 0 or value % MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB, got {value}")
    return value


def add_read_options(parser: argparse.ArgumentParser, *, size_help: str, dir_help: str, repeat_help: str) -> None:
    """``--size``, ``--dir``, ``--ops``, ``--ops-1m``, ``--qemu-ops``, ``--repeat`` and ``--loop``, in this order."""
    parser.add_argument("--size", type=parse_size, help=size_help)
    parser.add_argument("--dir", help=dir_help)
    parser.add_argument("--ops", type=int, help="4 KiB reads per run (default 200000; --quick: 20000)")
    parser.add_argument("--ops-1m", type=int, help="1 MiB reads per run (default 2000; --quick: 200)")
    parser.add_argument("--qemu-ops", type=int, help="4 KiB requests per qemu-img run (default 50000; --quick: 5000)")
    parser.add_argument("--repeat", type=int, help=repeat_help)
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="event loop of the async rows: asyncio's own (default) or uvloop (imported only when asked)",
    )


#: The event loops the async rows can run on.
LOOPS = ("asyncio", "uvloop")


def check_loop(parser: argparse.ArgumentParser, loop: str) -> None:
    """Exit through *parser* if the event loop *loop* is not installed (looked up, not imported)."""
    if loop != "asyncio" and importlib.util.find_spec(loop) is None:
        parser.error(f"--loop {loop}: {loop} is not installed (pip install {loop}, or imago's '{loop}' extra)")


def event_loop_runner(loop: str) -> asyncio.Runner:
    """An ``asyncio.Runner`` on the event loop *loop* (``asyncio`` or ``uvloop``, imported only here)."""
    if loop == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def add_final_options(parser: argparse.ArgumentParser, *, no_qemu_help: str, quick_help: str) -> None:
    """``--no-qemu`` and ``--quick``, the last options of both scripts."""
    parser.add_argument("--no-qemu", action="store_true", help=no_qemu_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)


def picker(args: argparse.Namespace) -> Callable[[int | None, int, int], int]:
    """``pick(value, full, quick)``: the option's value if given, else the default of the mode."""

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    return pick


@dataclass(frozen=True)
class ReadConfig:
    """The options both scripts have; each script's ``Config`` adds its own."""

    size: int
    ops: int
    ops_1m: int
    qemu_ops: int
    repeat: int
    seed: int
    directory: str | None
    qemu: bool
    quick: bool
    loop: str

    @staticmethod
    def values(args: argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments of the common fields, from the parsed options."""
        pick = picker(args)
        return {
            "size": pick(args.size, GiB, 64 * MiB),
            "ops": pick(args.ops, 200_000, 20_000),
            "ops_1m": pick(args.ops_1m, 2_000, 200),
            "qemu_ops": pick(args.qemu_ops, 50_000, 5_000),
            "repeat": pick(args.repeat, 5, 3),
            "seed": args.seed,
            "directory": args.dir,
            "qemu": not args.no_qemu,
            "quick": args.quick,
            "loop": args.loop,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "ops_4k": self.ops,
            "ops_1m": self.ops_1m,
            "qemu_ops_4k": self.qemu_ops,
            "repeat": self.repeat,
            "seed": self.seed,
            "quick": self.quick,
            "loop": self.loop,
            "statistic": "best",
        }

    def check_counts(self, parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
        """Exit through *parser* unless every one of the named counts is at least 1 (and the loop is installed)."""
        for name in names:
            if getattr(self, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        check_loop(parser, self.loop)


# --- images and the page cache ---------------------------------------------------------------------


def random_chunks(size: int, chunk: int = 16 * MiB) -> Iterator[bytes]:
    pos = 0
    while pos < size:
        step = min(chunk, size - pos)
        yield os.urandom(step)
        pos += step


def write_file(path: str, chunks: Iterable[bytes], observe: Callable[[bytes], object] | None = None) -> None:
    """Write the chunks to *path*, passing each to *observe* too (say, a hash's ``update``)."""
    with open(path, "wb") as file:
        for chunk in chunks:
            file.write(chunk)
            if observe is not None:
                observe(chunk)


def settle_and_cache(path: str) -> None:
    """fsync (no writeback while measuring), then read the file once into the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        buf = bytearray(16 * MiB)
        pos = 0
        while count := os.preadv(fd, [buf], pos):
            pos += count
    finally:
        os.close(fd)


def cache_residency(path: str, samples: int, rng: random.Random) -> tuple[int, int] | None:
    """How many of *samples* random pages of the file are in the page cache (``RWF_NOWAIT``)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
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
    finally:
        os.close(fd)


def warn_if_not_resident(residency: tuple[int, int] | None) -> None:
    if residency is not None and residency[0] < residency[1]:
        progress(
            f"WARNING: only {residency[0]}/{residency[1]} sampled pages are in the page cache;"
            " figures may include disk I/O"
        )


def residency_json(residency: tuple[int, int] | None) -> dict[str, int] | None:
    return None if residency is None else {"resident": residency[0], "sampled": residency[1]}


def remove_file(path: str) -> None:
    """Delete *path* if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def load_average() -> float | None:
    """The 1-minute load average, if the platform has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    if os.preadv(fd, [buf], offset) != length:
        raise OSError(f"short read of {length} bytes at {offset}")
    return bytes(buf)


def temporary_directory(directory: str | None) -> tempfile.TemporaryDirectory[str]:
    """The benchmark's scratch directory (in *directory*, else the system's temp dir), removed after."""
    return tempfile.TemporaryDirectory(prefix="imago-bench-", dir=directory)


# --- offsets and correctness cases ----------------------------------------------------------------


def read_offsets(size: int, ops: int, ops_1m: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """The precomputed offsets both sides read: random 4 KiB, sequential 4 KiB, sequential 1 MiB."""
    rng = random.Random(seed)
    random_4k = [rng.randrange(size // SMALL) * SMALL for _ in range(ops)]
    seq_4k = [(i * SMALL) % size for i in range(ops)]
    seq_1m = [(i * LARGE) % size for i in range(ops_1m)]
    return random_4k, seq_4k, seq_1m


def warm_count(ops: int) -> int:
    """Requests of an untimed warm-up run: a tenth of the ops, at most 20000."""
    return max(1, min(ops // 10, 20_000))


def read_cases(
    size: int, rng: random.Random, small: int, large: int, extra: Iterable[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """``(offset, length)`` to check: the ends, *extra*, *small* 4K, *large* 1M and 8 unaligned."""
    cases = [(0, SMALL), (size - SMALL, SMALL), (0, LARGE), (size - LARGE, LARGE), (12345, 6789)]
    cases += extra
    cases += [(rng.randrange(size // SMALL) * SMALL, SMALL) for _ in range(small)]
    cases += [(rng.randrange(size // LARGE) * LARGE, LARGE) for _ in range(large)]
    cases += [(rng.randrange(size - 3 * SMALL), rng.randrange(1, 3 * SMALL)) for _ in range(8)]
    return cases


def check_last(failures: list[str], what: str, buf: bytearray, fd: int, offset: int) -> None:
    """After a timed run, the buffer must hold the data at the run's last offset (read from *fd*)."""
    if buf != pread_exact(fd, len(buf), offset):
        failures.append(f"{what}: buffer after the timed run does not hold the data at {offset}")


# --- timed loops -----------------------------------------------------------------------------------
#
# Each returns the seconds the loop itself took (time.perf_counter), nothing else.


def bare_loop(fd: int, buf: bytearray, offsets: Sequence[int]) -> float:
    """The baseline: ``os.preadv(fd, [buf], off)`` over the (host) offsets, one buffer reused."""
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
    """``len(chunks)`` tasks, each awaiting ``FormatAccess.read`` over its share of the offsets, in turn."""

    async def worker(chunk: Sequence[int], buf: bytearray) -> None:
        read = access.read
        for off in chunk:
            await read(buf, off)

    start = time.perf_counter()
    if len(chunks) == 1:  # one reader: no task around it
        await worker(chunks[0], bufs[0])
    else:
        await asyncio.gather(*(worker(chunk, buf) for chunk, buf in zip(chunks, bufs, strict=True)))
    return time.perf_counter() - start


def partition(offsets: Sequence[int], parts: int) -> list[list[int]]:
    """Deal the offsets round-robin into *parts* lists (every offset read exactly once)."""
    return [list(offsets[i::parts]) for i in range(parts)]


# --- qemu-img --------------------------------------------------------------------------------------


class QemuError(Exception):
    """A qemu-img reference run failed; the message is the note to print."""


def skipped_note(note: str) -> str:
    return f"{note}: remaining qemu-img reference figures skipped"


def qemu_bench_command(binary: str, fmt: str, path: str, count: int, size: int, depth: int) -> list[str]:
    # -t writeback is qemu-img bench's default: reads come from the page cache, like ours.
    return [
        binary, "bench", "-f", fmt, "-t", "writeback",
        "-c", str(count), "-d", str(depth), "-s", str(size), "-S", str(size), path,
    ]  # fmt: skip


def last_line(out: subprocess.CompletedProcess[str], default: str) -> str:
    """The last line of the tool's stderr (of its stdout if stderr is empty), else *default*."""
    detail = (out.stderr or out.stdout).strip().splitlines()
    return detail[-1] if detail else default


def run_timed(cmd: list[str], what: str, timeout: float) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run *cmd*: the wall clock of the process and its outcome; ``QemuError`` if it cannot run."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise QemuError(f"{what} failed to run ({error})") from error
    return time.perf_counter() - start, out


def qemu_version(img: str) -> str:
    """The first line of ``qemu-img --version`` ("unknown" when it prints nothing)."""
    out = subprocess.run([img, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def run_qemu_convert(img: str, args: list[str]) -> float:
    """Wall clock of ``qemu-img convert ARGS`` (process start-up included); ``QemuError`` on failure."""
    wall, out = run_timed([img, "convert", *args], "qemu-img convert", 3600)
    if out.returncode != 0:
        raise QemuError(f"qemu-img convert failed (exit {out.returncode}: {last_line(out, 'no output')})")
    return wall


def run_qemu_bench(cmd: list[str]) -> tuple[float, float]:
    """qemu-img's own "Run completed in" seconds and the wall clock of the whole process.

    ``QemuError`` (with the note) on failure.
    """
    wall, out = run_timed(cmd, "qemu-img bench", 600)
    match = QEMU_TIME.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise QemuError(f"qemu-img bench failed (exit {out.returncode}: {last_line(out, 'no output')})")
    return float(match.group(1)), wall


# --- measurement groups ----------------------------------------------------------------------------


@dataclass
class Runner:
    """One contender of a group: ``run(warm)`` returns seconds for ``ops`` requests of ``block`` bytes."""

    name: str
    ops: int
    block: int
    run: Callable[[bool], float | None]
    seconds: list[float] = field(default_factory=list)
    #: qemu-img bench only: wall clock of the whole process (start-up and image open included).
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


def bare_runner(fd: int, offsets: list[int], block: int, warm_ops: int) -> Runner:
    """``bare_loop`` over *offsets* (of the file behind *fd*); the warm-up reads the first *warm_ops*."""
    buf = bytearray(block)

    def run(warm: bool) -> float:
        return bare_loop(fd, buf, offsets[:warm_ops] if warm else offsets)

    return Runner("bare", len(offsets), block, run)


def imago_sync_runner(
    disk: SyncFormatAccess, offsets: list[int], block: int, warm_ops: int, check: Callable[[bytearray, int], None]
) -> Runner:
    """``imago_sync_loop`` over *offsets*; after each timed run ``check(buf, last offset)``."""
    buf = bytearray(block)

    def run(warm: bool) -> float:
        buf[:] = bytes(block)
        seconds = imago_sync_loop(disk, buf, offsets[:warm_ops] if warm else offsets)
        if not warm:
            check(buf, offsets[-1])
        return seconds

    return Runner("imago", len(offsets), block, run)


def imago_async_runner(
    loop: asyncio.Runner,
    access: FormatAccess,
    offsets: list[int],
    block: int,
    depth: int,
    warm_ops: int,
    check: Callable[[bytearray, int], None],
) -> Runner:
    """*depth* tasks on *loop* reading *offsets* (dealt round-robin) through *access*.

    After each timed run, ``check(buf, last offset)`` for each task's buffer.
    """
    chunks = [c for c in partition(offsets, depth) if c]
    warm_chunks = [c for c in partition(offsets[:warm_ops], depth) if c]
    bufs = [bytearray(block) for _ in chunks]

    def run(warm: bool) -> float:
        for buf in bufs:
            buf[:] = bytes(block)
        todo = warm_chunks if warm else chunks
        seconds = loop.run(imago_async_round(access, todo, bufs[: len(todo)]))
        if not warm:
            for chunk, buf in zip(chunks, bufs, strict=True):
                check(buf, chunk[-1])
        return seconds

    return Runner("imago", len(offsets), block, run)


def qemu_bench_runner(count: int, block: int, bench: Callable[[int], tuple[float, float] | None]) -> Runner:
    """qemu-img bench of *count* requests; ``bench(count)`` gives its seconds and wall clock, or None."""

    def run(warm: bool) -> float | None:
        timed = bench(min(count, 1000) if warm else count)
        if timed is None:
            return None
        if not warm:
            runner.wall_seconds.append(timed[1])
        return timed[0]

    runner = Runner("qemu-img", count, block, run)
    return runner


def measure(group: str, runners: list[Runner], repeat: int) -> None:
    """Warm every runner up, then time ``repeat`` rounds, rotating the order each round."""
    progress(f"  measuring {group} ...")
    for runner in runners:
        runner.run(True)
    for round_no in range(repeat):
        shift = round_no % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            seconds = runner.run(False)
            if seconds is not None:
                runner.seconds.append(seconds)


def measure_plan(plan: dict[str, list[Runner]], repeat: int, groups: dict[str, list[Runner]]) -> None:
    """``measure`` each group of *plan* in turn, recording it in *groups*."""
    for group, runners in plan.items():
        measure(group, runners, repeat)
        groups[group] = runners


# --- report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    imago: tuple[str, str]  # (group, runner)
    reference: tuple[str, str]
    target: float | None


HEADER = ("test", "imago", "reference", "ratio", "target", "result")


def fmt_rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}"


def find_figure(groups: dict[str, list[Runner]], where: tuple[str, str], unit: str) -> dict[str, Any] | None:
    group, name = where
    for runner in groups.get(group, []):
        if runner.name == name:
            return runner.figure(unit)
    return None


def group_results(groups: dict[str, list[Runner]], unit_of: Callable[[str], str]) -> dict[str, Any]:
    """Every runner's figure, by group and name; ``unit_of(group)`` is ``IOPS`` or ``MiB/s``."""
    results: dict[str, Any] = {}
    for group, runners in groups.items():
        unit = unit_of(group)
        results[group] = {runner.name: runner.figure(unit) for runner in runners}
    return results


def ratio_rows(
    rows: Iterable[Row], groups: dict[str, list[Runner]], *, qemu: bool, overhead_column: bool
) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The ``ratios`` of the JSON line and the table lines of *rows*.

    A row missing a side is a ``n/a`` line if it has a target or qemu-img runs (*qemu*), else left
    out. With *overhead_column* the lines have a seventh column, ``overhead/op``.
    """
    ratios: dict[str, Any] = {}
    lines: list[tuple[str, ...]] = []
    for row in rows:
        mine = find_figure(groups, row.imago, row.unit)
        theirs = find_figure(groups, row.reference, row.unit)
        ref_name = row.reference[1]
        if mine is None or theirs is None:
            ratios[row.key] = None
            if row.target is not None or qemu:
                best = None if mine is None else mine["best"]
                line = (row.label, fmt_rate(best, row.unit), f"{ref_name}: -", "-", "-", "n/a")
                lines.append((*line, "") if overhead_column else line)
            continue
        ratio = mine["best"] / theirs["best"]
        meets = None if row.target is None else ratio >= row.target
        # Extra cost of one imago request over one reference request, from the best runs.
        per_op = 1e6 * (mine["block"] / MiB if row.unit == "MiB/s" else 1.0)
        overhead_us = per_op / mine["best"] - per_op / theirs["best"]
        ratios[row.key] = {
            "ratio": ratio,
            "median_ratio": mine["median"] / theirs["median"],
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
        line = (
            row.label,
            fmt_rate(mine["best"], row.unit),
            f"{ref_name}: {fmt_rate(theirs['best'], row.unit)}",
            f"{ratio:.3f}",
            target,
            result,
        )
        lines.append((*line, f"{overhead_us:+.2f} us") if overhead_column else line)
    return ratios, lines


def print_table(title: str, header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    """A blank line, *title*, the columns left-aligned under *header*, a blank line."""
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    print()
    print(title)
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  " + "  ".join("-" * w for w in widths))
    for line in lines:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print()


def print_qemu(note: str | None, version: str | None, timing: str) -> None:
    """The ``NOTE:`` why qemu-img figures are missing, else its version and *timing* (how it is timed)."""
    if note:
        print(f"NOTE: {note}")
    elif version:
        print(f"qemu-img: {version}; {timing}")


def print_verdict(failures: Sequence[str], elapsed: float) -> None:
    verdict = "OK" if not failures else "FAILED"
    print(f"correctness: {verdict}")
    for failure in failures:
        print(f"  {failure}")
    print(f"total time: {elapsed:.1f} s")


class Described(Protocol):
    """A configuration that can describe itself for the JSON line (``ReadConfig`` and others)."""

    def as_dict(self) -> dict[str, Any]: ...


def summary(
    benchmark: str,
    config: Described,
    *,
    qemu_version: str | None,
    qemu_note: str | None,
    residency: tuple[int, int] | None,
    failures: list[str],
    results: dict[str, Any],
    ratios: dict[str, Any],
    elapsed: float,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON line's object: the keys both scripts have, and *extra*."""
    return {
        "benchmark": benchmark,
        "config": config.as_dict(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "imago_version": imago.__version__,
        "qemu_img": qemu_version,
        "qemu_note": qemu_note,
        "page_cache_resident": residency_json(residency),
        "correct": not failures,
        "failures": failures,
        "results": results,
        "ratios": ratios,
        **extra,
        "elapsed_s": elapsed,
    }


def print_summary(result: dict[str, Any]) -> int:
    """Print the JSON line (the last line of the output); the exit status: 0 if correct, else 1."""
    print(json.dumps(result, sort_keys=True))
    return 0 if result["correct"] else 1
