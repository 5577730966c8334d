"""imago-vhdx: the VHDX format (Hyper-V virtual hard disks: fixed, dynamic, differencing)."""

from .driver import Vhdx

__all__ = ["Vhdx"]
