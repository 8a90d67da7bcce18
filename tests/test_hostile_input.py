"""Hostile input (issue 14): no file, header or number makes kmeminspect crash.

Named tests for each case the issue lists, then property-based tests (hypothesis) that corrupt every kind
of input kmeminspect reads (snapshots, stress journals, trace files, ELF and kdump vmcore headers, VMCOREINFO
notes, command-line numbers) and check each run ends in exit 0 with an answer, or exit 2 with one line:
never a traceback, never exit 3, never a hang, never a changed input file.

In ``make test`` they run derandomized with few examples (seconds); ``make fuzz`` sets
``KMEMINSPECT_FUZZ_EXAMPLES`` for a longer, random run.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import build
from test_cli_errors import elf_core

from kmeminspect import snapshot as snapshot_mod
from kmeminspect.cli import main
from kmeminspect.errors import KmemError
from kmeminspect.stress.journal import JOURNAL_FORMAT, JOURNAL_VERSION, read_journal

REPO = Path(__file__).resolve().parent.parent
FUZZ = int(os.environ.get("KMEMINSPECT_FUZZ_EXAMPLES", "0"))
#: CI: fixed examples, few; make fuzz: random, many
CASES = settings(
    max_examples=FUZZ or 25,
    derandomize=not FUZZ,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(CASES, max_examples=FUZZ // 10 or 5)  # the cases that need a process each
LIMIT_S = 20  # per case


class Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg] # click < 8.2
    except TypeError:
        return CliRunner()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def kmem(*args: str, inputs: tuple[Path, ...] = ()) -> Result:
    """Run the CLI in-process under a time limit; no input file may change."""
    before = [digest(p) for p in inputs]
    with time_limit(LIMIT_S):
        result = runner().invoke(main, list(args), prog_name="kmeminspect")
    assert [digest(p) for p in inputs] == before, "an input file changed"
    return result


def answered_or_refused(result: Result, *words: str) -> None:
    """Exit 0 (or 1, a verdict) with an answer, or exit 2 with one line naming what is wrong."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kmeminspect: "), result.stderr
        for word in words:
            assert word in lines[0], (word, lines[0])
    else:
        assert result.output.strip(), "exit 0 with nothing printed"


def refused(result: Result, *words: str) -> None:
    answered_or_refused(result, *words)
    assert result.exit_code == 2, result.output


# -- the snapshot ---------------------------------------------------------------------------------------


def snapshot_json() -> dict[str, Any]:
    return snapshot_mod.to_json(build(["boot", "hot-online", "device"], device_subsections=4))


def write_json(path: Path, data: Any) -> Path:
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    return path


def test_snapshot_without_layout(tmp_path: Path) -> None:
    data = snapshot_json()
    del data["layout"]
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "sections", inputs=(path,)), "'layout' is missing")


def test_snapshot_field_of_the_wrong_type(tmp_path: Path) -> None:
    data = snapshot_json()
    data["sections"][1]["nr"] = "1"
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "sections", inputs=(path,)), "sections[1].nr", "expected an integer")


def test_snapshot_pfn_of_2_to_the_70(tmp_path: Path) -> None:
    data = snapshot_json()
    data["runs"]["pfn_end"][-1] = 1 << 70
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "pfn", "0", inputs=(path,)), "runs.pfn_end")
    data = snapshot_json()
    data["blocks"][0]["start_pfn"] = 1 << 70
    path = write_json(tmp_path / "b.json.gz", data)
    refused(kmem("--snapshot", str(path), "blocks", inputs=(path,)), "blocks[0].start_pfn", "out of range")


def test_snapshot_arrays_of_different_lengths(tmp_path: Path) -> None:
    data = snapshot_json()
    data["runs"]["zone_id"].append(1)
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "audit", inputs=(path,)), "runs.zone_id", "columns differ")


def test_snapshot_negative_section_size_bits(tmp_path: Path) -> None:
    data = snapshot_json()
    data["layout"]["section_size_bits"] = -27
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "map", inputs=(path,)), "layout.section_size_bits")


def test_snapshot_runs_overlapping(tmp_path: Path) -> None:
    data = snapshot_json()
    data["runs"]["pfn_start"][1] = data["runs"]["pfn_start"][0]
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "sections", inputs=(path,)), "overlaps")


