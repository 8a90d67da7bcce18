"""Capture a scenario: vmcores and, at the same moment, the kernel's own answers (ground truth).

A capture directory holds::

    truth.json        release, cmdline, memory blocks, zones, iomem, kpageflags oracle, ...
    kpageflags.gz     /proc/kpageflags as read in the guest (little-endian u64 per pfn), gzip
    vmcore.elf        QEMU dump-guest-memory, ELF (holes punched: zero pages take no disk)
    vmcore.kdump      QEMU dump-guest-memory, flattened kdump-zlib
    console.log       the guest's serial console

A scenario stopped during boot (``Scenario.stop_at``: ``early-boot``) has no user space at its moment, so
no kpageflags or sysfs truth. Its truth is the kernel's node and zone bookkeeping read through QEMU's
gdbstub at the stop (``stop``, ``first_deferred_pfn``, ``zones``, ...), the dumps taken there, and from
the same boot once it went on: release, command line, ``after_boot`` (what deferred init reported) and::

    vmcoreinfo        the boot's VMCOREINFO note data: the dumps lack it (the kernel builds it in an
                      initcall and qemu_fw_cfg hands it to QEMU, both later than the stop)

Captures are cached under ``$KMEMINSPECT_CACHE/captures/<release>/<scenario>`` and reused while the
kernel version and the test bed's code are unchanged.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import mmap
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import drgn
import numpy as np
from drgn.helpers.linux.xarray import xa_for_each

from .cache import cache_dir, locked, log
from .download import Kernel
from .gdbstub import GdbStub, kernel_debug_info, read_through
from .oracle import checked, install_program, pfn_to_online_page_ranges
from .rootfs import rootfs_guest
from .scenarios import SCENARIOS, Scenario, wait_for
from .vm import Guest

#: /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h: a stable user-space ABI)
KPF_NOPAGE = 20
KPF_OFFLINE = 23
KPF_HUGE = 17
KPF_BUDDY = 10

FORMAT_VERSION = 1


#: the test bed's files a capture depends on (booting, scenario setup, dumping, the oracles); a change to any
#: of them recaptures every scenario, a change elsewhere (test helpers, ``__main__``) does not
CAPTURE_INPUTS = [
    "cache.py", "download.py", "gdbstub.py", "initramfs.py", "oracle.py", "qmp.py", "rootfs.py",
    "scenarios.py", "truth.py", "vm.py", "guest", "guest-rootfs",
]  # fmt: skip


def _fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in CAPTURE_INPUTS:
        paths = sorted((here / name).iterdir()) if (here / name).is_dir() else [here / name]
        for path in paths:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Capture:
    """A scenario captured on one kernel: its truth and its dumps."""

    directory: Path
    truth: dict[str, Any]

    @property
    def elf(self) -> Path:
        return self.directory / "vmcore.elf"

    @property
    def kdump(self) -> Path:
        return self.directory / "vmcore.kdump"

    def kpageflags(self) -> bytes:
        return gzip.decompress((self.directory / "kpageflags.gz").read_bytes())

    def vmcoreinfo(self) -> bytes | None:
        """The boot's VMCOREINFO, kept beside dumps taken before the guest published it (else None)."""
        path = self.directory / "vmcoreinfo"
        return path.read_bytes() if path.is_file() else None

    def online(self) -> np.ndarray | None:
        """pfn_to_online_page() != NULL for every pfn the kernel walked, or None without an oracle."""
        if self.truth.get("pfn_to_online_page_oracle") is None:
            return None
        mask = np.zeros(self.truth["kpageflags_pfns"], dtype=bool)
        for start, end in self.truth["online_pfn_ranges"]:
            mask[start:end] = True
        return mask


