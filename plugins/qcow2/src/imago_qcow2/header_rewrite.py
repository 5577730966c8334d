"""Rewriting the whole qcow2 header cluster: for changes that move the extensions or the backing name.

Fields that keep their place are updated in place (:func:`~imago_qcow2.layout.write_header_fields`).
A change of the backing file name, of the backing format, of the version or of any header
extension moves what follows it, so the header cluster is encoded anew (by
:func:`~imago_qcow2.header.build_header`) and written in one request of the whole cluster, then
flushed: a crash leaves the old header or the new one, as QEMU's own header updates do. Whatever
must fit in the first cluster is checked to fit before anything is written.
"""

from __future__ import annotations

from imago import InvalidOptionError, ReadOnlyError

from .header import FEATURE_TABLE, Header, build_header, has_feature_table
from .layout import CREATED_V3_HEADER_LENGTH, V2_HEADER_LENGTH
from .overlap import Metadata
from .state import TABLE_FIELDS, Qcow2State

__all__ = ["encode_header", "write_header"]


def encode_header(header: Header, option: str = "backing_file") -> tuple[Header, bytes]:
    """*header* as it will be on disk (name offsets and lengths filled in), and its cluster's bytes.

    The header length is the one QEMU writes for the version (72 or 112 bytes). Raises
    :class:`~imago.InvalidOptionError` naming *option* when the header does not fit in one cluster.
    """
    header_length = CREATED_V3_HEADER_LENGTH if header.version >= 3 else V2_HEADER_LENGTH
    header = header.__replace__(header_length=header_length)
    try:
        data = build_header(header)
    except ValueError as error:
        raise InvalidOptionError(option, f"{error} (the backing file name and header extensions must fit)") from None
    name = header.backing_file.encode() if header.backing_file is not None else b""
    written = header.__replace__(
        backing_file_offset=len(data) - len(name) if name else 0,
        backing_file_size=len(name),
        backing_file=header.backing_file if name else None,
        feature_names={(kind, bit): text for kind, bit, text in FEATURE_TABLE} if has_feature_table(header) else {},
    )
    cluster = bytearray(header.cluster_size)
    cluster[: len(data)] = data
    return written, bytes(cluster)


async def write_header(state: Qcow2State, header: Header, *, option: str = "backing_file") -> None:
    """Write *header* (all fields, extensions, backing name) as the image's first cluster; keep it.

    One write of the whole header cluster, then a flush. Build *header* from ``state.header``
    (``attrs.evolve``) right before calling; this takes the image's metadata lock, so that no
    in-place header update interleaves with the write. *option* names
    what the error says did not fit (see :func:`encode_header`); nothing is written then.
    """
    if not state.writable:
        raise ReadOnlyError(
            f"{state.filename or 'qcow2 image'} (changing the header needs an image opened for writing)"
        )
    async with state.lock:
        written, cluster = encode_header(header, option)
        await state.guard.check_write(Metadata.HEADER, 0, len(cluster))
        await state.storage.writev([memoryview(cluster)], 0)
        await state.storage.flush()
        previous, state.header = state.header, written
        if any(getattr(previous, name) != getattr(written, name) for name in TABLE_FIELDS):
            state.guard.tables_switched()
