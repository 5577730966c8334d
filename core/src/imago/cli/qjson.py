r"""JSON as qemu-img prints it: QEMU's pretty printer, byte for byte.

Four spaces per level, ``"key": value``, an empty object or array still split over two lines,
ASCII only with upper-case ``\uXXXX`` escapes, and name bytes that are not UTF-8 shown as
U+FFFD. Python's ``json`` differs in each of these, so tools comparing our output with
qemu-img's text would see differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dumps", "string"]

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def dumps(value: Any, *, pretty: bool = True) -> str:
    """*value* (dicts, lists, strings, ints, floats, bools, ``None``) as QEMU writes it, no newline at the end."""
    out: list[str] = []
    _write(out, value, 0, pretty)
    return "".join(out)


def _write(out: list[str], value: Any, level: int, pretty: bool) -> None:
    if isinstance(value, Mapping):
        _container(out, "{", "}", [(string(str(k)) + ": ", v) for k, v in value.items()], level, pretty)
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        _container(out, "[", "]", [("", v) for v in value], level, pretty)
    elif isinstance(value, bool) or value is None:
        out.append({True: "true", False: "false", None: "null"}[value])
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(repr(value))
    else:
        out.append(string(str(value)))


def _container(
    out: list[str], opening: str, closing: str, items: list[tuple[str, Any]], level: int, pretty: bool
) -> None:
    out.append(opening)
    for index, (prefix, item) in enumerate(items):
        if index:
            out.append(",")
        out.append("\n" + "    " * (level + 1) if pretty else " ")
        out.append(prefix)
        _write(out, item, level + 1, pretty)
    out.append("\n" + "    " * level if pretty else " ")
    out.append(closing)


def string(text: str) -> str:
    r"""A JSON string as QEMU writes one: ASCII only, upper-case hex escapes (``\u00FC``)."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    out = ['"']
    for char in text:
        point = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif point > 0xFFFF:
            point -= 0x10000
            out.append(f"\\u{0xD800 + (point >> 10):04X}\\u{0xDC00 + (point & 0x3FF):04X}")
        elif point < 0x20 or point >= 0x7F:
            out.append(f"\\u{point:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
