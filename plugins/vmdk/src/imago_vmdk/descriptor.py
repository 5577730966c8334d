"""The text descriptor: CIDs, the create type, the parent's name and the extent lines.

A descriptor is either a file of its own (``monolithicFlat``, ``twoGbMaxExtent*``, ``vmfs*``)
or embedded in a hosted sparse extent (``monolithicSparse``, ``streamOptimized``). Parsing is
strict where a mistake would open the wrong file or misplace data (extent lines: malformed ones,
unknown types and names that are not plain relative file names are refused with the line
named), lenient elsewhere (unknown keys and the disk database are kept but not interpreted).
"""

from __future__ import annotations

import enum
import os
import re

from imago import CorruptImageError, ImplicitOpenDeniedError, Record, UnsupportedFeatureError, check_local_file_name

__all__ = [
    "MAX_DESCRIPTOR_BYTES",
    "NO_PARENT_CID",
    "Access",
    "Descriptor",
    "ExtentLine",
    "ExtentType",
    "looks_like_descriptor",
    "parse_descriptor",
]

#: Descriptors larger than this are refused (QEMU reads at most 1 MiB - 1 of one).
MAX_DESCRIPTOR_BYTES = 1 << 20
#: The parentCID of an image without a parent.
NO_PARENT_CID = 0xFFFFFFFF


class Access(enum.Enum):
    """An extent's access mode."""

    RW = "RW"
    RDONLY = "RDONLY"
    NOACCESS = "NOACCESS"


class ExtentType(enum.Enum):
    """The extent types this driver reads (device extents, VMFSRDM/VMFSRAW, are refused)."""

    SPARSE = "SPARSE"
    FLAT = "FLAT"
    VMFS = "VMFS"
    VMFSSPARSE = "VMFSSPARSE"
    ZERO = "ZERO"
    SESPARSE = "SESPARSE"


# Extent types that name a file holding raw sectors, and those holding a sparse header.
FLAT_TYPES = frozenset({ExtentType.FLAT, ExtentType.VMFS})
SPARSE_TYPES = frozenset({ExtentType.SPARSE, ExtentType.VMFSSPARSE})
# Types VMware defines that are not (yet) read here: named in the refusal.
_KNOWN_UNSUPPORTED = frozenset({"VMFSRDM", "VMFSRAW"})

#: The createTypes of descriptor files this driver opens (sparse monoliths embed theirs).
DESCRIPTOR_FILE_TYPES = frozenset(
    {"monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs", "vmfsSparse", "seSparse"}
)

_EXTENT_LINE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\S+)\s+(\S+)(?:\s+"([^"]*)"(?:\s+(\S+))?)?\s*$')
_KEY_VALUE = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")


class ExtentLine(Record):
    """One extent line: access, size in sectors, type, file name (``None`` for ZERO) and start sector.

    ``line_number`` (from 1) and ``text`` say where it was, for errors.
    """

    __slots__ = ("access", "filename", "line_number", "sectors", "start_sector", "text", "type")

    access: Access
    sectors: int
    type: ExtentType
    filename: str | None
    start_sector: int
    line_number: int
    text: str

    def __init__(
        self,
        *,
        access: Access,
        sectors: int,
        type: ExtentType,
        filename: str | None,
        start_sector: int,
        line_number: int,
        text: str,
    ) -> None:
        object.__setattr__(self, "access", access)
        object.__setattr__(self, "sectors", sectors)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "filename", filename)
        object.__setattr__(self, "start_sector", start_sector)
        object.__setattr__(self, "line_number", line_number)
        object.__setattr__(self, "text", text)

    def where(self, descriptor: str | None) -> str:
        """``line N of DESCRIPTOR ('TEXT')``, for messages."""
        return f"line {self.line_number} of the descriptor {descriptor or '<image>'} ({self.text!r})"


