"""Open the kernel to inspect: the running kernel, a vmcore, or a live QEMU guest (QMP).

Every failure becomes a :class:`TargetError` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import stat
import struct
from pathlib import Path
from typing import BinaryIO

import drgn
from drgn import Program as Program  # re-exported: the type of an open kernel, for modules without drgn

from .errors import TargetError

EM_X86_64 = 62


def drgn_version() -> str:
    """The drgn this process imports (``doctor`` checks it; importing this module fails without drgn)."""
    return drgn.__version__


X86_64 = drgn.Platform(drgn.Architecture.X86_64, drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
KDUMP_SIGNATURE = b"KDUMP   "
_NO_VMCOREINFO = (
    "{path}: no VMCOREINFO in this dump (not a Linux kernel, dumped before the kernel published it, or a QEMU "
    "guest without -device vmcoreinfo and qemu_fw_cfg): pass --vmcoreinfo FILE"
)
FLATTENED_SIGNATURE = b"makedumpfile"


@dataclasses.dataclass(frozen=True)
class ProgramHeader:
    """One ELF64 program header of a core file (p_type 1 = PT_LOAD)."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int


def elf_program_headers(f: BinaryIO) -> tuple[int, list[ProgramHeader]]:
    """The program header table offset and entries of the ELF64 file f (little-endian), or raise
    ValueError when the table is cut short."""
    f.seek(0)
    head = f.read(64)
    if len(head) < 64:
        raise ValueError("ELF header cut short")
    e_phoff = struct.unpack_from("<Q", head, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    if e_phnum and e_phentsize < 56:
        raise ValueError(f"program headers of {e_phentsize} bytes (ELF64 needs 56)")
    size = f.seek(0, os.SEEK_END)
    if e_phoff + e_phentsize * e_phnum > size:  # a seek past 2^63 would fail, and past the end reads nothing
        raise ValueError(f"program header table at {e_phoff:#x} is past the end of the file ({size} bytes)")
    f.seek(e_phoff)
    table = f.read(e_phentsize * e_phnum)
    if len(table) < e_phentsize * e_phnum:
        raise ValueError("program header table cut short")
    headers = []
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * e_phentsize)
        headers.append(ProgramHeader(p_type, p_offset, p_vaddr, p_paddr, p_filesz))
    return e_phoff, headers


