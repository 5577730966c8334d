#!/usr/bin/env python3
"""VMDK through imago: sequential reads against bare ``os.preadv``, stream-optimized writes against qemu-img.

Cases, in every ``--dir`` (default: /dev/shm, a tmpfs, and /var/tmp, a disk file system), on
page-cached files, with ``--size`` MiB (default 1024) of compressible but varied data (half
random bytes, half a 16-letter alphabet: about 70 % after deflate):

* ``read``: a monolithicSparse image full of data (``qemu-img convert``) read front to back in
  1 MiB requests through ``SyncFormatAccess.read``, against bare ``os.preadv`` of the same number
  of bytes of the image file in 1 MiB requests (target: imago >= 0.8 of bare);
* ``stream``: ``imago convert -f raw -O vmdk -o subformat=streamOptimized`` (in this process,
  through ``imago.cli.main``: no start-up in the figure) against ``qemu-img convert`` to the same
  subformat (target: imago's time <= 0.5 of qemu-img's), and the library writer
  (``imago_vmdk.stream.write_stream``) to a file, for reference.

Every image read or written is checked: imago's reads against the source's bytes, every output
with ``qemu-img compare`` and ``qemu-img check``. The best of ``--repeat`` runs is reported. The
last output line is one JSON object with every figure. Exit status 0 unless a check fails (1).
"""

from __future__ import annotations

import argparse
import asyncio
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
from imago_vmdk.stream import write_stream

