"""qcow2 interoperability matrix: images written by qemu-img/qemu-io, read through imago.

Every test builds an image (or a chain) with QEMU's tools, then checks through imago:

* the whole disk, byte for byte, against ``qemu-img convert -O raw``;
* the mapping, run by run, against ``qemu-img map --output=json``: which layer (depth) holds
  each range, whether it is data, compressed or zero, whether any layer records it at all,
  and for data the host offset (in the image file, or in its external data file);
* internal snapshots, by name and by ID, against ``qemu-img convert -l snapshot.*=...``.

The matrix covers qcow2 v2 (compat=0.10) and v3 (compat=1.1), cluster sizes from 512 bytes
to 2 MiB, every refcount width, extended L2 entries, compression (zlib, zstd, data that
straddles host clusters), zero clusters with and without a host cluster, shared (non-COPIED)
clusters, backing chains with shorter backing files and relative names, and external data
files (raw and not). qemu-img and qemu-io are required: without them these tests fail.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

import imago
from imago import PermissiveImplicitOpenGate, ShallowMapping, SyncFormatAccess
from imago_qcow2 import Qcow2

from . import _qemu
from ._qemu import MiB, Run

CHUNK = 3 * MiB + 4096  # requests end inside clusters and mappings
ODD_CHUNK = 3 * 65537  # and not even on sector boundaries


# --- imago side ---------------------------------------------------------------------------------


def open_image(path: str | os.PathLike[str]) -> SyncFormatAccess:
    return imago.open(path, format="qcow2", gate=PermissiveImplicitOpenGate())


def read_all(image: SyncFormatAccess, chunk: int = CHUNK) -> bytes:
    out = bytearray(image.size)
    view = memoryview(out)
    for offset in range(0, image.size, chunk):
        image.read(view[offset : offset + chunk], offset)
    return bytes(out)


def assert_same_bytes(got: bytes, expected: bytes, what: str) -> None:
    assert len(got) == len(expected), f"{what}: imago reads {len(got)} bytes, qemu {len(expected)}"
    if got == expected:
        return
    first = next(i for i in range(len(got)) if got[i] != expected[i])
    last = next(i for i in range(len(got) - 1, -1, -1) if got[i] != expected[i])
    window = slice(first, min(first + 16, len(got)))
    raise AssertionError(
        f"{what}: content differs in [{first:#x}, {last + 1:#x}); at {first:#x} imago reads "
        f"{got[window].hex()} but qemu {expected[window].hex()}"
    )


def imago_runs(image: SyncFormatAccess, files_by_depth: Sequence[str]) -> list[Run]:
    """imago's shallow mappings of the whole chain as runs (qemu-img map's point of view).

    Data must come from the storage named in *files_by_depth* for its layer (the image file,
    or the external data file).
    """
    runs: list[Run] = []

    def walk(layer: SyncFormatAccess, offset: int, length: int, depth: int, guest: int) -> None:
        pos = 0
        while pos < length:
            mapping, mapped = layer.get_shallow_mapping(offset + pos, length - pos)
            assert mapped > 0, f"empty mapping at {offset + pos:#x} (depth {depth}): {mapping!r}"
            step = min(mapped, length - pos)
            start = guest + pos
            if isinstance(mapping, ShallowMapping.Raw):
                filename = mapping.storage.filename
                assert filename is not None, f"data at guest {start:#x} (depth {depth}) in a nameless storage"
                assert os.path.samefile(filename, files_by_depth[depth]), (
                    f"data at guest {start:#x} (depth {depth}) maps to {filename}, expected {files_by_depth[depth]}"
                )
                assert not mapping.writable, f"read-only image maps writable data at {start:#x}"
                runs.append(Run(start, step, depth, "data", True, mapping.offset))
            elif isinstance(mapping, ShallowMapping.Zero):
                runs.append(Run(start, step, depth, "zero", mapping.explicit))
            elif isinstance(mapping, ShallowMapping.Special):
                assert mapping.offset == offset + pos, f"Special at {offset + pos:#x} names {mapping.offset:#x}"
                runs.append(Run(start, step, depth, "compressed", True))
            elif isinstance(mapping, ShallowMapping.Indirect):
                backing = SyncFormatAccess(mapping.layer)
                inside = max(0, min(step, backing.size - mapping.offset))
                if inside:
                    walk(backing, mapping.offset, inside, depth + 1, start)
                if inside < step:
                    # Past the end of a shorter backing file: zero, recorded nowhere.
                    runs.append(Run(start + inside, step - inside, depth, "zero", False))
            else:
                raise AssertionError(f"unexpected mapping {mapping!r} at {offset + pos:#x} (depth {depth})")
            pos += step

    walk(image, 0, image.size, 0, 0)
    return _qemu.merge_runs(runs)


def check_image(
    path: str | os.PathLike[str],
    scratch: Path,
    *,
    files_by_depth: Sequence[str | os.PathLike[str]] | None = None,
    open_path: str | os.PathLike[str] | None = None,
    qemu_cwd: str | os.PathLike[str] | None = None,
) -> list[Run]:
    """Compare imago with qemu on the image at *path*: content and mapping. Returns the runs.

    *files_by_depth* names the file holding each layer's data (default: the image alone);
    *open_path* is what imago opens (default *path*), e.g. a path relative to another cwd;
    *qemu_cwd* is where QEMU's tools run.
    """
    path = os.path.abspath(path)
    files = [os.fspath(f) for f in (files_by_depth or [path])]
    expected = _qemu.convert_to_raw(path, scratch / "expected.raw", cwd=qemu_cwd)
    expected_runs = _qemu.qemu_runs(_qemu.qemu_map(path, cwd=qemu_cwd))
    with open_image(open_path if open_path is not None else path) as image:
        assert image.size == len(expected)
        assert_same_bytes(read_all(image), expected, f"{path}: disk content")
        assert_same_bytes(read_all(image, ODD_CHUNK), expected, f"{path}: disk content (unaligned reads)")
        got_runs = imago_runs(image, files)
    assert got_runs == expected_runs, f"{path}: mapping differs from qemu-img map"
    return got_runs


# --- workloads ----------------------------------------------------------------------------------


class Plan:
    """qemu-io commands laid out cluster by cluster, each scenario in clusters of its own."""

    def __init__(self, cluster_size: int, directory: Path) -> None:
        self.cs = cluster_size
        self.directory = directory
        self.cursor = 0
        self.sessions: list[list[str]] = [[]]
        self._sources = 0
        self._after_compressed = False

    def _add(self, command: str, *, compressed: bool = False) -> None:
        # qemu 7.2 keeps packing compressed clusters into the host cluster it last used for
        # them even after that cluster was freed and reused for plain data (qemu-img check:
        # "ERROR OFLAG_COPIED data cluster ... refcount=2"). So in each qemu-io process,
        # compressed writes come last.
        if self._after_compressed and not compressed:
            self.sessions.append([])
        self._after_compressed = compressed
        self.sessions[-1].append(command)

    def run(self, path: Path) -> None:
        for commands in self.sessions:
            if commands:
                _qemu.qemu_io(path, *commands)

    def take(self, clusters: int) -> int:
        base = self.cursor
        self.cursor += clusters * self.cs
        return base

    def write(self, offset: int, length: int, pattern: int) -> None:
        self._add(f"write -P {pattern:#x} {offset} {length}")

    def write_data(self, offset: int, data: bytes, *, compressed: bool = False) -> None:
        self._sources += 1
        source = self.directory / f"source{self._sources}.bin"
        source.write_bytes(data)
        self._add(f"write {'-c ' if compressed else ''}-s {source} {offset} {len(data)}", compressed=compressed)

    def compress(self, offset: int, length: int, pattern: int) -> None:
        self._add(f"write -c -P {pattern:#x} {offset} {length}", compressed=True)

    def zero(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._add(f"write -z {'-u ' if unmap else ''}{offset} {length}")

    def discard(self, offset: int, length: int) -> None:
        self._add(f"discard {offset} {length}")


def layout_plan(cs: int, extended_l2: bool, directory: Path, seed: int) -> tuple[int, Plan]:
    """Every kind of cluster one image can hold; returns (disk size, plan)."""
    p = Plan(cs, directory)
    g = max(512, cs // 32)  # a subcluster with extended L2 entries (at least a sector)

    b = p.take(1)
    p.write(b, cs, 0x11)  # fresh whole cluster: COPIED
    b = p.take(1)
    if cs >= 1024:
        p.write(b + cs // 2, max(512, cs // 4), 0x22)  # partial cluster
    else:
        p.write(b, cs, 0x22)
    p.take(1)  # unallocated
    b = p.take(3)
    p.write(b + cs - 512, cs + 1024, 0x33)  # straddles three clusters
    b = p.take(1)
    p.zero(b, cs)  # zero cluster without a host cluster (v2: unallocated)
    b = p.take(1)
    p.write(b, cs, 0x44)
    p.zero(b, cs)  # zero flag, host cluster kept
    b = p.take(1)
    p.write(b, cs, 0x45)
    p.zero(b, cs, unmap=True)
    b = p.take(1)
    p.write(b, cs, 0x46)
    p.discard(b, cs)
    b = p.take(1)
    p.write(b, cs, 0)  # written zeroes are data
    b = p.take(2)
    p.compress(b, 2 * cs, 0x55)  # compresses to almost nothing
    n = 4 if cs <= 64 * 1024 else 1
    b = p.take(n)
    p.write_data(b, _qemu.restricted_bytes(n * cs, seed, 4), compressed=True)  # ~55%: straddles
    b = p.take(n)
    p.write_data(b, _qemu.restricted_bytes(n * cs, seed + 1, 6), compressed=True)  # ~80%
    b = p.take(2)
    p.write_data(b, _qemu.text_bytes(2 * cs, seed), compressed=True)
    p.write(b + cs // 2 if cs >= 1024 else b, 512, 0x57)  # rewrites a compressed cluster
    b = p.take(1)
    p.write_data(b, _qemu.random_bytes(cs, seed), compressed=True)  # incompressible: stored plain
    b = p.take(1)
    p.compress(b, cs, 0x58)
    p.zero(b, cs)
    b = p.take(-(-32 * g // cs))  # subclusters (plain partial writes without extended L2)
    p.write(b + g, g, 0x61)
    if g >= 1024:
        p.write(b + 5 * g + 512, 512, 0x62)  # partial subcluster
    p.zero(b + 8 * g, 2 * g)
    p.write(b + 10 * g, 4 * g, 0x63)
    p.zero(b + 11 * g, g)  # zero subcluster inside allocated ones
    p.zero(b + 16 * g, 2 * g, unmap=True)
    p.write(b + 20 * g, 2 * g, 0x64)
    p.discard(b + 20 * g, g)
    p.write(b + 31 * g, g, 0x65)
    p.take(1)

    size = max(p.cursor + 3 * cs, 4 * MiB)
    size = -(-size // cs) * cs + (cs // 2 if cs >= 2048 else 0)  # a partial last cluster
    entry_size = 16 if extended_l2 else 8
    l2_span = cs * (cs // entry_size)
    boundary = -(-(p.cursor + 2048) // l2_span) * l2_span
    if boundary + 1024 <= size - 3 * cs:
        p.write(boundary - 1024, 2048, 0x79)  # crosses an L2 table
    last = (size - 1) // cs * cs
    p.write(last - cs - 1024, 1024, 0x7A)
    p.compress(last, size - last, 0x7B)  # compressed partial last cluster, at the end of the file
    return size, p


# --- the matrix: one image, every cluster kind ----------------------------------------------------

# (compat, cluster_size, refcount_bits, extended_l2, compression_type)
GEOMETRIES = [
    ("0.10", 512, 16, False, None),
    ("0.10", 4096, 16, False, None),
    ("0.10", 65536, 16, False, None),
    ("0.10", 2 * MiB, 16, False, None),
    ("1.1", 512, 16, False, "zlib"),
    ("1.1", 1024, 16, False, "zstd"),
    ("1.1", 4096, 16, False, "zlib"),
    ("1.1", 16384, 16, False, "zstd"),
    ("1.1", 65536, 16, False, "zlib"),
    ("1.1", 65536, 16, False, "zstd"),
    ("1.1", 2 * MiB, 16, False, "zstd"),
    ("1.1", 16384, 16, True, "zlib"),
    ("1.1", 32768, 16, True, "zstd"),
    ("1.1", 65536, 16, True, "zlib"),
    ("1.1", 2 * MiB, 16, True, "zlib"),
    *[("1.1", 4096, bits, False, "zlib") for bits in (1, 2, 4, 8, 32, 64)],
    ("1.1", 512, 1, False, "zstd"),
    ("1.1", 512, 64, False, "zlib"),
    ("1.1", 65536, 1, True, "zstd"),
    ("1.1", 65536, 64, True, "zlib"),
]


def _geometry_id(g: tuple[str, int, int, bool, str | None]) -> str:
    compat, cs, bits, ext, ctype = g
    parts = ["v2" if compat == "0.10" else "v3", f"c{cs}", f"rb{bits}"]
    if ext:
        parts.append("xl2")
    if ctype:
        parts.append(ctype)
    return "-".join(parts)


def _create_options(compat: str, cs: int, bits: int, ext: bool, ctype: str | None) -> dict[str, object]:
    options: dict[str, object] = {"compat": compat, "cluster_size": cs, "refcount_bits": bits}
    if ext:
        options["extended_l2"] = True
    if ctype:
        options["compression_type"] = ctype
    return options


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
def test_cluster_kinds(tmp_path: Path, geometry: tuple[str, int, int, bool, str | None]) -> None:
    compat, cs, bits, ext, ctype = geometry
    size, plan = layout_plan(cs, ext, tmp_path, seed=cs + bits)
    path = tmp_path / "disk.qcow2"
    _qemu.create(path, size, options=_create_options(compat, cs, bits, ext, ctype))
    plan.run(path)
    _qemu.check(path)
    layout = _qemu.qcow2_layout(path)
    assert layout.extended_l2 == ext
    assert any(layout.compressed_ranges()), "the image should hold compressed clusters"
    if cs <= 4096 and bits > 1:
        assert layout.straddling_compressed(), "some compressed data should straddle host clusters"
    runs = check_image(path, tmp_path)
    kinds = {(r.kind, r.present) for r in runs}
    assert {("data", True), ("compressed", True), ("zero", False)} <= kinds
    if compat == "1.1":
        assert ("zero", True) in kinds
        assert ext or layout.allocated_zero_clusters() >= 1


# --- preallocation: host clusters behind zero and unwritten clusters ------------------------------


@pytest.mark.parametrize("compat", [pytest.param("0.10", id="v2"), pytest.param("1.1", id="v3")])
@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_preallocated(tmp_path: Path, compat: str, prealloc: str, cs: int) -> None:
    path = tmp_path / "disk.qcow2"
    size = 2 * MiB + 3 * cs // 2
    _qemu.create(path, size, options={"compat": compat, "cluster_size": cs, "preallocation": prealloc})
    _qemu.qemu_io(
        path,
        f"write -P 0x11 0 {cs}",
        f"write -P 0x12 {3 * cs + 512} 1024",
        f"write -z {5 * cs} {cs}",  # v3: zero flag on the preallocated cluster
        f"write -z -u {7 * cs} {2 * cs}",
        f"write -P 0x13 {9 * cs} {cs}",
        f"write -z {9 * cs} {cs}",
        f"discard {11 * cs} {cs}",
        f"write -P 0x14 {size - 1024} 1024",
    )
    _qemu.check(path)
    if compat == "1.1":
        assert _qemu.qcow2_layout(path).allocated_zero_clusters() >= 1
    runs = check_image(path, tmp_path)
    if compat == "1.1":
        assert any(r.kind == "zero" and r.present and r.start <= 5 * cs and r.end >= 6 * cs for r in runs)


# --- compressed images from qemu-img convert -c ---------------------------------------------------

# (compat, cluster_size, compression_type, extended_l2)
COMPRESSED = [
    ("0.10", 512, None, False),
    ("0.10", 4096, None, False),
    ("0.10", 65536, None, False),
    ("1.1", 512, "zlib", False),
    ("1.1", 512, "zstd", False),
    ("1.1", 1024, "zstd", False),
    ("1.1", 4096, "zlib", False),
    ("1.1", 4096, "zstd", False),
    ("1.1", 16384, "zstd", True),
    ("1.1", 65536, "zlib", False),
    ("1.1", 65536, "zstd", False),
    ("1.1", 65536, "zstd", True),
    ("1.1", 2 * MiB, "zlib", False),
    ("1.1", 2 * MiB, "zstd", False),
]


def _compressed_id(c: tuple[str, int, str | None, bool]) -> str:
    compat, cs, ctype, ext = c
    return "-".join(["v2" if compat == "0.10" else "v3", f"c{cs}", ctype or "zlib", *(["xl2"] if ext else [])])


def compressible_source(cs: int, seed: int) -> bytes:
    """Regions of text, semi-random, random, zero and repeated bytes, with unaligned borders."""
    region = max(cs, 384 * 1024) + 1536
    parts = [
        _qemu.text_bytes(region, seed),
        _qemu.restricted_bytes(region, seed, 4),
        bytes(region),
        _qemu.restricted_bytes(region, seed + 1, 6),
        _qemu.random_bytes(region, seed),
        _qemu.fill_bytes(region, 0x5A),
        _qemu.restricted_bytes(region, seed + 2, 7),
        _qemu.text_bytes(region, seed + 3),
    ]
    data = b"".join(parts)
    return data[: len(data) // 512 * 512]


@pytest.mark.parametrize("case", COMPRESSED, ids=_compressed_id)
def test_convert_compressed(tmp_path: Path, case: tuple[str, int, str | None, bool]) -> None:
    compat, cs, ctype, ext = case
    source = tmp_path / "source.raw"
    source.write_bytes(compressible_source(cs, seed=cs))
    path = tmp_path / "disk.qcow2"
    options = _create_options(compat, cs, 16, ext, ctype)
    _qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *_qemu.options_arg(options), source, path)
    _qemu.check(path)
    layout = _qemu.qcow2_layout(path)
    compressed = list(layout.compressed_ranges())
    assert len(compressed) >= 4
    if cs < 2 * MiB:
        assert layout.straddling_compressed(), "some compressed data should straddle host clusters"
    check_image(path, tmp_path)
    assert source.read_bytes() == (tmp_path / "expected.raw").read_bytes()


# --- backing chains: qcow2 over qcow2 over raw ----------------------------------------------------

# (top compat, top cluster size, top extended L2, mid compat, mid cluster size, mid extended L2, relative)
CHAINS = [
    ("1.1", 4096, False, "1.1", 65536, False, True),
    ("1.1", 65536, False, "1.1", 4096, False, False),
    ("0.10", 65536, False, "0.10", 512, False, True),
    ("1.1", 65536, True, "0.10", 4096, False, True),
    ("1.1", 512, False, "1.1", 16384, True, False),
    ("1.1", 32768, True, "1.1", 65536, True, True),
    ("0.10", 4096, False, "1.1", 2 * MiB, False, True),
]


def _chain_id(c: tuple[str, int, bool, str, int, bool, bool]) -> str:
    tc, tcs, tx, mc, mcs, mx, rel = c

    def layer(compat: str, cs: int, ext: bool) -> str:
        return f"{'v2' if compat == '0.10' else 'v3'}c{cs}{'xl2' if ext else ''}"

    return f"{layer(tc, tcs, tx)}-over-{layer(mc, mcs, mx)}-over-raw-{'relative' if rel else 'absolute'}"


def _chain_commands(cs: int, other_cs: int, base: int, patterns: int, v3: bool) -> list[str]:
    """Writes over a backing file: COW of partial clusters, zeroes over backing data, compression."""
    u = max(cs, other_cs)
    cmds = [
        f"write -P {patterns:#x} {base + 512} {u + 1024}",  # partial clusters: copy-on-write
        f"write -z {base + 3 * u} {u}",  # zero over backing data
        f"write -z -u {base + 5 * u} {u}",
        f"write -P {patterns + 1:#x} {base + 7 * u} {2 * u}",
        f"discard {base + 7 * u} {u}",
        f"write -c -P {patterns + 2:#x} {base + 10 * u} {cs}",
        f"write -P {patterns + 3:#x} {base + 12 * u + u // 2} 512",
    ]
    if v3:
        cmds.append(f"write -z {base + 14 * u + 512} 1024")  # partial zero: subclusters or COW
    return cmds


@pytest.mark.parametrize("chain", CHAINS, ids=_chain_id)
def test_backing_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chain: tuple[str, int, bool, str, int, bool, bool]
) -> None:
    top_compat, top_cs, top_ext, mid_compat, mid_cs, mid_ext, relative = chain
    u = max(top_cs, mid_cs)
    base_size = 16 * u + 4096 + 512  # shorter than mid, ending inside a cluster
    mid_size = 32 * u + 3 * 512
    top_size = 48 * u
    mid_dir = tmp_path / "mid"
    top_dir = tmp_path / "top" / "images"
    elsewhere = tmp_path / "elsewhere"
    for d in (mid_dir, top_dir, elsewhere):
        d.mkdir(parents=True)
    base = mid_dir / "base.raw"
    # Every byte written: the raw file has no holes (qemu would map them as zero).
    base.write_bytes(_qemu.restricted_bytes(base_size, top_cs + mid_cs, 7))
    mid = mid_dir / "mid.qcow2"
    top = top_dir / "top.qcow2"
    _qemu.create(
        mid,
        mid_size,
        options={"compat": mid_compat, "cluster_size": mid_cs, **({"extended_l2": True} if mid_ext else {})},
        backing="base.raw" if relative else str(base),
        backing_fmt="raw",
        cwd=mid_dir,
    )
    _qemu.qemu_io(mid, *_chain_commands(mid_cs, top_cs, 0, 0x20, mid_compat == "1.1"))
    # Data past the end of the raw file, and over its end.
    _qemu.qemu_io(mid, f"write -P 0x2f {base_size - 1024} {2 * u}", f"write -P 0x2e {20 * u} {u}")
    _qemu.create(
        top,
        top_size,
        options={"compat": top_compat, "cluster_size": top_cs, **({"extended_l2": True} if top_ext else {})},
        backing="../../mid/mid.qcow2" if relative else str(mid),
        backing_fmt="qcow2",
        cwd=top_dir,
    )
    _qemu.qemu_io(top, *_chain_commands(top_cs, mid_cs, u // 2 if top_cs < u else 0, 0x30, top_compat == "1.1"))
    _qemu.qemu_io(top, f"write -P 0x3f {mid_size - 512} {u}", f"write -P 0x3e {40 * u} {u}")
    _qemu.check(mid)
    _qemu.check(top)
    assert _qemu.info(top)["backing-filename-format"] == "qcow2"
    monkeypatch.chdir(elsewhere)
    runs = check_image(
        top,
        tmp_path,
        files_by_depth=[top, mid, base],
        open_path=os.path.relpath(top, elsewhere) if relative else top,
    )
    depths = {r.depth for r in runs}
    assert depths == {0, 1, 2}
    # Past the end of each backing file: zero, recorded nowhere.
    assert any(not r.present and r.depth == 0 for r in runs)
    assert any(not r.present and r.depth == 1 for r in runs)
    # Each layer opened alone agrees with qemu too.
    check_image(mid, tmp_path, files_by_depth=[mid, base])


# --- external data files ---------------------------------------------------------------------------

# (cluster_size, data_file_raw, extended_l2, with a backing file)
DATA_FILES = [
    (512, False, False, False),
    (4096, False, False, False),
    (4096, True, False, False),
    (65536, False, False, False),
    (65536, True, False, False),
    (16384, False, True, False),
    (65536, True, True, False),
    (65536, False, False, True),
    (16384, False, True, True),
]


def _data_file_id(c: tuple[int, bool, bool, bool]) -> str:
    cs, raw, ext, backing = c
    return "-".join(
        [f"c{cs}", "raw" if raw else "notraw", *(["xl2"] if ext else []), *(["backing"] if backing else [])]
    )


@pytest.mark.parametrize("case", DATA_FILES, ids=_data_file_id)
def test_external_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[int, bool, bool, bool]
) -> None:
    cs, raw, ext, with_backing = case
    images = tmp_path / "images"
    elsewhere = tmp_path / "elsewhere"
    images.mkdir()
    elsewhere.mkdir()
    size = 2 * MiB + 512
    path = images / "disk.qcow2"
    data = images / "disk.data"
    backing = images / "base.raw"
    options: dict[str, object] = {"compat": "1.1", "cluster_size": cs, "data_file": "disk.data"}
    if raw:
        options["data_file_raw"] = True
    if ext:
        options["extended_l2"] = True
    if with_backing:
        backing.write_bytes(_qemu.restricted_bytes(MiB + 4096, cs, 7))
    _qemu.create(
        path,
        size,
        options=options,
        backing="base.raw" if with_backing else None,
        backing_fmt="raw" if with_backing else None,
        cwd=images,
    )
    g = max(512, cs // 32) if ext else cs
    # QEMU resolves a relative data file name against its cwd; imago against the image's directory.
    _qemu.qemu_io(
        path,
        f"write -P 0x11 {cs} {3 * cs}",
        f"write -P 0x12 {6 * cs + 512} 1024",  # partial: COW from the backing file or zeroes
        f"write -z {8 * cs} {cs}",
        f"write -P 0x13 {10 * cs} {2 * cs}",
        f"write -z {10 * cs} {cs}",  # zero flag over allocated data
        f"write -z -u {11 * cs} {cs}",
        f"write -P 0x14 {13 * cs} {cs}",
        f"discard {13 * cs} {cs}",
        f"write -P 0x15 {15 * cs + g} {g}",
        f"write -z {15 * cs + 3 * g} {g}",
        f"write -P 0 {17 * cs} {cs}",
        f"write -P 0x16 {size - 1536} 1536",
        cwd=images,
    )
    _qemu.check(path, cwd=images)
    assert _qemu.info(path, cwd=images)["format-specific"]["data"]["data-file"] == "disk.data"
    if raw:
        # Garbage in the data file where the image records zeroes: it must not show through.
        with open(data, "r+b") as f:
            for offset in (8 * cs, 10 * cs, 11 * cs):
                f.seek(offset)
                f.write(b"\xee" * cs)
    monkeypatch.chdir(elsewhere)
    files = [data, backing] if with_backing else [data]
    runs = check_image(
        path, tmp_path, files_by_depth=files, open_path=os.path.relpath(path, elsewhere), qemu_cwd=images
    )
    assert any(r.kind == "data" and r.depth == 0 for r in runs)


# --- internal snapshots -----------------------------------------------------------------------------

# (compat, cluster_size, refcount_bits, extended_l2, resize between snapshots, over a backing file)
SNAPSHOTS = [
    ("0.10", 65536, 16, False, False, False),
    ("0.10", 512, 16, False, False, True),  # qemu cannot resize v2 images with snapshots
    ("1.1", 512, 16, False, False, False),
    ("1.1", 4096, 2, False, False, False),
    ("1.1", 4096, 4, False, True, True),
    ("1.1", 16384, 8, True, False, True),
    ("1.1", 65536, 64, True, True, False),
    ("1.1", 65536, 32, False, False, False),
    ("1.1", 2 * MiB, 16, False, False, False),
]


def _snapshot_id(c: tuple[str, int, int, bool, bool, bool]) -> str:
    compat, cs, bits, ext, resize, backing = c
    parts = ["v2" if compat == "0.10" else "v3", f"c{cs}", f"rb{bits}"]
    if ext:
        parts.append("xl2")
    if resize:
        parts.append("resized")
    if backing:
        parts.append("backing")
    return "-".join(parts)


@pytest.mark.parametrize("case", SNAPSHOTS, ids=_snapshot_id)
def test_internal_snapshots(tmp_path: Path, case: tuple[str, int, int, bool, bool, bool]) -> None:
    compat, cs, bits, ext, resize, with_backing = case
    u = max(cs, 4096)
    size1 = 12 * u + 512
    path = tmp_path / "disk.qcow2"
    base = tmp_path / "base.raw"
    files = [os.fspath(path)]
    if with_backing:
        base.write_bytes(_qemu.restricted_bytes(7 * u + 512, cs, 7))  # shorter than the overlay
        files.append(os.fspath(base))
    options = _create_options(compat, cs, bits, ext, None)
    _qemu.create(
        path,
        size1,
        options=options,
        backing="base.raw" if with_backing else None,
        backing_fmt="raw" if with_backing else None,
        cwd=tmp_path,
    )
    compressed = bits > 2  # compressed clusters share host clusters: their refcounts grow fast
    first = [
        f"write -P 0x11 0 {3 * u}",
        f"write -P 0x12 {5 * u} {2 * u}",
        f"write -z {8 * u} {u}",
        f"write -P 0x13 {size1 - 1024} 1024",
    ]
    if compressed:
        first.append(f"write -c -P 0x14 {10 * u} {u}")
    _qemu.qemu_io(path, *first)
    _qemu.qemu_img("snapshot", "-c", "s1", path)
    size2 = size1 + 2 * u if resize else size1
    if resize:
        _qemu.qemu_img("resize", path, str(size2))
    second = [
        f"write -P 0x21 {u} 1024",  # copy-on-write out of a shared cluster
        f"write -P 0x22 {2 * u} {u}",
        f"write -P 0x26 {3 * u + 512} 1024",  # copy-on-write from the backing file, if any
        f"write -z {5 * u} {u}",  # zeroes over shared data
        f"discard {6 * u} {u}",
        f"write -P 0x23 {8 * u} 512",
        f"write -P 0x24 {size2 - u} {u}",
    ]
    if compressed:
        second.append(f"write -c -P 0x25 {9 * u} {u}")  # compressed writes need unallocated clusters
    _qemu.qemu_io(path, *second)
    _qemu.qemu_img("snapshot", "-c", "s2", path)
    _qemu.qemu_io(path, f"write -P 0x31 0 {u // 2}", f"write -z {2 * u} {u}", f"write -P 0x32 {3 * u + 512} 512")
    _qemu.check(path)

    # Clusters shared with the snapshots have COPIED clear; the ones rewritten since have it set.
    copied = _qemu.qcow2_layout(path).copied_clusters()
    assert False in copied.values()
    assert True in copied.values()

    check_image(path, tmp_path, files_by_depth=files)

    expected = {
        "s1": _qemu.convert_to_raw(path, tmp_path / "s1.raw", snapshot="snapshot.name=s1"),
        "s2": _qemu.convert_to_raw(path, tmp_path / "s2.raw", snapshot="snapshot.name=s2"),
    }
    assert expected["s1"] == _qemu.convert_to_raw(path, tmp_path / "s1-id.raw", snapshot="snapshot.id=1")
    assert expected["s1"] != expected["s2"]
    sizes = {"s1": size1, "s2": size2}
    with open_image(path) as image:
        driver = image.driver
        assert isinstance(driver, Qcow2)
        active = read_all(image)
        for name, snapshot_id in (("s1", "1"), ("s2", "2")):
            for key in (name, snapshot_id):
                view = SyncFormatAccess(driver.read_snapshot_sync(key))
                try:
                    # qemu reads a snapshot at the active layer's size (zeroes past its own end).
                    assert view.size == sizes[name], f"snapshot {key}: size {view.size}, created at {sizes[name]}"
                    assert_same_bytes(read_all(view), expected[name][: view.size], f"snapshot {key}")
                    assert_same_bytes(
                        read_all(view, ODD_CHUNK), expected[name][: view.size], f"snapshot {key} (unaligned reads)"
                    )
                    assert not any(expected[name][view.size :])
                    runs = imago_runs(view, files)
                finally:
                    view.close()
                assert any(r.kind == "data" and r.depth == 0 for r in runs)
                assert with_backing == any(r.depth == 1 for r in runs)
        # Reading snapshots leaves the active layer alone.
        assert read_all(image) == active


def test_snapshot_name_that_looks_like_an_id(tmp_path: Path) -> None:
    # A bare key is an ID first, then a name, as qemu-img convert -l KEY takes it.
    path = tmp_path / "disk.qcow2"
    _qemu.create(path, MiB, options={"cluster_size": 4096})
    _qemu.qemu_io(path, "write -P 0x01 0 8k")
    _qemu.qemu_img("snapshot", "-c", "2", path)  # ID 1, named "2"
    _qemu.qemu_io(path, "write -P 0x02 4k 8k")
    _qemu.qemu_img("snapshot", "-c", "1", path)  # ID 2, named "1"
    _qemu.qemu_io(path, "write -P 0x03 0 4k")
    with open_image(path) as image:
        driver = image.driver
        assert isinstance(driver, Qcow2)
        for key in ("1", "2"):
            expected = _qemu.convert_to_raw(path, tmp_path / f"{key}.raw", snapshot=key)
            with SyncFormatAccess(driver.read_snapshot_sync(key)) as view:
                assert_same_bytes(read_all(view), expected, f"snapshot {key}")


def test_persistent_bitmaps_and_header_extensions(tmp_path: Path) -> None:
    # Dirty bitmaps add an autoclear feature and a header extension; readers ignore both.
    path = tmp_path / "disk.qcow2"
    _qemu.create(path, 4 * MiB, options={"cluster_size": 65536})
    _qemu.qemu_io(path, "write -P 0x41 0 256k", "write -z 1M 128k")
    _qemu.qemu_img("bitmap", "--add", path, "b0")
    _qemu.qemu_img("bitmap", "--add", "-g", "512k", path, "b1")
    _qemu.qemu_io(path, "write -P 0x42 2M 64k")
    _qemu.check(path)
    assert [b["name"] for b in _qemu.info(path)["format-specific"]["data"]["bitmaps"]] == ["b0", "b1"]
    check_image(path, tmp_path)


# --- the backing format: recorded ones are used, missing ones probed ------------------------------

BACKING_FORMAT_EXTENSION = (0xE2792ACA).to_bytes(4, "big")


def test_recorded_backing_format_is_used(tmp_path: Path) -> None:
    # A raw backing file whose content is a qcow2 image (as a guest could write it): the
    # recorded format says raw, so its bytes are the disk, never the qcow2 image they describe.
    inner = tmp_path / "inner.qcow2"
    _qemu.create(inner, MiB, options={"cluster_size": 4096})
    _qemu.qemu_io(inner, "write -P 0x77 0 64k")
    base = tmp_path / "base.raw"
    content = inner.read_bytes()
    base.write_bytes(content + _qemu.random_bytes(-len(content) % 4096 + 8192, 1))
    top = tmp_path / "top.qcow2"
    _qemu.create(top, 2 * MiB, options={"cluster_size": 4096}, backing="base.raw", backing_fmt="raw", cwd=tmp_path)
    _qemu.qemu_io(top, "write -P 0x11 4096 4096")
    assert _qemu.info(top)["backing-filename-format"] == "raw"
    runs = check_image(top, tmp_path, files_by_depth=[top, base])
    assert runs[0] == Run(0, 4096, 1, "data", True, 0)
    assert (tmp_path / "expected.raw").read_bytes()[:4] == b"QFI\xfb"


def test_unrecorded_backing_format_is_probed(tmp_path: Path) -> None:
    # Images written by old QEMU versions name no backing format: it is probed.
    base = tmp_path / "base.qcow2"
    _qemu.create(base, MiB, options={"compat": "0.10", "cluster_size": 4096})
    _qemu.qemu_io(base, "write -P 0x21 0 64k", "write -P 0x22 512k 4096")
    top = tmp_path / "top.qcow2"
    _qemu.create(top, 2 * MiB, options={"compat": "0.10"}, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    _qemu.qemu_io(top, "write -P 0x11 4096 4096")
    # Turn the backing format header extension into an unknown one, which readers ignore.
    header = bytearray(top.read_bytes()[:4096])
    at = header.index(BACKING_FORMAT_EXTENSION)
    header[at : at + 4] = b"\x7f\xff\xff\xf0"
    with open(top, "r+b") as f:
        f.write(header)
    assert "backing-filename-format" not in _qemu.info(top)
    runs = check_image(top, tmp_path, files_by_depth=[top, base])
    assert {r.depth for r in runs} == {0, 1}