class Descriptor(Record):
    """A parsed descriptor: ``cid``, ``parent_cid``, ``create_type``, ``parent_hint``, ``extents``, ``ddb``."""

    __slots__ = ("cid", "create_type", "ddb", "extents", "parent_cid", "parent_hint", "version")

    version: int
    cid: int
    parent_cid: int
    create_type: str | None
    parent_hint: str | None
    extents: tuple[ExtentLine, ...]
    ddb: dict[str, str]

    def __init__(
        self,
        *,
        version: int,
        cid: int,
        parent_cid: int,
        create_type: str | None,
        parent_hint: str | None,
        extents: tuple[ExtentLine, ...],
        ddb: dict[str, str],
    ) -> None:
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "cid", cid)
        object.__setattr__(self, "parent_cid", parent_cid)
        object.__setattr__(self, "create_type", create_type)
        object.__setattr__(self, "parent_hint", parent_hint)
        object.__setattr__(self, "extents", extents)
        object.__setattr__(self, "ddb", ddb)


def looks_like_descriptor(head: bytes, *, strict: bool = True) -> bool:
    """Whether *head* (the start of a file) is a text descriptor, by QEMU's probing rule.

    Comment lines and lines of spaces may come first; the first other line must be
    ``version=1``, ``2`` or ``3``. A file starting with ``# Disk DescriptorFile`` passes through
    the comment rule. Not *strict* (opening a file named as vmdk, not probing), empty lines and
    leading blanks are allowed too.
    """
    for raw_line in head.split(b"\n"):
        line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
        if not strict:
            line = line.strip(b" \t")
        if line.startswith(b"#"):
            continue
        if (line.startswith(b" ") or not strict) and not line.strip(b" "):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def _hex32(value: str, key: str, descriptor: str | None, line_number: int) -> int:
    try:
        number = int(value, 16)
    except ValueError:
        number = -1
    if not 0 <= number <= 0xFFFFFFFF:
        raise CorruptImageError(
            descriptor, None, f"line {line_number} of the descriptor: {key} must be a 32-bit hex number, not {value!r}"
        )
    return number


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(data: bytes, descriptor: str | None, *, offset: int = 0) -> Descriptor:
    """Parse descriptor text *data* read from *descriptor* at *offset*.

    The text ends at its first NUL byte, as QEMU and VMware read it (the descriptor area of a
    sparse extent is padded with NULs, and QEMU's CID updates leave old bytes after the NUL that
    ends the new text). A NUL inside an extent line is refused, naming the line: the line's file
    name would otherwise be cut short.

    Raises :class:`CorruptImageError` for malformed content, :class:`UnsupportedFeatureError`
    for extent types not read here, and :class:`ImplicitOpenDeniedError` for extent names that
    are not plain relative local file names; each names the descriptor line.
    """
    original = data
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise CorruptImageError(
            descriptor, offset, f"the descriptor is {len(data)} bytes long, more than {MAX_DESCRIPTOR_BYTES}"
        )
    data = data.split(b"\0", 1)[0]
    text = data.decode("utf-8", "surrogateescape")
    cut = len(data) < len(original)
    if cut and not text.endswith("\n"):
        last = text.rsplit("\n", 1)[-1].strip()
        if last.split(None, 1)[:1] in (["RW"], ["RDONLY"], ["NOACCESS"]):
            raise CorruptImageError(
                descriptor, offset + len(data), f"line {text.count(chr(10)) + 1} of the descriptor contains a NUL byte"
            )
    version: int | None = None
    cid: int | None = None
    parent_cid: int | None = None
    create_type: str | None = None
    parent_hint: str | None = None
    extents: list[ExtentLine] = []
    ddb: dict[str, str] = {}
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        first = line.split(None, 1)[0]
        if first in ("RW", "RDONLY", "NOACCESS"):
            extents.append(_extent_line(line, number, descriptor))
            continue
        match = _KEY_VALUE.match(line)
        if match is None:
            continue  # (unknown line: ignored, as VMware and QEMU do)
        key, value = match.group(1), _unquote(match.group(2))
        if key == "version":
            if value not in ("1", "2", "3"):
                raise UnsupportedFeatureError(f"VMDK descriptor version {value!r} (line {number})", descriptor)
            version = int(value)
        elif key == "CID":
            cid = _hex32(value, key, descriptor, number)
        elif key == "parentCID":
            parent_cid = _hex32(value, key, descriptor, number)
        elif key == "createType":
            create_type = value
        elif key == "parentFileNameHint":
            parent_hint = value or None  # (an empty name: no parent)
        elif key.startswith("ddb."):
            ddb[key] = value
    if cid is None or parent_cid is None:
        raise CorruptImageError(descriptor, offset, "the descriptor has no CID or no parentCID line")
    return Descriptor(
        version=version or 1,
        cid=cid,
        parent_cid=parent_cid,
        create_type=create_type,
        parent_hint=parent_hint,
        extents=tuple(extents),
        ddb=ddb,
    )


