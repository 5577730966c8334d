"""The package's names, imported on first use, and what loading the plugin costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import imago_nbd
import imago_nbd.server


@pytest.mark.parametrize("package", [imago_nbd, imago_nbd.server])
def test_every_public_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(package, name) is not None, name
    assert set(names) <= set(dir(package))
    with pytest.raises(AttributeError, match="no_such_name"):
        assert package.no_such_name is None  # type: ignore[attr-defined]


def test_the_driver_and_the_server_are_the_registered_ones() -> None:
    import imago

    assert imago.storage_driver("nbd") is imago_nbd.Nbd
    assert imago_nbd.serve is imago_nbd.server.serve
    assert issubclass(imago_nbd.NbdServerError, imago.ImagoError)
    assert issubclass(imago_nbd.NbdConnectionError, imago.ImagoError)


def test_loading_the_plugin_imports_no_event_loop_tls_or_codec() -> None:
    # Every probe of an image's format loads every plugin: this one must stay cheap.
    code = (
        "import sys, imago_nbd.plugin\n"
        "heavy = {'asyncio', 'ssl', 'attrs', 'socket', 'imago_nbd.options', 'imago_nbd.replies',"
        " 'imago_nbd.client.connection', 'imago_nbd.server.listener'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