MiB = 1 << 20
CHUNK = MiB
READ_TARGET = 0.8
STREAM_TARGET = 0.5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    parser.add_argument(
        "--dir",
        action="append",
        default=None,
        help="directory for the images; repeatable (default /dev/shm and /var/tmp)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case, best reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="16 MiB, one run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = 16, 1
    if args.dir is None:
        args.dir = [d for d in ("/dev/shm", "/var/tmp") if os.path.isdir(d)] or [tempfile.gettempdir()]
    return args


def _qemu_img(*args: str | os.PathLike[str]) -> str:
    done = subprocess.run(["qemu-img", *map(os.fspath, args)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"qemu-img {' '.join(map(os.fspath, args))}: {done.stdout}{done.stderr}".strip())
    return done.stdout


def _best(repeat: int, run: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


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


def _imago_read(image: Path, size: int) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with imago.open(image, "vmdk") as disk:
        for offset in range(0, size, CHUNK):
            step = min(CHUNK, size - offset)
            disk.read(view[:step], offset)
            digest.update(view[:step])
    return digest.hexdigest()


def _imago_read_timed(image: Path, size: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with imago.open(image, "vmdk") as disk:
        for offset in range(0, size, CHUNK):
            disk.read(view[: min(CHUNK, size - offset)], offset)


def _bare_read(image: Path, size: int) -> None:
    buf = bytearray(CHUNK)
    fd = os.open(image, os.O_RDONLY)
    try:
        for offset in range(0, size, CHUNK):
            os.preadv(fd, [memoryview(buf)[: min(CHUNK, size - offset)]], offset)
    finally:
        os.close(fd)


def _imago_convert(source: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    status = imago_main(
        ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source), str(out)]
    )
    if status != 0:
        raise RuntimeError(f"imago convert failed ({status})")


def _qemu_convert(source: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, out)


def _library_stream(source: Path, out: Path) -> None:
    async def go() -> None:
        access = await imago.open_async(str(source), "raw")
        try:
            with out.open("wb") as sink:
                await write_stream(access, sink, extent_name=out.name)
        finally:
            await access.close()

    asyncio.run(go())


def _verify(source: Path, image: Path, failures: list[str], what: str) -> None:
    try:
        _qemu_img("check", "-f", "vmdk", image)
        _qemu_img("compare", "-f", "raw", "-F", "vmdk", source, image)
        info = json.loads(_qemu_img("info", "--output=json", "-f", "vmdk", image))
        if info["format-specific"]["data"]["create-type"] != "streamOptimized":
            failures.append(f"{what}: not streamOptimized")
    except RuntimeError as error:
        failures.append(f"{what}: {error}")


def run_dir(directory: str, args: argparse.Namespace, failures: list[str]) -> dict[str, Any]:
    size = args.size * MiB
    result: dict[str, Any] = {"dir": directory}
    with tempfile.TemporaryDirectory(prefix="imago-bench-vmdk-", dir=directory) as work_dir:
        work = Path(work_dir)
        source = work / "source.raw"
        expected = _source(source, size)

        # --- sequential read of a monolithicSparse image full of data ---
        sparse = work / "sparse.vmdk"
        _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", source, sparse)
        _cache(sparse)
        if _imago_read(sparse, size) != expected:
            failures.append(f"{directory}: imago's read of the monolithicSparse image differs from the source")
        bare = _best(args.repeat, lambda: _bare_read(sparse, size))
        mine = _best(args.repeat, lambda: _imago_read_timed(sparse, size))
        result["read"] = {
            "bare_seconds": bare,
            "imago_seconds": mine,
            "bare_mib_s": args.size / bare,
            "imago_mib_s": args.size / mine,
            "ratio": bare / mine,
            "target": READ_TARGET,
        }
        print(
            f"{directory} read 1M sequential: imago {args.size / mine:8.0f} MiB/s, bare os.preadv "
            f"{args.size / bare:8.0f} MiB/s, ratio {bare / mine:.2f} (target >= {READ_TARGET})",
            flush=True,
        )
        sparse.unlink()

        # --- stream-optimized: imago convert vs qemu-img convert ---
        _cache(source)
        ours, theirs, library = work / "imago.vmdk", work / "qemu.vmdk", work / "library.vmdk"
        qemu_seconds = _best(args.repeat, lambda: _qemu_convert(source, theirs))
        stream: dict[str, Any] = {"qemu_seconds": qemu_seconds, "target": STREAM_TARGET}
        try:
            imago_seconds = _best(args.repeat, lambda: _imago_convert(source, ours))
        except (RuntimeError, imago.ImagoError, SystemExit) as error:
            failures.append(f"{directory}: imago convert -O vmdk -o subformat=streamOptimized: {error}")
            stream["imago_error"] = str(error)
        else:
            _verify(source, ours, failures, f"{directory} imago convert")
            stream |= {
                "imago_seconds": imago_seconds,
                "ratio": imago_seconds / qemu_seconds,
                "imago_bytes": ours.stat().st_size,
            }
            print(
                f"{directory} streamOptimized convert: imago {imago_seconds:.2f} s, qemu-img {qemu_seconds:.2f} s, "
                f"ratio {imago_seconds / qemu_seconds:.2f} (target <= {STREAM_TARGET})",
                flush=True,
            )
        library_seconds = _best(args.repeat, lambda: _library_stream(source, library))
        _verify(source, library, failures, f"{directory} write_stream")
        stream |= {
            "library_seconds": library_seconds,
            "library_ratio": library_seconds / qemu_seconds,
            "library_bytes": library.stat().st_size,
            "qemu_bytes": theirs.stat().st_size,
        }
        print(
            f"{directory} streamOptimized write_stream (library, to a file): {library_seconds:.2f} s, "
            f"ratio to qemu-img {library_seconds / qemu_seconds:.2f}; sizes: imago "
            f"{library.stat().st_size} bytes, qemu-img {theirs.stat().st_size} bytes",
            flush=True,
        )
        result["stream"] = stream
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is required", file=sys.stderr)
        return 2
    failures: list[str] = []
    results = [run_dir(directory, args, failures) for directory in args.dir]
    for failure in failures:
        print(f"FAILED: {failure}")
    print("correctness: OK" if not failures else "correctness: FAILED")
    print(json.dumps({"size_mib": args.size, "correct": not failures, "failures": failures, "dirs": results}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
