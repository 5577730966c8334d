"""Capabilities: what a driver claims, how generic code asks, and what claiming requires."""

from __future__ import annotations

from typing import Any

import pytest

import imago
from imago import Capability, FormatDriver
from imago_null import Null
from imago_raw import Raw


def test_every_capability_is_listed_and_named() -> None:
    names = [str(capability) for capability in Capability.all()]
    assert names == ["snapshots", "compressed-writes", "resize", "check", "change-backing", "amend"]
    assert len(set(Capability.all())) == 6
    for capability in Capability.all():
        assert capability.methods
        assert capability.protocol.__doc__


def test_a_driver_without_claims_supports_nothing() -> None:
    assert FormatDriver.capabilities == frozenset()
    assert not any(FormatDriver.supports(capability) for capability in Capability.all())


def test_raw_claims_resize_only() -> None:
    assert Raw.supports(Capability.RESIZE)
    assert not Raw.supports(Capability.SNAPSHOTS)
    driver = Raw.builder(Null(4096)).open_sync(imago.DenyImplicitOpenGate())
    resizable = Capability.RESIZE.of(driver)
    assert resizable is driver
    assert Capability.SNAPSHOTS.of(driver) is None
    assert Capability.COMPRESSED_WRITES.of(driver) is None
    assert Capability.CHECK.of(driver) is None


def test_missing_names_what_a_claim_leaves_undone() -> None:
    class Claims(Raw):
        name = "claims"
        capabilities = frozenset({Capability.RESIZE, Capability.COMPRESSED_WRITES, Capability.SNAPSHOTS})

    assert Capability.RESIZE.missing(Claims, FormatDriver) == []
    # write_compressed is FormatDriver's default (unsupported); cluster_size does not exist.
    assert Capability.COMPRESSED_WRITES.missing(Claims, FormatDriver) == ["cluster_size", "write_compressed"]
    assert Capability.SNAPSHOTS.missing(Claims, FormatDriver) == list(Capability.SNAPSHOTS.methods)


def test_capabilities_compare_by_name_and_methods() -> None:
    same: Capability[Any] = Capability("resize", ("resize",), object)
    assert same == Capability.RESIZE
    assert Capability.RESIZE != Capability.CHECK
    with pytest.raises(AttributeError):
        Capability.RESIZE.name = "other"  # type: ignore[misc]
