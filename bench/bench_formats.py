#!/usr/bin/env python3
"""VDI, VHD (vpc) and VHDX through imago: sequential reads against bare ``os.preadv``, convert against qemu-img.

For every ``--format`` (default: vdi, vpc and vhdx; a format whose driver is not installed is
skipped, saying so), in every ``--dir`` (default: /dev/shm, a tmpfs, and /var/tmp, a disk file
system), on page-cached files, with ``--size`` MiB (default 1024) of varied data:

* ``read``: a dynamic image full of data (``qemu-img convert -O FMT``) read front to back in
  1 MiB requests through ``SyncFormatAccess.read``, against bare ``os.preadv`` of the same number
  of bytes of the image file in 1 MiB requests (target: imago >= 0.8 of bare);
* ``convert``: ``imago convert -f raw -O FMT`` (in this process, through ``imago.cli.main``: no
  start-up in the figure) against ``qemu-img convert -f raw -O FMT`` (target: imago's time <= 1.0
  of qemu-img's).

Every image read or written is checked: imago's reads against the source's bytes, both convert
outputs with ``qemu-img compare`` (and ``qemu-img check`` where qemu-img checks the format). The
best of ``--repeat`` runs is reported, the two sides' runs alternating (the previous output deleted
before each run, untimed). The last output line is one JSON object with every figure.
Exit status 0 unless a check fails (1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_convert import compressible_chunks

import imago
from imago.cli import main as imago_main

MiB = 1 << 20
CHUNK = MiB
READ_TARGET = 0.8
CONVERT_TARGET = 1.0
#: The formats measured, by qemu's names.
FORMATS = ("vdi", "vpc", "vhdx")
#: The formats ``qemu-img check`` checks (it cannot check VHD).
QEMU_CHECKS = frozenset({"vdi", "vhdx"})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    parser.add_argument(
        "--dir",
        action="append",
        default=None,
        help="directory for the images; repeatable (default /dev/shm and /var/tmp)",
    )
    parser.add_argument(
        "--format",
        action="append",
        choices=FORMATS,
        default=None,
        help="a format to measure; repeatable (default: all of " + ", ".join(FORMATS) + ")",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case, best reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="16 MiB, one run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = 16, 1
    if args.size <= 0 or args.repeat <= 0:
        parser.error("--size and --repeat must be positive")
    if args.dir is None:
        args.dir = [d for d in ("/dev/shm", "/var/tmp") if os.path.isdir(d)] or [tempfile.gettempdir()]
    if args.format is None:
        args.format = list(FORMATS)
    return args


def installed(fmt: str) -> bool:
    """Whether a driver for *fmt* is registered (its plugin installed and importable)."""
    try:
        imago.format_driver(fmt)
    except imago.ImagoError:
        return False
    return True


def _qemu_img(*args: str | os.PathLike[str]) -> str:
    argv = [str(arg) for arg in args]
    done = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"qemu-img {' '.join(argv)}: {done.stdout}{done.stderr}".strip())
    return str(done.stdout)


def _best(repeat: int, runs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]]) -> dict[str, float]:
    """The best time of each of *runs* (``name: (prepare, run)``), only ``run`` timed.

    The runs alternate (one of each per round), so that a disturbance of the machine (writeback
    of an earlier output, another process) falls on both sides rather than on one's every run.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, (prepare, run) in runs.items():
            prepare()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _nothing() -> None:
    pass


