"""The qcow2 header and its extensions: parsed, validated, kept for later writes.

Every number read from the image is checked (against the file size and QEMU's caps) before
anything is allocated or read because of it.
"""

from __future__ import annotations

import struct
from typing import Any

from imago import CorruptImageError, Record, UnsupportedFeatureError

from .layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPRESSION_TYPES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_FIELDS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTENDED_L2,
    KNOWN_INCOMPAT,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_NAME_BYTES,
    MAX_REFCOUNT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    field_offset,
    header_struct,
    l1_entries,
)

__all__ = [
    "Header",
    "HeaderExtension",
    "build_header",
    "check_table",
    "has_feature_table",
    "header_cluster_size",
    "parse_header",
]

#: Sets a field of a frozen record, once, in its ``__init__``.
_set = object.__setattr__

_FEATURE_KINDS = {0: "incompatible", 1: "compatible", 2: "autoclear"}
_BUILTIN_FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

_V2 = header_struct(0, V2_HEADER_LENGTH)
_V3 = header_struct(V2_HEADER_LENGTH, V3_HEADER_LENGTH)


class HeaderExtension(Record, kw_only=True):
    """A header extension kept as raw bytes (unknown ones are preserved for later writes)."""

    __slots__ = ("data", "type")

    type: int
    data: bytes

    def __init__(self, *, type: int, data: bytes) -> None:
        _set(self, "type", type)
        _set(self, "data", data)


