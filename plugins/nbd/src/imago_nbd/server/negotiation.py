"""Option haggling for one export: the server's answers to each option, sans I/O.

:func:`answer_option` takes an option the :class:`~imago_nbd.ServerHandshake` decoded and
returns the bytes to send and what the connection does next (go on, upgrade to TLS, enter
transmission, close). The policy is qemu-nbd's: a name that is not the export's is unknown;
with TLS configured nothing but STARTTLS and ABORT is answered before TLS; block-size
information is always given.
"""

from __future__ import annotations

import enum

import attrs

from ..constants import InfoType, OptionReply
from ..options import (
    AbortOption,
    BlockSizeInfo,
    DescriptionInfo,
    ExportInfo,
    ExportNameOption,
    GoOption,
    InfoOption,
    ListMetaContextOption,
    ListOption,
    NameInfo,
    OptionRequest,
    SetMetaContextOption,
    StartTLSOption,
    StructuredReplyOption,
)
from ..server_handshake import ServerHandshake
from .export import Export

__all__ = ["Answer", "Next", "answer_option", "context_ids"]


class Next(enum.Enum):
    """What the connection does after sending an answer."""

    OPTIONS = "options"  #: wait for the next option
    START_TLS = "start TLS"  #: wrap the connection in TLS
    TRANSMISSION = "transmission"  #: the handshake is over
    CLOSE = "close"  #: end the connection (ABORT, or an EXPORT_NAME that cannot be served)


@attrs.frozen
class Answer:
    """The bytes to send for an option, and what comes next."""

    data: bytes
    next: Next = Next.OPTIONS


#: Context ids, fixed per name (any unique numbers do).
_CONTEXT_IDS = {"base:allocation": 1, "qemu:allocation-depth": 2}


def context_ids(name: str) -> int:
    """The id a metadata context is selected under."""
    return _CONTEXT_IDS[name]


def answer_option(
    handshake: ServerHandshake, export: Export, option: OptionRequest, *, tls_required: bool, tls_active: bool
) -> Answer:
    """Answer *option* for *export*; *tls_required*: TLS is mandatory, *tls_active*: it is on."""
    hs = handshake
    if tls_required and not tls_active:
        if isinstance(option, StartTLSOption):
            return Answer(hs.reply_ack(), Next.START_TLS)
        if isinstance(option, AbortOption):
            return Answer(hs.reply_ack(), Next.CLOSE)
        if isinstance(option, ExportNameOption):
            return Answer(b"", Next.CLOSE)
        return Answer(hs.reply_error(OptionReply.ERR_TLS_REQD, "TLS is required"))
    if isinstance(option, StartTLSOption):
        if tls_active:
            return Answer(hs.reply_error(OptionReply.ERR_INVALID, "TLS is already active"))
        return Answer(hs.reply_error(OptionReply.ERR_POLICY, "TLS is not configured"))
    if isinstance(option, AbortOption):
        return Answer(hs.reply_ack(), Next.CLOSE)
    if isinstance(option, ListOption):
        return Answer(hs.reply_server(export.name, export.description) + hs.reply_ack())
    if isinstance(option, ExportNameOption):
        if option.name != export.name:
            return Answer(b"", Next.CLOSE)  # EXPORT_NAME has no error reply
        flags = export.transmission_flags(structured=hs.structured_replies)
        return Answer(hs.reply_export_name(export.size, flags), Next.TRANSMISSION)
    if isinstance(option, InfoOption):  # and GoOption, its subclass
        return _info(hs, export, option)
    if isinstance(option, StructuredReplyOption):
        if hs.structured_replies:
            return Answer(hs.reply_error(OptionReply.ERR_INVALID, "structured replies are already on"))
        return Answer(hs.reply_ack())
    if isinstance(option, ListMetaContextOption):  # and SetMetaContextOption, its subclass
        return _meta_contexts(hs, export, option)
    return Answer(hs.reply_error(OptionReply.ERR_UNSUP, f"option {option.code} is not supported"))


def _info(hs: ServerHandshake, export: Export, option: InfoOption) -> Answer:
    if option.name != export.name:
        return Answer(hs.reply_error(OptionReply.ERR_UNKNOWN, f"export {option.name!r} not present"))
    parts = []
    if InfoType.NAME in option.requests:
        parts.append(hs.reply_info(NameInfo(name=export.name)))
    if InfoType.DESCRIPTION in option.requests and export.description:
        parts.append(hs.reply_info(DescriptionInfo(description=export.description)))
    parts.append(hs.reply_info(BlockSizeInfo(block_size=export.block_size)))
    flags = export.transmission_flags(structured=hs.structured_replies)
    parts.append(hs.reply_info(ExportInfo(size=export.size, flags=flags)))
    going = isinstance(option, GoOption)
    parts.append(hs.reply_ack())
    return Answer(b"".join(parts), Next.TRANSMISSION if going else Next.OPTIONS)


def _meta_contexts(hs: ServerHandshake, export: Export, option: ListMetaContextOption) -> Answer:
    setting = isinstance(option, SetMetaContextOption)
    if not hs.structured_replies:
        return Answer(hs.reply_error(OptionReply.ERR_INVALID, "metadata contexts need structured replies"))
    if option.export != export.name:
        return Answer(hs.reply_error(OptionReply.ERR_UNKNOWN, f"export {option.export!r} not present"))
    names = export.match_contexts(option.queries, listing=not setting)
    parts = [hs.reply_meta_context(context_ids(name), name) for name in names]
    parts.append(hs.reply_ack())
    return Answer(b"".join(parts))
