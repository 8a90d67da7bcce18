"""What works on this machine and what is missing, with the command that fixes each missing piece."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from .target import elf_program_headers


@dataclasses.dataclass(frozen=True)
class Check:
    """One requirement: whether it is met, what was found, which commands need it, the command that fixes it."""

    name: str
    ok: bool
    detail: str
    needed_for: str
    fix: str | None


NT_GNU_BUILD_ID = 3
PT_NOTE = 4
#: the oldest drgn with what kmeminspect uses (pyproject's dependency; `make test` runs the fast tests on it,
#: .ci/oldest-drgn): Program.set_qemu_qmp (--qemu, 0.2.0), Program.core_dump_path (0.0.33), the command API
#: of the plugin (drgn.commands: command, argument, CommandNamespace, 0.1.0), modules (main_module,
#: wants_debug_file, load_debug_info(main=True), 0.0.31)
DRGN_MINIMUM = (0, 2, 0)


def gnu_build_id(notes: bytes) -> str | None:
    """The GNU build id in a sequence of ELF notes (``/sys/kernel/notes``, a PT_NOTE segment), as hex."""
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, offset)
        name_start = offset + 12
        desc_start = name_start + (namesz + 3) // 4 * 4
        if note_type == NT_GNU_BUILD_ID and notes[name_start : name_start + namesz] == b"GNU\0":
            return notes[desc_start : desc_start + descsz].hex()
        offset = desc_start + (descsz + 3) // 4 * 4
    return None


def vmlinux_build_id(path: Path) -> str | None:
    """The build id of an ELF vmlinux, from its PT_NOTE segments."""
    with open(path, "rb") as f:
        try:
            _, headers = elf_program_headers(f)
        except (ValueError, struct.error):
            return None
        for header in headers:
            if header.type == PT_NOTE:
                f.seek(header.offset)
                found = gnu_build_id(f.read(header.filesz))
                if found:
                    return found
    return None


def running_build_id() -> str | None:
    """The GNU build id of the running kernel (``/sys/kernel/notes``), or None when it cannot be read."""
    try:
        return gnu_build_id(Path("/sys/kernel/notes").read_bytes())
    except OSError:
        return None


def _debug_info_check(release: str, vmlinux: Path | None) -> tuple[bool, str, str]:
    """(ok, what was found, the fix) for ``--vmlinux``: its build id against the running kernel's."""
    fix = f"apt-get install linux-image-{release}-dbg, or pass --vmlinux with this build's vmlinux"
    assert vmlinux is not None
    if not vmlinux.is_file():
        return False, f"{vmlinux}: no such file", fix
    theirs, ours = vmlinux_build_id(vmlinux), running_build_id()
    if theirs is None:
        return False, f"{vmlinux}: no build id (not a vmlinux?)", fix
    if ours is not None and theirs != ours:
        return False, f"{vmlinux}: build id {theirs}, running kernel {ours}", fix
    return True, f"{vmlinux} (build id {theirs}{' matches' if ours else ''})", fix


def _types_checks(release: str, vmlinux: Path | None, btf: Path | None) -> list[tuple[str, bool, str, str, str]]:
    """The ``debug info`` and ``types`` rows: drgn itself is asked (the running kernel is opened as every
    ``--live`` command opens it: --vmlinux, else the debug info drgn finds, its debuginfod included where
    drgn has it, else the kernel's BTF), so what doctor says is what the commands will do."""
    install = f"apt-get install linux-image-{release}-dbg, or pass --vmlinux with this build's vmlinux"
    needed = "DWARF mode (optional: the kernel's BTF needs no debug package)"
    rows = []
    if vmlinux is not None:
        ok, found, fix = _debug_info_check(release, vmlinux)
        rows.append(("debug info", ok, found, "--live with --vmlinux", fix))
    if os.geteuid() != 0:
        rows.append(("types", False, "cannot open the running kernel to tell (not root)", "--live", "run as root"))
        return rows
    if not os.path.exists("/proc/kcore"):
        rows.append(("types", False, "no /proc/kcore to open", "--live", "use --vmcore or --qemu"))
        return rows
    from .errors import TargetError
    from .target import live_types

    try:
        mode, where, finders = live_types(vmlinux, btf)
    except TargetError as error:
        rows.append(("types", False, str(error), "--live", install))
        return rows
    if vmlinux is None:
        found = where if mode == "dwarf" else f"drgn finds none for {release} (its finders: {', '.join(finders)})"
        rows.append(("debug info", mode == "dwarf", found, needed, install))
    later = "--vmcore, --qemu: DWARF with --vmlinux or when drgn finds that build's, else the kernel's own BTF"
    rows.append(("types", True, f"--live: {mode.upper()} ({where}); {later}", "every command reading a kernel", ""))
    return rows