def test_snapshot_from_a_newer_kmeminspect(tmp_path: Path) -> None:
    data = snapshot_json()
    data["format"], data["written_by"] = 3, "kmeminspect 9.1.0"
    path = write_json(tmp_path / "s.json.gz", data)
    refused(kmem("--snapshot", str(path), "sections"), "format 3 is not supported", "kmeminspect 9.1.0")


def test_snapshot_a_directory(tmp_path: Path) -> None:
    refused(kmem("--snapshot", str(tmp_path), "sections"), "directory")


def test_written_snapshot_still_loads(tmp_path: Path) -> None:
    """The schema accepts everything kmeminspect writes (format 2, and format 1 without the new fields)."""
    path = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot", "collision", "absent", "device", "hot-offline"], device_subsections=5), path)
    assert snapshot_mod.load(path).sections
    old = snapshot_json()
    old["format"] = 1
    for name in ("claims", "online_page_callback", "written_by"):
        del old[name]
    for p in old["pagemaps"]:
        del p["live"]
    for n in old["nodes"]:
        del n["deferred_init_running"]
    del old["layout"]["max_physmem_bits"]
    assert snapshot_mod.from_json(old).layout.max_physmem_bits is None


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON tree (lists: their first two items only)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield from paths(v, (*prefix, i))


SNAPSHOT = snapshot_json()
SNAPSHOT_PATHS = [p for p in paths(SNAPSHOT) if p]


def mutated(data: Any, where: tuple[Any, ...], value: Any, delete: bool) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    return data


@CASES
@given(
    where=st.sampled_from(SNAPSHOT_PATHS),
    value=JSON_VALUES,
    delete=st.booleans(),
    command=st.sampled_from([["sections"], ["blocks"], ["pfn", "0x7ff0-0x8010"], ["audit"], ["map"]]),
)
def test_corrupted_snapshot(
    tmp_path: Path, where: tuple[Any, ...], value: Any, delete: bool, command: list[str]
) -> None:
    path = write_json(tmp_path / "s.json.gz", mutated(SNAPSHOT, where, value, delete))
    answered_or_refused(kmem("--snapshot", str(path), "--json", *command, inputs=(path,)))


@CASES
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000))
def test_corrupted_snapshot_bytes(tmp_path: Path, cut: int, flip: int) -> None:
    good = tmp_path / "good.json.gz"
    snapshot_mod.save(build(["boot", "hot-online"]), good)
    data = bytearray(good.read_bytes())
    if flip < len(data):
        data[flip] ^= 0x5A
    path = tmp_path / "s.json.gz"
    path.write_bytes(bytes(data[: max(cut, 1)] if cut < len(data) else data))
    answered_or_refused(kmem("--snapshot", str(path), "--json", "sections", inputs=(path,)))


# -- the stress journal ------------------------------------------------------------------------------------


def journal_lines() -> list[dict[str, Any]]:
    header = {
        "format": JOURNAL_FORMAT,
        "version": JOURNAL_VERSION,
        "mode": "live",
        "pid": 1,
        "boot_id": "x",
        "sysfs": "/nonexistent",
        "blocks": {"33": {"state": "online", "zone": "Movable"}},
    }
    return [header, {"event": "begin", "seq": 1, "block": 33}, {"event": "closed", "failed": [33], "restored": False}]


