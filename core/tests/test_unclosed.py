"""Images dropped without close(): flushed and closed, with a ResourceWarning naming the file.

The scripts run in a subprocess, so that interpreter exit is real; qemu-img is the judge of
what reached the files.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest

import imago
from imago import DenyImplicitOpenGate, FormatAccess, SyncFormatAccess
from imago_null import Null
from imago_raw import Raw

# Allocating writes: whole and partial clusters, scattered, so that L2 tables and refcounts must
# reach the file (they sit in imago's metadata cache until a flush).
WRITES = [(65536, b"a" * 65536), (1000, b"b" * 3000), (5 << 20, b"c" * 4096), ((8 << 20) - 512, b"d" * 512)]
SIZE = 8 << 20


def expected_content() -> bytes:
    data = bytearray(SIZE)
    for offset, chunk in WRITES:
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


def run_script(directory: pathlib.Path, body: str, *warning_options: str) -> subprocess.CompletedProcess[str]:
    script = directory / "script.py"
    script.write_text(f"WRITES = {WRITES!r}\nSIZE = {SIZE}\n" + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, *warning_options, str(script)], cwd=directory, capture_output=True, text=True, timeout=60
    )


def assert_same_as_expected(directory: pathlib.Path, image: str, format: str) -> None:
    (directory / "expected.raw").write_bytes(expected_content())
    if format == "qcow2":
        check = subprocess.run(["qemu-img", "check", image], cwd=directory, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", format, "-F", "raw", image, "expected.raw"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


WRITE_AND_EXIT = """
    import imago

    images = []  # both stay referenced until the interpreter exits
    for name, format in (("new.qcow2", "qcow2"), ("new.raw", "raw")):
        imago.create(name, format, SIZE)
        images.append(imago.open(name, format, write=True))
        for offset, chunk in WRITES:
            images[-1].write(chunk, offset)
    print("written")
