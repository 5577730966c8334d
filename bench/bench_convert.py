#!/usr/bin/env python3
"""``imago convert`` against ``qemu-img convert`` (and ``qemu-img bench``) on the same images.

Cases, each run in every ``--dir`` (default: /dev/shm, a tmpfs, and /var/tmp, a disk file
system), on page-cached files:

* ``qcow2-to-raw``: a ``--size`` fully allocated qcow2 (random data) to raw;
* ``raw-to-qcow2``: a ``--size`` raw file (random data) to qcow2;
* ``compress-zlib`` / ``compress-zstd``: ``--compressed-size`` of compressible data (half
  random, half text-like) to qcow2 with ``-c`` (``-o compression_type=zstd`` for zstd);
* ``read-compressed``: the zlib-compressed image back to raw (throughput of the read path);
  ``qemu-img bench -f qcow2 -c N -s 64k`` reads the same image for a second reference;
* ``sparse-1t-to-raw``: a 1 TiB-virtual qcow2 (``--sparse-virtual``) holding ``--size`` of
  data in 64 MiB pieces spread over the disk, to raw; reported against imago's own
  ``qcow2-to-raw`` time (the goal: at most 1.5x).

Both tools run as processes with their default options (wall clock, start-up included), the
target removed before each run; the best of ``--repeat`` runs is reported. Every imago output
is checked with ``qemu-img compare`` against the source. Ratio = imago time / qemu-img time:
lower is better. CPU ratio = the same for CPU time (user + system, every thread; the least of
the runs): on a machine busy with other work the wall clock follows it rather than what the
tools could do alone. For the two copy cases, a *floor* runs in the same rounds: a bare Python
process (no imago) that copies the source file's bytes into a new file with ``copy_file_range``
in 16 MiB requests, the least work any converter started as a Python process can do; its
time over qemu-img's (``floor x``) says how close to qemu-img a Python tool can come on this
machine. ``--case`` picks cases. The last output line is one JSON object with
every figure. Exit status 0 unless an output differs from its source (1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

IMAGO = str(Path(sys.executable).parent / "imago")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB, "t": TiB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=GiB, help="data of the copy cases (default 1G)")
    parser.add_argument("--compressed-size", type=_size, default=256 * MiB, help="data of the -c cases (default 256M)")
    parser.add_argument("--sparse-virtual", type=_size, default=TiB, help="virtual size of the sparse case (1T)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool, best reported (default 3)")
    parser.add_argument(
        "--dir", action="append", help="directory for the images (repeatable; default /dev/shm and /var/tmp)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny images, one run, one directory (smoke test)")
    parser.add_argument(
        "--case",
        action="append",
        choices=list(GOALS),
        help="run only this case (repeatable; sparse-1t-to-raw also runs qcow2-to-raw, its reference)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.compressed_size, args.sparse_virtual, args.repeat = 16 * MiB, 8 * MiB, 16 * GiB, 1
        args.dir = args.dir or [tempfile.gettempdir()]
    if not args.dir:
        args.dir = [d for d in ("/dev/shm", "/var/tmp") if os.path.isdir(d)]
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- images ----------------------------------------------------------------------------------------


def _random_chunks(size: int, chunk: int = 16 * MiB) -> Iterator[bytes]:
    done = 0
    while done < size:
        step = min(chunk, size - done)
        yield os.urandom(step)
        done += step


def compressible_chunks(size: int, seed: int = 1) -> Iterator[bytes]:
    """Half random bytes, half a 16-letter alphabet: compresses to about 70 %."""
    rng = random.Random(seed)
    table = bytes(0x41 + (b & 15) for b in range(256))
    done = 0
    while done < size:
        step = min(4 * MiB, size - done)
        half = step // 2
        yield rng.randbytes(half) + rng.randbytes(step - half).translate(table)
        done += step


def _write(path: Path, chunks: Iterator[bytes]) -> None:
    with path.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)


def _qemu_img(*args: str | os.PathLike[str]) -> str:
    done = subprocess.run(["qemu-img", *map(os.fspath, args)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"qemu-img {' '.join(map(os.fspath, args))}: {done.stderr.strip()}")
    return done.stdout


def _sparse_image(path: Path, virtual: int, data: int, source: Path) -> None:
    """A qcow2 of *virtual* bytes holding *data* bytes of *source* in 64 MiB pieces spread evenly."""
    _qemu_img("create", "-q", "-f", "qcow2", path, str(virtual))
    piece = min(64 * MiB, data)
    pieces = max(1, data // piece)
    stride = virtual // pieces // MiB * MiB
    script = "".join(f"write -s {source} {index * stride} {piece}\n" for index in range(pieces))
    # qemu-io's write -s takes the data from a file, at offset 0; the same bytes in each piece.
    done = subprocess.run(["qemu-io", "-f", "qcow2", path], input=script, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"qemu-io: {done.stderr.strip()}")


# --- timing ----------------------------------------------------------------------------------------


#: The environment of the timed processes: Python compiles imago's modules once, into a cache outside
#: the source tree (as an installed package has them compiled), instead of at every start.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _timed(argv: list[str], target: Path | None) -> float:
    return _measured(argv, target)[0]


def _measured(argv: list[str], target: Path | None) -> tuple[float, float]:
    """Wall clock and CPU seconds (user + system, all threads) of one run of *argv*."""
    if target is not None and target.exists():
        target.unlink()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=_ENV)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _best(argv: list[str], target: Path | None, repeat: int) -> float:
    return _best_measured(argv, target, repeat)[0]


def _best_measured(argv: list[str], target: Path | None, repeat: int) -> tuple[float, float]:
    """The least wall clock and the least CPU time of *repeat* runs (each its own minimum)."""
    runs = [_measured(argv, target) for _ in range(repeat)]
    return min(wall for wall, _ in runs), min(cpu for _, cpu in runs)


def _convert_case(
    directory: Path, name: str, source: Path, options: list[str], out_fmt: str, repeat: int
) -> dict[str, Any]:
    mine, theirs = directory / f"imago-{name}.{out_fmt}", directory / f"qemu-{name}.{out_fmt}"
    argv = ["convert", *options, "-O", out_fmt]
    qemu_seconds, qemu_cpu = _best_measured(["qemu-img", *argv, str(source), str(theirs)], theirs, repeat)
    imago_seconds, imago_cpu = _best_measured([IMAGO, *argv, str(source), str(mine)], mine, repeat)
    same = subprocess.run(["qemu-img", "compare", "-q", str(source), str(mine)], check=False).returncode == 0
    sizes = {"imago_bytes": mine.stat().st_blocks * 512, "qemu_img_bytes": theirs.stat().st_blocks * 512}
    mine.unlink()
    theirs.unlink()
    progress(
        f"  {name}: imago {imago_seconds:.3f} s ({imago_cpu:.3f} s CPU), "
        f"qemu-img {qemu_seconds:.3f} s ({qemu_cpu:.3f} s CPU)"
    )
    return {
        "imago_seconds": imago_seconds,
        "qemu_img_seconds": qemu_seconds,
        "ratio": imago_seconds / qemu_seconds,
        # CPU time (user + system, every thread): what a loaded machine's wall clock follows.
        "imago_cpu_seconds": imago_cpu,
        "qemu_img_cpu_seconds": qemu_cpu,
        "cpu_ratio": imago_cpu / qemu_cpu if qemu_cpu else 0.0,
        "same_content": same,
        **sizes,
    }


# The floor of the copy cases: python started as imago is, then one kernel copy of every byte.
_FLOOR_SCRIPT = """
import os, sys
source = os.open(sys.argv[1], os.O_RDONLY)
target = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
size, offset = os.fstat(source).st_size, 0
while offset < size:
    offset += os.copy_file_range(source, target, min(16 << 20, size - offset), offset, offset) or size
