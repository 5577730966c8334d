"""Images dropped without ``close()``: flushed and released, with a :class:`ResourceWarning`.

A :class:`~imago.FormatAccess` owns the format driver it wraps. When the last access over a
driver that is still open goes away without :meth:`~imago.FormatAccess.close` (garbage
collected, or still alive at interpreter exit), the driver is flushed (when writable) and
closed here, as the Rust crate's synchronous wrapper flushes in ``Drop``, and a
``ResourceWarning`` names the file, as Python does for an unclosed file. Nothing written and
acknowledged is lost because the caller forgot to close.

The bookkeeping is kept per driver, not per access: several accesses may wrap one driver (a
driver method that uses a temporary access of its own, a caller wrapping a driver twice), and
the driver is released only when the last of them is gone. The finalizers
(:class:`weakref.finalize`) hold the driver, never the access, so they neither keep accesses
alive nor depend on reference cycles; ``weakref.finalize`` also runs them at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from typing import TYPE_CHECKING

from .. import runtime

if TYPE_CHECKING:
    from .driver import FormatDriver

__all__ = ["mark_closed", "release", "track"]


class _DriverUse:
    """How many live accesses wrap one driver, and whether the driver was closed."""

    __slots__ = ("__weakref__", "closed", "pid", "users")

    def __init__(self) -> None:
        self.users = 0
        self.closed = False
        # A forked child must not flush or close its parent's image (the parent still uses it).
        self.pid = os.getpid()


# Keyed weakly by driver: a closed driver stays known as closed for as long as it lives, so that
# wrapping it again does not arm a finalizer that would close it twice.
_uses: weakref.WeakKeyDictionary[FormatDriver, _DriverUse] = weakref.WeakKeyDictionary()
_exit_hook_registered = False
_exiting = False


def _note_exit() -> None:
    global _exiting
    _exiting = True


def _use_of(driver: FormatDriver) -> _DriverUse:
    use = _uses.get(driver)
    if use is None:
        use = _uses[driver] = _DriverUse()
    return use


def track(access: object, driver: FormatDriver) -> weakref.finalize[[_DriverUse, FormatDriver], object] | None:
    """Arm the release of *driver* for when *access* is dropped unclosed.

    Returns the finalizer (to detach on close), or ``None`` if the driver is already closed.
    """
    global _exit_hook_registered
    use = _use_of(driver)
    if use.closed:
        return None
    use.users += 1
    finalizer = weakref.finalize(access, _dropped, use, driver)
    if not _exit_hook_registered:
        # Registered after weakref's own exit hook (made with the first finalizer), so it runs
        # before it: the finalizers it then calls know that the interpreter is exiting.
        atexit.register(_note_exit)
        _exit_hook_registered = True
    return finalizer


def mark_closed(driver: FormatDriver) -> bool:
    """Record that *driver* is being closed; whether it already was."""
    use = _use_of(driver)
    was_closed = use.closed
    use.closed = True
    return was_closed


async def release(driver: FormatDriver) -> None:
    """Flush *driver* if it is writable, then close it (and its storages and backing layers)."""
    try:
        if driver.writable:
            await driver.flush()
    finally:
        await driver.close()


def _dropped(use: _DriverUse, driver: FormatDriver) -> None:
    """An access over *driver* was dropped without close(): release the driver with the last one."""
    use.users -= 1
    if use.users > 0 or use.closed or use.pid != os.getpid():
        return
    use.closed = True
    name = driver.storage.filename or "<no file name>"
    mode = "opened for writing" if driver.writable else "opened read-only"
    done = "flushed and closed" if driver.writable else "closed"
    when = "at interpreter exit" if _exiting else "when it was garbage-collected"
    try:
        runtime.run_sync(release(driver))
    finally:
        # After the flush: a warnings filter that turns this into an error must not cost data.
        warnings.warn(
            f"{driver.name} image {name!r} ({mode}) was not closed; imago {done} it {when}. "
            "Close images with close() or a with block.",
            ResourceWarning,
            stacklevel=1,
        )