"""


def test_unclosed_images_are_flushed_at_exit(tmp_path: pathlib.Path) -> None:
    result = run_script(tmp_path, WRITE_AND_EXIT, "-W", "always::ResourceWarning")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "written\n"
    assert_same_as_expected(tmp_path, "new.qcow2", "qcow2")
    assert_same_as_expected(tmp_path, "new.raw", "raw")
    for name in ("new.qcow2", "new.raw"):
        line = next(line for line in result.stderr.splitlines() if name in line)
        assert "ResourceWarning" in line
        assert str(tmp_path / name) in line
        assert "opened for writing) was not closed" in line
        assert "at interpreter exit" in line
    assert "Traceback" not in result.stderr


def test_warning_is_silent_by_default_but_data_is_kept(tmp_path: pathlib.Path) -> None:
    # ResourceWarning is ignored by Python's default filters, like an unclosed file's.
    result = run_script(tmp_path, WRITE_AND_EXIT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_same_as_expected(tmp_path, "new.qcow2", "qcow2")


def test_dropped_image_is_flushed_when_collected(tmp_path: pathlib.Path) -> None:
    # The checks run inside the script, before it exits: the flush happened at collection.
    body = """
    import gc
    import subprocess

    import imago

    imago.create("new.qcow2", "qcow2", SIZE)
    image = imago.open("new.qcow2", "qcow2", write=True)
    for offset, chunk in WRITES:
        image.write(chunk, offset)
    image.cycle = [image]  # only the cycle collector can free it
    del image
    gc.collect()
    print("collected", flush=True)
    subprocess.run(["qemu-img", "check", "new.qcow2"], check=True, capture_output=True)
    data = bytearray(SIZE)
    for offset, chunk in WRITES:
        data[offset : offset + len(chunk)] = chunk
    open("expected.raw", "wb").write(data)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", "new.qcow2", "expected.raw"], check=True)
    print("checked")
    """
    result = run_script(tmp_path, body, "-W", "always::ResourceWarning")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["collected", "Images are identical.", "checked"]
    assert "ResourceWarning" in result.stderr
    assert "when it was garbage-collected" in result.stderr
    assert str(tmp_path / "new.qcow2") in result.stderr


def test_warnings_as_errors_still_flush(tmp_path: pathlib.Path) -> None:
    # -W error turns the warning into an exception, raised in the finalizer after the flush.
    body = """
    import gc

    import imago

    imago.create("new.qcow2", "qcow2", SIZE)
    image = imago.open("new.qcow2", "qcow2", write=True)
    for offset, chunk in WRITES:
        image.write(chunk, offset)
    del image
    gc.collect()
    print("survived")
    """
    result = run_script(tmp_path, body, "-W", "error::ResourceWarning")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "survived\n"
    assert "ResourceWarning" in result.stderr  # reported as an exception in a finalizer
    assert_same_as_expected(tmp_path, "new.qcow2", "qcow2")


# --- in the test process -----------------------------------------------------------------------------


def drop(holder: list[object]) -> None:
    """Drop the last references (those in *holder*) and collect."""
    holder.clear()
    gc.collect()


def test_dropped_read_only_image_is_released_with_a_warning(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"r" * 4096)
    image = imago.open(path, "raw")
    storage = image.driver.storage
    holder: list[object] = [image]
    del image
    with pytest.warns(ResourceWarning, match=r"raw image .*ro\.img' \(opened read-only\) was not closed") as info:
        drop(holder)
    assert len(info) == 1
    with pytest.raises(imago.ClosedError):
        storage.fileno()  # type: ignore[attr-defined]
    assert path.read_bytes() == b"r" * 4096


def test_closed_image_gives_no_warning(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "closed.img"
    path.write_bytes(bytes(4096))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with imago.open(path, "raw", write=True) as image:
            image.write(b"x", 0)
        del image
        asyncio.run(_open_and_close(path))
        gc.collect()


async def _open_and_close(path: pathlib.Path) -> None:
    async with await imago.open_async(path, "raw") as image:
        assert image.size == 4096


def test_backing_chain_released_with_its_top_layer(tmp_path: pathlib.Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"B" * 65536)
    imago.create(tmp_path / "top.qcow2", "qcow2", backing_file="base.raw", backing_format="raw")
    image = imago.open(tmp_path / "top.qcow2", "qcow2", write=True)
    image.write(b"T" * 512, 0)
    backing = image.driver.backing
    assert backing is not None
    backing_storage = backing.driver.storage
    holder: list[object] = [image]
    del image
    with pytest.warns(ResourceWarning) as info:
        drop(holder)
    # One warning, for the top layer: the backing layer was closed by it, not dropped.
    assert [str(w.message).split(" (")[0] for w in info] == [f"qcow2 image {str(tmp_path / 'top.qcow2')!r}"]
    assert backing.closed
    with pytest.raises(imago.ClosedError):
        backing_storage.fileno()  # type: ignore[attr-defined]
    check = subprocess.run(["qemu-img", "check", "top.qcow2"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    read = subprocess.run(
        ["qemu-io", "-c", "read -P 0x54 0 512", "-c", "read -P 0x42 512 65024", "top.qcow2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "verification failed" not in read.stdout + read.stderr


def test_dropped_under_a_running_event_loop(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "loop.qcow2"
    imago.create(path, "qcow2", SIZE)

    async def main() -> None:
        image = await imago.open_async(path, "qcow2", write=True)
        for offset, chunk in WRITES:
            await image.write(chunk, offset)
        holder: list[object] = [image]
        del image
        with pytest.warns(ResourceWarning, match="loop.qcow2"):
            drop(holder)

    asyncio.run(main())
    assert_same_as_expected(tmp_path, "loop.qcow2", "qcow2")


def test_several_accesses_share_one_driver() -> None:
    driver = Raw.builder(Null(4096)).write(True).open_sync(DenyImplicitOpenGate())
    first = SyncFormatAccess(driver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A second access that goes away (as a driver's own temporary one does) leaves the
        # driver open while another access lives.
        second = FormatAccess(driver)
        del second
        gc.collect()
        first.write(b"still open", 0)
    holder: list[object] = [first]
    del first
    with pytest.warns(ResourceWarning, match="raw image"):
        drop(holder)


def test_closing_one_access_closes_the_driver_once() -> None:
    driver = Raw.builder(Null(4096)).write(True).open_sync(DenyImplicitOpenGate())
    first = FormatAccess(driver)
    second = SyncFormatAccess(driver)
    closes = []
    original = driver.close

    async def counting_close() -> None:
        closes.append(1)
        await original()

    driver.close = counting_close  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.close()
        asyncio.run(first.close())  # the driver is closed already: nothing to do
        assert first.closed
        # Wrapping the closed driver again arms nothing.
        third = SyncFormatAccess(driver)
        del first, second, third
        gc.collect()
    assert closes == [1]


def test_forked_child_does_not_release_the_parents_image(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fork.img"
    path.write_bytes(bytes(4096))
    image = imago.open(path, "raw", write=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            storage = image.driver.storage
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                del image
                gc.collect()
            storage.fileno()  # type: ignore[attr-defined]  # still open: not released
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    image.write(b"parent", 0)
    image.close()
    assert path.read_bytes()[:6] == b"parent"


def test_views_of_an_open_image_do_not_release_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "views.img"
    path.write_bytes(bytes(4096))
    image = imago.open(path, "raw", write=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        file = image.as_file()
        view = image.access.as_sync()
        del file, view
        gc.collect()
        image.write(b"open", 0)
        image.close()
    assert path.read_bytes()[:4] == b"open"
