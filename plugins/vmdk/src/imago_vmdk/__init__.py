"""imago-vmdk: VMware's VMDK format (descriptor files, hosted sparse, stream-optimized, flat, VMFS extents)."""

from .driver import Vmdk

__all__ = ["Vmdk"]
