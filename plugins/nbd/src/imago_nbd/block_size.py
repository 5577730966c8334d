"""``BlockSize``: an export's block-size constraints (``NBD_INFO_BLOCK_SIZE``) and the checks they imply."""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_BLOCK_SIZE", "NO_MAXIMUM", "BlockSize"]

#: The maximum block size meaning "no inherent limit".
NO_MAXIMUM = 0xFFFFFFFF
_MAX_MINIMUM = 1 << 16


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@attrs.frozen(kw_only=True)
class BlockSize:
    """Minimum, preferred and maximum block size of an export, in bytes.

    The protocol's rules are enforced at construction (``ValueError`` naming the field): the
    minimum is a power of two no larger than 64 KiB; the preferred size a power of two at least
    the minimum; the maximum a multiple of the minimum, or ``NO_MAXIMUM``. (The protocol also
    wants the preferred size at least 512; servers in the field advertise less, so it is not
    enforced here.)
    """

    minimum: int
    preferred: int
    maximum: int

    def __attrs_post_init__(self) -> None:
        if not _is_power_of_two(self.minimum) or self.minimum > _MAX_MINIMUM:
            raise ValueError(f"minimum block size {self.minimum} is not a power of two up to 65536")
        if not _is_power_of_two(self.preferred) or self.preferred < self.minimum:
            raise ValueError(f"preferred block size {self.preferred} is not a power of two >= the minimum")
        if self.maximum != NO_MAXIMUM and (self.maximum < self.minimum or self.maximum % self.minimum):
            raise ValueError(f"maximum block size {self.maximum} is not a multiple of the minimum {self.minimum}")

    def is_aligned(self, offset: int, length: int) -> bool:
        """Whether a request at *offset* for *length* bytes respects the minimum block size."""
        return offset % self.minimum == 0 and length % self.minimum == 0

    def effective_maximum(self, export_size: int) -> int:
        """The largest payload a request may carry on an export of *export_size* bytes."""
        return min(self.maximum, export_size)


#: What a peer assumes when none was advertised: any alignment, 4 KiB preferred, no maximum.
DEFAULT_BLOCK_SIZE = BlockSize(minimum=1, preferred=4096, maximum=NO_MAXIMUM)
