"""``imago dd``: ``qemu-img dd`` (7.2): copy part of an image into a new image, dd style.

Operands are ``if=``, ``of=``, ``bs=`` (default 512), ``count=`` and ``skip=`` (in blocks,
qemu's size suffixes allowed). As in qemu-img, the copy ends at ``count`` blocks from the start
of the input (``skip`` does not move that end), the output is created for exactly what is
copied (rounded up to 512 bytes) and every byte is written (no sparse detection).
"""

from __future__ import annotations

import argparse
import sys

from ..api import create, open
from ..errors import DriverNotFoundError
from ..plugin.manager import format_driver
from .common import (
    CliError,
    add_force_share,
    add_format,
    add_gate_options,
    check_interrupt,
    gate_for,
    interruptible,
    parse_size,
)

__all__ = ["configure", "run"]

_INT_MAX = (1 << 31) - 1
#: Bytes copied per request (whole blocks of ``bs``; the output bytes do not depend on it).
_CHUNK = 4 << 20
_SUFFIXES = (
    "You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago dd``, qemu-img's."""
    add_format(parser, what="the input image")
    parser.add_argument("-O", dest="output_format", default="raw", metavar="FMT", help="output format (default: raw)")
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument(
        "operands",
        nargs="*",
        metavar="OPERAND",
        help="if=INPUT of=OUTPUT [bs=BLOCK_SIZE (512)] [count=BLOCKS] [skip=BLOCKS]",
    )


def _operands(texts: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            raise CliError(f"unrecognized operand {key}")
        values[key] = value  # the last one counts, as in qemu-img
    return values


def _number(values: dict[str, str], key: str) -> int | None:
    text = values.get(key)
    if text is None:
        return None
    try:
        return parse_size(text, what=key)
    except CliError:
        raise CliError(f"Invalid {key} specified. {_SUFFIXES}") from None


def run(args: argparse.Namespace) -> int:
    """Copy; 0 on success (also when ``skip`` is past the end, as qemu-img), 1 on errors."""
    values = _operands(args.operands)
    block = _number(values, "bs")
    if block is None:
        block = 512
    elif not 1 <= block <= _INT_MAX:
        raise CliError(f"Invalid bs specified. Must be between 1 and {_INT_MAX}.")
    count = _number(values, "count")
    skip = _number(values, "skip") or 0
    source, target = values.get("if"), values.get("of")
    if not source or not target:
        raise CliError("Must specify both input and output files")
    try:
        output = format_driver(args.output_format)
    except DriverNotFoundError:
        raise CliError(f"Unknown file format '{args.output_format}'") from None
    # Each image's implicit opens stay in its own directory (see convert).
    source_gate, target_gate = gate_for(args, [source]), gate_for(args, [target])
    with open(source, args.format, gate=source_gate, force_share=args.force_share) as disk:
        # qemu sees every image as whole 512-byte sectors: the input's last one is padded with zeroes.
        end = -(-disk.size // 512) * 512
        if count is not None and count * block < end:
            end = count * block
        start = skip * block
        size = max(0, end - start)
        create(target, output.name, -(-size // 512) * 512, gate=target_gate)
        if start > end:
            # qemu-img creates an empty output, says so and succeeds.
            print(f"imago: {source}: cannot skip to specified offset", file=sys.stderr)
            return 0
        with open(target, output.name, write=True, gate=target_gate) as out, interruptible():
            buffer = bytearray(max(block, _CHUNK // block * block))
            view = memoryview(buffer)
            position = start
            while position < end:
                check_interrupt()
                step = min(len(buffer), end - position)
                inside = max(0, min(step, disk.size - position))
                disk.read(view[:inside], position)
                view[inside:step] = bytes(step - inside)
                out.write(view[:step], position - start)
                position += step
    return 0
