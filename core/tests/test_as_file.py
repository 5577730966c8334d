"""SyncFormatAccess.as_file(): a seekable io.RawIOBase over a disk image."""

from __future__ import annotations

import hashlib
import io
import pathlib
import shutil
import tarfile
import zipfile
from collections.abc import Iterator

import pytest

import imago
from imago import ImageFile, PermissiveImplicitOpenGate, SyncFormatAccess
from imago_null import Null
from imago_raw import Raw

SIZE = 10_000


def _pattern(size: int) -> bytes:
    return bytes((i * 13 + 5) % 256 for i in range(size))


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    p = tmp_path / "disk.img"
    p.write_bytes(_pattern(SIZE))
    return p


@pytest.fixture
def image(path: pathlib.Path) -> Iterator[SyncFormatAccess]:
    access = imago.open(path, "raw", write=True)
    yield access
    access.close()


@pytest.fixture
def ro_image(path: pathlib.Path) -> Iterator[SyncFormatAccess]:
    access = imago.open(path, "raw")
    yield access
    access.close()


def test_is_a_raw_io_base(image: SyncFormatAccess) -> None:
    file = image.as_file()
    assert isinstance(file, io.RawIOBase)
    assert isinstance(file, ImageFile)
    assert isinstance(file, io.IOBase)
    assert file.readable()
    assert file.seekable()
    assert file.writable()
    assert not file.closed
    assert file.tell() == 0
    assert isinstance(image.access.as_file(), io.RawIOBase)


def test_read_only_file_is_not_writable(ro_image: SyncFormatAccess) -> None:
    assert ro_image.as_file().writable() is False


def test_read(image: SyncFormatAccess) -> None:
    file = image.as_file()
    data = _pattern(SIZE)
    assert file.read(10) == data[:10]
    assert file.tell() == 10
    assert file.read(5) == data[10:15]
    assert file.read(0) == b""
    assert file.tell() == 15
    assert file.read() == data[15:]
    assert file.tell() == SIZE
    assert file.read() == b""
    assert file.read(10) == b""


def test_readall(image: SyncFormatAccess) -> None:
    file = image.as_file()
    assert file.readall() == _pattern(SIZE)
    file.seek(SIZE - 3)
    assert file.readall() == _pattern(SIZE)[-3:]
    assert file.readall() == b""


def test_readinto(image: SyncFormatAccess) -> None:
    file = image.as_file()
    buf = bytearray(100)
    assert file.readinto(buf) == 100
    assert buf == _pattern(SIZE)[:100]
    words = memoryview(bytearray(8)).cast("I")
    assert file.readinto(words) == 8
    assert words.tobytes() == _pattern(SIZE)[100:108]
    with pytest.raises(imago.InvalidBufferError):
        file.readinto(b"read-only")  # type: ignore[arg-type]
    assert file.tell() == 108


def test_short_read_at_the_end(image: SyncFormatAccess) -> None:
    file = image.as_file()
    file.seek(SIZE - 7)
    assert file.read(100) == _pattern(SIZE)[-7:]
    assert file.tell() == SIZE
    file.seek(SIZE - 3)
    buf = bytearray(b"\xee" * 10)
    assert file.readinto(buf) == 3
    assert buf == _pattern(SIZE)[-3:] + b"\xee" * 7


def test_read_past_the_end(image: SyncFormatAccess) -> None:
    file = image.as_file()
    assert file.seek(SIZE + 1000) == SIZE + 1000
    assert file.read(10) == b""
    assert file.readinto(bytearray(10)) == 0
    assert file.read() == b""
    assert file.tell() == SIZE + 1000


def test_seek(image: SyncFormatAccess) -> None:
    file = image.as_file()
    data = _pattern(SIZE)
    assert file.seek(100) == 100
    assert file.seek(100, io.SEEK_SET) == 100
    assert file.seek(50, io.SEEK_CUR) == 150
    assert file.seek(-20, io.SEEK_CUR) == 130
    assert file.read(2) == data[130:132]
    assert file.seek(0, io.SEEK_END) == SIZE
    assert file.seek(-10, io.SEEK_END) == SIZE - 10
    assert file.read() == data[-10:]
    assert file.seek(0) == 0
    assert file.read(1) == data[:1]