def _bcc_check() -> tuple[bool, str, str]:
    """Is bcc importable by this Python (the one running kmeminspect)?"""
    if importlib.util.find_spec("bcc") is not None:
        return True, f"importable by {sys.executable}", ""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and subprocess.run([system, "-c", "import bcc"], capture_output=True).returncode == 0:
        return (
            False,
            f"only the system {system} has it, not {sys.executable}",
            f"run kmeminspect with {system} (pip install into it), or PYTHONPATH=/usr/lib/python3/dist-packages",
        )
    return False, "not installed", "apt-get install python3-bpfcc bpfcc-tools"


def checks(vmlinux: Path | None = None, btf: Path | None = None) -> list[Check]:
    """Each thing a command needs, found or missing (``vmlinux``, ``btf``: the --vmlinux, --btf the user
    passed)."""
    release = platform.release()
    result = []

    def add(name: str, ok: bool, detail: str, needed_for: str, fix: str | None) -> None:
        result.append(Check(name, ok, detail, needed_for, None if ok else fix))

    add("x86_64", platform.machine() == "x86_64", platform.machine(), "everything", "use an x86_64 machine")
    add("root", os.geteuid() == 0, f"euid {os.geteuid()}", "--live, trace, stress", "run as root: sudo kmeminspect ...")
    add(
        "/proc/kcore",
        os.path.exists("/proc/kcore"),
        "present" if os.path.exists("/proc/kcore") else "absent",
        "--live",
        "boot a kernel with CONFIG_PROC_KCORE=y, or use --vmcore / --qemu",
    )
    for row in _types_checks(release, vmlinux, btf):
        add(*row)
    try:
        from .target import drgn_version

        found = drgn_version()
        version = tuple(int(part) for part in found.split("+")[0].split(".")[:3])
        add(
            "drgn",
            version >= DRGN_MINIMUM,
            found,
            "everything",
            "python3 -m pip install --upgrade drgn",
        )
    except ImportError:
        add("drgn", False, "not importable", "everything", "python3 -m pip install drgn")
    ok, found, fix = _bcc_check()
    add("bcc", ok, found, "trace", fix)
    tracefs = next(
        (p for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing") if os.path.exists(f"{p}/trace")), None
    )
    add("tracefs", tracefs is not None, tracefs or "not mounted", "trace", "mount -t tracefs nodev /sys/kernel/tracing")
    kprobes = tracefs is not None and os.path.exists(f"{tracefs}/kprobe_events")
    add(
        "kprobes",
        kprobes,
        f"{tracefs}/kprobe_events" if kprobes else "no kprobe_events",
        "trace",
        "a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y",
    )
    has_btf = os.path.exists("/sys/kernel/btf/vmlinux")
    add(
        "BTF",
        has_btf,
        "/sys/kernel/btf/vmlinux" if has_btf else "absent",
        "reading without a debug package; trace (fentry/fexit)",
        "a kernel with CONFIG_DEBUG_INFO_BTF=y",
    )
    hookable = tracefs is not None and _ftrace_can_hook("pfn_to_online_page")
    add(
        "fentry",
        has_btf and hookable,
        "pfn_to_online_page in available_filter_functions" if hookable else "pfn_to_online_page not hookable",
        "trace (faster caller and race probes; kprobes otherwise)",
        "a kernel with CONFIG_DEBUG_INFO_BTF=y and CONFIG_DYNAMIC_FTRACE=y",
    )
    add(
        "memory hotplug",
        os.path.isdir("/sys/devices/system/memory"),
        "/sys/devices/system/memory",
        "blocks, stress",
        "a kernel with CONFIG_MEMORY_HOTPLUG=y",
    )
    for tool, package, purpose in (
        ("qemu-system-x86_64", "qemu-system-x86", "the test bed, make demo"),
        ("crash", "crash", "tests (kmem -n comparison)"),
        ("makedumpfile", "makedumpfile", "benchmarks"),
    ):
        where = shutil.which(tool)
        add(tool, where is not None, where or "not found", purpose, f"apt-get install {package}")
    return result


def _ftrace_can_hook(function: str) -> bool:
    """Is function in available_filter_functions (what fentry and reliable kprobes need)?"""
    from .trace.session import TraceError, traceable_functions

    try:
        return function in traceable_functions()
    except TraceError:
        return False
