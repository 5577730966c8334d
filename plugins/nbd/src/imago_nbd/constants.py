"""The numbers of the NBD protocol: magics, flags, option, reply, info, command and error values.

Values follow the NBD protocol document (``doc/proto.md`` of the reference implementation);
names drop the ``NBD_`` prefix and the group prefix (``NBD_OPT_GO`` is ``Option.GO``).
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag
from typing import Final

__all__ = [
    "CLISERV_MAGIC",
    "DEFAULT_MAX_OPTION_LENGTH",
    "EXPORT_NAME_ZEROES",
    "INIT_PASSWD",
    "MAX_STRING_LENGTH",
    "OPTION_REPLY_MAGIC",
    "OPTS_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "URI_SCHEMES",
    "ClientFlag",
    "Command",
    "CommandFlag",
    "Errno",
    "HandshakeFlag",
    "InfoType",
    "Option",
    "OptionReply",
    "ReplyFlag",
    "ReplyType",
    "StateFlag",
    "TransmissionFlag",
    "errno_from_nbd",
    "nbd_from_errno",
]

#: The URI schemes of NBD (``doc/uri.md``): plain or TLS, over TCP or a Unix domain socket.
URI_SCHEMES: Final = ("nbd", "nbd+unix", "nbds", "nbds+unix")
#: ``NBDMAGIC``: the first 8 bytes a server sends.
INIT_PASSWD: Final = 0x4E42444D41474943
#: ``IHAVEOPT``: the newstyle magic after ``INIT_PASSWD``, and the start of every option.
OPTS_MAGIC: Final = 0x49484156454F5054
#: The oldstyle magic (never spoken here; recognised to name it in an error).
CLISERV_MAGIC: Final = 0x00420281861253
#: The start of every option reply (fixed newstyle).
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
#: The start of every transmission request.
REQUEST_MAGIC: Final = 0x25609513
#: The start of a simple reply.
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: The start of a structured reply chunk.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

#: Strings (export names, error messages, context names) MUST be no longer than this.
MAX_STRING_LENGTH: Final = 4096
#: Option payloads larger than this are refused (a denial-of-service guard; the longest
#: sensible option, a meta-context query list, is far smaller).
DEFAULT_MAX_OPTION_LENGTH: Final = 64 * 1024
#: The reserved bytes after ``NBD_OPT_EXPORT_NAME``'s reply unless NO_ZEROES was negotiated.
EXPORT_NAME_ZEROES: Final = 124


class HandshakeFlag(IntFlag):
    """Handshake flags: 16 bits the server sends after its greeting magics."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags: 32 bits the client answers the greeting with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Transmission flags: 16 bits describing the export (``NBD_INFO_EXPORT``, EXPORT_NAME's reply)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(IntEnum):
    """Option numbers sent during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn; never sent
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # not implemented by this codec; a server answers ERR_UNSUP


class OptionReply(IntEnum):
    """Option reply types; error replies have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10

    @property
    def is_error(self) -> bool:
        """Whether this is an error reply (bit 31 set)."""
        return bool(self.value & (1 << 31))


class InfoType(IntEnum):
    """Information types in ``NBD_REP_INFO`` replies and in INFO/GO requests."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(IntFlag):
    """Command flags: 16 bits in every request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ReplyType(IntEnum):
    """Structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class StateFlag(IntFlag):
    """The status flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(IntEnum):
    """Error values on the wire (their own numbering, not the host's ``errno``)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Host errno -> wire value. The host's numbers differ between systems, so the table is built
# from the errno module's names; several host errors fold into one wire value, as the protocol
# asks (EDQUOT and EFBIG are "no space", a read-only file system is "not permitted").
_TO_NBD: dict[int, Errno] = {}
for _name, _value in (
    ("EPERM", Errno.EPERM),
    ("EACCES", Errno.EPERM),
    ("EROFS", Errno.EPERM),
    ("EIO", Errno.EIO),
    ("ENOMEM", Errno.ENOMEM),
    ("EINVAL", Errno.EINVAL),
    ("ENOSPC", Errno.ENOSPC),
    ("EDQUOT", Errno.ENOSPC),
    ("EFBIG", Errno.ENOSPC),
    ("EOVERFLOW", Errno.EOVERFLOW),
    ("ENOTSUP", Errno.ENOTSUP),
    ("EOPNOTSUPP", Errno.ENOTSUP),
    ("ESHUTDOWN", Errno.ESHUTDOWN),
):
    if hasattr(errno, _name):
        _TO_NBD.setdefault(getattr(errno, _name), _value)
_FROM_NBD: dict[int, int] = {value.value: getattr(errno, value.name) for value in Errno}


def nbd_from_errno(error: int) -> Errno:
    """The wire error value for the host error number *error* (``EINVAL`` when the protocol has no match)."""
    return _TO_NBD.get(error, Errno.EINVAL)


def errno_from_nbd(error: int) -> int:
    """The host error number for the wire error value *error* (``EINVAL`` for values the protocol does not define)."""
    return _FROM_NBD.get(error, errno.EINVAL)
