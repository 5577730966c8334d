"""The check, as ``qemu-img check`` does it for VDI: the block map and the allocated-block count.

QEMU's VDI check reports, one corruption each, entries naming a block past the block count,
image blocks named by two entries, and a header whose ``blocks_allocated`` differs from the
entries counted; it repairs nothing (``-r`` is refused). Its JSON has no cluster counts.
"""

from __future__ import annotations

from imago import CheckFinding, CheckResult, FindingKind

from .blockmap import BlockMap
from .header import VdiHeader

__all__ = ["check_image"]


def check_image(header: VdiHeader, block_map: BlockMap, filename: str | None) -> CheckResult:
    """What ``qemu-img check`` finds in the image's (in-memory, up to date) header and map."""
    findings = [
        CheckFinding(
            kind=FindingKind.CORRUPTION,
            message=damage.message,
            offset=header.offset_bmap + 4 * damage.block,
        )
        for damage in block_map.problems()
    ]
    counted = block_map.count_allocated()
    if counted != header.blocks_allocated:
        findings.append(
            CheckFinding(
                kind=FindingKind.CORRUPTION,
                message=f"ERROR: allocated blocks mismatch, is {counted}, should be {header.blocks_allocated}",
                offset=0x184,
            )
        )
    return CheckResult(filename=filename, format="vdi", corruptions=len(findings), findings=tuple(findings))
