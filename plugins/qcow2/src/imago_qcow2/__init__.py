"""imago-qcow2: the qcow2 image format."""

from .driver import Qcow2, Qcow2Builder
from .header import Header
from .snapshots import Snapshot

__all__ = ["Header", "Qcow2", "Qcow2Builder", "Snapshot"]
