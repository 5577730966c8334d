"""The fuzz harness (fuzz/): every committed input replayed through its target, a short atheris pass
per target, and proof that the harness reports what it must (so it cannot silently pass everything).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imago

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fuzz package lives at the top of the repository

from fuzz import run as fuzz_run  # noqa: E402
from fuzz.engine import INSTRUMENTED_PACKAGES, WATCHDOG_ENV  # noqa: E402
from fuzz.memory import MAX_STORAGE_SIZE, MemoryStorage  # noqa: E402
from fuzz.targets import TARGETS, known_findings  # noqa: E402
from fuzz.targets import cli as cli_target  # noqa: E402
from fuzz.targets.common import exercise_read, input_random, open_image  # noqa: E402
from fuzz.targets.qcow2_write import MAX_OPS, Op, OpKind, apply_input, decode, encode  # noqa: E402
from fuzz.verdict import DataMismatch, InputTimeout, judge  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
KNOWN = known_findings()


def replay_cases() -> Iterator[Any]:
    for name, target in TARGETS.items():
        for path in target.inputs():
            key = f"{name}/{path.name}"
            marks = [pytest.mark.xfail(reason=KNOWN[key], strict=True)] if key in KNOWN else []
            yield pytest.param(name, path, id=f"{name}-{path.parent.name}-{path.name}", marks=marks)


@pytest.mark.parametrize(("name", "path"), list(replay_cases()))
def test_replay(name: str, path: Path) -> None:
    verdict = TARGETS[name].judge(path.read_bytes(), time_limit=60)
    assert verdict.ok, verdict


def test_every_target_has_inputs_and_the_known_findings_exist() -> None:
    for name, target in TARGETS.items():
        assert len(target.inputs()) >= 4, name
        assert target.regression_dir().is_dir(), name
    for key in KNOWN:
        target_name, _, file_name = key.partition("/")
        assert (TARGETS[target_name].regression_dir() / file_name).is_file(), key


def test_every_package_a_target_walks_is_instrumented() -> None:
    # A package left out is fuzzed blind: atheris sees no edge inside it.
    for name, target in TARGETS.items():
        for package in target.coverage:
            assert package.split(".")[0] in INSTRUMENTED_PACKAGES, (name, package)


def test_the_committed_corpus_is_small_and_complete() -> None:
    from fuzz.make_seeds import QCOW2_SEEDS, WRITE_SEQUENCES

    files = [path for path in CORPUS.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 2 << 20
    names = {path.name for path in (CORPUS / "qcow2").iterdir()}
    assert {f"{name}.qcow2" for name in QCOW2_SEEDS} | {"compressed-zlib.qcow2", "compressed-zstd.qcow2"} == names
    assert {f"{name}.bin" for name in WRITE_SEQUENCES} == {path.name for path in (CORPUS / "qcow2_write").iterdir()}
    assert tuple(TARGETS) == fuzz_run.TARGET_NAMES
    for name, target in TARGETS.items():
        assert fuzz_run.engine_command(name, corpus=None, findings=ROOT)[-len(target.seeds) :] == [
            str(directory) for directory in target.seed_dirs()
        ]


# --- the read targets do real work --------------------------------------------------------------


def test_qcow2_read_reads_the_snapshots_and_data() -> None:
    data = (CORPUS / "qcow2" / "snapshots-4k.qcow2").read_bytes()
    disk = open_image("qcow2", data)
    try:
        assert [s.name for s in imago.Capability.SNAPSHOTS.of(disk.driver).snapshots] == ["first", "second"]  # type: ignore[union-attr]
        buf = bytearray(4096)
        disk.read(buf, 128 << 10)
        assert buf == b"\x88" * 4096
        done = exercise_read(disk, input_random(data))
    finally:
        disk.close()
    # The whole 1 MiB disk, five 64 KiB reads at drawn offsets, and each snapshot's 1 MiB plus 64 KiB.
    assert done == (1 << 20) + 5 * (64 << 10) + 2 * ((1 << 20) + (64 << 10))


def test_open_image_never_opens_the_backing_file(tmp_path: Path) -> None:
    # The seed names base.qcow2; an implicit open would find nothing here anyway, but the gate must refuse first.
    data = (CORPUS / "qcow2" / "backing-name.qcow2").read_bytes()
    disk = open_image("qcow2", data)
    try:
        assert disk.driver.backing is None
        assert disk.driver.info()["backing-filename"] == "base.qcow2"
    finally:
        disk.close()


# --- the write target -----------------------------------------------------------------------------


def test_decode_splits_the_trailer_and_encode_builds_it() -> None:
    ops = [Op(OpKind.WRITE, 5, 300, 7, 1), Op(OpKind.FLUSH, 0, 0, 0, 0)]
    assert decode(encode(b"IMAGE", ops)) == (b"IMAGE", ops)
    assert decode(b"IMAGE\x00") == (b"IMAGE\x00", [])  # count 0: no trailer, all image
    assert decode(b"") == (b"", [])
    assert decode(b"\x05") == (b"\x05", [])  # too short for the operations its count asks for
    with pytest.raises(ValueError, match="at most"):
        encode(b"", ops * MAX_OPS)


def test_qcow2_write_result_checks_with_qemu(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "1M"], check=True)
    ops = [
        Op(OpKind.WRITE, 3, 300, 7, 1),  # 300 bytes at 1536
        Op(OpKind.SNAPSHOT_CREATE, 0, 0, 1, 0),
        Op(OpKind.WRITE, 100, 5000, 9, 1),  # 5000 bytes at 51200
        Op(OpKind.WRITE_ZEROES, 101, 1024, 0, 1),  # zeroes at 51712
        Op(OpKind.GROW, 0, 0, 15, 0),  # + 64 KiB
    ]
    outcome = apply_input(encode(image.read_bytes(), ops))
    assert outcome.verified  # the image started consistent: the model was compared
    result = tmp_path / "result.qcow2"
    result.write_bytes(outcome.image)
    assert subprocess.run(["qemu-img", "check", "-q", result], check=False).returncode == 0
    listed = subprocess.run(["qemu-img", "snapshot", "-l", result], capture_output=True, text=True, check=True)
    assert "fuzz1" in listed.stdout
    raw = tmp_path / "result.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", result, raw], check=True)
    disk = raw.read_bytes()
    assert len(disk) == (1 << 20) + 16 * 4096

    def pattern(arg: int, offset: int, length: int) -> bytes:
        return bytes((arg + offset + i) % 256 for i in range(length))

    expected = bytearray(len(disk))
    expected[1536 : 1536 + 300] = pattern(7, 1536, 300)
    expected[51200 : 51200 + 5000] = pattern(9, 51200, 5000)
    expected[51712 : 51712 + 1024] = bytes(1024)
    assert disk == expected


def test_qcow2_write_detects_lost_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imago.SyncFormatAccess, "write", lambda self, buf, offset: None)
    data = (CORPUS / "qcow2_write" / "written-ops.bin").read_bytes()
    verdict = TARGETS["qcow2_write"].judge(data)
    assert isinstance(verdict.finding, DataMismatch)
    assert "before closing" in str(verdict.finding)


# --- verdicts: what is a finding ------------------------------------------------------------------


def test_a_non_imago_error_from_a_reader_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (CORPUS / "qcow2" / "written-4k.qcow2").read_bytes()
    assert TARGETS["qcow2_read"].judge(data).ok

    def broken_read(self: Any, buf: Any, offset: int) -> None:
        raise ValueError("injected")

    monkeypatch.setattr(imago.SyncFormatAccess, "read", broken_read)
    verdict = TARGETS["qcow2_read"].judge(data)
    assert isinstance(verdict.finding, ValueError)
    assert not TARGETS["raw_read"].judge(b"\x01" * 512).ok


def test_imago_errors_are_acceptable_and_os_errors_only_where_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (CORPUS / "qcow2" / "written-4k.qcow2").read_bytes()
    error: BaseException = imago.CorruptImageError("fuzz-input", 0, "injected")

    def failing(self: Any, *args: Any) -> None:
        raise error

    monkeypatch.setattr(imago.SyncFormatAccess, "read", failing)
    verdict = TARGETS["qcow2_read"].judge(data)
    assert verdict.ok
    assert verdict.outcome is error
    error = OSError(errno.ENOSPC, "No space left on device")
    assert not TARGETS["qcow2_read"].judge(data).ok
    monkeypatch.setattr(imago.SyncFormatAccess, "write", failing)
    write_input = (CORPUS / "qcow2_write" / "written-ops.bin").read_bytes()
    assert TARGETS["qcow2_write"].judge(write_input).ok  # a full storage is the write target's documented error
    error = OSError(errno.EIO, "Input/output error")
    assert not TARGETS["qcow2_write"].judge(write_input).ok


def test_a_hang_is_a_finding() -> None:
    def hang(_data: bytes) -> None:
        while True:
            pass

    verdict = judge(hang, b"", time_limit=0.2)
    assert isinstance(verdict.finding, InputTimeout)


def test_memory_storage_refuses_to_grow_past_its_cap() -> None:
    storage = MemoryStorage(b"", writable=True)
    with pytest.raises(OSError, match="No space") as caught:
        imago.runtime.run_sync(storage.write_zeroes(0, MAX_STORAGE_SIZE + 1))
    assert caught.value.errno == errno.ENOSPC
    assert storage.size == 0


def test_the_cli_targets_flag_a_caught_non_imago_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (CORPUS / "qcow2" / "written-4k.qcow2").read_bytes()
    assert TARGETS["cli_info"].judge(data).ok
    qcow2 = imago.format_driver("qcow2")

    def info(self: Any) -> dict[str, Any]:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(qcow2, "info", info)
    verdict = TARGETS["cli_info"].judge(data)
    assert isinstance(verdict.finding, cli_target.CliFinding)
    assert isinstance(verdict.finding.__cause__, OSError)

    def missing(self: Any) -> dict[str, Any]:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "base.qcow2")

    monkeypatch.setattr(qcow2, "info", missing)
    assert TARGETS["cli_info"].judge(data).ok  # a file the image names, missing: documented


# --- atheris ------------------------------------------------------------------------------------------


RUNS = 150


def short_pass_cases() -> Iterator[Any]:
    for name in TARGETS:
        open_findings = sorted(key for key in KNOWN if key.startswith(f"{name}/"))
        # An open finding may be reached again in a short pass: not strict until it is fixed.
        marks = (
            [pytest.mark.xfail(reason=f"open findings: {', '.join(open_findings)}", strict=False)]
            if open_findings
            else []
        )
        yield pytest.param(name, id=name, marks=marks)


def run_fuzzer(command: list[str], findings: Path, log: Path, env: dict[str, str] | None = None) -> int:
    """Run a fuzzing process to its end (hang guard: 300 s); its leftovers collected as the runner does."""
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=None if env is None else os.environ | env
        )
        try:
            status = process.wait(timeout=300)  # the engine's own watchdog ends a hanging input sooner
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            fuzz_run.collect(findings, process.pid, process.returncode)
    assert cli_target.process_directories(process.pid) == []
    return status


@pytest.mark.parametrize("name", list(short_pass_cases()))
def test_a_short_atheris_pass_finds_nothing(name: str, tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    findings.mkdir()
    (tmp_path / "corpus").mkdir()
    command = fuzz_run.engine_command(
        name, corpus=tmp_path / "corpus", findings=findings, runs=RUNS, seed=1, timeout=30
    )
    status = run_fuzzer(command, findings, tmp_path / "log")
    text = (tmp_path / "log").read_text()
    assert status == 0, text[-3000:]
    # libFuzzer counts the inputs it ran ("Done N runs", and the final statistics); it may run
    # one more than asked (the empty input first), and says "Done" only from its main loop.
    matches = re.findall(r"Done (\d+) runs|number_of_executed_units:\s+(\d+)", text)
    counts = [int(done or executed) for done, executed in matches]
    assert counts, text[-3000:]
    assert max(counts) >= RUNS
    assert list(findings.iterdir()) == []


def test_atheris_reports_a_finding(tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    findings.mkdir()
    command = fuzz_run.engine_command("raw_read", corpus=None, findings=findings, runs=20, seed=1)
    prelude = """
        import imago
        def broken_read(self, buf, offset):
            raise ValueError("injected")
        imago.SyncFormatAccess.read = broken_read
    """
    script = textwrap.dedent(prelude) + "\nimport sys\nfrom fuzz.engine import main\nmain(sys.argv)\n"
    arguments = command[command.index("raw_read") :]
    status = run_fuzzer([sys.executable, "-c", script, *arguments], findings, tmp_path / "log")
    assert status == 77  # libFuzzer's -error_exitcode: an uncaught exception
    assert "ValueError: injected" in (tmp_path / "log").read_text()
    assert [path.name.split("-")[0] for path in findings.iterdir()] == ["crash"]


def test_the_watchdog_keeps_a_hanging_input(tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    findings.mkdir()
    # libFuzzer's -timeout far away: the watchdog (1 s here) must end the stuck input itself.
    command = fuzz_run.engine_command("raw_read", corpus=None, findings=findings, runs=20, seed=1, timeout=600)
    prelude = """
        import itertools
        import imago
        def stuck_read(self, buf, offset):
            sum(itertools.repeat(1, 1 << 62))  # a loop in C that never looks at signals
        imago.SyncFormatAccess.read = stuck_read
    """
    script = textwrap.dedent(prelude) + "\nimport sys\nfrom fuzz.engine import main\nmain(sys.argv)\n"
    arguments = command[command.index("raw_read") :]
    status = run_fuzzer([sys.executable, "-c", script, *arguments], findings, tmp_path / "log", env={WATCHDOG_ENV: "1"})
    assert status == fuzz_run.WATCHDOG_STATUS
    assert "stuck_read" in (tmp_path / "log").read_text()  # faulthandler's stack dump
    kept = [path.name.split("-")[0] for path in findings.iterdir()]
    assert kept == ["hang"]


# --- vhdx_read: the compact encoding and its seeds ------------------------------------------------


def _vhdx_expected(name: str, image: Path, tmp_path: Path) -> bytes:
    """The disk of a decoded seed as QEMU reads it (the pending log replayed by a writable qemu-io first)."""
    if name == "differencing":
        # QEMU cannot open it without its parent: the blocks the seed holds, zeroes where the parent was.
        disk = bytearray(4 << 20)
        disk[:4096] = b"\xb1" * 4096
        disk[1 << 20 : (1 << 20) + 4096] = b"\xb2" * 4096
        disk[(1 << 20) + (512 << 10) : (1 << 20) + (512 << 10) + 4096] = b"\xb3" * 4096
        return bytes(disk)
    if name == "sector-4k":
        # QEMU refuses 4096-byte logical sectors (ENOTSUP): the 8 KiB block 1 starts with.
        disk = bytearray(3 << 20)
        disk[1 << 20 : (1 << 20) + 8192] = b"\xe5" * 8192
        return bytes(disk)
    source = image
    if name == "log-pending":
        source = tmp_path / "replayed.vhdx"
        source.write_bytes(image.read_bytes())
        subprocess.run(["qemu-io", "-f", "vhdx", "-c", "read 0 512", source], check=True, capture_output=True)
    raw = tmp_path / f"{name}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", source, raw], check=True, capture_output=True)
    return raw.read_bytes()


def test_every_vhdx_seed_opens_and_reads_as_qemu_reads_it(tmp_path: Path) -> None:
    from fuzz.make_seeds import VHDX_SEEDS
    from fuzz.targets.vhdx_read import decode, encode

    seeds = sorted((CORPUS / "vhdx").iterdir())
    names = {path.stem for path in seeds}
    assert names == {*VHDX_SEEDS, "log-pending", "differencing", "sector-4k"}
    assert sum(path.stat().st_size for path in seeds) < 250_000
    for path in seeds:
        data = path.read_bytes()
        image = decode(data)
        assert encode(image) == data, path.name  # the seeds are what encode makes of their images
        file = tmp_path / f"{path.stem}.vhdx"
        file.write_bytes(image)
        expected = _vhdx_expected(path.stem, file, tmp_path)
        disk = open_image("vhdx", image)  # no ImagoError: the seed opens (the differencing one without its parent)
        try:
            got = bytearray(disk.size)
            disk.read(got, 0)
            assert disk.driver.log_replayed_in_memory == (path.stem == "log-pending"), path.name  # type: ignore[attr-defined]
            assert disk.driver.backing is None
            assert disk.driver.info()["virtual-size"] == len(expected)
        finally:
            disk.close()
        assert got == expected, path.name
        if "empty" not in path.stem and path.stem != "no-zero-state":
            assert got.strip(b"\0"), path.name  # data blocks are read, not only zeroes


def test_vhdx_encoding_round_trips_and_recomputes_checksums(tmp_path: Path) -> None:
    import crc32c
    from fuzz.targets.vhdx_read import FIX_CHECKSUM, MAX_FILE_SIZE, MIN_FILE_SIZE, RECORD_HEAD, decode, encode

    image = tmp_path / "disk.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", image, "3M"], check=True)
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 2M 3k", image], check=True, capture_output=True)
    original = image.read_bytes()
    encoded = encode(original)
    assert decode(encoded) == original
    assert len(encoded) < 16 << 10
    # A file longer than its last non-zero byte keeps its length (an empty record at its last MiB).
    longer = original + bytes(3 << 20)
    assert decode(encode(longer)) == longer
    assert decode(encode(bytes(1 << 20))) == bytes(MIN_FILE_SIZE)  # short images are padded
    with pytest.raises(ValueError, match="whole number of MiB"):
        encode(original[:-1])
    with pytest.raises(ValueError, match="whole number of MiB"):
        encode(bytes(MAX_FILE_SIZE + (1 << 20)))

    # Bit 7 recomputes a damaged header's checksum; without it the bytes stay as given.
    header = bytearray(original[64 << 10 : (64 << 10) + 4096])
    header[8] ^= 0xFF  # the sequence number, under the checksum
    piece = RECORD_HEAD.pack(0, (64 << 10) // 16, 4096) + bytes(header)
    assert decode(piece)[64 << 10 : (64 << 10) + 4096] == header
    fixed = bytearray(decode(bytes([piece[0] | FIX_CHECKSUM]) + piece[1:])[64 << 10 : (64 << 10) + 4096])
    stored = int.from_bytes(fixed[4:8], "little")
    fixed[4:8] = bytes(4)
    assert stored == crc32c.crc32c(bytes(fixed))
    assert fixed[8:] == header[8:]

    # Misuse: empty and truncated inputs, slots past the cap, a log entry whose length runs off the file.
    assert decode(b"") == bytes(MIN_FILE_SIZE)
    assert decode(b"\x03\x00") == bytes(MIN_FILE_SIZE)  # a head cut short: ignored
    assert len(decode(RECORD_HEAD.pack(0x1F, 0xFFFF, 0xFFFF) + b"\x01" * 0xFFFF)) == MAX_FILE_SIZE
    entry = b"loge" + bytes(4) + (1 << 30).to_bytes(4, "little")
    assert decode(RECORD_HEAD.pack(1 | FIX_CHECKSUM, 0, len(entry)) + entry)[1 << 20 : (1 << 20) + 12] == entry
    assert TARGETS["vhdx_read"].judge(b"").ok  # all zeroes: refused with an ImagoError
