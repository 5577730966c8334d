"""The storage conformance suite for the ``nbd`` driver over nbdkit's memory plugin.

NBD exports keep their size and name no directory: the suite's resize, write-past-the-end and
relative-name tests are replaced by what the driver does instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from imago import (
    ImplicitOpenDeniedError,
    InvalidRequestError,
    PreallocateMode,
    Storage,
    UnsupportedFeatureError,
    runtime,
)
from imago.testing import StorageConformance

from ._client import open_nbd
from ._peers import Peer, start_nbdkit


class TestNbdConformance(StorageConformance):
    grows_on_write: ClassVar[bool] = False
    _peers: ClassVar[list[Peer]] = []

    @pytest.fixture(autouse=True)
    def _stop_servers(self) -> Iterator[None]:
        yield
        while self._peers:
            self._peers.pop().stop()

    def create_storage(self, directory: Path, size: int) -> Storage:
        peer = start_nbdkit("memory", f"size={size}")
        self._peers.append(peer)
        return open_nbd(peer.uri, writable=True)

    def reopen_read_only(self, storage: Storage) -> Storage:
        assert storage.filename is not None
        return open_nbd(storage.filename)

    @pytest.mark.parametrize("mode", list(PreallocateMode))
    def test_resize(self, storage: Storage, mode: PreallocateMode) -> None:
        runtime.run_sync(storage.resize(storage.size, mode))  # the same size is fine
        with pytest.raises(UnsupportedFeatureError, match="resizing an NBD export"):
            runtime.run_sync(storage.resize(storage.size + 4096, mode))
        runtime.run_sync(storage.close())

    def test_write_past_end(self, storage: Storage) -> None:
        with pytest.raises(InvalidRequestError, match="cannot grow"):
            runtime.run_sync(storage.writev([memoryview(b"beyond")], storage.size + 100))
        assert storage.size == 1 << 20
        runtime.run_sync(storage.close())

    def test_repr_and_resolve_relative_path(self, storage: Storage) -> None:
        assert "Nbd" in repr(storage)
        assert storage.resolve_relative_path("/abs/name") == "/abs/name"
        with pytest.raises(ImplicitOpenDeniedError):
            storage.resolve_relative_path("backing.img")
        runtime.run_sync(storage.close())
