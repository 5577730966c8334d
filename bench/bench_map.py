#!/usr/bin/env python3
"""``imago map --output=json`` against ``qemu-img map --output=json`` on the same qcow2 images.

Images (made with qemu-img and qemu-io, 64 KiB clusters), in each directory of ``--dir``
(default: ``/dev/shm`` (tmpfs) and ``/var/tmp`` (a disk filesystem), those that exist):

* ``sparse``: 1 TiB virtual holding 1 GiB of data, written in 16 runs spread over the disk;
* ``full``: 1 GiB, every cluster written.

Both tools run as processes (wall clock, page-cached files after a warm-up run; best of
``--repeat``), and their outputs must be equal. ``imago in-process`` is the same map through
``imago.cli.main`` in this process: the time without interpreter start-up and imports (wall
clock, and the CPU time of this process); ``--in-process-only`` leaves out the imago process.
Ratio = imago time / qemu-img time: lower is better. The last line of the output is one JSON
object with every figure. Exit status 0 unless the outputs differ (1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import imago.cli

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
#: Bytes each qemu-io write command writes (keeps qemu-io's buffer small).
CHUNK = 256 * MiB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        action="append",
        help="directory for the images (repeatable; default /dev/shm and /var/tmp)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contender, best is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny images (1 GiB virtual, 16 MiB of data), one run")
    parser.add_argument(
        "--in-process-only",
        action="store_true",
        help="time imago in this process only (no imago process: start-up left out)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.dir is None:
        args.dir = [d for d in ("/dev/shm", "/var/tmp") if os.path.isdir(d)]
    if args.quick:
        args.repeat = 1
    return args


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def write_runs(path: str, runs: list[tuple[int, int]]) -> None:
    """Write the ``(offset, length)`` runs with qemu-io, a pattern byte per run."""
    commands: list[str] = []
    for index, (offset, length) in enumerate(runs):
        done = 0
        while done < length:
            step = min(CHUNK, length - done)
            commands += ["-c", f"write -P {index % 250 + 1} {offset + done} {step}"]
            done += step
    run("qemu-io", "-f", "qcow2", *commands, path)


def make_images(directory: str, quick: bool) -> dict[str, str]:
    """The two images in *directory*: name -> path."""
    virtual, data, full = (GiB, 16 * MiB, 16 * MiB) if quick else (TiB, GiB, GiB)
    sparse = os.path.join(directory, "sparse.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", sparse, str(virtual))
    pieces = 16
    step = virtual // pieces
    write_runs(sparse, [(i * step + (i * 7 % 5) * MiB, data // pieces) for i in range(pieces)])
    dense = os.path.join(directory, "full.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", dense, str(full))
    write_runs(dense, [(0, full)])
    return {"sparse": sparse, "full": dense}


def best(repeat: int, action: Callable[[], object]) -> tuple[float, object]:
    times: list[float] = []
    result: object = None
    action()  # warm-up: page cache, and the interpreter's own caches
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return min(times), result


def imago_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "imago")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "imago.cli"]


def in_process(path: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = imago.cli.main(["map", "--output=json", path])
    if status != 0:
        raise RuntimeError(f"imago map {path} failed with status {status}")
    return out.getvalue()


def cpu_seconds(repeat: int, action: Callable[[], object]) -> float:
    """The least CPU time of this process that *action* takes (after a warm-up run)."""
    action()
    times: list[float] = []
    for _ in range(repeat):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return min(times)


def bench_one(path: str, repeat: int, in_process_only: bool = False) -> dict[str, Any]:
    qemu_seconds, qemu_out = best(repeat, lambda: run("qemu-img", "map", "--output=json", path))
    inproc_seconds, inproc_out = best(repeat, lambda: in_process(path))
    inproc_cpu = cpu_seconds(repeat, lambda: in_process(path))
    assert isinstance(qemu_out, str)
    result: dict[str, Any] = {
        "qemu_img_seconds": qemu_seconds,
        "imago_seconds": None,
        "imago_in_process_seconds": inproc_seconds,
        "imago_in_process_cpu_seconds": inproc_cpu,
        "ratio": None,
        "ratio_in_process": inproc_seconds / qemu_seconds,
        "entries": qemu_out.count("\n"),
        "same_output": inproc_out == qemu_out,
    }
    if not in_process_only:
        imago_seconds, imago_out = best(repeat, lambda: run(*imago_command(), "map", "--output=json", path))
        result["imago_seconds"] = imago_seconds
        result["ratio"] = imago_seconds / qemu_seconds
        result["same_output"] = result["same_output"] and imago_out == qemu_out
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary: dict[str, Any] = {"quick": args.quick, "repeat": args.repeat, "results": {}}
    start = time.perf_counter()
    run(sys.executable, "-c", "pass")
    bare, _ = best(args.repeat, lambda: run(sys.executable, "-c", "pass"))
    summary["python_startup_seconds"] = bare
    print(f"python -c pass: {bare * 1000:.1f} ms")
    correct = True
    for directory in args.dir:
        work = tempfile.mkdtemp(prefix="imago-bench-map-", dir=directory)
        try:
            images = make_images(work, args.quick)
            for name, path in images.items():
                result = bench_one(path, args.repeat, args.in_process_only)
                key = f"{name}@{directory}"
                summary["results"][key] = result
                correct = correct and result["same_output"]
                process = (
                    ""
                    if result["imago_seconds"] is None
                    else f"imago {result['imago_seconds'] * 1000:8.1f} ms (x{result['ratio']:.2f})   "
                )
                print(
                    f"{key:<24} qemu-img {result['qemu_img_seconds'] * 1000:8.1f} ms   {process}"
                    f"imago in-process {result['imago_in_process_seconds'] * 1000:8.1f} ms "
                    f"(x{result['ratio_in_process']:.2f}, CPU {result['imago_in_process_cpu_seconds'] * 1000:.1f} ms)"
                    f"   entries {result['entries']}{'' if result['same_output'] else '   OUTPUT DIFFERS'}"
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary["correct"] = correct
    summary["seconds"] = time.perf_counter() - start
    print(f"correctness: {'OK' if correct else 'FAILED'}")
    print(json.dumps(summary))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
