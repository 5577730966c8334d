"""imago-qcow2: the qcow2 image format."""

from .create import Qcow2CreateBuilder
from .driver import Qcow2, Qcow2Builder
from .header import Header
from .snapshot_table import Snapshot

__all__ = ["Header", "Qcow2", "Qcow2Builder", "Qcow2CreateBuilder", "Snapshot"]
