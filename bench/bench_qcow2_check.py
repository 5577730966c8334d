#!/usr/bin/env python3
"""``imago check`` against ``qemu-img check`` on the same qcow2 images.

Images (made with qemu-img and qemu-io, ``--size`` virtual bytes each, 64 KiB clusters):

* ``preallocated``: ``preallocation=metadata``, every L2 entry in use (the most metadata a
  check reads for the size);
* ``sparse``: a few MiB written at scattered offsets, one internal snapshot (little metadata,
  a large virtual size);
* ``compressed``: ``--compressed-size`` bytes written compressed by ``qemu-img convert -c``.

Each is checked by ``qemu-img check --output=json`` (a process, wall clock) and by imago
(``imago.open(...).check()`` in this process, wall clock of open + check + close); the best of
``--repeat`` runs is reported. Both results must agree (``CheckResult.to_json()`` equals
qemu-img's JSON but for the file name). Ratio = imago time / qemu-img time: lower is better.
The last line of the output is one JSON object with every figure. Exit status 0 unless the
checks disagree (1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import imago

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as lib
from _benchlib import GiB, MiB, parse_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=10 * GiB, help="virtual size of each image (default 10G)")
    parser.add_argument(
        "--compressed-size", type=parse_size, default=256 * MiB, help="data of the compressed image (default 256M)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender, best is reported (default 3)")
    parser.add_argument("--dir", help="directory for the images (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="small images (256M, 16M compressed), one run")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.compressed_size, args.repeat = 256 * MiB, 16 * MiB, 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def make_images(directory: str, size: int, compressed_size: int) -> dict[str, str]:
    lib.progress("making the images with qemu-img ...")
    images = {name: os.path.join(directory, f"{name}.qcow2") for name in ("preallocated", "sparse", "compressed")}
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", images["preallocated"], str(size))
    run("qemu-img", "create", "-q", "-f", "qcow2", images["sparse"], str(size))
    step = max(size // 64, 64 * 1024) // (64 * 1024) * (64 * 1024)
    writes = [f"write -P {i % 255 + 1} {offset} 64k" for i, offset in enumerate(range(0, size - 65536, step))]
    run("qemu-io", "-f", "qcow2", *(arg for command in writes for arg in ("-c", command)), images["sparse"])
    run("qemu-img", "snapshot", "-c", "one", images["sparse"])
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {min(size, 4 * MiB)}", images["sparse"])
    source = os.path.join(directory, "text.raw")
    with open(source, "wb") as f:
        line = b"imago checks images as qemu-img does; every line a little different: %08d\n"
        for i in range(compressed_size // len(line % 0)):
            f.write(line % i)
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", source, images["compressed"])
    os.unlink(source)
    return images


def time_qemu(path: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"qemu-img check {path} failed ({proc.returncode}): {proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return elapsed, report


def time_imago(path: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    with imago.open(path, "qcow2") as disk:
        result = disk.check()
    return time.perf_counter() - start, result.to_json()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed (make qemu)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    failures: list[str] = []
    with lib.temporary_directory(args.dir) as directory:
        images = make_images(directory, args.size, args.compressed_size)
        time_imago(images["sparse"])  # load the plugins before timing
        for name, path in images.items():
            lib.progress(f"checking {name} ...")
            qemu_times, imago_times = [], []
            for _ in range(args.repeat):
                qemu_time, qemu_report = time_qemu(path)
                imago_time, imago_report = time_imago(path)
                qemu_times.append(qemu_time)
                imago_times.append(imago_time)
            if {**imago_report, "filename": None} != {**qemu_report, "filename": None}:
                failures.append(f"{name}: imago {imago_report} != qemu-img {qemu_report}")
            results[name] = {
                "imago_seconds": min(imago_times),
                "qemu_img_seconds": min(qemu_times),
                "ratio": min(imago_times) / min(qemu_times),
                "allocated_clusters": qemu_report.get("allocated-clusters", 0),
                "file_size": os.path.getsize(path),
            }
    print(f"imago check vs qemu-img check: best of {args.repeat}, ratio = imago / qemu-img (lower is better)")
    print(f"  {'image':<14}{'clusters':>10}{'imago':>12}{'qemu-img':>12}{'ratio':>9}")
    for name, entry in results.items():
        print(
            f"  {name:<14}{entry['allocated_clusters']:>10}{entry['imago_seconds']:>11.3f}s"
            f"{entry['qemu_img_seconds']:>11.3f}s{entry['ratio']:>9.2f}"
        )
    print("correctness: OK" if not failures else "correctness: FAILED\n  " + "\n  ".join(failures))
    summary = {
        "benchmark": "imago-qcow2-check",
        "config": {"size": args.size, "compressed_size": args.compressed_size, "repeat": args.repeat},
        "quick": args.quick,
        "correct": not failures,
        "failures": failures,
        "results": results,
        "qemu_img": lib.qemu_version("qemu-img"),
    }
    print(json.dumps(summary, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
