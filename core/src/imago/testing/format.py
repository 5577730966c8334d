"""The format conformance suite."""

from __future__ import annotations

import abc
import asyncio
import io
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ..errors import (
    ClosedError,
    InvalidBufferError,
    InvalidRequestError,
    ReadOnlyError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from ..format.access import FormatAccess, SyncFormatAccess
from ..format.capabilities import Capability
from ..format.driver import FormatDriver
from ..runtime import run_sync
from ..storage import PreallocateMode
from .model import DiskModel, check_mappings, random_bytes

__all__ = ["FormatConformance"]

_SIZE = 4 << 20


class FormatConformance(abc.ABC):
    """Tests every format driver must pass on images it creates. Subclass it as ``TestSomething``.

    What a driver does beyond reading and writing is tested where its class claims the
    capability (:class:`~imago.Capability`): resizing, compressed writes, snapshots. Where it
    does not, the suite checks that asking for it fails with UnsupportedFeatureError.
    """

    @abc.abstractmethod
    def create_image(self, directory: Path, size: int) -> FormatDriver:
        """A new image of *size* bytes under *directory*, opened for writing."""

    @abc.abstractmethod
    def reopen_image(self, image: FormatDriver, *, writable: bool) -> FormatDriver:
        """Close *image* (flushing it) and open the same image again."""

    # --- helpers ---------------------------------------------------------------------------------

    @pytest.fixture
    def image(self, tmp_path: Path) -> SyncFormatAccess:
        """A fresh 4 MiB image, writable."""
        return SyncFormatAccess(self.create_image(tmp_path, _SIZE))

    def _reopen(self, image: SyncFormatAccess, *, writable: bool) -> SyncFormatAccess:
        return SyncFormatAccess(self.reopen_image(image.driver, writable=writable))

    @staticmethod
    def _read(image: SyncFormatAccess, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        image.read(buf, offset)
        return bytes(buf)

    def _check(self, image: SyncFormatAccess, model: DiskModel) -> None:
        assert image.size == model.size
        model.check(self._read(image, 0, model.size))

    # --- tests ---------------------------------------------------------------------------------------

    def test_fresh_image(self, image: SyncFormatAccess) -> None:
        assert image.size == _SIZE
        assert image.writable
        assert image.format_name == type(image.driver).name
        assert self._read(image, 0, _SIZE) == bytes(_SIZE)
        image.close()

    def test_write_read_roundtrip_and_reopen(self, image: SyncFormatAccess) -> None:
        rng = random.Random(11)
        model = DiskModel(_SIZE)
        for offset, length in [(0, 65536), (1, 1), (70000, 300000), (_SIZE - 513, 513), (2 << 20, 4096)]:
            data = random_bytes(rng, length)
            image.write(data, offset)
            model.write(offset, data)
        self._check(image, model)
        image = self._reopen(image, writable=False)
        self._check(image, model)
        image.close()

    def test_vectored_io(self, image: SyncFormatAccess) -> None:
        rng = random.Random(12)
        parts = [random_bytes(rng, n) for n in (3, 65536, 1000, 70000)]
        image.writev(parts, 65000)
        pieces = [bytearray(n) for n in (65539, 2, 70998)]
        image.readv(pieces, 65000)
        assert b"".join(pieces) == b"".join(parts)
        image.close()

    def test_async_api(self, image: SyncFormatAccess) -> None:
        access: FormatAccess = image.access
        rng = random.Random(13)
        chunks = {index * 65536 + rng.randrange(1000): random_bytes(rng, 30000) for index in range(48)}

        async def main() -> dict[int, bytes]:
            await asyncio.gather(*(access.write(data, offset) for offset, data in chunks.items()))
            bufs = {offset: bytearray(30000) for offset in chunks}
            await asyncio.gather(*(access.read(buf, offset) for offset, buf in bufs.items()))
            await access.flush()
            return {offset: bytes(buf) for offset, buf in bufs.items()}

        assert asyncio.run(main()) == chunks
        image.close()

    def test_sync_api_inside_running_loop(self, image: SyncFormatAccess) -> None:
        async def main() -> bytes:
            image.write(b"from a coroutine", 4096)
            image.flush()
            return self._read(image, 4096, 16)

        assert asyncio.run(main()) == b"from a coroutine"
        image.close()

    @pytest.mark.parametrize("operation", ["write_zeroes", "discard_to_zero", "discard_to_backing"])
    def test_zeroing_operations(self, image: SyncFormatAccess, operation: str) -> None:
        data = random_bytes(random.Random(14), _SIZE)
        image.write(data, 0)
        model = DiskModel(_SIZE)
        model.write(0, data)
        for offset, length in [(1, 100), (65536, 65536), (200000, 300001), (_SIZE - 7, 7)]:
            getattr(image, operation)(offset, length)
            model.zero(offset, length)
        self._check(image, model)
        image = self._reopen(image, writable=True)
        self._check(image, model)
        image.close()

    def test_discard_to_any_keeps_neighbours(self, image: SyncFormatAccess) -> None:
        data = random_bytes(random.Random(15), 1 << 20)
        image.write(data, 0)
        model = DiskModel(_SIZE)
        model.write(0, data)
        image.discard_to_any(100000, 300000)
        model.forget(100000, 300000)
        self._check(image, model)
        image.close()

    def test_mappings_cover_the_disk(self, image: SyncFormatAccess) -> None:
        rng = random.Random(16)
        model = DiskModel(_SIZE)
        data = random_bytes(rng, 100000)
        image.write(data, 500000)
        model.write(500000, data)
        image.write_zeroes(1 << 20, 65536)
        model.zero(1 << 20, 65536)
        check_mappings(image, bytes(model.data))
        image.close()

    def test_requests_out_of_bounds(self, image: SyncFormatAccess) -> None:
        with pytest.raises(InvalidRequestError):
            image.read(bytearray(2), _SIZE - 1)
        with pytest.raises(InvalidRequestError):
            image.write(b"xx", _SIZE - 1)
        with pytest.raises(InvalidRequestError):
            image.read(bytearray(1), -1)
        with pytest.raises(InvalidRequestError):
            image.write_zeroes(_SIZE, 1)
        with pytest.raises(InvalidRequestError):
            image.discard_to_zero(0, -5)
        with pytest.raises(InvalidRequestError):
            image.get_mapping(-1, 10)
        image.read(bytearray(0), _SIZE)  # empty requests at the end are fine
        image.write(b"", _SIZE)
        with pytest.raises(InvalidBufferError):
            image.read(b"immutable", 0)
        with pytest.raises(InvalidBufferError):
            image.write(12345, 0)
        image.close()

    def test_read_only_image_refuses_changes(self, image: SyncFormatAccess) -> None:
        image.write(b"keep me", 0)
        image = self._reopen(image, writable=False)
        assert not image.writable
        changes: list[Callable[[], None]] = [
            lambda: image.write(b"x", 0),
            lambda: image.writev([b"x"], 0),
            lambda: image.write_zeroes(0, 4096),
            lambda: image.discard_to_zero(0, 4096),
            lambda: image.discard_to_any(0, 4096),
            lambda: image.discard_to_backing(0, 4096),
            lambda: image.resize(2 * _SIZE),
        ]
        for call in changes:
            with pytest.raises(ReadOnlyError):
                call()
        assert self._read(image, 0, 7) == b"keep me"
        image.close()

    def test_resize(self, image: SyncFormatAccess) -> None:
        data = random_bytes(random.Random(17), 8192)
        if not image.driver.supports(Capability.RESIZE):
            image.write(data, 0)
            with pytest.raises(UnsupportedFeatureError):
                image.resize(2 * _SIZE)
            assert image.size == _SIZE
            assert self._read(image, 0, 8192) == data
            image.close()
            return
        image.write(data, _SIZE - 8192)
        self._read(image, 0, 4096)  # populate mapping caches
        image.resize(2 * _SIZE, PreallocateMode.NONE)
        assert image.size == 2 * _SIZE
        assert self._read(image, _SIZE - 8192, 8192 + 65536) == data + bytes(65536)
        with pytest.raises(InvalidRequestError, match="shrink=True"):
            image.resize(_SIZE - 4096)
        assert image.size == 2 * _SIZE
        image.resize(_SIZE - 4096, shrink=True)
        assert image.size == _SIZE - 4096
        with pytest.raises(InvalidRequestError):
            image.read(bytearray(4097), _SIZE - 8192)
        image = self._reopen(image, writable=True)
        assert image.size == _SIZE - 4096
        image.resize(_SIZE, "full")
        assert self._read(image, _SIZE - 8192, 8192) == data[:4096] + bytes(4096)
        image.close()

    def test_claimed_capabilities_are_implemented(self, image: SyncFormatAccess) -> None:
        cls = type(image.driver)
        for capability in cls.capabilities:
            assert capability in Capability.all(), capability
            assert capability.missing(cls, FormatDriver) == [], capability
            assert capability.of(image.driver) is image.driver
        for capability in set(Capability.all()) - cls.capabilities:
            assert capability.of(image.driver) is None
        image.close()

    def test_compressed_writes(self, image: SyncFormatAccess) -> None:
        compressing = Capability.COMPRESSED_WRITES.of(image.driver)
        if compressing is None:
            with pytest.raises(UnsupportedFeatureError):
                image.write_compressed(bytes(65536), 0)
            image.close()
            return
        cluster = compressing.cluster_size
        rng = random.Random(19)
        # A compressible cluster, an incompressible one (written as is), and zeroes.
        data = bytes(rng.getrandbits(2) for _ in range(cluster)) + random_bytes(rng, cluster) + bytes(cluster)
        image.write_compressed(data, 2 * cluster)
        assert self._read(image, 2 * cluster, len(data)) == data
        assert self._read(image, cluster, cluster) == bytes(cluster)
        with pytest.raises(InvalidRequestError):
            image.write_compressed(data[:cluster], cluster // 2)
        image = self._reopen(image, writable=False)
        assert self._read(image, 2 * cluster, len(data)) == data
        with pytest.raises(ReadOnlyError):
            image.write_compressed(data[:cluster], 0)
        image.close()

    def test_snapshots(self, image: SyncFormatAccess) -> None:
        snapshotting = Capability.SNAPSHOTS.of(image.driver)
        if snapshotting is None:
            image.close()
            pytest.skip(f"{image.format_name} does not claim snapshots")
        before = random_bytes(random.Random(20), 8192)
        after = random_bytes(random.Random(21), 8192)
        image.write(before, 4096)
        first = run_sync(snapshotting.create_snapshot("first"))
        assert [s.name for s in snapshotting.snapshots] == ["first"]
        image.write(after, 4096)
        view = SyncFormatAccess(run_sync(snapshotting.read_snapshot(first.id)))
        assert self._read(view, 4096, 8192) == before
        view.close()
        assert self._read(image, 4096, 8192) == after
        run_sync(snapshotting.apply_snapshot("first"))
        assert self._read(image, 4096, 8192) == before
        with pytest.raises(SnapshotNotFoundError):
            run_sync(snapshotting.apply_snapshot("no such snapshot"))
        deleted = run_sync(snapshotting.delete_snapshot("first"))
        assert deleted.id == first.id
        assert list(snapshotting.snapshots) == []
        image = self._reopen(image, writable=False)
        assert self._read(image, 4096, 8192) == before
        reopened = Capability.SNAPSHOTS.of(image.driver)
        assert reopened is not None
        with pytest.raises(ReadOnlyError):
            run_sync(reopened.create_snapshot("read-only"))
        image.close()

    def test_closed_image(self, image: SyncFormatAccess) -> None:
        image.close()
        image.close()
        with pytest.raises(ClosedError):
            image.read(bytearray(1), 0)
        with pytest.raises(ClosedError):
            image.write(b"x", 0)
        with pytest.raises(ClosedError):
            image.flush()

    def test_as_file(self, image: SyncFormatAccess) -> None:
        payload = random_bytes(random.Random(18), 300000)
        with image.as_file() as f:
            assert isinstance(f, io.RawIOBase)
            f.seek(12345)
            assert f.write(payload) == len(payload)
            f.seek(12345)
            assert f.read(len(payload)) == payload
            f.seek(-10, io.SEEK_END)
            assert f.read() == bytes(10)
            assert f.read(5) == b""
        assert self._read(image, 12345, len(payload)) == payload
        image.close()

    def test_random_workload_matches_model(self) -> None:
        suite = self

        class Workload(_Workload):
            conformance = suite

        Workload.TestCase.settings = settings(
            max_examples=15,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        Workload.TestCase().runTest()


_offsets = st.integers(min_value=0, max_value=_SIZE - 1)
_lengths = st.integers(min_value=1, max_value=300000)


class _Workload(RuleBasedStateMachine):
    """Random operations against a driver and a :class:`DiskModel` side by side."""

    conformance: ClassVar[FormatConformance]

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="imago-workload-")
        self.image = SyncFormatAccess(self.conformance.create_image(Path(self.directory.name), _SIZE))
        self.model = DiskModel(_SIZE)
        self.rng = random.Random(0)

    @initialize(seed=st.integers(0, 1 << 32))
    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _clip(self, offset: int, length: int) -> tuple[int, int]:
        offset %= max(self.model.size, 1)
        return offset, max(0, min(length, self.model.size - offset))

    @rule(offset=_offsets, length=_lengths)
    def write(self, offset: int, length: int) -> None:
        offset, length = self._clip(offset, length)
        data = random_bytes(self.rng, length)
        self.image.write(data, offset)
        self.model.write(offset, data)

    @rule(offset=_offsets, length=_lengths, how=st.sampled_from(["write_zeroes", "discard_to_zero"]))
    def zero(self, offset: int, length: int, how: str) -> None:
        offset, length = self._clip(offset, length)
        getattr(self.image, how)(offset, length)
        self.model.zero(offset, length)

    @rule(offset=_offsets, length=_lengths)
    def discard(self, offset: int, length: int) -> None:
        offset, length = self._clip(offset, length)
        self.image.discard_to_any(offset, length)
        self.model.forget(offset, length)

    @rule(offset=_offsets, length=_lengths)
    def read(self, offset: int, length: int) -> None:
        offset, length = self._clip(offset, length)
        buf = bytearray(length)
        self.image.read(buf, offset)
        self.model.check(buf, offset)

    @rule()
    def flush(self) -> None:
        self.image.flush()

    @rule()
    def reopen(self) -> None:
        self.image = SyncFormatAccess(self.conformance.reopen_image(self.image.driver, writable=True))

    @precondition(lambda self: self.image.driver.supports(Capability.RESIZE))
    @rule(size=st.integers(min_value=1, max_value=2 * _SIZE))
    def resize(self, size: int) -> None:
        if size % 512:
            # Formats that count sectors (qcow2) refuse such sizes, changing nothing; others take them.
            try:
                self.image.resize(size, shrink=True)
            except InvalidRequestError:
                assert self.image.size == self.model.size
                return
        else:
            self.image.resize(size, shrink=True)
        self.model.resize(size)

    @invariant()
    def size_matches(self) -> None:
        assert self.image.size == self.model.size

    def teardown(self) -> None:
        try:
            buf = bytearray(self.model.size)
            self.image.read(buf, 0)
            self.model.check(buf)
            self.image.close()
        finally:
            self.directory.cleanup()
