#!/usr/bin/env python3
"""Start-up time of the ``imago`` command against a bare ``python -c pass`` and ``qemu-img``.

Each contender is a fresh process (wall clock of ``subprocess.run``, output discarded):

* ``python -c pass``: the floor, the interpreter and ``site`` alone (the reference of every ratio);
* ``python -c "import typing, argparse, pluggy"``: what any typed command line tool built on
  argparse and pluggy pays before its own code runs (the floor under imago's figures);
* ``python -c "import imago"``;
* ``imago --help`` (lists the plugins' subcommands too, so it loads every plugin);
* ``imago info`` of a small raw and a small qcow2 image (made by ``qemu-img create``), with the
  format probed, and with ``-f`` naming it (only the plugins declaring the drivers load);
* ``qemu-img info`` of the same images.

Rounds run every contender once, in turn, so that the machine's load hits all alike; ``--runs``
rounds (default 30, ``--quick`` 3) after one warm-up round. The best and the median of each
are reported in milliseconds, and their ratios to ``python -c pass`` (lower is better); the
target of the start-up issue is ``imago info`` at most 3x ``python -c pass`` (best wall clock).
The CPU time of each process (user + system, from ``getrusage``) is reported too: on a machine
busy with other work the wall clock of short processes largely measures the wait for a CPU,
which their CPU time leaves out (it still grows with the load, less). The processes run with
``PYTHONDONTWRITEBYTECODE`` removed from the environment, so that Python writes its bytecode
caches in the warm-up and reads them afterwards, as an installed ``imago`` does (a test
environment that sets it makes every import compile its module again). ``--breakdown`` adds
the modules that cost most in ``imago info`` of the qcow2 image (``python -X importtime``).
``--baseline TREE`` runs the imago commands a second time from another source tree (its
``core/src`` and ``plugins/*/src`` first on ``PYTHONPATH``; make one with ``git worktree add``),
in the same rounds, as rows marked ``[baseline]``.
The last line of the output is one JSON object with every figure. Exit status 0 unless a
command failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

TARGET = 3.0  # imago info / python -c pass, from the issue


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="timed rounds (default 30; --quick: 3)")
    parser.add_argument("--dir", help="directory for the images (default: the system temp dir)")
    parser.add_argument("--breakdown", action="store_true", help="also list the costliest imports of imago info")
    parser.add_argument("--baseline", help="another source tree whose imago commands run too, for comparison")
    parser.add_argument("--no-qemu", action="store_true", help="skip qemu-img info")
    parser.add_argument("--quick", action="store_true", help="3 rounds: checks that everything runs")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 30
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.baseline is not None and not os.path.isdir(os.path.join(args.baseline, "core", "src")):
        parser.error(f"--baseline {args.baseline!r} is not an imago source tree")
    return args


def environment(tree: str | None = None) -> dict[str, str]:
    """This environment without PYTHONDONTWRITEBYTECODE (the processes use .pyc files), with *tree* first."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        paths = [os.path.join(tree, "core", "src"), *sorted(glob.glob(os.path.join(tree, "plugins", "*", "src")))]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return env