class Header(Record, kw_only=True):
    """The fields of a qcow2 header, validated."""

    __slots__ = (
        "autoclear_features",
        "backing_file",
        "backing_file_offset",
        "backing_file_size",
        "backing_format",
        "cluster_bits",
        "compatible_features",
        "compression_type",
        "crypt_method",
        "data_file",
        "extensions",
        "feature_names",
        "header_length",
        "incompatible_features",
        "l1_size",
        "l1_table_offset",
        "nb_snapshots",
        "refcount_order",
        "refcount_table_clusters",
        "refcount_table_offset",
        "size",
        "snapshots_offset",
        "version",
    )

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    feature_names: dict[tuple[int, int], str]
    extensions: tuple[HeaderExtension, ...]

    def __init__(
        self,
        *,
        version: int,
        backing_file_offset: int,
        backing_file_size: int,
        cluster_bits: int,
        size: int,
        crypt_method: int,
        l1_size: int,
        l1_table_offset: int,
        refcount_table_offset: int,
        refcount_table_clusters: int,
        nb_snapshots: int,
        snapshots_offset: int,
        incompatible_features: int = 0,
        compatible_features: int = 0,
        autoclear_features: int = 0,
        refcount_order: int = 4,
        header_length: int = V2_HEADER_LENGTH,
        compression_type: int = 0,
        backing_file: str | None = None,
        backing_format: str | None = None,
        data_file: str | None = None,
        feature_names: dict[tuple[int, int], str] | None = None,
        extensions: tuple[HeaderExtension, ...] = (),
    ) -> None:
        _set(self, "version", version)
        _set(self, "backing_file_offset", backing_file_offset)
        _set(self, "backing_file_size", backing_file_size)
        _set(self, "cluster_bits", cluster_bits)
        _set(self, "size", size)
        _set(self, "crypt_method", crypt_method)
        _set(self, "l1_size", l1_size)
        _set(self, "l1_table_offset", l1_table_offset)
        _set(self, "refcount_table_offset", refcount_table_offset)
        _set(self, "refcount_table_clusters", refcount_table_clusters)
        _set(self, "nb_snapshots", nb_snapshots)
        _set(self, "snapshots_offset", snapshots_offset)
        _set(self, "incompatible_features", incompatible_features)
        _set(self, "compatible_features", compatible_features)
        _set(self, "autoclear_features", autoclear_features)
        _set(self, "refcount_order", refcount_order)
        _set(self, "header_length", header_length)
        _set(self, "compression_type", compression_type)
        _set(self, "backing_file", backing_file)
        _set(self, "backing_format", backing_format)
        _set(self, "data_file", data_file)
        _set(self, "feature_names", {} if feature_names is None else feature_names)
        _set(self, "extensions", extensions)

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries are 128 bits with 32 subclusters each."""
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """L2 entries per table (a table fills one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        """Width of a refcount entry."""
        return 1 << self.refcount_order

    @property
    def compression(self) -> str:
        """``zlib`` or ``zstd``."""
        return COMPRESSION_TYPES[self.compression_type]

    @property
    def has_data_file(self) -> bool:
        """Whether guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        """Whether the external data file is kept valid as a raw image."""
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    def feature_name(self, kind: int, bit: int) -> str:
        """The name of a feature bit, from the image's table or the specification."""
        name = self.feature_names.get((kind, bit)) or _BUILTIN_FEATURE_NAMES.get((kind, bit))
        return f"{name} ({_FEATURE_KINDS[kind]} bit {bit})" if name else f"unknown {_FEATURE_KINDS[kind]} bit {bit}"

    def l1_entries_needed(self, size: int | None = None) -> int:
        """L1 entries needed to map a disk of *size* bytes (default: this image's)."""
        return l1_entries(self.size if size is None else size, self.cluster_bits, self.extended_l2)

    def describe(self) -> dict[str, Any]:
        """Header facts for ``info()``."""
        return {
            "version": self.version,
            "cluster_size": self.cluster_size,
            "refcount_bits": self.refcount_bits,
            "compression_type": self.compression,
            "extended_l2": self.extended_l2,
            "incompatible_features": self.incompatible_features,
            "compatible_features": self.compatible_features,
            "autoclear_features": self.autoclear_features,
            "header_length": self.header_length,
        }


_at = field_offset


def _corrupt(filename: str | None, offset: int | None, problem: str) -> CorruptImageError:
    return CorruptImageError(filename, offset, problem)


def _decode_name(raw: bytes, what: str, filename: str | None, offset: int) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(filename, offset, f"{what} is not valid UTF-8") from None
    if "\0" in name:
        raise _corrupt(filename, offset, f"{what} contains a NUL byte")
    return name


def header_cluster_size(head: bytes) -> int | None:
    """The cluster size a header's first bytes announce, if it is a plausible qcow2 header.

    :func:`parse_header` wants the whole header cluster; this says how much to read.
    """
    field = HEADER_FIELDS["cluster_bits"]
    if len(head) < field.end or head[:4] != MAGIC:
        return None
    cluster_bits = int.from_bytes(head[field.offset : field.end], "big")
    return 1 << cluster_bits if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS else None


def parse_header(data: bytes, file_size: int, filename: str | None) -> Header:
    """Parse and validate the header in *data* (the file's first cluster, or all of a shorter file)."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise _corrupt(filename, 0, "not a qcow2 image (bad magic)")
    if len(data) < V2_HEADER_LENGTH:
        raise _corrupt(filename, 0, f"header truncated: the file has only {len(data)} bytes")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(data, 0)
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"qcow2 version {version}", filename)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _corrupt(
            filename,
            _at("cluster_bits"),
            f"cluster_bits {cluster_bits} outside [{MIN_CLUSTER_BITS}, {MAX_CLUSTER_BITS}]",
        )
    cluster_size = 1 << cluster_bits
    fields: dict[str, Any] = {}
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise _corrupt(filename, 0, "version 3 header truncated")
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(data, V2_HEADER_LENGTH)
        if header_length < V3_HEADER_LENGTH:
            raise _corrupt(
                filename, _at("header_length"), f"header_length {header_length} is less than {V3_HEADER_LENGTH}"
            )
        if header_length > cluster_size:
            raise _corrupt(
                filename, _at("header_length"), f"header_length {header_length} exceeds the cluster size {cluster_size}"
            )
        if header_length > len(data):
            raise _corrupt(
                filename, _at("header_length"), f"header_length {header_length} runs past the end of the file"
            )
        compression_type = data[_at("compression_type")] if header_length > _at("compression_type") else 0
        fields.update(
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
        )
    else:
        header_length = V2_HEADER_LENGTH
        incompat = 0
        refcount_order = 4
        compression_type = 0

    if crypt_method == 1:
        raise UnsupportedFeatureError("encryption (AES, crypt_method 1)", filename)
    if crypt_method == 2:
        raise UnsupportedFeatureError("encryption (LUKS, crypt_method 2)", filename)
    if crypt_method != 0:
        raise UnsupportedFeatureError(f"encryption (unknown crypt_method {crypt_method})", filename)
    if refcount_order > 6:
        raise _corrupt(
            filename, _at("refcount_order"), f"refcount_order {refcount_order} is above 6 (64-bit refcounts)"
        )

    # Extensions: from the end of the header to the backing file name (or the cluster's end).
    limit = min(cluster_size, len(data))
    if backing_file_offset:
        if backing_file_size > MAX_NAME_BYTES:
            raise _corrupt(
                filename,
                _at("backing_file_size"),
                f"backing file name is {backing_file_size} bytes long (at most {MAX_NAME_BYTES})",
            )
        if backing_file_offset + backing_file_size > cluster_size:
            raise _corrupt(filename, _at("backing_file_offset"), "backing file name does not lie in the header cluster")
        if backing_file_offset + backing_file_size > len(data):
            raise _corrupt(filename, _at("backing_file_offset"), "backing file name runs past the end of the file")
        if backing_file_offset < header_length:
            raise _corrupt(filename, _at("backing_file_offset"), "backing file name overlaps the header")
        limit = backing_file_offset
    feature_names: dict[tuple[int, int], str] = {}
    extensions: list[HeaderExtension] = []
    known: dict[int, bytes] = {}
    position = header_length
    while position + 8 <= limit:
        ext_type, ext_length = struct.unpack_from(">II", data, position)
        if ext_type == EXT_END:
            break
        end = position + 8 + ext_length
        if end > limit:
            what = "the backing file name" if limit == backing_file_offset else "the header cluster"
            raise _corrupt(filename, position, f"header extension {ext_type:#x} runs past {what}")
        payload = bytes(data[position + 8 : end])
        if ext_type in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_DATA_FILE, EXT_BITMAPS, EXT_CRYPTO):
            if ext_type in known:
                raise _corrupt(filename, position, f"header extension {ext_type:#x} appears twice")
            known[ext_type] = payload
            if ext_type == EXT_FEATURE_TABLE:
                if ext_length % 48:
                    raise _corrupt(filename, position, "feature name table length is not a multiple of 48")
                for entry in range(0, ext_length, 48):
                    kind, bit = payload[entry], payload[entry + 1]
                    raw_name = payload[entry + 2 : entry + 48].split(b"\0", 1)[0]
                    if kind in _FEATURE_KINDS:
                        feature_names[(kind, bit)] = raw_name.decode("utf-8", "replace")
            elif ext_type in (EXT_BITMAPS, EXT_CRYPTO):
                extensions.append(HeaderExtension(type=ext_type, data=payload))
        else:
            extensions.append(HeaderExtension(type=ext_type, data=payload))
        position = end + (-ext_length % 8)

    header = Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        feature_names=feature_names,
        extensions=tuple(extensions),
        **fields,
    )

    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        names = ", ".join(header.feature_name(0, bit) for bit in range(64) if unknown >> bit & 1)
        raise UnsupportedFeatureError(names, filename)
    if compression_type not in COMPRESSION_TYPES:
        raise UnsupportedFeatureError(f"compression type {compression_type}", filename)
    if (compression_type != 0) != bool(incompat & INCOMPAT_COMPRESSION):
        raise _corrupt(filename, _at("compression_type"), "compression type and its incompatible feature bit disagree")
    if header.extended_l2 and cluster_bits < 14:
        raise _corrupt(filename, _at("cluster_bits"), "extended L2 entries need clusters of at least 16 KiB")

    backing_file = None
    if backing_file_offset and backing_file_size:  # an empty name means no backing file, as in QEMU
        raw = data[backing_file_offset : backing_file_offset + backing_file_size]
        backing_file = _decode_name(raw, "backing file name", filename, backing_file_offset)
    backing_format = None
    if EXT_BACKING_FORMAT in known:
        raw = known[EXT_BACKING_FORMAT]
        if len(raw) > MAX_NAME_BYTES:
            raise _corrupt(filename, header_length, "backing format name too long")
        backing_format = _decode_name(raw, "backing format name", filename, header_length)
    data_file = None
    if EXT_DATA_FILE in known:
        if not header.has_data_file:
            raise _corrupt(filename, header_length, "external data file named, but its feature bit is not set")
        data_file = _decode_name(known[EXT_DATA_FILE], "external data file name", filename, header_length)
    header = header.__replace__(backing_file=backing_file, backing_format=backing_format, data_file=data_file)
    _check_tables(header, file_size, filename)
    return header


def check_table(
    filename: str | None,
    field_offset: int,
    what: str,
    offset: int,
    length: int,
    cluster_size: int,
    file_size: int,
) -> None:
    """Check that a metadata table is cluster-aligned and lies inside the file."""
    if offset % cluster_size:
        raise _corrupt(filename, field_offset, f"{what} offset {offset:#x} is not cluster-aligned")
    if offset == 0 and length:
        raise _corrupt(filename, field_offset, f"{what} would overlap the header")
    if offset + length > file_size:
        raise _corrupt(filename, field_offset, f"{what} ({length} bytes at {offset:#x}) runs past the end of the file")


def _check_tables(header: Header, file_size: int, filename: str | None) -> None:
    cluster_size = header.cluster_size
    l1_bytes = header.l1_size * 8
    if l1_bytes > MAX_L1_BYTES:
        raise _corrupt(
            filename, _at("l1_size"), f"L1 table of {header.l1_size} entries exceeds {MAX_L1_BYTES >> 20} MiB"
        )
    if header.l1_size < header.l1_entries_needed():
        raise _corrupt(
            filename, _at("l1_size"), f"L1 table of {header.l1_size} entries is too small for a {header.size}-byte disk"
        )
    if header.l1_size:
        check_table(
            filename, _at("l1_table_offset"), "L1 table", header.l1_table_offset, l1_bytes, cluster_size, file_size
        )
    refcount_bytes = header.refcount_table_clusters * cluster_size
    if refcount_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise _corrupt(
            filename,
            _at("refcount_table_clusters"),
            f"refcount table of {header.refcount_table_clusters} clusters exceeds 8 MiB",
        )
    if not refcount_bytes:
        raise _corrupt(filename, _at("refcount_table_clusters"), "the image has no refcount table")
    check_table(
        filename,
        _at("refcount_table_offset"),
        "refcount table",
        header.refcount_table_offset,
        refcount_bytes,
        cluster_size,
        file_size,
    )
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise _corrupt(
            filename, _at("nb_snapshots"), f"{header.nb_snapshots} snapshots exceed the limit of {MAX_SNAPSHOTS}"
        )
    # Aligned even when there are no snapshots, as QEMU demands.
    check_table(
        filename,
        _at("snapshots_offset"),
        "snapshot table",
        header.snapshots_offset,
        40 if header.nb_snapshots else 0,
        cluster_size,
        file_size,
    )


#: The feature name table a version 3 image carries: (kind, bit, name) per known feature.
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = tuple(
    (kind, bit, name) for (kind, bit), name in sorted(_BUILTIN_FEATURE_NAMES.items())
)


def has_feature_table(header: Header) -> bool:
    """Whether *header*, written by :func:`build_header`, carries the feature name table.

    As QEMU does: version 3 only, and not with clusters of 4 KiB or less, where the table's
    392 bytes would leave little room for the backing file name.
    """
    return header.version >= 3 and header.cluster_size > 4096


#: Where kept extensions go among each other: encryption, bitmaps, then unknown ones as read.
_KEPT_ORDER = {EXT_CRYPTO: 0, EXT_BITMAPS: 1}


def _extension(ext_type: int, payload: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(payload)) + payload + bytes(-len(payload) % 8)


def build_header(header: Header) -> bytes:
    """The bytes of *header*'s cluster start: fields, extensions, end marker, backing name.

    Known extensions come from the header's fields (backing format, data file name, and the
    feature name table where :func:`has_feature_table` says); the kept ones (encryption,
    bitmaps, unknown ones) are written back as they were read, in QEMU's order.
    ``backing_file_offset``/``backing_file_size`` are computed here.
    """
    # QEMU's order: backing format, data file, encryption, feature names, bitmaps, the rest.
    extensions = b""
    if header.backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, header.backing_format.encode())
    if header.data_file is not None:
        extensions += _extension(EXT_DATA_FILE, header.data_file.encode())
    kept = sorted(header.extensions, key=lambda extension: _KEPT_ORDER.get(extension.type, 2))
    for extension in kept:
        if extension.type == EXT_CRYPTO:
            extensions += _extension(extension.type, extension.data)
    if has_feature_table(header):
        table = b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_TABLE)
        extensions += _extension(EXT_FEATURE_TABLE, table)
    for extension in kept:
        if extension.type != EXT_CRYPTO:
            extensions += _extension(extension.type, extension.data)
    extensions += bytes(8)  # end of extensions
    backing = header.backing_file.encode() if header.backing_file is not None else b""
    header_length = header.header_length
    backing_offset = header_length + len(extensions) if backing else 0
    fixed = _V2.pack(
        MAGIC,
        header.version,
        backing_offset,
        len(backing),
        header.cluster_bits,
        header.size,
        header.crypt_method,
        header.l1_size,
        header.l1_table_offset,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.nb_snapshots,
        header.snapshots_offset,
    )
    if header.version >= 3:
        fixed += _V3.pack(
            header.incompatible_features,
            header.compatible_features,
            header.autoclear_features,
            header.refcount_order,
            header_length,
        )
        fixed += bytes([header.compression_type]) + bytes(header_length - V3_HEADER_LENGTH - 1)
    data = fixed + extensions + backing
    if len(data) > header.cluster_size:
        raise ValueError(f"the header ({len(data)} bytes) does not fit in one {header.cluster_size}-byte cluster")
    return data
