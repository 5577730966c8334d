"""Names images record for other files: only plain local file names may be opened."""

from __future__ import annotations

from ..errors import ImplicitOpenDeniedError

__all__ = ["check_local_file_name"]


def check_local_file_name(name: str | None) -> str:
    """Return *name* if it is a plain local file name, else raise :class:`ImplicitOpenDeniedError`.

    Like QEMU, a name whose first ``:`` comes before any ``/`` is taken as a protocol prefix
    (``json:{...}``, ``nbd:...``, ``http://...``) and refused; write ``./a:b`` for such a file.
    """
    if name is None or name == "":
        raise ImplicitOpenDeniedError(repr(name), "no file name given", allowable=False)
    if "\0" in name:
        raise ImplicitOpenDeniedError(name, "file name contains a NUL byte", allowable=False)
    colon = name.find(":")
    if colon >= 0 and "/" not in name[:colon]:
        raise ImplicitOpenDeniedError(
            name, "not a plain local file name (looks like a protocol or json: string)", allowable=False
        )
    return name
