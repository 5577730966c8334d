"""Names written as URIs: the storage driver claiming the scheme opens them, and never implicitly."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

import imago
from imago.cli.common import gate_for
from imago.plugin.manager import storage_driver_for_uri
from imago.storage import uri_scheme

# What the test driver serves, by URI; what it was asked to open, in order.
_DISKS: dict[str, bytearray] = {}
_OPENED: list[str] = []


class MemoryUri(imago.Storage):
    """A storage over bytes kept in this module, opened by ``memuri://NAME`` URIs."""

    name: ClassVar[str] = "memuri-test"
    uri_schemes: ClassVar[tuple[str, ...]] = ("memuri", "memuri+x")

    def __init__(self, uri: str, writable: bool) -> None:
        self._uri = uri
        self._data = _DISKS[uri]
        self._writable = writable

    @classmethod
    async def open(cls, options: imago.StorageOpenOptions) -> MemoryUri:
        _OPENED.append(str(options.filename))
        if options.filename not in _DISKS:
            raise FileNotFoundError(options.filename)
        return cls(options.filename, options.writable)

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def filename(self) -> str:
        return self._uri

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        for buf in bufs:
            chunk = self._data[offset : offset + len(buf)]
            buf[: len(chunk)] = chunk
            buf[len(chunk) :] = bytes(len(buf) - len(chunk))
            offset += len(buf)

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        for buf in bufs:
            end = offset + len(buf)
            if end > len(self._data):
                self._data.extend(bytes(end - len(self._data)))
            self._data[offset:end] = buf
            offset = end

    async def resize(self, new_size: int, prealloc: imago.PreallocateMode = imago.PreallocateMode.NONE) -> None:
        del self._data[new_size:]
        self._data.extend(bytes(new_size - len(self._data)))


class _Plugin:
    def __init__(self, *drivers: type[imago.Storage]) -> None:
        self.drivers = drivers

    @imago.hookimpl
    def imago_register_storage_drivers(self, register: imago.StorageRegistrar) -> None:
        for driver in self.drivers:
            register(driver)


@pytest.fixture
def memuri() -> Iterator[None]:
    imago.register_plugin("memuri-test", _Plugin(MemoryUri))
    _DISKS.clear()
    _OPENED.clear()
    try:
        yield
    finally:
        imago.unregister_plugin("memuri-test")


@pytest.mark.parametrize(
    ("name", "scheme"),
    [
        ("nbd://host/export", "nbd"),
        ("NBD+Unix:///e?socket=/s", "nbd+unix"),
        ("a.b-c+d://x", "a.b-c+d"),
        ("disk.qcow2", None),
        ("/abs/path://x", None),
        ("://x", None),
        ("1nbd://x", None),
        ("nb d://x", None),
        ("nbd:/x", None),
        ("ñbd://x", None),
    ],
)
def test_uri_scheme_is_rfc_3986_syntax(name: str, scheme: str | None) -> None:
    assert uri_scheme(name) == scheme


def test_a_uri_opens_through_the_driver_claiming_its_scheme(memuri: None) -> None:
    _DISKS["memuri://disk"] = bytearray(b"hello" + bytes(4091))
    assert storage_driver_for_uri("MEMURI") is MemoryUri
    with imago.open("memuri://disk", format="raw", write=True) as disk:
        buf = bytearray(5)
        disk.read(buf, 0)
        assert buf == b"hello"
        disk.write(b"HELLO", 0)
    assert _DISKS["memuri://disk"][:5] == b"HELLO"
    # Probing works through it too; the second scheme is the same driver's.
    _DISKS["memuri+x://other"] = bytearray(4096)
    with imago.open("memuri+x://other") as disk:
        assert disk.driver.name == "raw"
    assert _OPENED == ["memuri://disk", "memuri+x://other", "memuri+x://other"]


def test_an_explicit_storage_driver_wins_over_the_scheme(memuri: None, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        imago.open("memuri://disk", format="raw", storage_driver_name="file")
    assert _OPENED == []


def test_a_scheme_no_driver_claims_is_an_error_naming_the_uri(memuri: None) -> None:
    with pytest.raises(imago.UnsupportedFeatureError, match=r"gopher://x.*no installed storage driver"):
        imago.open("gopher://x/disk", format="raw")


def test_a_local_file_whose_name_looks_like_a_uri_still_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gopher:").mkdir()
    (tmp_path / "gopher:" / "disk").write_bytes(b"local" + bytes(507))
    monkeypatch.chdir(tmp_path)
    with imago.open("gopher://disk", format="raw") as disk:
        buf = bytearray(5)
        disk.read(buf, 0)
        assert buf == b"local"


def _qcow2_with_backing(tmp_path: Path, backing: str) -> bytearray:
    image = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(image), "1M"], check=True
    )
    return bytearray(image.read_bytes())


