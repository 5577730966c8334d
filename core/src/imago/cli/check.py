"""``imago check``: ``qemu-img check`` for every format whose driver claims :attr:`Capability.CHECK`.

Built on the public API only (``imago.open`` then ``check(fix)``). Output, exit statuses and
messages are qemu-img 7.2's: the findings go to stderr one line each (where QEMU's drivers print
them), the summary to stdout, as human text or as qemu-img's JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..api import open as open_image
from ..errors import ImagoError, UnsupportedFeatureError
from ..format.capabilities import Capability
from ..format.check import CheckFinding, CheckResult, RepairMode
from . import qjson
from .common import (
    add_cache,
    add_force_share,
    add_format,
    add_gate_options,
    add_output,
    cache_flags,
    describe_error,
    gate_for,
)

__all__ = ["EXIT_NOT_SUPPORTED", "configure", "format_human", "format_json", "run"]

#: ``qemu-img check``'s exit status for a format without a check (raw, ...).
EXIT_NOT_SUPPORTED = 63


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago check``, qemu-img's (``-f``, ``--output``, ``-r``, ``-T``, ``-U``, ``-q``)."""
    add_format(parser)
    add_output(parser)
    parser.add_argument(
        "-r",
        "--repair",
        dest="repair",
        metavar="leaks|all",
        help="repair leaked clusters only, or all kinds of errors (opens the image for writing)",
    )
    add_cache(parser, "-T", dest="cache", default="writeback")
    add_force_share(parser)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing on stdout (findings and errors still)"
    )
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file")


def run(args: argparse.Namespace) -> int:
    """Check (and with ``-r`` repair) one image; returns qemu-img's exit status.

    0 clean, 1 check not completed (or a bad option, or the image could not be opened),
    2 corruptions, 3 leaks only, 63 the format has no check. Errors are one line on stderr.
    """
    filename: str = args.filename
    if args.output not in ("human", "json"):
        return _fail("--output must be used with human or json as argument.")
    try:
        mode = RepairMode.parse(args.repair)
    except ValueError:
        return _fail(f"Unknown option value for -r (expecting 'leaks' or 'all'): {args.repair}")
    direct, no_flush = cache_flags(args.cache, option="source cache")
    try:
        # -r opens for writing; with -U too, imago.open refuses it, as qemu-img does.
        disk = open_image(
            filename,
            args.format,
            write=mode is not None,
            force_share=args.force_share,
            for_check=True,
            direct=direct,
            no_flush=no_flush,
            gate=gate_for(args, [filename]),
        )
    except (ImagoError, OSError) as error:
        return _fail(f"Could not open '{filename}': {_describe(error)}")
    with disk:
        if not disk.driver.supports(Capability.CHECK):
            return _fail("This image format does not support checks", EXIT_NOT_SUPPORTED)
        try:
            result = disk.check(mode)
        except (ImagoError, OSError) as error:
            if mode is not None and isinstance(error, UnsupportedFeatureError):
                # A check that cannot repair (VDI): qemu-img says the format has no check for -r.
                return _fail("This image format does not support checks", EXIT_NOT_SUPPORTED)
            return _fail(f"Check failed: {_describe(error)}")
    result = result.__replace__(filename=filename)  # qemu-img reports the name as given (copy.replace)
    if result.failure is not None:
        # The check stopped: qemu-img prints what it found before, the reason, and no counts.
        _print_lines([*result.repaired, *result.findings] if _repaired(result) else result.findings)
        return _fail(f"Check failed: {result.failure}")
    _print_lines([*result.repaired, *result.findings] if _repaired(result) else result.findings)
    if not args.quiet:
        sys.stdout.write(format_json(result) if args.output == "json" else format_human(result))
        sys.stdout.flush()
    if result.check_errors:
        return _fail("Check failed")
    return result.exit_status


def _fail(message: str, status: int = 1) -> int:
    print(f"imago: {message}", file=sys.stderr)
    return status


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, ImagoError) and error.strerror:
        return error.strerror
    return describe_error(error)


def _print_lines(findings: Sequence[CheckFinding]) -> None:
    """The lines QEMU's driver prints while checking (stderr): the repair pass, then the check."""
    if findings:
        sys.stderr.write("".join(f"{finding.message}\n" for finding in findings))
        sys.stderr.flush()


def _repaired(result: CheckResult) -> bool:
    return bool(result.corruptions_fixed or result.leaks_fixed)


def format_human(result: CheckResult) -> str:
    """``qemu-img check``'s human summary of *result* (what it prints on stdout)."""
    out: list[str] = []
    if _repaired(result):
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if result.clean:
        out.append("No errors were found on the image.\n")
    else:
        if result.corruptions:
            out.append(
                f"\n{result.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if result.leaks:
            out.append(
                f"\n{result.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if result.check_errors:
            out.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
    total = result.total_clusters or 0
    allocated = result.allocated_clusters or 0
    if total and allocated:
        fragmented = result.fragmented_clusters or 0
        compressed = result.compressed_clusters or 0
        out.append(
            f"{allocated}/{total} = {allocated * 100.0 / total:.2f}% allocated, "
            f"{fragmented * 100.0 / allocated:.2f}% fragmented, "
            f"{compressed * 100.0 / allocated:.2f}% compressed clusters\n"
        )
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(out)


def format_json(result: CheckResult) -> str:
    """``qemu-img check --output=json``'s text for *result*, byte for byte (QEMU's JSON writer)."""
    return qjson.dumps(result.to_json()) + "\n"
