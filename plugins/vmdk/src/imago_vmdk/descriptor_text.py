"""Descriptor text for new images, and the CID a changed image records.

The text follows QEMU's template (``qemu-img create -f vmdk``): the header lines, the extent
lines, and the disk database with the hardware version, the geometry, the adapter type and the
tools version. :func:`with_new_cid` rewrites the ``CID`` line, as a writer must once an image
changes (delta images record their parent's CID and so detect a changed parent).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

__all__ = ["new_cid", "render_descriptor", "with_new_cid"]

_CID_LINE = re.compile(rb"^CID=[0-9A-Fa-f]*[ \t]*$", re.MULTILINE)


def new_cid() -> int:
    """A random content ID (never ``0xffffffff``, which means "no parent" as a parentCID)."""
    while True:
        cid = secrets.randbits(32)
        if cid != 0xFFFFFFFF:
            return cid


def render_descriptor(
    *,
    cid: int,
    parent_cid: int,
    create_type: str,
    parent_hint: str | None,
    extent_lines: Sequence[str],
    hw_version: str,
    cylinders: int,
    heads: int,
    adapter_type: str,
    tools_version: str,
) -> str:
    """The descriptor text of a new image."""
    parent = f'parentFileNameHint="{parent_hint}"\n' if parent_hint is not None else ""
    extents = "".join(f"{line}\n" for line in extent_lines)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        f"parentCID={parent_cid:08x}\n"
        f'createType="{create_type}"\n'
        f"{parent}"
        "\n"
        "# Extent description\n"
        f"{extents}"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hw_version}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{tools_version}"\n'
    )


def with_new_cid(text: bytes, cid: int) -> bytes | None:
    """*text* (up to its first NUL) with its ``CID`` line set to *cid*; ``None`` if it has none."""
    body = text.split(b"\0", 1)[0]
    changed, count = _CID_LINE.subn(f"CID={cid:08x}".encode(), body, count=1)
    return changed if count else None