def test_files_an_image_on_a_uri_driver_names_are_never_opened_through_it(memuri: None, tmp_path: Path) -> None:
    # By default an image reached through a URI opens no other file at all.
    (tmp_path / "base.raw").write_bytes(b"base" + bytes((1 << 20) - 4))
    _DISKS["memuri://overlay"] = _qcow2_with_backing(tmp_path, str(tmp_path / "base.raw"))
    with pytest.raises(imago.ImplicitOpenDeniedError):
        imago.open("memuri://overlay", format="qcow2")
    with imago.open("memuri://overlay", format="qcow2", backing=False) as disk:
        assert disk.size == 1 << 20
    # A gate that allows it opens the backing file as a local file, never through the URI driver.
    with imago.open("memuri://overlay", format="qcow2", gate=imago.PermissiveImplicitOpenGate()) as disk:
        buf = bytearray(4)
        disk.read(buf, 0)
        assert buf == b"base"
    assert _OPENED == ["memuri://overlay"] * 3


def test_a_data_file_an_image_on_a_uri_driver_names_is_refused(memuri: None, tmp_path: Path) -> None:
    # The external data file is opened with the image's own storage options: through the URI
    # driver that would be, and the gate refuses it whatever the gate allows.
    image = tmp_path / "data.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(image), "1M"],
        check=True,
    )
    _DISKS[str(tmp_path / "data.raw")] = bytearray(1 << 20)
    _DISKS["memuri://image"] = bytearray(image.read_bytes())
    with pytest.raises(imago.ImplicitOpenDeniedError, match="never opened through the 'memuri-test' storage driver"):
        imago.open("memuri://image", format="qcow2", gate=imago.PermissiveImplicitOpenGate())
    assert _OPENED == ["memuri://image"]


def test_a_recorded_uri_never_reaches_the_driver_claiming_its_scheme(memuri: None, tmp_path: Path) -> None:
    _DISKS["memuri://secret"] = bytearray(1 << 20)
    image = tmp_path / "overlay.qcow2"
    image.write_bytes(_qcow2_with_backing(tmp_path, "memuri://secret"))
    for gate in (None, imago.PermissiveImplicitOpenGate()):
        with pytest.raises(imago.ImplicitOpenDeniedError):
            imago.open(image, format="qcow2", gate=gate)
    assert _OPENED == []


@pytest.mark.parametrize(
    ("schemes", "problem"),
    [(["memuri"], "must be a tuple"), (("MemUri",), "not a lower-case URI scheme"), (("a b",), "not a lower-case")],
)
def test_the_registrar_checks_uri_schemes(schemes: object, problem: str) -> None:
    class Bad(MemoryUri):
        name: ClassVar[str] = "bad-uri-test"
        uri_schemes = schemes  # type: ignore[assignment]

    imago.register_plugin("bad-uri-test", _Plugin(Bad))
    try:
        info = next(info for info in imago.plugins() if info.name == "bad-uri-test")
        assert isinstance(info.error, imago.PluginLoadError)
        assert isinstance(info.error.__cause__, imago.InvalidDriverError)
        assert problem in str(info.error)
        assert "bad-uri-test" not in imago.storage_drivers()
    finally:
        imago.unregister_plugin("bad-uri-test")


def test_two_drivers_claiming_one_scheme_are_reported(memuri: None) -> None:
    class Twin(MemoryUri):
        name: ClassVar[str] = "memuri-twin-test"

    imago.register_plugin("memuri-twin", _Plugin(Twin))
    try:
        with pytest.raises(imago.DuplicateDriverError, match="memuri://"):
            imago.open("memuri://disk", format="raw")
    finally:
        imago.unregister_plugin("memuri-twin")


def test_the_command_line_gate_allows_no_directory_for_a_uri(tmp_path: Path) -> None:
    args = argparse.Namespace(allow_any=False, allow_dirs=())
    gate = gate_for(args, ["nbd+unix:///e?socket=/tmp/s", str(tmp_path / "disk.qcow2")])
    assert isinstance(gate, imago.SandboxImplicitOpenGate)
    assert [str(d) for d in gate.directories] == [str(tmp_path)]


def test_the_command_line_gate_for_uris_alone_denies_every_implicit_open(tmp_path: Path) -> None:
    args = argparse.Namespace(allow_any=False, allow_dirs=())
    assert isinstance(gate_for(args, ["nbd+unix:///e?socket=/tmp/s"]), imago.DenyImplicitOpenGate)
    args = argparse.Namespace(allow_any=False, allow_dirs=(str(tmp_path),))
    gate = gate_for(args, ["nbd+unix:///e?socket=/tmp/s"])
    assert isinstance(gate, imago.SandboxImplicitOpenGate)
    assert [str(d) for d in gate.directories] == [str(tmp_path)]