def _cache(path: Path) -> None:
    """Read the file once, so that the timed runs find it in the page cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def _source(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in compressible_chunks(size):
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _imago_read(image: Path, fmt: str, size: int, digest: Any = None) -> None:
    """Read the first *size* bytes of the disk in 1 MiB requests (into *digest* if given)."""
    view = memoryview(bytearray(CHUNK))
    with imago.open(image, fmt) as disk:
        for offset in range(0, size, CHUNK):
            step = min(CHUNK, size - offset)
            disk.read(view[:step], offset)
            if digest is not None:
                digest.update(view[:step])


def _bare_read(image: Path, size: int) -> None:
    view = memoryview(bytearray(CHUNK))
    fd = os.open(image, os.O_RDONLY)
    try:
        for offset in range(0, size, CHUNK):
            os.preadv(fd, [view[: min(CHUNK, size - offset)]], offset)
    finally:
        os.close(fd)


def _imago_convert(fmt: str, source: Path, out: Path) -> None:
    status = imago_main(["convert", "-f", "raw", "-O", fmt, str(source), str(out)])
    if status != 0:
        raise RuntimeError(f"imago convert -O {fmt} failed ({status})")


def _qemu_convert(fmt: str, source: Path, out: Path) -> None:
    _qemu_img("convert", "-f", "raw", "-O", fmt, source, out)


def _verify(fmt: str, source: Path, image: Path, failures: list[str], what: str) -> None:
    try:
        if fmt in QEMU_CHECKS:
            _qemu_img("check", "-f", fmt, image)
        # Not strict (-s): a VHD's CHS-rounded size may exceed the source's; the excess must read as zeroes.
        _qemu_img("compare", "-f", "raw", "-F", fmt, source, image)
    except RuntimeError as error:
        failures.append(f"{what}: {error}")


def run_format(
    fmt: str, work: Path, source: Path, expected: str, args: argparse.Namespace, failures: list[str]
) -> dict[str, Any]:
    """Both cases for *fmt* in *work* (which holds *source*); returns the figures."""
    size = args.size * MiB
    where = f"{work.parent} {fmt}"
    result: dict[str, Any] = {}

    # --- sequential read of a dynamic image full of data ---
    image = work / f"read.{fmt}"
    _qemu_img("convert", "-f", "raw", "-O", fmt, source, image)
    _cache(image)
    digest = hashlib.sha256()
    _imago_read(image, fmt, size, digest)
    if digest.hexdigest() != expected:
        failures.append(f"{where}: imago's read of the image differs from the source")
    reads = _best(
        args.repeat,
        {
            "bare": (_nothing, lambda: _bare_read(image, size)),
            "imago": (_nothing, lambda: _imago_read(image, fmt, size)),
        },
    )
    bare, mine = reads["bare"], reads["imago"]
    result["read"] = {
        "bare_seconds": bare,
        "imago_seconds": mine,
        "bare_mib_s": args.size / bare,
        "imago_mib_s": args.size / mine,
        "ratio": bare / mine,
        "target": READ_TARGET,
    }
    print(
        f"{where} read 1M sequential: imago {args.size / mine:8.0f} MiB/s, bare os.preadv "
        f"{args.size / bare:8.0f} MiB/s, ratio {bare / mine:.2f} (target >= {READ_TARGET})",
        flush=True,
    )
    image.unlink()

    # --- imago convert vs qemu-img convert ---
    _cache(source)
    ours, theirs = work / f"imago.{fmt}", work / f"qemu.{fmt}"
    runs = {
        # (The previous output is deleted before each run, untimed.)
        "qemu": (lambda: theirs.unlink(missing_ok=True), lambda: _qemu_convert(fmt, source, theirs)),
        "imago": (lambda: ours.unlink(missing_ok=True), lambda: _imago_convert(fmt, source, ours)),
    }
    convert: dict[str, Any] = {"target": CONVERT_TARGET}
    try:
        seconds = _best(args.repeat, runs)
    except (RuntimeError, imago.ImagoError, SystemExit) as error:
        failures.append(f"{where}: imago convert -O {fmt}: {error}")
        convert["imago_error"] = str(error)
    else:
        qemu_seconds, imago_seconds = seconds["qemu"], seconds["imago"]
        _verify(fmt, source, theirs, failures, f"{where} qemu-img convert")
        _verify(fmt, source, ours, failures, f"{where} imago convert")
        convert |= {
            "qemu_seconds": qemu_seconds,
            "imago_seconds": imago_seconds,
            "ratio": imago_seconds / qemu_seconds,
            "imago_bytes": ours.stat().st_size,
            "qemu_bytes": theirs.stat().st_size,
        }
        print(
            f"{where} convert -f raw -O {fmt}: imago {imago_seconds:.2f} s, qemu-img {qemu_seconds:.2f} s, "
            f"ratio {imago_seconds / qemu_seconds:.2f} (target <= {CONVERT_TARGET})",
            flush=True,
        )
    ours.unlink(missing_ok=True)
    theirs.unlink(missing_ok=True)
    result["convert"] = convert
    return result


def run_dir(directory: str, formats: Sequence[str], args: argparse.Namespace, failures: list[str]) -> dict[str, Any]:
    """Every format in *directory*, from one source file; returns the figures by format."""
    result: dict[str, Any] = {"dir": directory, "formats": {}}
    with tempfile.TemporaryDirectory(prefix="imago-bench-formats-", dir=directory) as work_dir:
        work = Path(work_dir)
        source = work / "source.raw"
        expected = _source(source, args.size * MiB)
        for fmt in formats:
            result["formats"][fmt] = run_format(fmt, work, source, expected, args, failures)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is required", file=sys.stderr)
        return 2
    formats = []
    skipped = []
    for fmt in dict.fromkeys(args.format):
        if installed(fmt):
            formats.append(fmt)
        else:
            skipped.append(fmt)
            print(f"{fmt}: skipped (no imago driver registered for it)", flush=True)
    failures: list[str] = []
    results = [run_dir(directory, formats, args, failures) for directory in args.dir]
    for failure in failures:
        print(f"FAILED: {failure}")
    print("correctness: OK" if not failures else "correctness: FAILED")
    summary = {
        "size_mib": args.size,
        "formats": formats,
        "skipped": skipped,
        "correct": not failures,
        "failures": failures,
        "dirs": results,
    }
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
