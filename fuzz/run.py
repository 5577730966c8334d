"""Fuzzing campaigns: ``python -m fuzz TARGET [--minutes N] [--jobs J]``.

Starts *J* fuzzing processes (:mod:`fuzz.engine`) on the target, sharing one growing corpus
(``fuzz/work/TARGET``, seeded from the committed corpus directories, which are never written)
and one findings directory (``fuzz/findings/TARGET``: libFuzzer's ``crash-*``, ``timeout-*``,
``oom-*`` files). Each process stops after the given minutes (or ``--runs`` inputs). The exit
status is 0 when no process found anything, 1 otherwise. A finding becomes a regression input
by copying it to ``fuzz/regressions/TARGET/`` (the test suite replays it).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .verdict import DEFAULT_TIME_LIMIT

__all__ = ["FINDINGS_DIR", "TARGET_NAMES", "WORK_DIR", "collect", "engine_command", "main"]

FUZZ_DIR = Path(__file__).resolve().parent
REPO_ROOT = FUZZ_DIR.parent
#: The growing corpora of campaigns (not committed).
WORK_DIR = FUZZ_DIR / "work"
#: libFuzzer's artifacts: the inputs of findings (not committed; copy them to regressions/).
FINDINGS_DIR = FUZZ_DIR / "findings"
#: The targets by name; listed here so that the runner starts without importing imago.
TARGET_NAMES = (
    "qcow2_read",
    "qcow2_write",
    "raw_read",
    "vmdk_read",
    "vdi_read",
    "vpc_read",
    "vhdx_read",
    "cli_info",
    "cli_check",
)
_SEEDS = {
    "qcow2_read": ("qcow2",),
    "qcow2_write": ("qcow2_write", "qcow2"),
    "raw_read": ("raw",),
    "vmdk_read": ("vmdk",),
    "vdi_read": ("vdi",),
    "vpc_read": ("vpc",),
    "vhdx_read": ("vhdx",),
    "cli_info": ("qcow2",),
    "cli_check": ("qcow2",),
}
#: libFuzzer's RSS cap per process (MiB); the address-space cap is set by the engine itself.
RSS_LIMIT_MB = 2048


def engine_command(
    target: str,
    *,
    corpus: Path | None,
    findings: Path,
    seconds: int | None = None,
    runs: int | None = None,
    timeout: int = DEFAULT_TIME_LIMIT,
    seed: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one fuzzing process (run it with the repository root as working directory)."""
    dirs = [] if corpus is None else [str(corpus)]
    dirs += [str(FUZZ_DIR / "corpus" / name) for name in _SEEDS[target]]
    options = [
        f"-timeout={timeout}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={findings}/",
        "-error_exitcode=77",
        "-timeout_exitcode=70",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        options.append(f"-max_total_time={seconds}")
    if runs is not None:
        options.append(f"-runs={runs}")
    if seed is not None:
        options.append(f"-seed={seed}")
    return [sys.executable, "-m", "fuzz.engine", target, *options, *extra, *dirs]


#: The exit status of a process the engine's watchdog ended (``faulthandler``'s).
WATCHDOG_STATUS = 1


def collect(findings: Path, pid: int, status: int) -> Path | None:
    """After fuzzing process *pid* ended with *status*: keep its in-flight input if the watchdog fired.

    Returns the ``hang-<sha1>`` file kept, if any; the in-flight file is removed either way, and so
    are the process's tmpfs image directories (libFuzzer exits without running Python's atexit).
    """
    from .targets.cli import remove_process_directories

    remove_process_directories(pid)
    inflight = findings / f"inflight-{pid}"
    if not inflight.exists():
        return None
    data = inflight.read_bytes()
    inflight.unlink()
    if status != WATCHDOG_STATUS:
        return None
    kept = findings / f"hang-{hashlib.sha1(data).hexdigest()}"
    kept.write_bytes(data)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Run a campaign; returns 1 if any process reported a finding."""
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("target", choices=TARGET_NAMES)
    parser.add_argument("--minutes", type=float, default=10.0, help="per process (default: %(default)s)")
    parser.add_argument("--runs", type=int, help="stop each process after this many inputs instead")
    parser.add_argument("--jobs", type=int, default=1, help="parallel fuzzing processes (default: 1)")
    parser.add_argument(
        "--timeout", type=int, default=DEFAULT_TIME_LIMIT, help="seconds per input (default: %(default)s)"
    )
    parser.add_argument("libfuzzer", nargs="*", help="further libFuzzer options (after --), e.g. -max_len=65536")
    args = parser.parse_args(argv)
    corpus = WORK_DIR / args.target
    findings = FINDINGS_DIR / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    seconds = None if args.runs is not None else max(1, round(args.minutes * 60))
    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[tuple[subprocess.Popen[bytes], Path | None]] = []
    for job in range(args.jobs):
        command = engine_command(
            args.target,
            corpus=corpus,
            findings=findings,
            seconds=seconds,
            runs=args.runs,
            timeout=args.timeout,
            extra=args.libfuzzer,
        )
        if args.jobs == 1:
            processes.append((subprocess.Popen(command, cwd=REPO_ROOT), None))
        else:
            log = logs / f"{args.target}-{job}.log"
            print(f"job {job}: {' '.join(command)} > {log}")
            with log.open("w") as output:
                processes.append(
                    (subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT), log)
                )
    statuses = [process.wait() for process, _log in processes]
    for (process, _log), status in zip(processes, statuses, strict=True):
        collect(findings, process.pid, status)
    found = sorted(path.name for path in findings.iterdir())
    print(f"{args.target}: exit statuses {statuses}; findings in {findings}: {len(found)}")
    for name in found:
        print(f"  {name}")
    return 0 if all(status == 0 for status in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