os.close(target)
"""


def _floor(case: dict[str, Any], source: Path, directory: Path, repeat: int) -> None:
    """Add the bare copy of *source*'s bytes, and its ratio to qemu-img's time, to *case*."""
    target = directory / "floor.out"
    seconds, cpu = _best_measured([sys.executable, "-c", _FLOOR_SCRIPT, str(source), str(target)], target, repeat)
    if target.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"the floor's copy of {source} is {target.stat().st_size} bytes long")
    target.unlink()
    case["floor_seconds"], case["floor_cpu_seconds"] = seconds, cpu
    case["floor_ratio"] = seconds / case["qemu_img_seconds"]
    progress(f"  floor (bare copy_file_range of the source): {seconds:.3f} s ({cpu:.3f} s CPU)")


def _qemu_bench_read(image: Path, size: int, repeat: int) -> float:
    """``qemu-img bench`` reading the whole compressed image in 64 KiB requests: bytes per second."""
    count = max(1, size // (64 << 10))
    seconds = _best(["qemu-img", "bench", "-f", "qcow2", "-c", str(count), "-s", "64k", str(image)], None, repeat)
    return count * (64 << 10) / seconds


def run_directory(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="imago-bench-convert-", dir=directory))
    results: dict[str, Any] = {}
    _ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        progress(f"{directory}: making images ...")
        random_raw = work / "random.raw"
        _write(random_raw, _random_chunks(args.size))
        full = work / "full.qcow2"
        _qemu_img("convert", "-f", "raw", "-O", "qcow2", random_raw, full)
        cases = set(args.case or GOALS)
        if "sparse-1t-to-raw" in cases:
            cases.add("qcow2-to-raw")
        compressible = work / "compressible.raw"
        packed = work / "packed.qcow2"
        if cases & {"compress-zlib", "compress-zstd", "read-compressed"}:
            _write(compressible, compressible_chunks(args.compressed_size))
            _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", compressible, packed)
        sparse = work / "sparse.qcow2"
        if "sparse-1t-to-raw" in cases:
            _sparse_image(sparse, args.sparse_virtual, args.size, random_raw)
        warm = work / "warm.raw"
        warm.write_bytes(bytes(MiB))
        for options in (["-O", "raw"], ["-c", "-O", "qcow2"]):  # fills the bytecode cache
            _timed([IMAGO, "convert", "-f", "raw", *options, str(warm), str(work / "warm.out")], work / "warm.out")
        warm.unlink()
        (work / "warm.out").unlink()
        repeat = args.repeat
        if "qcow2-to-raw" in cases:
            results["qcow2-to-raw"] = _convert_case(work, "q2r", full, ["-f", "qcow2"], "raw", repeat)
            _floor(results["qcow2-to-raw"], full, work, repeat)
        if "raw-to-qcow2" in cases:
            results["raw-to-qcow2"] = _convert_case(work, "r2q", random_raw, ["-f", "raw"], "qcow2", repeat)
            _floor(results["raw-to-qcow2"], random_raw, work, repeat)
        if "compress-zlib" in cases:
            results["compress-zlib"] = _convert_case(work, "cz", compressible, ["-f", "raw", "-c"], "qcow2", repeat)
        if "compress-zstd" in cases:
            results["compress-zstd"] = _convert_case(
                work, "cs", compressible, ["-f", "raw", "-c", "-o", "compression_type=zstd"], "qcow2", repeat
            )
        if "read-compressed" in cases:
            read = _convert_case(work, "rc", packed, ["-f", "qcow2"], "raw", repeat)
            read["imago_bytes_per_second"] = args.compressed_size / read["imago_seconds"]
            read["qemu_img_bench_bytes_per_second"] = _qemu_bench_read(packed, args.compressed_size, repeat)
            read["throughput_vs_qemu_img_bench"] = (
                read["imago_bytes_per_second"] / read["qemu_img_bench_bytes_per_second"]
            )
            results["read-compressed"] = read
        if "sparse-1t-to-raw" in cases:
            sparse_case = _convert_case(work, "s2r", sparse, ["-f", "qcow2"], "raw", repeat)
            sparse_case["vs_imago_full"] = sparse_case["imago_seconds"] / results["qcow2-to-raw"]["imago_seconds"]
            results["sparse-1t-to-raw"] = sparse_case
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _ENV.pop("PYTHONPYCACHEPREFIX", None)
    return results


GOALS = {
    "qcow2-to-raw": ("ratio", 1.0, "<="),
    "raw-to-qcow2": ("ratio", 1.0, "<="),
    "compress-zlib": ("ratio", 0.5, "<="),
    "compress-zstd": ("ratio", 0.7, "<="),
    "read-compressed": ("throughput_vs_qemu_img_bench", 1.5, ">="),
    "sparse-1t-to-raw": ("vs_imago_full", 1.5, "<="),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"quick": args.quick, "size": args.size, "repeat": args.repeat, "directories": {}}
    correct = True
    for directory in args.dir:
        results = run_directory(Path(directory), args)
        report["directories"][directory] = results
        print(f"\n{directory}")
        print(f"  {'case':<18} {'imago s':>9} {'qemu-img s':>11} {'ratio':>7} {'CPU ratio':>9} {'floor x':>7}  goal")
        for name, entry in results.items():
            field, goal, sense = GOALS[name]
            value = entry[field]
            met = value <= goal if sense == "<=" else value >= goal
            floor = f"{entry['floor_ratio']:.2f}" if "floor_ratio" in entry else "-"
            print(
                f"  {name:<18} {entry['imago_seconds']:>9.3f} {entry['qemu_img_seconds']:>11.3f} "
                f"{entry['ratio']:>7.2f} {entry['cpu_ratio']:>9.2f} {floor:>7}  {field} {value:.2f} {sense} {goal} "
                f"{'met' if met else 'NOT met'}"
            )
            correct = correct and entry["same_content"]
    print()
    print(f"correctness: {'OK' if correct else 'FAILED'}")
    report["correct"] = correct
    print(json.dumps(report, sort_keys=True))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