def _check_vmcore_file(path: Path) -> str:
    """Return the dump's format, or raise if it is not an x86_64 vmcore that drgn can read."""
    if not path.exists():
        raise TargetError(f"{path}: no such file")
    if path.is_dir():
        raise TargetError(f"{path}: a directory, not a vmcore: give the dump file in it (kdump-tools: dump.<date>)")
    if not path.is_file():
        raise TargetError(f"{path}: not a regular file: give a vmcore file")
    if not os.access(path, os.R_OK):
        raise TargetError(f"{path}: permission denied (run as root, or make the dump readable)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(b"\x7fELF"):
            if len(head) < 64 or head[4] != 2:
                raise TargetError(f"{path}: not a 64-bit ELF vmcore")
            e_type, e_machine = struct.unpack_from("<HH", head, 16)
            if e_type != 4:  # ET_CORE
                raise TargetError(f"{path}: an ELF file but not a core dump (is it the vmlinux?)")
            if e_machine != EM_X86_64:
                raise TargetError(f"{path}: a dump of machine type {e_machine}, not x86_64 (not supported)")
            try:
                _, headers = elf_program_headers(f)
            except ValueError as error:
                raise TargetError(f"{path}: truncated ELF vmcore ({error}); copy it again") from None
            end = max((h.offset + h.filesz for h in headers), default=0)
            if end > size:
                raise TargetError(
                    f"{path}: truncated ELF vmcore ({size} bytes, its headers describe {end}); copy it again"
                )
            return "elf"
        if head.startswith(KDUMP_SIGNATURE):
            return "kdump"
        if head.startswith(FLATTENED_SIGNATURE):
            return "kdump-flattened"
    raise TargetError(f"{path}: not a vmcore (neither ELF core nor kdump-compressed)")


def _load_debug_info(prog: drgn.Program, vmlinux: Path | None, what: str) -> None:
    """Load the kernel's debug info; fail with the expected build id when it is missing or wrong."""
    if vmlinux is not None and not vmlinux.is_file():
        raise TargetError(f"--vmlinux {vmlinux}: no such file")
    try:
        if vmlinux is not None:
            # drgn checks the build id: a vmlinux of another build is ignored, not loaded
            prog.load_debug_info([str(vmlinux)], default=False, main=True)
        else:
            prog.load_default_debug_info()
    except drgn.MissingDebugInfoError:
        pass
    try:
        main = prog.main_module()
    except LookupError:
        raise TargetError(f"{what}: cannot find the kernel image in it (no vmcoreinfo?)") from None
    if not main.wants_debug_file():
        return
    want = f" (build id {main.build_id.hex()})" if main.build_id else ""
    if vmlinux is not None:
        raise TargetError(f"--vmlinux {vmlinux} does not match {what}{want}: pass that exact build's vmlinux")
    raise TargetError(
        f"no debug info for {what}, release {_release(prog)}{want}: install its -dbg package or pass --vmlinux"
    )


def _release(prog: drgn.Program) -> str:
    try:
        text = prog["VMCOREINFO"].string_()
    except (KeyError, LookupError, drgn.FaultError):
        return "unknown"
    for line in text.splitlines():
        if line.startswith(b"OSRELEASE="):
            return str(line.split(b"=", 1)[1].decode())
    return "unknown"


def open_vmcore(path: Path, vmlinux: Path | None, vmcoreinfo: Path | None = None) -> drgn.Program:
    """Open a vmcore; ``vmcoreinfo`` overrides the dump's own note (dumps taken during early boot,
    before the kernel published it, have none)."""
    fmt = _check_vmcore_file(path)
    info = None
    if vmcoreinfo is not None:
        try:
            info = vmcoreinfo.read_bytes()
        except OSError as error:
            raise TargetError(f"--vmcoreinfo {vmcoreinfo}: {error.strerror or error}") from None
        if b"OSRELEASE=" not in info:
            raise TargetError(f"--vmcoreinfo {vmcoreinfo}: not VMCOREINFO data (no OSRELEASE= line)")
    # QEMU's kdump header says machine "Unknown", so libkdumpfile cannot tell the architecture: the file
    # checks above established x86_64 for ELF; kdump dumps are opened as x86_64 too (the only one supported).
    if fmt != "elf" or info is not None:
        try:
            prog = drgn.Program(X86_64, vmcoreinfo=info)
        except Exception as error:  # noqa: BLE001 - drgn's parse errors have no common class
            raise TargetError(
                f"--vmcoreinfo {vmcoreinfo}: not valid VMCOREINFO ({error}); give the boot's own"
            ) from None
    else:
        prog = drgn.Program()
    try:
        prog.set_core_dump(str(path))
    except OSError as error:
        raise TargetError(f"{path}: cannot open vmcore: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - libkdumpfile raises plain Exception
        if "vmcoreinfo" in str(error).lower():
            raise TargetError(_NO_VMCOREINFO.format(path=path)) from None
        raise TargetError(f"{path}: cannot open {fmt} vmcore: {error}") from None
    if not (prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL):
        raise TargetError(_NO_VMCOREINFO.format(path=path))
    _load_debug_info(prog, vmlinux, f"the kernel in {path}")
    return prog


def open_live(vmlinux: Path | None) -> drgn.Program:
    """The running kernel through /proc/kcore (root, x86_64), with its debug info (``vmlinux`` or the distro's)."""
    if platform.machine() != "x86_64":
        raise TargetError(f"this machine is {platform.machine()}: kmeminspect reads x86_64 kernels only")
    if os.geteuid() != 0:
        raise TargetError("reading the running kernel needs root (/proc/kcore): run with sudo")
    if not os.path.exists("/proc/kcore"):
        raise TargetError("/proc/kcore is missing (CONFIG_PROC_KCORE=n): use --vmcore or --qemu instead")
    prog = drgn.Program()
    try:
        prog.set_kernel()
    except OSError as error:
        raise TargetError(f"cannot open /proc/kcore: {error.strerror or error}") from None
    _load_debug_info(prog, vmlinux, f"the running kernel ({platform.release()})")
    return prog


def open_qemu(address: str, vmlinux: Path | None) -> drgn.Program:
    """A live QEMU guest through its QMP socket (a path, or HOST:PORT), with the guest kernel's debug info."""
    if ":" not in address:
        path = Path(address)
        if not path.exists():
            raise TargetError(
                f"--qemu {address}: no such socket (start QEMU with -qmp unix:{address},server=on,wait=off)"
            )
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise TargetError(f"--qemu {address}: not a socket")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(address)
                greeting = s.recv(4096)
        except TimeoutError:
            raise TargetError(
                f"--qemu {address}: no QMP greeting within 5 s (QEMU serves one client per QMP socket: "
                "is another attached? give QEMU a second -qmp socket)"
            ) from None
        except OSError as error:
            raise TargetError(f"--qemu {address}: cannot connect: {error.strerror or error}") from None
        if b'"QMP"' not in greeting:
            raise TargetError(f"--qemu {address}: not a QEMU QMP socket")
    prog = drgn.Program()
    try:
        prog.set_qemu_qmp(address)
    except (OSError, ValueError) as error:
        raise TargetError(f"--qemu {address}: cannot attach: {error}") from None
    _load_debug_info(prog, vmlinux, f"the guest behind {address}")
    return prog


def open_target(
    kind: str, location: str | None, vmlinux: str | None, vmcoreinfo: str | None = None
) -> tuple[drgn.Program, dict[str, object]]:
    """Open a target; return the program and a description of the source for snapshots."""
    vmlinux_path = Path(vmlinux) if vmlinux else None
    if vmcoreinfo and kind != "vmcore":
        raise TargetError("--vmcoreinfo goes with --vmcore")
    if kind == "vmcore":
        assert location is not None
        info = Path(vmcoreinfo) if vmcoreinfo else None
        return open_vmcore(Path(location), vmlinux_path, info), {"kind": "vmcore", "path": location}
    if kind == "qemu":
        assert location is not None
        return open_qemu(location, vmlinux_path), {"kind": "qemu", "path": location}
    return open_live(vmlinux_path), {"kind": "live", "path": "/proc/kcore"}
