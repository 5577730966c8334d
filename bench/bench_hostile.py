#!/usr/bin/env python3
"""Peak memory and time of opening hostile images: the malformed corpus, the fuzz corpora, a 1 EiB disk.

Every image of ``fuzz/corpus/{qcow2,raw}`` and ``fuzz/regressions/*`` (crafted and mutated
images, many malformed), every image ``plugins/qcow2/tests/test_malformed.py`` opens (one per
refusal rule: that test file runs first under the ``bench/_keep_opened.py`` pytest plugin, which
keeps a copy of each), plus a 1 EiB-virtual qcow2 made by ``qemu-img create`` (a 22 MiB file),
is opened in a fresh process with an explicit format and ``DenyImplicitOpenGate``: open,
``info()``, one mapping over the whole disk, and 1 MiB read at the start and at the end. The
reference runs in the same loop: ``qemu-img info -f FMT`` of the same file. Each process runs
under ``/usr/bin/time`` (peak RSS, wall clock). Outcomes are ``ok`` or the error class: anything
but an ``ImagoError`` (or a timeout) is counted as a failure and makes the exit status 1.

Printed: per contender, the largest peak RSS and the median and largest time, with the floor of
a Python process that only imports imago (what every imago row pays), and the images costing
most. ``--quick`` takes a few images of each kind (the smoke test). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0

# Runs in the child: open and walk one image; prints the outcome.
CHILD = """
import sys
import imago
path, fmt = sys.argv[1], sys.argv[2]
try:
    with imago.open(path, fmt, gate=imago.DenyImplicitOpenGate()) as disk:
        disk.driver.info()
        disk.get_mapping(0, disk.size)
        size = disk.size
        buf = bytearray(min(1 << 20, size))
        disk.read(buf, 0)
        disk.read(buf, size - len(buf))
    print("ok")
except imago.ImagoError as error:
    print(type(error).__name__)
"""


def malformed(quick: bool, work: Path) -> list[tuple[str, Path, str]]:
    """The images ``test_malformed.py`` opens (with ``--quick``, those of two of its tests)."""
    kept = work / "malformed"
    kept.mkdir()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_keep_opened"]
    command.append(str(ROOT / "plugins" / "qcow2" / "tests" / "test_malformed.py"))
    if quick:
        command += ["-k", "bad_magic or l1_table_offset_past_eof"]
    env = dict(os.environ, IMAGO_KEEP_OPENED=str(kept), PYTHONPATH=str(ROOT / "bench"))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"test_malformed.py failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return [(f"malformed/{p.name}", p, "qcow2") for p in sorted(kept.iterdir())]


def images(quick: bool, work: Path) -> list[tuple[str, Path, str]]:
    """(label, path, format) of every image to open."""
    found: list[tuple[str, Path, str]] = malformed(quick, work)
    for directory, fmt in (("corpus/qcow2", "qcow2"), ("corpus/raw", "raw")):
        paths = sorted((ROOT / "fuzz" / directory).iterdir())
        found += [(f"{directory}/{p.name}", p, fmt) for p in paths[: 3 if quick else None]]
    for target in sorted((ROOT / "fuzz" / "regressions").iterdir()):
        if target.is_dir() and target.name != "qcow2_write":  # its inputs end in operation trailers
            fmt = "raw" if target.name.startswith("raw") else "qcow2"
            paths = sorted(target.iterdir())
            found += [(f"regressions/{target.name}/{p.name}", p, fmt) for p in paths[: 1 if quick else None]]
    huge = work / "1eib.qcow2"
    size = "1G" if quick else "1E"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(huge), size], check=True)
    found.append((f"qemu-img create -o cluster_size=2M ({size})", huge, "qcow2"))
    return found


def measured(argv: list[str]) -> dict[str, Any]:
    """Peak RSS (KiB), wall clock and output of *argv* run under ``/usr/bin/time``."""
    try:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M %e", *argv],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"rss_kib": 0, "seconds": TIMEOUT, "outcome": "timeout"}
    rss, seconds = done.stderr.strip().splitlines()[-1].split()
    outcome = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"exit {done.returncode}"
    return {"rss_kib": int(rss), "seconds": float(seconds), "outcome": outcome, "status": done.returncode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few images of each kind (smoke test)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imago-bench-hostile-") as work:
        todo = images(args.quick, Path(work))
        floor = measured([sys.executable, "-c", "import imago; print('ok')"])
        rows = []
        for label, path, fmt in todo:
            mine = measured([sys.executable, "-c", CHILD, str(path), fmt])
            theirs = measured(["qemu-img", "info", "-f", fmt, str(path)])
            theirs["outcome"] = "ok" if theirs.get("status") == 0 else "refused"
            rows.append({"image": label, "format": fmt, "imago": mine, "qemu_img": theirs})
    failures = [r for r in rows if r["imago"]["outcome"] not in ("ok",) and not r["imago"]["outcome"].endswith("Error")]
    summary: dict[str, Any] = {"images": len(rows), "python_import_imago": floor, "failures": failures}
    print(f"{len(rows)} images; a Python process importing imago alone: {floor['rss_kib'] / 1024:.1f} MiB")
    print(f"{'':10} {'max RSS MiB':>12} {'median s':>9} {'max s':>7}  outcomes")
    for who in ("imago", "qemu_img"):
        rss = max(r[who]["rss_kib"] for r in rows) / 1024
        seconds = [r[who]["seconds"] for r in rows]
        outcomes: dict[str, int] = {}
        for r in rows:
            outcomes[r[who]["outcome"]] = outcomes.get(r[who]["outcome"], 0) + 1
        summary[who] = {"max_rss_mib": rss, "median_seconds": statistics.median(seconds), "max_seconds": max(seconds)}
        summary[who]["outcomes"] = outcomes
        print(f"{who:10} {rss:>12.1f} {statistics.median(seconds):>9.2f} {max(seconds):>7.2f}  {outcomes}")
    print("costliest for imago (RSS MiB, s, outcome; qemu-img RSS MiB, s):")
    for r in sorted(rows, key=lambda r: (-r["imago"]["rss_kib"], -r["imago"]["seconds"]))[:5]:
        m, q = r["imago"], r["qemu_img"]
        print(
            f"  {r['image'][:60]:60} {m['rss_kib'] / 1024:7.1f} {m['seconds']:6.2f} {m['outcome']:<24}"
            f" {q['rss_kib'] / 1024:7.1f} {q['seconds']:6.2f}"
        )
    for failure in failures:
        print(f"FAILURE: {failure['image']}: {failure['imago']['outcome']}")
    summary["rows"] = rows
    print(json.dumps(summary, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