def test_seek_errors(image: SyncFormatAccess) -> None:
    file = image.as_file()
    file.seek(5)
    with pytest.raises(ValueError, match="negative"):
        file.seek(-1)
    with pytest.raises(ValueError, match="negative"):
        file.seek(-6, io.SEEK_CUR)
    with pytest.raises(ValueError, match="negative"):
        file.seek(-SIZE - 1, io.SEEK_END)
    for whence in (3, -1, 42):
        with pytest.raises(ValueError, match="whence"):
            file.seek(0, whence)
    for bad in (1.5, "3", None):
        with pytest.raises(TypeError):
            file.seek(bad)  # type: ignore[arg-type]
    assert file.tell() == 5  # failed seeks do not move


def test_write(image: SyncFormatAccess, path: pathlib.Path) -> None:
    file = image.as_file()
    file.seek(1000)
    assert file.write(b"written") == 7
    assert file.tell() == 1007
    assert file.write(bytearray(b"++")) == 2
    assert file.write(memoryview(b"")) == 0
    file.flush()
    data = path.read_bytes()
    assert data[1000:1009] == b"written++"
    assert data[:1000] == _pattern(SIZE)[:1000]
    assert data[1009:] == _pattern(SIZE)[1009:]
    file.seek(1000)
    assert file.read(9) == b"written++"


def test_write_up_to_the_end(image: SyncFormatAccess, path: pathlib.Path) -> None:
    file = image.as_file()
    file.seek(-4, io.SEEK_END)
    assert file.write(b"TAIL") == 4
    assert file.tell() == SIZE
    assert path.read_bytes()[-4:] == b"TAIL"
    assert file.write(b"") == 0


def test_write_past_the_end(image: SyncFormatAccess, path: pathlib.Path) -> None:
    file = image.as_file()
    file.seek(-2, io.SEEK_END)
    with pytest.raises(imago.InvalidRequestError):
        file.write(b"four")
    assert file.tell() == SIZE - 2  # nothing written, position kept
    file.seek(SIZE + 10)
    with pytest.raises(imago.InvalidRequestError):
        file.write(b"x")
    assert path.read_bytes() == _pattern(SIZE)
    assert image.size == SIZE


def test_write_read_only(ro_image: SyncFormatAccess, path: pathlib.Path) -> None:
    file = ro_image.as_file()
    with pytest.raises(imago.ReadOnlyError):
        file.write(b"nope")
    assert file.tell() == 0
    assert path.read_bytes() == _pattern(SIZE)


def test_write_non_buffer(image: SyncFormatAccess) -> None:
    with pytest.raises(imago.InvalidBufferError):
        image.as_file().write("text")  # type: ignore[arg-type]


def test_truncate_unsupported(image: SyncFormatAccess) -> None:
    file = image.as_file()
    with pytest.raises(io.UnsupportedOperation):
        file.truncate()
    with pytest.raises(io.UnsupportedOperation):
        file.truncate(10)
    assert image.size == SIZE


def test_fileno_unsupported(image: SyncFormatAccess) -> None:
    with pytest.raises(io.UnsupportedOperation):
        image.as_file().fileno()


