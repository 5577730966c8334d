"""imago-vpc: the VHD format (QEMU's ``vpc``): fixed, dynamic and differencing images."""

from .driver import Vpc

__all__ = ["Vpc"]