def write_journal(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_journal_of_a_newer_kmeminspect(tmp_path: Path) -> None:
    records = journal_lines()
    records[0].update(version=2, written_by="kmeminspect 9.1.0")
    with pytest.raises(KmemError, match="version 2 is not supported.*kmeminspect 9.1.0"):
        read_journal(write_journal(tmp_path / "j", records))


def test_journal_with_a_block_of_the_wrong_type(tmp_path: Path) -> None:
    records = journal_lines()
    records[0]["blocks"] = {"33": "online"}
    with pytest.raises(KmemError, match=r"blocks.33: expected an object"):
        read_journal(write_journal(tmp_path / "j", records))


def test_qemu_journal_as_the_qemu_driver_writes_it(tmp_path: Path) -> None:
    """The QEMU driver's header keeps its virtio-mem device (id, requested size) to put it back."""
    header = {
        "format": JOURNAL_FORMAT,
        "version": JOURNAL_VERSION,
        "mode": "qemu",
        "pid": 1,
        "qmp": "/nonexistent/qmp.sock",
        "prefix": "kmi-stress",
        "virtio_mem": {"id": "vmem0", "requested_size": 209715200},
    }
    read_header, _ = read_journal(write_journal(tmp_path / "j", [header]))
    assert read_header["virtio_mem"] == {"id": "vmem0", "requested_size": 209715200}
    header["virtio_mem"] = {"id": "vmem0", "requested_size": "big"}
    with pytest.raises(KmemError, match="virtio_mem.requested_size"):
        read_journal(write_journal(tmp_path / "j", [header]))


JOURNAL = journal_lines()


@CASES
@given(line=st.integers(0, 2), data=st.data(), value=JSON_VALUES, delete=st.booleans())
def test_corrupted_journal(tmp_path: Path, line: int, data: st.DataObject, value: Any, delete: bool) -> None:
    """The journal's reader (what --restore trusts) returns a checked journal or refuses in one line."""
    where = data.draw(st.sampled_from([p for p in paths(JOURNAL[line]) if p] or [()]))
    records = copy.deepcopy(JOURNAL)
    records[line] = mutated(records[line], where, value, delete) if where else value
    path = write_journal(tmp_path / "j", records)
    before = digest(path)
    try:
        with time_limit(LIMIT_S):
            header, events = read_journal(path)
    except KmemError as error:
        assert "\n" not in str(error)
    else:
        assert header["mode"] in ("live", "qemu") and all(isinstance(e, dict) for e in events)
    assert digest(path) == before


# -- the trace file -----------------------------------------------------------------------------------------


def trace_lines() -> list[dict[str, Any]]:
    header = {"type": "trace", "format": 1, "release": "x", "options": {}, "probes": [], "unavailable": {}}
    event = {
        "type": "event",
        "t": 1.5,
        "comm": "bash",
        "tid": 7,
        "function": "online_pages",
        "phase": "begin",
        "pfn_start": 0x8000,
        "pfn_end": 0x10000,
        "zone": "Movable",
    }
    summary = {"type": "summary", "events": {"online_pages:begin": 1}, "handouts_inactive": 0, "races": 0}
    summary.update(duration_s=2.0, stopped_by="SIGINT")
    return [header, event, summary]


def test_trace_report_of_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.bin"
    path.write_bytes(bytes(range(256)) * 8)
    refused(kmem("trace", "--report", str(path), inputs=(path,)), "not a JSON line")


def test_trace_report_of_a_newer_trace(tmp_path: Path) -> None:
    lines = trace_lines()
    lines[0].update(format=2, written_by="kmeminspect 9.1.0")
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    refused(kmem("trace", "--report", str(path)), "trace format 2 is not supported", "kmeminspect 9.1.0")


TRACE = trace_lines()


@CASES
@given(line=st.integers(0, 2), data=st.data(), value=JSON_VALUES, delete=st.booleans())
def test_corrupted_trace_file(tmp_path: Path, line: int, data: st.DataObject, value: Any, delete: bool) -> None:
    where = data.draw(st.sampled_from([p for p in paths(TRACE[line]) if p]))
    records = copy.deepcopy(TRACE)
    records[line] = mutated(records[line], where, value, delete)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    answered_or_refused(kmem("trace", "--report", str(path), inputs=(path,)))


# -- vmcore headers ------------------------------------------------------------------------------------------


def test_elf_program_headers_past_the_end(tmp_path: Path) -> None:
    data = bytearray(elf_core(62, 4096))
    for phoff in (0x10_0000, 1 << 63, (1 << 64) - 1):
        struct.pack_into("<Q", data, 32, phoff)
        path = tmp_path / "vmcore"
        path.write_bytes(bytes(data))
        refused(kmem("--vmcore", str(path), "sections", inputs=(path,)), "truncated ELF vmcore", "past the end")


def test_vmcore_a_directory(tmp_path: Path) -> None:
    refused(kmem("--vmcore", str(tmp_path), "sections"), "a directory, not a vmcore")


ELF = elf_core(62, 4096)


@CASES
@given(
    edits=st.lists(st.tuples(st.integers(0, 64 + 56 - 1), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, len(ELF)),
)
def test_corrupted_elf_vmcore_header(tmp_path: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(ELF)
    for offset, byte in edits:
        data[offset] = byte
    path = tmp_path / "vmcore"
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    refused(kmem("--vmcore", str(path), "--vmlinux", str(tmp_path / "none"), "sections", inputs=(path,)))


def kdump_header(block_size: int = 4096, max_mapnr: int = 16, bitmap_blocks: int = 1) -> bytes:
    """The start of a kdump-compressed file: struct disk_dump_header (signature, version 6, ...)."""
    head = bytearray(block_size)
    head[:8] = b"KDUMP   "
    struct.pack_into("<i", head, 8, 6)  # header_version
    head[12 : 12 + 6] = b"Linux\0"
    struct.pack_into("<iIiI", head, 408, block_size, 1, bitmap_blocks, max_mapnr)  # utsname is 390 bytes
    return bytes(head)


def subprocess_kmem(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "kmeminspect", *args], capture_output=True, text=True, timeout=60, cwd="/", env=env
    )


@FEW
@given(
    block_size=st.sampled_from([0, 1, 4096, 1 << 30, -1]),
    max_mapnr=st.sampled_from([0, 16, (1 << 32) - 1]),
    bitmap_blocks=st.sampled_from([0, 1, 1 << 30, -5]),
    cut=st.none() | st.integers(0, 8192),
)
def test_corrupted_kdump_header(
    tmp_path: Path, block_size: int, max_mapnr: int, bitmap_blocks: int, cut: int | None
) -> None:
    """libkdumpfile parses these: each in its own process, so a crash in C would show as a status too."""
    data = kdump_header(4096, 16, 1)
    head = bytearray(data) + b"\0" * 4096
    struct.pack_into("<iIiI", head, 408, block_size, 1, bitmap_blocks, max_mapnr)
    path = tmp_path / "dump"
    path.write_bytes(bytes(head[:cut] if cut is not None else head))
    before = digest(path)
    result = subprocess_kmem("--vmcore", str(path), "--vmlinux", str(tmp_path / "none"), "sections")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1
    assert digest(path) == before


@CASES
@given(
    lines=st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_()=0123456789abcdef\x00-.", max_size=40), max_size=8)
)
def test_corrupted_vmcoreinfo(tmp_path: Path, lines: list[str]) -> None:
    core = tmp_path / "vmcore"
    core.write_bytes(ELF)
    info = tmp_path / "vmcoreinfo"
    info.write_text("OSRELEASE=6.1.0\n" + "\n".join(lines) + "\n")
    refused(kmem("--vmcore", str(core), "--vmcoreinfo", str(info), "sections", inputs=(core, info)))


# -- numbers on the command line ----------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(1 << 80), max_value=1 << 80).map(str),
    st.integers(min_value=0, max_value=1 << 70).map(hex),
    st.text(alphabet="0123456789abcdefx-+_. e", max_size=24),
    st.sampled_from(["nan", "inf", "-0", "0x", "-", "1-", "-1", "0-0", "1e3", ""]),
)


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "s.json.gz"
    snapshot_mod.save(build(["boot", "hot-online"]), path)
    return path


@CASES
@given(text=NUMBERS, phys=st.booleans())
def test_pfn_numbers(small_snapshot: Path, text: str, phys: bool) -> None:
    result = kmem("--snapshot", str(small_snapshot), "--json", "pfn", *(["--phys"] if phys else []), "--", text)
    answered_or_refused(result)
    if result.exit_code == 0:
        out = json.loads(result.output)
        if "-" not in text.strip().lstrip("-"):
            shown = out["pfns"][0]["pfn"]
            assert shown == int(text, 0) >> (12 if phys else 0)


@CASES
@given(
    option=st.sampled_from(["--transitions", "--duration", "--timeout", "--audit-every", "--seed", "--dimm-rounds"]),
    text=NUMBERS,
)
def test_stress_numbers(small_snapshot: Path, option: str, text: str) -> None:
    """Parsed before anything runs: a bad number is a usage error; a good one reaches the refusal of a
    snapshot target (stress needs a running kernel)."""
    result = kmem("--snapshot", str(small_snapshot), "stress", f"{option}={text}")
    refused(result)


@CASES
@given(option=st.sampled_from(["--top", "--verify-every", "--hold-window-ms", "--duration"]), text=NUMBERS)
def test_trace_numbers(tmp_path: Path, option: str, text: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    answered_or_refused(kmem("trace", f"{option}={text}", "--report", str(path), inputs=(path,)))
