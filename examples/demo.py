"""Demo: create a raw image, write, read back, map, and print what happened.

Usage: python examples/demo.py [IMAGE]   (default: demo.img in a temporary directory)
"""

from __future__ import annotations

import os
import sys
import tempfile

import imago


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(prefix="imago-demo-"), "demo.img")
    size = 64 << 20
    imago.create(path, format="raw", size=size)
    print(f"created {path}: raw, {size} bytes")
    with imago.open(path, format="raw", write=True) as disk:
        disk.write(b"imago!" * 1000, 1 << 20)
        disk.write_zeroes(8 << 20, 1 << 20)
        disk.discard_to_zero(16 << 20, 4 << 20)
        disk.flush()
        back = bytearray(6000)
        disk.read(back, 1 << 20)
        assert bytes(back) == b"imago!" * 1000, "read-back mismatch"
        print(f"wrote and read back {len(back)} bytes at offset {1 << 20}: {bytes(back[:18])!r}...")
        offset = 0
        print("mapping (guest offset, length, where):")
        while offset < disk.size:
            mapping, length = disk.get_mapping(offset, disk.size - offset)
            print(f"  {offset:>10} {length:>10}  {mapping}")
            offset += length
        with disk.as_file() as f:
            f.seek(1 << 20)
            print(f"as_file(): read {f.read(12)!r} at {1 << 20}")
    print("plugins:", ", ".join(f"{p.name} ({p.distribution})" for p in imago.plugins()))


if __name__ == "__main__":
    main()
