"""The server's sans-I/O parts: option answers, block-status descriptors, the discard gate."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import imago
from imago_nbd import (
    GoOption,
    InfoOption,
    InfoType,
    ListMetaContextOption,
    ListOption,
    OptionReceived,
    OptionReply,
    ServerHandshake,
    SetMetaContextOption,
    StartTLSOption,
    StructuredReplyOption,
    TransmissionFlag,
)
from imago_nbd.server.export import AccessGate, Export
from imago_nbd.server.extents import Status, descriptors
from imago_nbd.server.negotiation import Next, answer_option


def _handshake() -> ServerHandshake:
    hs = ServerHandshake()
    hs.greeting()
    hs.receive_data(b"\x00\x00\x00\x03")
    return hs


def _ask(hs: ServerHandshake, export: Export, option: object, *, tls: bool = False, active: bool = False) -> Next:
    events = hs.receive_data(b"IHAVEOPT" + _encoded(option))
    assert isinstance(events[0], OptionReceived)
    answer = answer_option(hs, export, events[0].option, tls_required=tls, tls_active=active)
    return answer.next


def _encoded(option: object) -> bytes:
    body = option.encode()  # type: ignore[attr-defined]
    return struct.pack(">II", option.code, len(body)) + body  # type: ignore[attr-defined]


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    with imago.open(path, "raw", write=True) as disk:
        yield Export(disk.access, name="vd", allocation_depth=True)


def test_answers(export: Export) -> None:
    hs = _handshake()
    assert _ask(hs, export, ListOption()) is Next.OPTIONS
    assert _ask(hs, export, SetMetaContextOption(export="vd", queries=("base:",))) is Next.OPTIONS
    assert hs.meta_contexts == {}  # refused: no structured replies yet
    assert _ask(hs, export, StructuredReplyOption()) is Next.OPTIONS
    assert _ask(hs, export, ListMetaContextOption(export="vd")) is Next.OPTIONS
    assert _ask(hs, export, SetMetaContextOption(export="vd", queries=("qemu:", "other:x"))) is Next.OPTIONS
    assert set(hs.meta_contexts.values()) == {"qemu:allocation-depth"}
    assert _ask(hs, export, InfoOption(name="nope")) is Next.OPTIONS
    assert _ask(hs, export, InfoOption(name="vd", requests=(InfoType.NAME,))) is Next.OPTIONS
    assert _ask(hs, export, GoOption(name="vd")) is Next.TRANSMISSION
    assert export.transmission_flags(structured=True) & TransmissionFlag.SEND_DF


def test_tls_required_refuses_everything_but_starttls(export: Export) -> None:
    hs = _handshake()
    assert _ask(hs, export, GoOption(name="vd"), tls=True) is Next.OPTIONS  # ERR_TLS_REQD
    assert _ask(hs, export, StartTLSOption(), tls=True) is Next.START_TLS
    hs.tls_established()
    assert _ask(hs, export, StartTLSOption(), tls=True, active=True) is Next.OPTIONS  # ERR_INVALID
    assert _ask(hs, export, GoOption(name="vd"), tls=True, active=True) is Next.TRANSMISSION
    assert OptionReply.ERR_TLS_REQD.is_error


def test_context_matching(export: Export) -> None:
    assert export.match_contexts((), listing=True) == ["base:allocation", "qemu:allocation-depth"]
    assert export.match_contexts((), listing=False) == []
    assert export.match_contexts(("base:allocation", "base:"), listing=False) == ["base:allocation"]
    assert export.match_contexts(("qemu:dirty-bitmap:x", "nbdkit:"), listing=False) == []


def test_descriptors_merge_and_req_one() -> None:
    runs = [Status(4096, 0, 1), Status(4096, 0, 2), Status(8192, 3, 0), Status(512, 3, 0)]
    assert descriptors(runs, depth=False, one=False) == [(8192, 0), (8704, 3)]
    assert descriptors(runs, depth=True, one=False) == [(4096, 1), (4096, 2), (8704, 0)]
    assert descriptors(runs, depth=False, one=True) == [(8192, 0)]
    assert descriptors([], depth=False, one=True) == []


def test_access_gate_drains_before_a_discard() -> None:
    async def scenario() -> list[str]:
        gate = AccessGate()
        order: list[str] = []
        gate.enter_shared_now()

        async def discard() -> None:
            await gate.enter_exclusive()
            order.append("discard")
            gate.leave_exclusive()

        async def later_read() -> None:
            await gate.enter_shared()
            order.append("read after")
            gate.leave_shared()

        task = asyncio.create_task(discard())
        await asyncio.sleep(0)
        assert not gate.open  # the waiting discard holds new requests back
        reader = asyncio.create_task(later_read())
        await asyncio.sleep(0)
        order.append("first read done")
        gate.leave_shared()
        await asyncio.wait_for(asyncio.gather(task, reader), 10)
        return order

    assert asyncio.run(scenario()) == ["first read done", "discard", "read after"]


def test_export_misuse(export: Export) -> None:
    with pytest.raises(imago.InvalidRequestError, match="description"):
        Export(export.access, description="d" * 4097)
    read_only = Export(export.access, read_only=True)
    assert read_only.flags & TransmissionFlag.READ_ONLY
    assert not read_only.flags & TransmissionFlag.SEND_TRIM
    assert not Export(export.access, multi_conn=False).flags & TransmissionFlag.CAN_MULTI_CONN
