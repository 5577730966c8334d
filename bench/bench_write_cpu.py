#!/usr/bin/env python3
"""CPU cost per qcow2 write request: this source tree against another one (a baseline checkout).

For changes that must not slow the write path (issue 9: the metadata overlap checks, within
5 %), wall-clock benchmarks on a shared machine are too noisy. This one measures the CPU time
(``time.process_time``) of the write path alone, per request:

* ``allocating 1M``: 1 MiB writes into a new 64 MiB qcow2 image (every request allocates);
* ``rewrite 4K``: 4 KiB writes at random offsets of that image, all allocated already.

Each tree runs in its own processes (``PYTHONPATH`` = the tree's ``core/src`` and
``plugins/*/src``), ``--rounds`` times, alternating; each process reports the best of
``--repeat`` runs, and the table shows the best over the rounds, in microseconds per request,
and the ratio this tree / baseline (lower is better). Make a baseline with
``git worktree add /tmp/base <commit>``. The last line of the output is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

_WORKLOAD = r"""
import json, os, random, sys, time
import imago
directory, repeat = sys.argv[1], int(sys.argv[2])
path = os.path.join(directory, "bench-write-cpu.qcow2")
big, small = os.urandom(1 << 20), os.urandom(4096)
size = 64 << 20
offsets = [random.Random(1).randrange(0, size // 4096) * 4096 for _ in range(5000)]

def allocating():
    if os.path.exists(path):
        os.unlink(path)
    imago.create(path, "qcow2", size)
    with imago.open(path, "qcow2", write=True, no_flush=True) as disk:
        start = time.process_time()
        for offset in range(0, size, 1 << 20):
            disk.write(big, offset)
        return (time.process_time() - start) / (size >> 20)

def rewrite():
    with imago.open(path, "qcow2", write=True, no_flush=True) as disk:
        start = time.process_time()
        for offset in offsets:
            disk.write(small, offset)
        return (time.process_time() - start) / len(offsets)

allocating(), rewrite()  # warm up: plugins loaded, caches filled
result = {
    "allocating 1M": min(allocating() for _ in range(repeat)),
    "rewrite 4K": min(rewrite() for _ in range(repeat)),
}
os.unlink(path)
print(json.dumps(result))
"""


def python_path(tree: str) -> str:
    return os.pathsep.join(
        [os.path.join(tree, "core", "src"), *sorted(glob.glob(os.path.join(tree, "plugins", "*", "src")))]
    )


def run_tree(tree: str, directory: str, repeat: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": python_path(tree)}
    out = subprocess.run(
        [sys.executable, "-c", _WORKLOAD, directory, str(repeat)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the other source tree (a checkout of the baseline commit)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per tree, alternating (default 6)")
    parser.add_argument("--repeat", type=int, default=15, help="runs per process; the best counts (default 15)")
    parser.add_argument("--dir", help="directory for the image (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="one round of two runs (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeat = 1, 2
    if not os.path.isdir(os.path.join(args.baseline, "core", "src")):
        parser.error(f"--baseline {args.baseline!r} is not an imago source tree")
    trees = {"this": here, "baseline": os.path.abspath(args.baseline)}
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory(prefix="imago-bench-", dir=args.dir) as directory:
        for round_number in range(args.rounds):
            order = list(trees.items()) if round_number % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                print(f"round {round_number + 1}: {name} ...", file=sys.stderr, flush=True)
                for workload, seconds in run_tree(tree, directory, args.repeat).items():
                    best[name][workload] = min(best[name].get(workload, seconds), seconds)
    print(f"CPU time per write request, best of {args.rounds} x {args.repeat} runs (ratio = this / baseline)")
    print(f"  {'workload':<16}{'this':>12}{'baseline':>12}{'ratio':>8}")
    ratios = {}
    for workload in best["this"]:
        this, baseline = best["this"][workload], best["baseline"][workload]
        ratios[workload] = this / baseline
        print(f"  {workload:<16}{this * 1e6:>10.2f}us{baseline * 1e6:>10.2f}us{ratios[workload]:>8.3f}")
    summary = {
        "benchmark": "imago-write-cpu",
        "trees": trees,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "seconds_per_request": best,
        "ratios": ratios,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
