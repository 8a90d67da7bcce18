"""Bad input: one line on stderr saying what is wrong and what to do, exit 2, no traceback."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic import build

from kmeminspect import snapshot as snapshot_mod
from kmeminspect.cli import main


def kmem(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kmeminspect", *args]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/", env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("kmeminspect: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


def elf_core(machine: int, segment_size: int, file_size: int | None = None) -> bytes:
    """A minimal ELF64 core header with one PT_LOAD of segment_size bytes at offset 0x1000."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 4, machine, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 0, 0x1000, 0, 0, segment_size, segment_size, 0x1000)
    data = bytes(header) + phdr
    data += b"\0" * ((file_size if file_size is not None else 0x1000 + segment_size) - len(data))
    return data


def test_not_a_vmcore(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    assert_one_line_error(kmem("--vmcore", str(path), "sections"), "not a vmcore")


def test_missing_vmcore(tmp_path: Path) -> None:
    assert_one_line_error(kmem("--vmcore", str(tmp_path / "nope"), "sections"), "no such file")


def test_truncated_elf_vmcore(tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(elf_core(62, 1 << 20, file_size=0x2000))
    result = kmem("--vmcore", str(path), "sections")
    assert_one_line_error(result, "truncated")
    assert path.stat().st_size == 0x2000  # nothing the user had is changed


def test_non_x86_64_dump(tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(elf_core(183, 4096))  # EM_AARCH64
    assert_one_line_error(kmem("--vmcore", str(path), "sections"), "not x86_64")


def test_elf_but_not_core(tmp_path: Path) -> None:
    data = bytearray(elf_core(62, 4096))
    data[16] = 2  # ET_EXEC
    path = tmp_path / "vmlinux"
    path.write_bytes(bytes(data))
    assert_one_line_error(kmem("--vmcore", str(path), "sections"), "not a core dump")


def test_missing_vmlinux(tmp_path: Path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(elf_core(62, 4096))
    result = kmem("--vmcore", str(path), "--vmlinux", str(tmp_path / "vmlinux"), "sections")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_malformed_range(tmp_path: Path) -> None:
    snap = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot"]), snap)
    assert_one_line_error(kmem("--snapshot", str(snap), "pfn", "0x10-zz"), "not a pfn")
    assert_one_line_error(kmem("--snapshot", str(snap), "pfn", "0x20-0x10"), "empty range")


def test_pfn_beyond_highest_section(tmp_path: Path) -> None:
    """Issue 14: a pfn the architecture can address is answered, beyond the highest present section too
    (it was exit 2 before); a range reaching past that section is answered in full, not cut short."""
    snap = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot", "hot-online"]), snap)
    beyond = kmem("--snapshot", str(snap), "--json", "pfn", str(2 * 32768))
    assert beyond.returncode == 0, beyond.stderr
    answer = json.loads(beyond.stdout)["pfns"][0]
    assert answer["pfn"] == 65536 and answer["memmap"] == "none"
    assert not answer["pfn_valid"] and not answer["pfn_to_online_page"] and not answer["online_section"]
    ok = kmem("--snapshot", str(snap), "--json", "pfn", str(2 * 32768 - 1))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["pfns"][0]["pfn_to_online_page"] is True
    across = kmem("--snapshot", str(snap), "pfn", "--json", "0xfff0-0x10010")
    runs = json.loads(across.stdout)["runs"]
    assert (runs[0]["pfn_start"], runs[-1]["pfn_end"]) == (0xFFF0, 0x10010)
    assert runs[-1]["pfn_start"] == 0x10000 and runs[-1]["memmap"] == "none"


def test_pfn_beyond_the_architecture(tmp_path: Path) -> None:
    """Only a pfn beyond MAX_PHYSMEM_BITS (46 here: pfns end at 2^34) is bad input."""
    snap = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot"]), snap)
    assert_one_line_error(kmem("--snapshot", str(snap), "pfn", hex(1 << 34)), "MAX_PHYSMEM_BITS 46")
    last = kmem("--snapshot", str(snap), "--json", "pfn", hex((1 << 34) - 1))
    assert last.returncode == 0 and json.loads(last.stdout)["pfns"][0]["memmap"] == "none"


def test_pfn_of_2_to_the_70(tmp_path: Path) -> None:
    snap = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot"]), snap)
    assert_one_line_error(kmem("--snapshot", str(snap), "pfn", str(1 << 70)), "not a pfn")


def test_pfn_phys(tmp_path: Path) -> None:
    """--phys: physical addresses, as crash's kmem -p takes them; a range covers the pages it touches."""
    snap = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot", "hot-online"]), snap)
    one = kmem("--snapshot", str(snap), "--json", "pfn", "--phys", "0x8000123")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["pfns"][0]["pfn"] == 0x8000
    span = kmem("--snapshot", str(snap), "--json", "pfn", "--phys", "0x7fff800-0x8000001")
    runs = json.loads(span.stdout)["runs"]
    assert (runs[0]["pfn_start"], runs[-1]["pfn_end"]) == (0x7FFF, 0x8001)


def test_unknown_snapshot_version(tmp_path: Path) -> None:
    snap = tmp_path / "s.json.gz"
    data = snapshot_mod.to_json(build(["boot"]))
    data["format"] = 99
    with gzip.open(snap, "wt") as f:
        json.dump(data, f)
    assert_one_line_error(kmem("--snapshot", str(snap), "sections"), "format 99 is not supported")


def test_not_a_snapshot(tmp_path: Path) -> None:
    snap = tmp_path / "s.json.gz"
    snap.write_text("{}")
    assert_one_line_error(kmem("--snapshot", str(snap), "sections"), "not a kmeminspect snapshot")


def test_snapshot_round_trip(tmp_path: Path) -> None:
    original = build(["boot", "collision", "absent", "device", "hot-offline"], device_subsections=5, altmap_reserve=64)
    path = tmp_path / "s.json.gz"
    snapshot_mod.save(original, path)
    loaded = snapshot_mod.load(path)
    assert loaded.sections == original.sections
    assert loaded.pagemaps == original.pagemaps
    assert loaded.layout == original.layout
    assert (loaded.runs == original.runs).all()
    assert snapshot_mod.diff(original, loaded) == {"sections": [], "blocks": [], "pagemaps": [], "runs": []}


def test_qmp_socket_absent(tmp_path: Path) -> None:
    assert_one_line_error(kmem("--qemu", str(tmp_path / "qmp.sock"), "sections"), "no such socket")


@pytest.fixture
def chatty_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that answers like something other than QEMU."""
    path = tmp_path / "other.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"220 hello from not-qemu\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield path
    server.close()


def test_qmp_socket_not_qemu(chatty_socket: Path) -> None:
    assert_one_line_error(kmem("--qemu", str(chatty_socket), "sections"), "not a QEMU QMP socket")


def test_live_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exit_info:
        main(["sections"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs root" in err[0]


def test_live_without_kcore() -> None:
    if os.path.exists("/proc/kcore") or os.geteuid() != 0:
        pytest.skip("this machine has /proc/kcore (or we are not root)")
    assert_one_line_error(kmem("sections"), "/proc/kcore is missing")


def test_two_targets() -> None:
    assert_one_line_error(kmem("--vmcore", "a", "--qemu", "b", "sections"), "choose one target")


def test_doctor_reports_this_machine() -> None:
    result = kmem("--json", "doctor")
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["/proc/kcore"]["ok"] == os.path.exists("/proc/kcore")
    assert checks["root"]["ok"] == (os.geteuid() == 0)
    assert all((c["fix"] is None) == c["ok"] for c in checks.values())


def test_vmcoreinfo_needs_vmcore(tmp_path: Path) -> None:
    assert_one_line_error(kmem("--qemu", str(tmp_path / "q"), "--vmcoreinfo", "x", "sections"), "goes with --vmcore")


def test_vmcoreinfo_not_vmcoreinfo(tmp_path: Path) -> None:
    core = tmp_path / "vmcore"
    core.write_bytes(elf_core(62, 4096))
    info = tmp_path / "info"
    info.write_text("hello\n")
    assert_one_line_error(kmem("--vmcore", str(core), "--vmcoreinfo", str(info), "sections"), "not VMCOREINFO")


def test_diff_names_what_changed(tmp_path: Path) -> None:
    before = build(["boot", "hot-offline"])
    after = build(["boot", "hot-online", "device"], device_subsections=4)
    a, b = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    snapshot_mod.save(before, a)
    snapshot_mod.save(after, b)
    result = kmem("--json", "diff", str(a), str(b))
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert [(s["nr"], s["change"]) for s in d["sections"]] == [(1, "changed"), (2, "added")]
    assert d["sections"][0]["flags"][1][-1] == "SECTION_IS_ONLINE"
    assert [(blk["id"], blk["change"], blk["state"]) for blk in d["blocks"]] == [(1, "changed", ["offline", "online"])]
    assert [p["change"] for p in d["pagemaps"]] == ["added"]
    assert d["runs"] and d["runs"][0]["pfn_start"] == 32768 and "zone_id" in d["runs"][0]["fields"]


def test_map_html_unwritable(tmp_path: Path) -> None:
    """An --html path that cannot be written: one line naming it, and nothing printed as if it worked."""
    snap = tmp_path / "s.snap"
    snapshot_mod.save(build(["boot"]), snap)
    result = kmem("--snapshot", str(snap), "map", "--html", str(tmp_path / "no-such-dir" / "map.html"))
    assert_one_line_error(result, "cannot write", "no-such-dir", "writable path")
    assert result.stdout == ""