def imago_command() -> list[str]:
    """The installed console script next to this Python, else ``python -m imago.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "imago")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "imago.cli"]


Command = tuple[list[str], dict[str, str]]  # argv, environment


def contenders(directory: str, qemu: bool, baseline: str | None) -> dict[str, Command]:
    raw, qcow2 = os.path.join(directory, "small.raw"), os.path.join(directory, "small.qcow2")
    imago = imago_command()
    argvs = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import typing,argparse,pluggy": [sys.executable, "-c", "import typing, argparse, pluggy"],
        "import imago": [sys.executable, "-c", "import imago"],
        "imago --help": [*imago, "--help"],
        "imago info raw": [*imago, "info", raw],
        "imago info qcow2": [*imago, "info", qcow2],
        "imago info -f raw": [*imago, "info", "-f", "raw", raw],
        "imago info -f qcow2": [*imago, "info", "-f", "qcow2", qcow2],
    }
    if qemu:
        argvs["qemu-img info raw"] = ["qemu-img", "info", raw]
        argvs["qemu-img info qcow2"] = ["qemu-img", "info", qcow2]
    env = environment()
    commands = {name: (argv, env) for name, argv in argvs.items()}
    if baseline is not None:
        env = environment(baseline)
        for name, argv in argvs.items():
            if "imago" in name:
                commands[f"{name} [baseline]"] = (argv, env)
    return commands


def make_images(directory: str) -> None:
    for fmt in ("raw", "qcow2"):
        path = os.path.join(directory, f"small.{fmt}")
        if shutil.which("qemu-img"):
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, "64M"], check=True)
        elif fmt == "raw":
            with open(path, "wb") as file:
                file.truncate(64 << 20)
        else:
            raise SystemExit("qemu-img is needed to make the qcow2 image")


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """One run of *argv*: (wall clock, CPU time) in seconds."""
    cpu, start = cpu_of_children(), time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed, cpu = time.perf_counter() - start, cpu_of_children() - cpu
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {result.returncode}: {result.stderr.decode()}")
    return elapsed, cpu


def measure(commands: dict[str, Command], runs: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for argv, env in commands.values():  # warm-up: writes the bytecode caches, fills the page cache
        run_once(argv, env)
    for _ in range(runs):
        for name, (argv, env) in commands.items():
            times[name].append(run_once(argv, env))
    return times


def breakdown(argv: list[str], env: dict[str, str], top: int = 15) -> list[dict[str, Any]]:
    """The modules of the largest own import time in one run of *argv* (a Python console script)."""
    python_argv = argv if argv[0] == sys.executable else [sys.executable, argv[0], *argv[1:]]
    result = subprocess.run(
        [python_argv[0], "-X", "importtime", *python_argv[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    rows: list[dict[str, Any]] = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        rows.append({"module": name.strip(), "self_ms": int(own) / 1000, "cumulative_ms": int(cumulative) / 1000})
    rows.sort(key=lambda row: row["self_ms"], reverse=True)
    return rows[:top]


def report(times: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> dict[str, Any]:
    def stats(samples: list[tuple[float, float]], which: int) -> tuple[float, float]:
        values = [sample[which] for sample in samples]
        return min(values), statistics.median(values)

    base_wall, base_cpu = stats(times["python -c pass"], 0), stats(times["python -c pass"], 1)
    print(f"start-up, {args.runs} rounds, PYTHONDONTWRITEBYTECODE unset for the measured processes")
    print(
        f"{'command':33} {'best ms':>8} {'median':>8} {'cpu best':>9} {'median':>8}"
        f" {'best x':>7} {'median x':>8} {'cpu x':>6}  target"
    )
    figures: dict[str, Any] = {}
    for name, samples in times.items():
        (best, median), (cpu_best, cpu_median) = stats(samples, 0), stats(samples, 1)
        entry: dict[str, Any] = {
            "best_ms": round(best * 1000, 2),
            "median_ms": round(median * 1000, 2),
            "best_ratio": round(best / base_wall[0], 2),
            "median_ratio": round(median / base_wall[1], 2),
            "best_cpu_ms": round(cpu_best * 1000, 2),
            "median_cpu_ms": round(cpu_median * 1000, 2),
            "best_cpu_ratio": round(cpu_best / base_cpu[0], 2) if base_cpu[0] else None,
        }
        target = ""
        if name.startswith("imago info"):
            entry["target"] = TARGET
            entry["meets_target"] = entry["best_ratio"] <= TARGET
            target = f"<= {TARGET:g}x " + ("PASS" if entry["meets_target"] else "FAIL")
        figures[name] = entry
        cpu_ratio = "-" if entry["best_cpu_ratio"] is None else f"{entry['best_cpu_ratio']:.2f}"
        print(
            f"{name:33} {entry['best_ms']:8.1f} {entry['median_ms']:8.1f} {entry['best_cpu_ms']:9.1f}"
            f" {entry['median_cpu_ms']:8.1f} {entry['best_ratio']:7.2f} {entry['median_ratio']:8.2f}"
            f" {cpu_ratio:>6}  {target}"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imago-bench-startup-", dir=args.dir) as directory:
        make_images(directory)
        qemu = not args.no_qemu and shutil.which("qemu-img") is not None
        commands = contenders(directory, qemu, args.baseline)
        try:
            times = measure(commands, args.runs)
        except RuntimeError as error:
            print(f"bench_startup: {error}", file=sys.stderr)
            return 1
        figures = report(times, args)
        summary: dict[str, Any] = {
            "config": {
                "runs": args.runs,
                "quick": args.quick,
                "python": sys.version.split()[0],
                "baseline": args.baseline,
            },
            "results": figures,
        }
        if args.breakdown:
            rows = breakdown(*commands["imago info qcow2"])
            print("costliest imports of imago info qcow2 (own time, -X importtime, one run):")
            for row in rows:
                print(f"  {row['module']:40} {row['self_ms']:7.2f} ms (with its imports {row['cumulative_ms']:.2f} ms)")
            summary["breakdown"] = rows
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
