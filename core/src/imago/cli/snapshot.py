"""``imago snapshot``: ``qemu-img snapshot`` for every format whose driver claims :attr:`Capability.SNAPSHOTS`.

``imago snapshot [-f FMT] [-U] [-q] (-l | -c NAME | -a NAME | -d NAME) FILE`` lists, creates,
applies or deletes internal snapshots. The ``-l`` table, the messages and the exit statuses
are qemu-img 7.2's; ``-a`` finds the snapshot by ID first, then by name, ``-d`` by name only,
as qemu-img does. The image is opened without its backing file: no snapshot operation reads
it, so a missing or far-away backing file does not stop them (qemu-img 7.2 opens it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from .. import runtime
from ..api import open as open_image
from ..errors import ImagoError
from ..format.capabilities import Capability, SnapshotRecord, SupportsSnapshots
from .common import CliError, add_format, add_gate_options, describe_error, gate_for

__all__ = ["configure", "format_size", "format_table", "run"]


class _Action(argparse.Action):
    """``-l``, ``-c``, ``-a``, ``-d``: one of them, once (qemu-img's rule)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if namespace.action is not None:
            parser.error("Cannot mix '-l', '-a', '-c', '-d'")
        namespace.action = self.const
        namespace.name = None if self.const == "list" else values


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago snapshot``, qemu-img's (``-f`` as in later qemu-img versions)."""
    parser.set_defaults(action=None, name=None)
    actions = parser.add_argument_group("actions (one of them)")
    actions.add_argument(
        "-l", dest="_list", action=_Action, const="list", nargs=0, help="list the snapshots (the default)"
    )
    actions.add_argument("-c", dest="_create", action=_Action, const="create", metavar="NAME", help="create a snapshot")
    actions.add_argument(
        "-a",
        dest="_apply",
        action=_Action,
        const="apply",
        metavar="NAME",
        help="revert the disk to a snapshot (found by ID, then by name)",
    )
    actions.add_argument(
        "-d", dest="_delete", action=_Action, const="delete", metavar="NAME", help="delete a snapshot (found by name)"
    )
    add_format(parser)
    parser.add_argument(
        "-U",
        "--force-share",
        dest="force_share",
        action="store_true",
        help="open the image read-only without locks that would stop a writer (-l only)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="quiet (the commands print nothing on success)")
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file (its backing file is not opened)")


def run(args: argparse.Namespace) -> int:
    """Run the action on one image; 0 on success, 1 on any error (qemu-img's statuses)."""
    filename: str = args.filename
    action: str | None = args.action
    name: str | None = args.name
    write = action != "list"
    if write and args.force_share:
        raise CliError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    try:
        disk = open_image(
            filename,
            args.format,
            write=write,
            force_share=args.force_share,
            backing=False,
            gate=gate_for(args, [filename]),
        )
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with disk:
        snapshots = Capability.SNAPSHOTS.of(disk.driver)
        if action == "list":
            if snapshots is not None and snapshots.snapshots:
                sys.stdout.write(format_table(snapshots.snapshots))
        elif action is not None:
            assert name is not None
            _change(action, name, snapshots)
    return 0


#: What qemu-img says when the format has no snapshots, by action.
_UNSUPPORTED = {
    "create": "-95 (Operation not supported)",
    "apply": "Block driver does not support snapshots",
    "delete": "snapshot not found",
}


def _change(action: str, name: str, snapshots: SupportsSnapshots | None) -> None:
    """Create, apply or delete the snapshot *name*; a :class:`CliError` with qemu-img's message if not."""
    failure = f"Could not {action} snapshot '{name}': "
    if snapshots is None:
        raise CliError(failure + _UNSUPPORTED[action])
    # qemu-img applies by ID, then by name, and deletes by name only.
    if action == "apply" and not any(name in (s.id, s.name) for s in snapshots.snapshots):
        raise CliError(failure + "Failed to load snapshot: No such file or directory")
    if action == "delete" and not any(s.name == name for s in snapshots.snapshots):
        raise CliError(failure + "snapshot not found")
    operations: dict[str, Callable[[str], Coroutine[Any, Any, object]]] = {
        "create": snapshots.create_snapshot,
        "apply": snapshots.apply_snapshot,
        "delete": snapshots.delete_snapshot,
    }
    try:
        runtime.run_sync(operations[action](name))
    except (ImagoError, OSError) as error:
        raise CliError(failure + describe_error(error)) from None


def format_size(size: int) -> str:
    """A byte count as qemu prints it in tables: three significant digits and a binary unit (``1.5 MiB``)."""
    exponent = math.frexp(size / (1000.0 / 1024.0))[1]
    index = max(0, (exponent - 1) // 10)
    return f"{size / (1 << (index * 10)):.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[index]}B"


def _row(snapshot: SnapshotRecord) -> str:
    facts = snapshot.describe()
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(facts.get("date-sec", 0))))
    clock_ns = int(facts.get("vm-clock-sec", 0)) * 1_000_000_000 + int(facts.get("vm-clock-nsec", 0))
    seconds = clock_ns // 1_000_000_000
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{clock_ns // 1_000_000 % 1000:03d}"
    icount = "" if facts.get("icount") is None else str(facts["icount"])
    size = format_size(int(facts.get("vm-state-size", 0)))
    return f"{snapshot.id:<9} {snapshot.name:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}\n"


def format_table(snapshots: Iterable[SnapshotRecord]) -> str:
    """``qemu-img snapshot -l``'s table (dates in local time), ending with a newline."""
    header = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}\n"
    return "Snapshot list:\n" + header + "".join(_row(snapshot) for snapshot in snapshots)
