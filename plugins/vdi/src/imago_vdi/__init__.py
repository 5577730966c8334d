"""imago-vdi: VirtualBox's VDI format (static and dynamic images)."""

from .driver import Vdi

__all__ = ["Vdi"]
