"""imago-faults: a storage that injects I/O errors and simulates power loss, for testing.

:class:`FaultyStorage` wraps another storage. A :class:`FaultPlan` shared with the test says
which calls fail (:class:`Fault`: the Nth read, write, flush, sync..., or every call touching a
byte range; EIO or a short read), counts the calls, and switches on a volatile write cache whose
pending changes :meth:`FaultyStorage.power_loss` drops (all of them, or a random subset, as a
disk cache may have written some back).
"""

from .cache import CachedChange, VolatileCache
from .plan import ANY, OPERATIONS, Call, Fault, FaultPlan, InjectedError
from .storage import FaultyStorage

__all__ = [
    "ANY",
    "OPERATIONS",
    "CachedChange",
    "Call",
    "Fault",
    "FaultPlan",
    "FaultyStorage",
    "InjectedError",
    "VolatileCache",
]
