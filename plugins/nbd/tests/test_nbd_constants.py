"""Protocol numbers against the NBD protocol document (doc/proto.md, section "Values"), the errno
mapping, and block-size constraints (section "Block size constraints")."""

from __future__ import annotations

import errno

import pytest

from imago import ImagoError
from imago_nbd import (
    NO_MAXIMUM,
    BlockSize,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReply,
    ProtocolError,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
    errno_from_nbd,
    nbd_from_errno,
)
from imago_nbd.constants import (
    INIT_PASSWD,
    OPTION_REPLY_MAGIC,
    OPTS_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)


def test_magics_spell_what_the_spec_says() -> None:
    # "Newstyle negotiation": the ASCII magics.
    assert INIT_PASSWD.to_bytes(8, "big") == b"NBDMAGIC"
    assert OPTS_MAGIC.to_bytes(8, "big") == b"IHAVEOPT"
    # "Fixed newstyle negotiation", "Request message", "Simple reply message", "Structured reply chunk message".
    assert (OPTION_REPLY_MAGIC, REQUEST_MAGIC) == (0x3E889045565A9, 0x25609513)
    assert (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC) == (0x67446698, 0x668E33EF)


def test_numbers_match_the_values_section() -> None:
    # "Handshake flags", "Client flags", "Transmission flags": bit numbers.
    assert (HandshakeFlag.FIXED_NEWSTYLE, HandshakeFlag.NO_ZEROES) == (1, 2)
    assert (ClientFlag.FIXED_NEWSTYLE, ClientFlag.NO_ZEROES) == (1, 2)
    assert TransmissionFlag.SEND_WRITE_ZEROES == 1 << 6
    assert TransmissionFlag.CAN_MULTI_CONN == 1 << 8
    assert TransmissionFlag.SEND_CACHE == 1 << 10
    assert TransmissionFlag.SEND_FAST_ZERO == 1 << 11
    # "Option types".
    assert [Option.EXPORT_NAME, Option.ABORT, Option.LIST, Option.STARTTLS] == [1, 2, 3, 5]
    assert [Option.INFO, Option.GO, Option.STRUCTURED_REPLY] == [6, 7, 8]
    assert [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT] == [9, 10]
    # "Option reply types": errors have bit 31 set.
    assert [OptionReply.ACK, OptionReply.SERVER, OptionReply.INFO, OptionReply.META_CONTEXT] == [1, 2, 3, 4]
    assert OptionReply.ERR_UNSUP == 2**31 + 1
    assert OptionReply.ERR_SHUTDOWN == 2**31 + 7
    assert OptionReply.ERR_BLOCK_SIZE_REQD == 2**31 + 8
    assert OptionReply.ERR_TOO_BIG == 2**31 + 9
    assert all(reply.is_error == (reply >= 2**31) for reply in OptionReply)
    # "Information types" of NBD_REP_INFO.
    assert [InfoType.EXPORT, InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE] == [0, 1, 2, 3]
    # "Command flags", "Structured reply flags", "Structured reply types", "Request types".
    assert [CommandFlag.FUA, CommandFlag.NO_HOLE, CommandFlag.DF, CommandFlag.REQ_ONE] == [1, 2, 4, 8]
    assert CommandFlag.FAST_ZERO == 16
    assert ReplyFlag.DONE == 1
    assert [ReplyType.NONE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE, ReplyType.BLOCK_STATUS] == [0, 1, 2, 5]
    assert (ReplyType.ERROR, ReplyType.ERROR_OFFSET) == (2**15 + 1, 2**15 + 2)
    assert [c.value for c in Command] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [c.name for c in Command][5:] == ["CACHE", "WRITE_ZEROES", "BLOCK_STATUS"]
    # "base:allocation" status flags.
    assert (StateFlag.HOLE, StateFlag.ZERO) == (1, 2)


def test_error_values_match_the_spec() -> None:
    # "Error values".
    assert {e.name: e.value for e in Errno} == {
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }


@pytest.mark.parametrize("value", list(Errno), ids=lambda e: e.name)
def test_errno_mapping_round_trips(value: Errno) -> None:
    host = errno_from_nbd(value)
    assert errno.errorcode[host] in (value.name, "EOPNOTSUPP")
    assert nbd_from_errno(host) is value


@pytest.mark.parametrize(
    ("host", "wire"),
    [
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.EROFS, Errno.EPERM),
        (errno.EACCES, Errno.EPERM),
        (errno.EOPNOTSUPP, Errno.ENOTSUP),
        (errno.ENOENT, Errno.EINVAL),  # no wire equivalent
    ],
)
def test_host_errors_fold_into_wire_values(host: int, wire: Errno) -> None:
    assert nbd_from_errno(host) is wire


def test_unknown_wire_error_is_einval() -> None:
    assert errno_from_nbd(4242) == errno.EINVAL


def test_protocol_error_is_an_imago_error() -> None:
    error = ProtocolError("bad magic", offset=40, sender="server")
    assert isinstance(error, ImagoError)
    assert isinstance(error, ValueError)
    assert (error.problem, error.offset, error.sender) == ("bad magic", 40, "server")
    assert "stream offset 40" in str(error)
    assert "from the server" in str(error)


@pytest.mark.parametrize(
    ("minimum", "preferred", "maximum", "field"),
    [
        (3, 4096, NO_MAXIMUM, "minimum"),  # not a power of two
        (1 << 17, 1 << 17, NO_MAXIMUM, "minimum"),  # over 64 KiB
        (512, 1000, NO_MAXIMUM, "preferred"),
        (4096, 512, NO_MAXIMUM, "preferred"),  # below the minimum
        (512, 4096, 1000, "maximum"),  # not a multiple of the minimum
        (4096, 4096, 0, "maximum"),
    ],
)
def test_block_size_rules(minimum: int, preferred: int, maximum: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BlockSize(minimum=minimum, preferred=preferred, maximum=maximum)


def test_block_size_checks() -> None:
    size = BlockSize(minimum=512, preferred=4096, maximum=1 << 20)
    assert size.is_aligned(1024, 512)
    assert not size.is_aligned(1000, 512)
    assert not size.is_aligned(1024, 100)
    assert size.effective_maximum(1 << 30) == 1 << 20
    assert size.effective_maximum(65536) == 65536
    assert BlockSize(minimum=1, preferred=512, maximum=NO_MAXIMUM).effective_maximum(12345) == 12345