def parse_iomem(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
        if m:
            entries.append(
                {
                    "depth": len(m.group(1)) // 2,
                    "start": int(m.group(2), 16),
                    "end": int(m.group(3), 16) + 1,
                    "name": m.group(4),
                }
            )
    return entries


def parse_zoneinfo(text: str) -> list[dict[str, Any]]:
    zones: list[dict[str, Any]] = []
    for line in text.splitlines():
        m = re.match(r"^Node (\d+), zone\s+(\S+)", line)
        if m:
            zones.append({"node": int(m.group(1)), "zone": m.group(2)})
            continue
        m = re.match(r"^\s+(spanned|present|managed|start_pfn:)\s+(\d+)", line)
        if m and zones:
            zones[-1][m.group(1).rstrip(":")] = int(m.group(2))
    return zones


def runs_of(mask: list[bool] | Any) -> list[list[int]]:
    """[start, end) pfn ranges where mask is true."""
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], m.view(np.int8), [0]))))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]


BLOCKS_SCRIPT = r"""
cd /sys/devices/system/memory
for d in memory*; do
    node=$(ls -d $d/node* 2>/dev/null | head -1)
    echo "${d#memory} $(cat $d/phys_index) $(cat $d/state) ${node##*node} $(cat $d/valid_zones 2>/dev/null | tr ' ' ,)"
done
"""


def collect_truth(guest: Guest) -> tuple[dict[str, Any], bytes]:
    """The kernel's own view, read inside the guest, and the raw /proc/kpageflags."""

    def read(cmd: str) -> str:
        return guest.run(cmd).text

    truth: dict[str, Any] = {"format": FORMAT_VERSION}
    truth["release"] = read("uname -r").strip()
    truth["cmdline"] = read("cat /proc/cmdline").strip()
    truth["block_size"] = int(read("cat /sys/devices/system/memory/block_size_bytes"), 16)
    blocks = []
    for line in read(BLOCKS_SCRIPT).splitlines():
        fields = line.split()
        blocks.append(
            {
                "id": int(fields[0]),
                "phys_index": int(fields[1], 16),
                "state": fields[2],
                "node": int(fields[3]) if fields[3].isdigit() else None,
                "valid_zones": fields[4].split(",") if len(fields) > 4 else [],
            }
        )
    truth["blocks"] = sorted(blocks, key=lambda b: b["id"])
    truth["zoneinfo"] = parse_zoneinfo(read("cat /proc/zoneinfo"))
    truth["iomem"] = parse_iomem(read("cat /proc/iomem"))
    truth["meminfo"] = {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in read("cat /proc/meminfo").splitlines())
    }
    # From 7.2 on a NULL from pfn_to_online_page() reads as 0 instead of KPF_NOPAGE: the read path was
    # reworked into kpage_read() (kpageflags_read still exists, as a tail call): detect it by that symbol.
    kallsyms = read("grep -E ' (kpageflags_read|kpage_read)' /proc/kallsyms || true")
    truth["kpageflags_symbols"] = sorted({line.split()[2] for line in kallsyms.splitlines() if line.strip()})
    nopage_oracle = not any(s.startswith("kpage_read") for s in truth["kpageflags_symbols"])
    raw = guest.run("dd if=/proc/kpageflags bs=65536 2>/dev/null | gzip -1", timeout=300).stdout
    flags = np.frombuffer(gzip.decompress(raw), dtype="<u8")
    truth["kpageflags_pfns"] = int(flags.size)
    truth["pfn_to_online_page_oracle"] = "kpageflags-nopage" if nopage_oracle else None
    if nopage_oracle:
        truth["online_pfn_ranges"] = runs_of((flags >> KPF_NOPAGE) & 1 == 0)
    truth["offline_page_ranges"] = runs_of((flags >> KPF_OFFLINE) & 1 == 1)
    truth["huge_pfns"] = int(((flags >> KPF_HUGE) & 1).sum())
    return truth, raw