def _extent_line(line: str, number: int, descriptor: str | None) -> ExtentLine:
    where = f"line {number} of the descriptor {descriptor or '<image>'} ({line!r})"
    match = _EXTENT_LINE.match(line)
    if match is None:
        raise CorruptImageError(descriptor, None, f"invalid extent line: {where}")
    access_text, sectors_text, type_text, filename, start_text = match.groups()
    if type_text in _KNOWN_UNSUPPORTED:
        raise UnsupportedFeatureError(f"{type_text} extents ({where})", descriptor)
    try:
        extent_type = ExtentType(type_text)
    except ValueError:
        raise CorruptImageError(descriptor, None, f"unknown extent type {type_text!r}: {where}") from None
    if not sectors_text.isdigit() or int(sectors_text) <= 0:
        raise CorruptImageError(descriptor, None, f"the extent size must be a positive number of sectors: {where}")
    sectors = int(sectors_text)
    start_sector = 0
    if extent_type is ExtentType.ZERO:
        if filename is not None:
            raise CorruptImageError(descriptor, None, f"a ZERO extent names no file: {where}")
    elif filename is None:
        raise CorruptImageError(descriptor, None, f"the extent names no file: {where}")
    else:
        check_extent_name(filename, where)
    if extent_type is ExtentType.FLAT:
        if start_text is None or not start_text.isdigit():
            raise CorruptImageError(descriptor, None, f"a FLAT extent needs its start sector: {where}")
        start_sector = int(start_text)
    elif start_text is not None:
        raise CorruptImageError(descriptor, None, f"only FLAT extents have a start sector: {where}")
    return ExtentLine(
        access=Access(access_text),
        sectors=sectors,
        type=extent_type,
        filename=filename,
        start_sector=start_sector,
        line_number=number,
        text=line,
    )


def check_extent_name(name: str, where: str) -> str:
    """Refuse extent names that are not relative local names below the descriptor's directory.

    Absolute names, ``..`` components, protocol and ``json:`` prefixes and NUL bytes are refused
    (:class:`ImplicitOpenDeniedError`, naming *where*: the descriptor line): an extent name must
    never make us open a file the image's directory does not hold (CVE-2022-47951).
    """
    reason: str | None = None
    if not name:
        reason = "an empty file name"
    elif "\0" in name:
        reason = "a file name with a NUL byte"
    elif os.path.isabs(name):
        reason = "an absolute file name"
    elif ".." in name.replace("\\", "/").split("/"):
        reason = "a file name leaving the descriptor's directory ('..')"
    else:
        try:
            check_local_file_name(name)
        except ImplicitOpenDeniedError:
            reason = "not a plain local file name (a protocol or json: prefix)"
    if reason is not None:
        raise ImplicitOpenDeniedError(
            name, f"extent names must be relative local file names; {reason} on {where}", allowable=False
        )
    return name