def test_readline_and_iteration(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "text.img"
    path.write_bytes(b"line one\nline two\nlast")
    with imago.open(path, "raw") as image:
        file = image.as_file()
        assert file.readline() == b"line one\n"
        assert list(file) == [b"line two\n", b"last"]
        file.seek(0)
        assert file.readlines() == [b"line one\n", b"line two\n", b"last"]


def test_buffered_reader(image: SyncFormatAccess) -> None:
    reader = io.BufferedReader(image.as_file(), buffer_size=4096)
    data = _pattern(SIZE)
    assert reader.read(3) == data[:3]
    assert reader.peek(1)[:1] == data[3:4]
    reader.seek(5000)
    assert reader.read(100) == data[5000:5100]
    assert reader.tell() == 5100
    assert reader.read() == data[5100:]
    reader.close()
    assert not image.closed


def test_buffered_random_writes(image: SyncFormatAccess, path: pathlib.Path) -> None:
    file = io.BufferedRandom(image.as_file())
    file.seek(20)
    file.write(b"buffered")
    file.flush()
    assert path.read_bytes()[20:28] == b"buffered"
    file.seek(20)
    assert file.read(8) == b"buffered"
    file.close()
    assert not image.closed


def test_text_wrapper(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.img"
    path.write_bytes("héllo\nwörld\n".encode())
    with imago.open(path, "raw") as image:
        text = io.TextIOWrapper(io.BufferedReader(image.as_file()), encoding="utf-8")
        assert text.read() == "héllo\nwörld\n"


def test_closing_file_does_not_close_image(image: SyncFormatAccess) -> None:
    file = image.as_file()
    file.close()
    assert file.closed
    assert not image.closed
    buf = bytearray(4)
    image.read(buf, 0)
    assert buf == _pattern(SIZE)[:4]
    with pytest.raises(ValueError, match="closed"):
        file.read(1)
    with pytest.raises(ValueError, match="closed"):
        file.seek(0)
    with pytest.raises(ValueError, match="closed"):
        file.tell()
    with pytest.raises(ValueError, match="closed"):
        file.write(b"x")
    file.close()  # twice is fine


def test_file_as_context_manager(image: SyncFormatAccess) -> None:
    with image.as_file() as file:
        assert file.read(2) == _pattern(SIZE)[:2]
    assert file.closed
    assert not image.closed


def test_several_files_have_own_positions(image: SyncFormatAccess) -> None:
    a, b = image.as_file(), image.as_file()
    a.seek(100)
    assert b.tell() == 0
    assert b.read(1) == _pattern(SIZE)[:1]
    assert a.read(1) == _pattern(SIZE)[100:101]


def test_use_after_image_closed(path: pathlib.Path) -> None:
    image = imago.open(path, "raw", write=True)
    file = image.as_file()
    file.read(1)
    image.close()
    for call in (
        lambda: file.read(1),
        lambda: file.readinto(bytearray(1)),
        lambda: file.readall(),
        lambda: file.write(b"x"),
        lambda: file.seek(0),
        lambda: file.tell(),
        lambda: file.readable(),
        lambda: file.writable(),
        lambda: file.seekable(),
    ):
        with pytest.raises(imago.ClosedError):
            call()
    file.flush()  # nothing to flush: no error
    file.close()
    assert file.closed


def test_as_file_on_null_image() -> None:
    image = SyncFormatAccess(Raw.builder(Null(4096)).open_sync(PermissiveImplicitOpenGate()))
    file = image.as_file()
    assert file.read() == bytes(4096)
    image.close()


# --- used as a real file ----------------------------------------------------------------------


def _disk_with(path: pathlib.Path, payload: bytes, size: int) -> None:
    imago.create(path, "raw", size)
    with imago.open(path, "raw", write=True) as image:
        image.as_file().write(payload)


def test_hashlib_over_disk(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "hash.img"
    _disk_with(path, _pattern(300_000), 1 << 20)
    with imago.open(path, "raw") as image:
        digest = hashlib.file_digest(image.as_file(), "sha256").hexdigest()  # type: ignore[arg-type]
        buffered = hashlib.file_digest(io.BufferedReader(image.as_file()), "sha256").hexdigest()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == expected
    assert buffered == expected
    assert expected == hashlib.sha256(_pattern(300_000) + bytes((1 << 20) - 300_000)).hexdigest()


def test_copyfileobj_out_of_disk(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "copy.img"
    _disk_with(path, b"copy me" * 1000, 65536)
    out = io.BytesIO()
    with imago.open(path) as image:
        shutil.copyfileobj(image.as_file(), out)
    assert out.getvalue() == path.read_bytes()


def test_tarfile_on_disk(tmp_path: pathlib.Path) -> None:
    members = {"a.txt": b"alpha" * 100, "dir/b.bin": _pattern(50_000), "empty": b""}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path = tmp_path / "tar.img"
    _disk_with(path, archive.getvalue(), 1 << 20)  # the zero padding ends a tar archive
    with imago.open(path, "raw") as image, tarfile.open(fileobj=image.as_file(), mode="r:") as tar:
        assert sorted(tar.getnames()) == sorted(members)
        for name, content in members.items():
            extracted = tar.extractfile(name)
            assert extracted is not None
            assert extracted.read() == content


def test_tarfile_written_through_as_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tarw.img"
    imago.create(path, "raw", 1 << 20)
    with imago.open(path, "raw", write=True) as image:
        file = image.as_file()
        with tarfile.open(fileobj=file, mode="w") as tar:
            info = tarfile.TarInfo("hello.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
        assert not file.closed  # tarfile does not close a fileobj it was given
    with tarfile.open(path) as tar:
        member = tar.extractfile("hello.txt")
        assert member is not None
        assert member.read() == b"hello"


def test_zipfile_on_disk(tmp_path: pathlib.Path) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.txt", b"x marks the spot" * 500)
        zf.writestr("sub/y.bin", _pattern(20_000))
    payload = archive.getvalue()
    path = tmp_path / "zip.img"
    _disk_with(path, payload, len(payload))  # the end-of-directory record must end the disk
    assert path.read_bytes() == payload
    with imago.open(path, "raw") as image, zipfile.ZipFile(image.as_file()) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == ["sub/y.bin", "x.txt"]
        assert zf.read("x.txt") == b"x marks the spot" * 500
        assert zf.read("sub/y.bin") == _pattern(20_000)
