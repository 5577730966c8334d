#!/usr/bin/env python3
"""Compressed qcow2 clusters: the codec alone, and ``imago convert`` in-process (no start-up).

Finer figures than ``bench_convert.py`` for the compressed cases, on the same kind of data
(``--size`` of half random, half text-like bytes, on page-cached files in ``--dir``):

* ``codec``: clusters compressed (deflate as qcow2 writes it, zstd) and decompressed per second,
  on one thread and on all cores (threads, as the driver runs them): the floor of the pipeline;
* ``write-zlib`` / ``write-zstd``: ``imago convert -c`` of the raw file to qcow2;
* ``read-zlib`` / ``read-zstd``: ``imago convert`` of an image ``qemu-img convert -c`` made,
  back to raw.

The conversions run in this process (``imago.cli.main``, imports done once, so start-up is not
in the figures); the best of ``--repeat`` runs is reported: wall time, CPU time of the process
(every thread) and of the main thread (the event loop, which runs the Python side of the
pipeline), with the throughput of the data. Every output is checked with ``qemu-img compare``.
The last output line is one JSON object with every figure. Exit status 0 unless an output
differs from its source (1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The -c cases' data of bench_convert.py (the script's directory is on sys.path).
from bench_convert import compressible_chunks

from imago.cli import main as imago_main
from imago_qcow2 import compression

MiB = 1 << 20
CLUSTER = 64 << 10


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of data (default 256)")
    parser.add_argument("--dir", default=None, help="directory for the images (default /dev/shm, else the temp dir)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case, best reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="8 MiB, one run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = 8, 1
    if args.dir is None:
        args.dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return args


def _qemu_img(*args: str | Path) -> None:
    argv = ["qemu-img", *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


# --- the codec -------------------------------------------------------------------------------------


def _throughput(func: Callable[[bytes], object], items: list[bytes], threads: int, repeat: int) -> float:
    """Bytes of clusters per second through *func* on *threads* threads (each a contiguous share)."""
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        share = -(-len(items) // threads)
        parts = [items[start : start + share] for start in range(0, len(items), share)]
        for _ in range(repeat):
            start = time.perf_counter()
            list(pool.map(lambda part: [func(item) for item in part], parts))
            best = min(best, time.perf_counter() - start)
    return len(items) * CLUSTER / best


def codec_case(data: bytes, repeat: int) -> dict[str, Any]:
    """Compress and decompress rates of the codec in use, by kind of data, on one and all cores."""
    view = memoryview(data)
    clusters = [bytes(view[start : start + CLUSTER]) for start in range(0, len(data) - CLUSTER + 1, CLUSTER)]
    # The data alternates 2 MiB of random bytes and 2 MiB of text-like bytes.
    per_half = (2 * MiB) // CLUSTER
    kinds = {
        "random": [c for i, c in enumerate(clusters) if (i // per_half) % 2 == 0],
        "text": [c for i, c in enumerate(clusters) if (i // per_half) % 2 == 1],
    }
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"deflate_module": compression.DEFLATE.__name__, "cores": cores}
    for name, compression_type in (("zlib", 0), ("zstd", 1)):

        def deflate(cluster: bytes, compression_type: int = compression_type) -> bytes:
            return compression.compress_cluster(cluster, compression_type)

        def inflate(blob: bytes, compression_type: int = compression_type) -> bytes:
            return compression.decompress_cluster(blob, CLUSTER, compression_type, "bench", 0)

        for kind, items in kinds.items():
            for threads in sorted({1, cores}):
                rate = _throughput(deflate, items, threads, repeat)
                result[f"{name}_compress_{kind}_{threads}t_mb_s"] = rate / 1e6
        packed = [deflate(c) for c in kinds["text"]]

        for threads in sorted({1, cores}):
            result[f"{name}_decompress_text_{threads}t_mb_s"] = _throughput(inflate, packed, threads, repeat) / 1e6
    return result


# --- conversions in-process ------------------------------------------------------------------------


def _convert(argv: list[str], target: Path, repeat: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeat):
        target.unlink(missing_ok=True)
        wall, cpu, main_thread = time.perf_counter(), time.process_time(), time.thread_time()
        status = imago_main(["convert", *argv])
        figures = {
            "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
            "main_thread_cpu_seconds": time.thread_time() - main_thread,
        }
        if status:
            raise RuntimeError(f"imago convert {' '.join(argv)}: exit status {status}")
        if not best or figures["seconds"] < best["seconds"]:
            best = figures
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="imago-bench-compressed-", dir=args.dir))
    size = args.size * MiB
    results: dict[str, Any] = {}
    try:
        source = work / "source.raw"
        with source.open("wb") as out:
            for chunk in compressible_chunks(size):
                out.write(chunk)
        # A first conversion each way imports what the commands use: not timed.
        warm, warm_qcow2 = work / "warm.raw", work / "warm.qcow2"
        warm.write_bytes(bytes(MiB))
        _convert(["-f", "raw", "-c", "-O", "qcow2", str(warm), str(warm_qcow2)], warm_qcow2, 1)
        _convert(["-f", "qcow2", "-O", "raw", str(warm_qcow2), str(warm)], warm, 1)
        print(f"{args.dir}: codec ...", file=sys.stderr, flush=True)
        results["codec"] = codec_case(source.read_bytes()[: min(size, 32 * MiB)], args.repeat)
        for name in ("zlib", "zstd"):
            print(f"{args.dir}: {name} ...", file=sys.stderr, flush=True)
            options = ["-o", f"compression_type={name}"]
            target = work / f"imago-{name}.qcow2"
            write = _convert(
                ["-f", "raw", "-c", "-O", "qcow2", *options, str(source), str(target)], target, args.repeat
            )
            packed = work / f"qemu-{name}.qcow2"
            _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *options, source, packed)
            back = work / f"back-{name}.raw"
            read = _convert(["-f", "qcow2", "-O", "raw", str(packed), str(back)], back, args.repeat)
            for case, figures, output in ((f"write-{name}", write, target), (f"read-{name}", read, back)):
                same = subprocess.run(["qemu-img", "compare", "-q", str(source), str(output)], check=False)
                figures["mb_s"] = size / figures["seconds"] / 1e6
                figures["same_content"] = same.returncode == 0
                results[case] = figures
            for path in (target, packed, back):
                path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    codec = results["codec"]
    print(f"\ncodec ({codec['deflate_module']} for deflate; MB/s of 64 KiB clusters, 1 thread / {codec['cores']})")
    cores = codec["cores"]
    for key in sorted(k for k in codec if k.endswith("_1t_mb_s")):
        stem = key.removesuffix("_1t_mb_s")
        print(f"  {stem:<26} {codec[key]:>8.0f} {codec[f'{stem}_{cores}t_mb_s']:>8.0f}")
    print(f"\nimago convert in-process, {args.size} MiB, best of {args.repeat}")
    print(f"  {'case':<12} {'wall s':>7} {'cpu s':>7} {'main s':>7} {'MB/s':>7}")
    correct = True
    for case, figures in results.items():
        if case == "codec":
            continue
        print(
            f"  {case:<12} {figures['seconds']:>7.3f} {figures['cpu_seconds']:>7.3f} "
            f"{figures['main_thread_cpu_seconds']:>7.3f} {figures['mb_s']:>7.0f}"
            f"{'' if figures['same_content'] else '  DIFFERS'}"
        )
        correct = correct and figures["same_content"]
    print()
    print(f"correctness: {'OK' if correct else 'FAILED'}")
    print(json.dumps({"size_mib": args.size, "repeat": args.repeat, "correct": correct, **results}, sort_keys=True))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
