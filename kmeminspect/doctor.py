"""What works on this machine and what is missing, with the command that fixes each missing piece."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    needed_for: str
    fix: str | None


def _debug_info(release: str) -> Path | None:
    for path in (
        f"/usr/lib/debug/boot/vmlinux-{release}",
        f"/usr/lib/debug/lib/modules/{release}/vmlinux",
        f"/lib/modules/{release}/build/vmlinux",
        f"/boot/vmlinux-{release}",
    ):
        if Path(path).is_file():
            return Path(path)
    return None


def _system_python_has(module: str) -> bool:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if not python:
        return False
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def checks() -> list[Check]:
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
    vmlinux = _debug_info(release)
    add(
        "debug info",
        vmlinux is not None,
        str(vmlinux) if vmlinux else f"none for {release}",
        "--live",
        f"apt-get install linux-image-{release}-dbg (or pass --vmlinux)",
    )
    try:
        import drgn

        add("drgn", True, drgn.__version__, "everything", None)
    except ImportError:
        add("drgn", False, "not importable", "everything", "python3 -m pip install drgn")
    add(
        "bcc",
        _system_python_has("bcc"),
        "python3-bpfcc",
        "trace",
        "apt-get install python3-bpfcc bpfcc-tools linux-headers-$(uname -r)",
    )
    add(
        "BTF",
        os.path.exists("/sys/kernel/btf/vmlinux"),
        "/sys/kernel/btf/vmlinux",
        "trace (fentry)",
        "a kernel with CONFIG_DEBUG_INFO_BTF=y",
    )
    tracefs = next(
        (p for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing") if os.path.exists(f"{p}/kprobe_events")), None
    )
    add(
        "kprobes",
        tracefs is not None,
        tracefs or "no kprobe_events",
        "trace",
        "mount -t tracefs tracefs /sys/kernel/tracing",
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
        found = shutil.which(tool)
        add(tool, found is not None, found or "not found", purpose, f"apt-get install {package}")
    return result
