"""The ``nbd`` storage driver over TLS (nbds://, nbds+unix://) against qemu-nbd, certificates made by openssl."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imago import InvalidOptionError, runtime
from imago_nbd.errors import NbdConnectionError

from ._client import open_nbd, read_all
from ._peers import Peer, make_certificates, start_qemu_nbd

SIZE = 2 << 20


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory: Path = tmp_path_factory.mktemp("pki")
    return make_certificates(directory)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    data = random.Random(11).randbytes(SIZE)
    path.write_bytes(data)
    return path, data


@pytest.fixture
def tls_server(image: tuple[Path, bytes], certificates: tuple[str, str]) -> Iterator[Peer]:
    peer = start_qemu_nbd(image[0], "-e", "2", tls_dir=certificates[0])
    yield peer
    peer.stop()


def test_tls_over_unix_socket(tls_server: Peer, image: tuple[Path, bytes], certificates: tuple[str, str]) -> None:
    assert tls_server.uri.startswith("nbds+unix://")
    storage = open_nbd(f"{tls_server.uri}&tls-certificates={certificates[1]}", writable=True, connections=2)
    try:
        assert read_all(storage) == image[1]
        runtime.run_sync(storage.writev([memoryview(b"secret" * 1000)], 4096))

        async def under_loop() -> bytes:
            buffers = [bytearray(65536) for _ in range(SIZE // 65536)]
            await asyncio.gather(*(storage.readv([memoryview(b)], i * 65536) for i, b in enumerate(buffers)))
            return b"".join(buffers)

        expected = bytearray(image[1])
        expected[4096 : 4096 + 6000] = b"secret" * 1000
        assert asyncio.run(under_loop()) == bytes(expected)
        runtime.run_sync(storage.flush())
    finally:
        runtime.run_sync(storage.close())
    assert image[0].read_bytes() == bytes(expected)


def test_tls_over_tcp_with_driver_option(image: tuple[Path, bytes], certificates: tuple[str, str]) -> None:
    peer = start_qemu_nbd(image[0], "-e", "2", tls_dir=certificates[0], tcp=True)
    try:
        assert peer.uri.startswith("nbds://127.0.0.1:")
        storage = open_nbd(peer.uri, tls_certificates=certificates[1], connections=2)
        try:
            assert read_all(storage) == image[1]
        finally:
            runtime.run_sync(storage.close())
        # The certificate names localhost and 127.0.0.1, not this name.
        with pytest.raises(NbdConnectionError, match="TLS handshake failed"):
            open_nbd(peer.uri + "?tls-hostname=elsewhere.example", tls_certificates=certificates[1])
    finally:
        peer.stop()


def test_tls_refusals(
    tls_server: Peer, certificates: tuple[str, str], tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    plain_uri = tls_server.uri.replace("nbds+unix", "nbd+unix")
    with pytest.raises(NbdConnectionError, match="requires TLS"):
        open_nbd(plain_uri)
    # A CA the server's certificate does not chain to.
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")
    with pytest.raises(NbdConnectionError, match="TLS handshake failed"):
        open_nbd(tls_server.uri, tls_certificates=other[1])
    # The server wants a client certificate (QEMU's verify-peer): the CA alone is not enough.
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(Path(certificates[1]) / "ca-cert.pem", ca_only / "ca-cert.pem")
    with pytest.raises(NbdConnectionError):
        read_all(open_nbd(tls_server.uri, tls_certificates=str(ca_only)))
    with pytest.raises(InvalidOptionError, match="tls_certificates") as caught:
        open_nbd(tls_server.uri, tls_certificates=str(tmp_path / "missing"))
    assert caught.value.option == "tls_certificates"
    with pytest.raises(InvalidOptionError, match="does not use TLS"):
        open_nbd(plain_uri, tls_certificates=certificates[1])
    # A server without TLS refuses STARTTLS.
    plain = start_qemu_nbd(image[0])
    try:
        with pytest.raises(NbdConnectionError, match="refused TLS"):
            open_nbd(plain.uri.replace("nbd+unix", "nbds+unix"), tls_certificates=certificates[1])
    finally:
        plain.stop()
