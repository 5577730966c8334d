"""imago.AnnotatedStorage: a storage wrapper that forwards everything and carries a tag."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Sequence
from typing import Any

import pytest

import imago
from imago import (
    AnnotatedStorage,
    Mapping,
    PermissiveImplicitOpenGate,
    PreallocateMode,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
    SyncFormatAccess,
    runtime,
)
from imago_file import File
from imago_null import Null
from imago_raw import Raw


class Recorder(Storage):
    """A storage that records every call made to it, backed by a bytearray."""

    name = "recorder"

    def __init__(self, size: int = 1024) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[Any, ...]] = []

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> Recorder:
        return cls()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def writable(self) -> bool:
        return False

    @property
    def filename(self) -> str | None:
        return "/images/recorded.img"

    @property
    def mem_align(self) -> int:
        return 4096

    @property
    def req_align(self) -> int:
        return 512

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        self.calls.append(("readv", len(bufs), offset))
        for view in bufs:
            view[:] = self.data[offset : offset + view.nbytes]
            offset += view.nbytes

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        self.calls.append(("readv_inline", len(bufs), offset))
        for view in bufs:
            view[:] = self.data[offset : offset + view.nbytes]
            offset += view.nbytes

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        self.calls.append(("writev", len(bufs), offset))
        for view in bufs:
            self.data[offset : offset + view.nbytes] = view
            offset += view.nbytes

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length, unmap))

    async def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def sync(self) -> None:
        self.calls.append(("sync",))

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        self.calls.append(("resize", new_size, prealloc))

    async def close(self) -> None:
        self.calls.append(("close",))

    def resolve_relative_path(self, name: str) -> str:
        self.calls.append(("resolve_relative_path", name))
        return "/resolved/" + name


def test_forwards_properties() -> None:
    inner = Recorder(2048)
    wrapped = AnnotatedStorage(inner, "tag")
    assert wrapped.inner is inner
    assert wrapped.tag == "tag"
    assert wrapped.size == 2048
    assert wrapped.writable is False
    assert wrapped.filename == "/images/recorded.img"
    assert wrapped.mem_align == 4096
    assert wrapped.req_align == 512
    inner.data.extend(bytes(10))
    assert wrapped.size == 2058  # read through, not copied at construction


def test_forwards_every_operation() -> None:
    inner = Recorder()
    inner.data[10:15] = b"hello"
    wrapped = AnnotatedStorage(inner, ("layer", 1))
    buf = bytearray(5)
    runtime.run_sync(wrapped.readv([memoryview(buf)], 10))
    assert buf == b"hello"
    buf2 = bytearray(5)
    wrapped.readv_inline([memoryview(buf2)], 10)
    assert buf2 == b"hello"
    runtime.run_sync(wrapped.writev([memoryview(b"ab"), memoryview(b"cd")], 100))
    assert inner.data[100:104] == b"abcd"
    runtime.run_sync(wrapped.write_zeroes(1, 2))
    runtime.run_sync(wrapped.write_zeroes(3, 4, unmap=True))
    runtime.run_sync(wrapped.discard(5, 6))
    runtime.run_sync(wrapped.flush())
    runtime.run_sync(wrapped.sync())
    runtime.run_sync(wrapped.resize(4096, PreallocateMode.FULL))
    runtime.run_sync(wrapped.resize(8192))
    assert wrapped.resolve_relative_path("base.img") == "/resolved/base.img"
    runtime.run_sync(wrapped.close())
    assert inner.calls == [
        ("readv", 1, 10),
        ("readv_inline", 1, 10),
        ("writev", 2, 100),
        ("write_zeroes", 1, 2, False),
        ("write_zeroes", 3, 4, True),
        ("discard", 5, 6),
        ("flush",),
        ("sync",),
        ("resize", 4096, PreallocateMode.FULL),
        ("resize", 8192, PreallocateMode.NONE),
        ("resolve_relative_path", "base.img"),
        ("close",),
    ]


def test_forwards_under_a_loop() -> None:
    inner = Recorder()
    inner.data[:3] = b"xyz"
    wrapped = AnnotatedStorage(inner, "t")

    async def main() -> bytes:
        buf = bytearray(3)
        await wrapped.readv([memoryview(buf)], 0)
        await wrapped.flush()
        return bytes(buf)

    assert asyncio.run(main()) == b"xyz"
    assert inner.calls == [("readv", 1, 0), ("flush",)]


@pytest.mark.parametrize("inner", [None, "file.img", 42, b"data", Raw])
def test_rejects_non_storage(inner: object) -> None:
    with pytest.raises(TypeError, match="Storage"):
        AnnotatedStorage(inner, "tag")  # type: ignore[arg-type]


def test_not_openable_by_options() -> None:
    with pytest.raises(TypeError):
        runtime.run_sync(AnnotatedStorage.open(StorageOpenOptions(filename="x")))


def test_annotated_repr_and_name() -> None:
    wrapped = AnnotatedStorage(Null(512), "top")
    assert AnnotatedStorage.name == "annotated"
    assert "top" in repr(wrapped)
    assert "Null" in repr(wrapped)


def test_default_resolve_relative_path_through_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.img"
    inner = File.create_sync(StorageCreateOptions(filename=path, size=512))
    wrapped = AnnotatedStorage(inner, "t")
    assert wrapped.resolve_relative_path("b.img") == str(tmp_path / "b.img")
    assert wrapped.resolve_relative_path("/abs/c.img") == "/abs/c.img"
    runtime.run_sync(wrapped.close())
    with pytest.raises(imago.ClosedError):
        runtime.run_sync(inner.readv([memoryview(bytearray(1))], 0))


def test_raw_over_annotated_file_reports_tag(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "top.img"
    path.write_bytes(b"A" * 4096 + b"B" * 4096)
    storage = AnnotatedStorage(File.open_sync(StorageOpenOptions(filename=path, writable=True)), "top")
    with SyncFormatAccess(Raw.builder(storage).write(True).open_sync(PermissiveImplicitOpenGate())) as image:
        assert image.size == 8192
        assert image.filename == str(path)
        mapping, length = image.get_mapping(0, image.size)
        assert isinstance(mapping, Mapping.Raw)
        assert mapping.storage.tag == "top"  # type: ignore[attr-defined]
        assert mapping.storage is storage
        assert (mapping.offset, length, mapping.writable) == (0, 8192, True)
        shallow, _ = image.get_shallow_mapping(4096, 100)
        assert shallow.storage.tag == "top"  # type: ignore[attr-defined]
        buf = bytearray(8)
        image.read(buf, 4092)
        assert buf == b"AAAABBBB"
        image.read(buf, 4092)  # the cached fast path goes through the wrapper too
        assert buf == b"AAAABBBB"
        image.write(b"cc", 4095)
        image.write_zeroes(0, 2)
        image.resize(4096 * 3)
        assert storage.size == 4096 * 3
    assert path.read_bytes()[:8] == b"\0\0AAAAAA"
    assert path.read_bytes()[4094:4098] == b"AccB"
    assert path.stat().st_size == 4096 * 3
    assert image.closed


def test_raw_over_annotated_null_tag_of_any_type() -> None:
    tag = object()
    storage = AnnotatedStorage(Null(1 << 20), tag)
    image = SyncFormatAccess(Raw.builder(storage).open_sync(PermissiveImplicitOpenGate()))
    mapping, length = image.get_mapping(4096, 1 << 30)
    assert isinstance(mapping, Mapping.Raw)
    assert mapping.storage.tag is tag  # type: ignore[attr-defined]
    assert length == (1 << 20) - 4096
    image.close()