def kpageflags_reports_nopage(kernel: Kernel) -> bool:
    """False where a NULL from pfn_to_online_page() reads as 0 in /proc/kpageflags: from 7.2 on, whose
    read path is kpage_read() (found in the vmlinux symbol table). Those kernels need the bcc oracle."""
    stamp = kernel.directory / "kpage_read.json"
    if stamp.is_file():
        return bool(json.loads(stamp.read_text())["nopage"])
    with open(kernel.vmlinux, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        has_kpage_read = data.find(b"\0kpage_read\0") >= 0 or data.find(b"\0kpage_read.") >= 0
    stamp.write_text(json.dumps({"nopage": not has_kpage_read}))
    return not has_kpage_read


def elf_notes(path: Path) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of every note in an ELF core's PT_NOTE segments."""
    notes = []
    with open(path, "rb") as f:
        head = f.read(64)
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type != 4:  # PT_NOTE
                continue
            f.seek(p_offset)
            data = f.read(p_filesz)
            pos = 0
            while pos + 12 <= len(data):
                namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
                desc = pos + 12 + ((namesz + 3) & ~3)
                notes.append((data[pos + 12 : pos + 12 + namesz].rstrip(b"\0"), note_type, data[desc : desc + descsz]))
                pos = desc + ((descsz + 3) & ~3)
    return notes


def published_vmcoreinfo(guest: Guest, work: Path) -> bytes:
    """The VMCOREINFO the guest handed to QEMU (``-device vmcoreinfo``), from a one-page ELF dump."""
    page = work / "vmcoreinfo.elf"
    guest.execute("dump-guest-memory", paging=False, protocol=f"file:{page}", begin=0, length=4096)
    try:
        notes = elf_notes(page)
    finally:
        page.unlink()
    for name, _, desc in notes:
        if name == b"VMCOREINFO":
            return desc
    raise RuntimeError("the guest published no VMCOREINFO (qemu_fw_cfg not loaded?)")


def node_bookkeeping(prog: drgn.Program) -> dict[str, Any]:
    """Node 0's span, deferred init mark and zones, and max_pfn, as the kernel holds them."""
    pgdat = prog["node_data"][0]
    zones = []
    for zone in pgdat.node_zones:
        zones.append(
            {
                "node": 0,
                "zone": zone.name.string_().decode(),
                "start_pfn": zone.zone_start_pfn.value_(),
                "spanned": zone.spanned_pages.value_(),
                "present": zone.present_pages.value_(),
            }
        )
    return {
        "first_deferred_pfn": pgdat.first_deferred_pfn.value_(),
        "node_start_pfn": pgdat.node_start_pfn.value_(),
        "node_spanned_pages": pgdat.node_spanned_pages.value_(),
        "max_pfn": prog["max_pfn"].value_(),
        "zones": zones,
    }


def _write_dumps(guest: Guest, work: Path) -> None:
    guest.dump(work / "vmcore.elf", "elf")
    # zero pages need no disk: ELF dumps of a mostly idle guest are mostly zeros
    subprocess.run(["fallocate", "--dig-holes", str(work / "vmcore.elf")], check=False)
    guest.dump(work / "vmcore.kdump", "kdump-zlib")


def _follow_chain(prog: drgn.Program, stub: GdbStub, scenario: Scenario, truth: dict[str, Any]) -> int:
    """Arm the scenario's ``stop_chain`` breakpoints one after another; record where it stopped; return
    the vCPU (gdb thread) that stopped there."""
    thread = 1
    for function, hits in scenario.stop_chain:
        address = prog.symbol(function).address
        thread = stub.stop_at(address, hits, timeout=300)
        truth["stop"] = {"function": function, "hits": hits, "address": address, "pc": stub.pc(), "thread": thread}
        log(f"stopped at {function} (hit {hits}, vCPU {thread - 1})")
    truth["stop"]["first_argument"] = stub.first_argument()
    return thread


#: the agent's CPU while a trigger stop holds CPU 0 (``Scenario.smp`` is 2 for those)
AGENT_CPU_MASK, TRIGGER_CPU_MASK = 0x2, 0x1
ORACLE_GO, ORACLE_OUTPUT = "/tmp/oracle-go", "/tmp/oracle.json"


def _answers_while_stopped(guest: Guest, use_bcc: bool) -> dict[str, Any]:
    """pfn_to_online_page() for every pfn, asked of the kernel on CPU 1 while CPU 0 stays stopped in the
    scenario's moment: KPF_NOPAGE where kpageflags still says it, else the bcc oracle attached before."""
    truth: dict[str, Any] = {}
    if use_bcc:
        guest.run(f"touch {ORACLE_GO}")
        output = ORACLE_OUTPUT
        wait_for("the oracle's answer", lambda: guest.run(f"grep -c runs {output} || true").text.strip() == "1", 600)
        answers = checked(json.loads(guest.run(f"grep runs {output}").text), 0.0, "")
        truth["kpageflags_pfns"] = answers.pfns
        truth["pfn_to_online_page_oracle"] = f"bcc-{answers.mode}"
        truth["online_pfn_ranges"] = [list(r) for r in answers.ranges]
        return truth
    raw = guest.run("dd if=/proc/kpageflags bs=65536 2>/dev/null | gzip -1", timeout=300).stdout
    flags = np.frombuffer(gzip.decompress(raw), dtype="<u8")
    truth["kpageflags_pfns"] = int(flags.size)
    truth["pfn_to_online_page_oracle"] = "kpageflags-nopage"
    truth["online_pfn_ranges"] = runs_of((flags >> KPF_NOPAGE) & 1 == 0)
    return truth


def stop_bookkeeping(prog: drgn.Program) -> dict[str, Any]:
    """What the stopped kernel holds that the scenarios' tests compare with kmeminspect's reading: node 0's
    bookkeeping, the deferred_pages key, every pgmap's ref word and every memory block's state."""
    truth = node_bookkeeping(prog)
    truth["deferred_pages_enabled"] = prog["deferred_pages"].key.enabled.counter.value_()
    pgmaps = []
    for _, entry in xa_for_each(prog["pgmap_array"].address_of_()):
        pgmap = drgn.cast("struct dev_pagemap *", entry)
        pgmaps.append({"address": entry.value_(), "percpu_count_ptr": pgmap.ref.percpu_count_ptr.value_()})
    truth["pgmaps"] = pgmaps
    blocks = []
    if "memory_blocks" in prog:  # without CONFIG_MEMORY_HOTPLUG there are none
        for block_id, entry in xa_for_each(prog["memory_blocks"].address_of_()):
            mem = drgn.cast("struct memory_block *", entry)
            blocks.append({"id": int(block_id), "state": mem.state.value_(), "online_type": mem.online_type.value_()})
    truth["memory_blocks"] = blocks
    return truth


def _capture_stopped(guest: Guest, kernel: Kernel, scenario: Scenario, work: Path, dumps: bool) -> dict[str, Any]:
    """Stop the guest where the scenario says, read its bookkeeping and dump it there.

    A boot stop (``stop_at``) starts the guest frozen and lets it boot on afterwards for what only a
    booted guest tells (release, command line, its VMCOREINFO). A ``trigger`` stop boots the guest, sets it
    up, starts the trigger in the background and stops the guest inside what it does; it stays stopped."""
    assert guest.gdb_path is not None
    prog = kernel_debug_info(kernel.vmlinux)
    truth: dict[str, Any] = {"format": FORMAT_VERSION}
    guest.launch()
    launched = time.monotonic()
    if scenario.trigger is not None:
        guest.execute("cont")
        guest.wait_for_agent()
        scenario.setup(guest)
        truth["release"] = guest.run("uname -r").text.strip()
        truth["cmdline"] = guest.run("cat /proc/cmdline").text.strip()
        guest.run(f"taskset -p {AGENT_CPU_MASK} $PPID >/dev/null")  # the agent, and all it starts, on CPU 1
        use_bcc = not kpageflags_reports_nopage(kernel)
        if use_bcc:  # attach before the stop: attaching patches text, which waits for every CPU
            install_program(guest)
            guest.run_background(f"python3 /tmp/pfn_oracle.py fexit --wait {ORACLE_GO} > {ORACLE_OUTPUT}")
            attached = f"test -e {ORACLE_GO}.attached"
            wait_for("the oracle to attach", lambda: guest.run(attached, check=False).returncode == 0, 600)
        truth["trigger"] = scenario.trigger(guest)
        guest.run_background(f"taskset {TRIGGER_CPU_MASK} sh -c '{truth['trigger']}'")
        with GdbStub(guest.gdb_path) as stub:  # QEMU stops the guest while a debugger attaches
            stub.halt_reason()
            read_through(prog, stub)
            thread = _follow_chain(prog, stub, scenario, truth)
            truth.update(stop_bookkeeping(prog))
            if dumps:
                _write_dumps(guest, work)
            if scenario.smp > 1:
                stub.resume_only(2 if thread == 1 else 1)
                truth.update(_answers_while_stopped(guest, use_bcc))
        return truth
    assert scenario.stop_at is not None
    address = prog.symbol(scenario.stop_at).address
    with GdbStub(guest.gdb_path) as stub:
        stub.set_breakpoint(address)
        stub.run_until_stop(timeout=300)
        pc = stub.pc()
        if pc != address:
            raise RuntimeError(f"the guest stopped at {pc:#x}, not at {scenario.stop_at} ({address:#x})")
        log(f"stopped at {scenario.stop_at} {time.monotonic() - launched:.1f}s after launch")
        truth["stop"] = {"function": scenario.stop_at, "address": address, "pc": pc}
        stub.remove_breakpoint(address)
        read_through(prog, stub)
        _follow_chain(prog, stub, scenario, truth)
        truth.update(stop_bookkeeping(prog))
        if dumps:
            _write_dumps(guest, work)
        stub.detach()
    guest.wait_for_agent()
    scenario.setup(guest)
    (work / "vmcoreinfo").write_bytes(published_vmcoreinfo(guest, work))
    truth["release"] = guest.run("uname -r").text.strip()
    truth["cmdline"] = guest.run("cat /proc/cmdline").text.strip()
    truth["after_boot"] = {
        "deferred_init": guest.run("dmesg | grep 'deferred pages initialised' || true").text.strip(),
        "zoneinfo": parse_zoneinfo(guest.run("cat /proc/zoneinfo").text),
    }
    return truth


def capture(kernel: Kernel, scenario_name: str, dumps: bool = True, refresh: bool = False) -> Capture:
    """Bring a scenario up on kernel, record truth and dumps; reuse the cached capture if current."""
    with locked(f"capture-{kernel.release}-{scenario_name}"):
        return _capture(kernel, scenario_name, dumps, refresh)


def _capture(kernel: Kernel, scenario_name: str, dumps: bool, refresh: bool) -> Capture:
    scenario = SCENARIOS[scenario_name]
    directory = cache_dir() / "captures" / kernel.release / scenario_name
    stamp = {"kernel_version": kernel.version, "fingerprint": _fingerprint(), "dumps": dumps}
    stamp_path = directory / "stamp.json"
    if not refresh and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return Capture(directory, json.loads((directory / "truth.json").read_text()))
    if directory.exists():
        shutil.rmtree(directory)
    work = directory.with_name(directory.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"capturing {scenario_name} on {kernel.release}")
    use_bcc = scenario.stop_at is None and not kpageflags_reports_nopage(kernel)
    guest = rootfs_guest(scenario_name, kernel, work / "guest") if use_bcc else scenario.guest(kernel, work / "guest")
    try:
        if scenario.stopped:
            truth = _capture_stopped(guest, kernel, scenario, work, dumps)
        else:
            guest.start()
            scenario.setup(guest)
            truth, kpageflags = collect_truth(guest)
            (work / "kpageflags.gz").write_bytes(kpageflags)
        if use_bcc and not scenario.stopped:
            # the same walk, with an fexit on pfn_to_online_page() recording every answer
            answers = pfn_to_online_page_ranges(guest, mode="fexit")
            if answers.pfns != truth["kpageflags_pfns"]:
                raise RuntimeError(f"oracle walked {answers.pfns} pfns, kpageflags {truth['kpageflags_pfns']}")
            truth["pfn_to_online_page_oracle"] = f"bcc-{answers.mode}"
            truth["online_pfn_ranges"] = [list(r) for r in answers.ranges]
            truth["oracle_calls"] = answers.calls
        truth["scenario"] = scenario_name
        truth["generation"] = kernel.generation
        truth["kernel_version"] = kernel.version
        if dumps and not scenario.stopped:
            _write_dumps(guest, work)
        (work / "truth.json").write_text(json.dumps(truth, indent=1))
    finally:
        guest.kill()
        if guest.console_path.exists():
            shutil.copy2(guest.console_path, work / "console.log")
        shutil.rmtree(work / "guest", ignore_errors=True)
    (work / "stamp.json").write_text(json.dumps(stamp))
    work.rename(directory)
    return Capture(directory, truth)
