"""Open the kernel to inspect: the running kernel, a vmcore, or a live QEMU guest (QMP).

Every failure becomes a :class:`TargetError` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
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


def _load_debug_info(prog: drgn.Program, vmlinux: Path, what: str) -> None:
    """Load the kernel's DWARF from ``vmlinux``; fail with the expected build id when it is the wrong one."""
    if not vmlinux.is_file():
        raise TargetError(f"--vmlinux {vmlinux}: no such file")
    try:
        # drgn checks the build id: a vmlinux of another build is ignored, not loaded
        prog.load_debug_info([str(vmlinux)], default=False, main=True)
    except drgn.MissingDebugInfoError:
        pass
    main = _main_module(prog, what)
    if main.wants_debug_file():
        want = f" (build id {main.build_id.hex()})" if main.build_id else ""
        raise TargetError(f"--vmlinux {vmlinux} does not match {what}{want}: pass that exact build's vmlinux")


def _main_module(prog: drgn.Program, what: str) -> drgn.MainModule:
    try:
        return prog.main_module()
    except LookupError:
        raise TargetError(f"{what}: cannot find the kernel image in it (no vmcoreinfo?)") from None


#: where types_mode() keeps its answer in a Program's cache
_MODE_KEY = "kmeminspect.types"


def types_mode(prog: drgn.Program) -> str:
    """Where ``prog`` finds the kernel's types: ``dwarf`` (a vmlinux with debug info) or ``btf`` (the
    kernel's own BTF, kallsyms and VMCOREINFO)."""
    return str(prog.cache.get(_MODE_KEY, "dwarf"))


def _load_types(prog: drgn.Program, vmlinux: Path | None, btf: Path | None, what: str) -> None:
    """Give ``prog`` the kernel's types: from ``vmlinux`` when given; else from ``btf`` when given; else from
    the debug info drgn finds by itself (the distro's -dbg package, debuginfod); else from the kernel's own
    BTF (docs/btf.md)."""
    if vmlinux is not None:
        _load_debug_info(prog, vmlinux, what)
        prog.cache[_MODE_KEY] = "dwarf"
        return
    if btf is None:
        drgn_log = logging.getLogger("drgn")
        level = drgn_log.level
        drgn_log.setLevel(logging.ERROR)  # drgn's "missing debugging symbols" is expected: BTF follows
        try:
            prog.load_default_debug_info()
        except drgn.MissingDebugInfoError:
            pass
        finally:
            drgn_log.setLevel(level)
        if not _main_module(prog, what).wants_debug_file():
            prog.cache[_MODE_KEY] = "dwarf"
            return
    _load_btf(prog, btf, what)
    prog.cache[_MODE_KEY] = "btf"


def _load_btf(prog: drgn.Program, btf_file: Path | None, what: str) -> None:
    from .kernel.btf import Btf, BtfError, btf_from_elf
    from .kernel.btf_types import btf_in_memory, load_kallsyms, use_btf

    install = f"install linux-image-{_release(prog)}-dbg (Debian) or pass --vmlinux"
    load_kallsyms(prog)
    if btf_file is not None:
        try:
            with open(btf_file, "rb") as f:
                magic = f.read(4)
                if magic == b"\x7fELF":
                    data = btf_from_elf(f)
                elif magic[:2] == b"\x9f\xeb":  # BTF_MAGIC 0xeB9F, little-endian
                    data = magic + f.read()
                else:
                    raise TargetError(
                        f"--btf {btf_file}: neither BTF nor an ELF file: give a copy of the kernel's "
                        "/sys/kernel/btf/vmlinux, or its vmlinux"
                    )
        except OSError as error:
            raise TargetError(
                f"--btf {btf_file}: {error.strerror or error}: give a file with the kernel's BTF (a copy of its "
                "/sys/kernel/btf/vmlinux, or its vmlinux)"
            ) from None
        if data is None:
            raise TargetError(
                f"--btf {btf_file}: an ELF file without a .BTF section (built without CONFIG_DEBUG_INFO_BTF?): "
                "give the kernel's vmlinux, or a copy of its /sys/kernel/btf/vmlinux"
            )
        where = f"--btf {btf_file}"
    elif prog.flags & drgn.ProgramFlags.IS_LOCAL:
        try:
            data = Path(LIVE_BTF).read_bytes()
        except OSError:
            raise TargetError(
                f"no debug info for {what} and no {LIVE_BTF} (CONFIG_DEBUG_INFO_BTF=n): {install}"
            ) from None
        where = LIVE_BTF
    else:
        try:
            data = btf_in_memory(prog)
        except LookupError:
            raise TargetError(
                f"no debug info for {what} and no BTF in it (CONFIG_DEBUG_INFO_BTF=n): {install}"
            ) from None
        except drgn.FaultError:
            raise TargetError(
                f"no debug info for {what}, and the dump lacks the pages of its BTF (filtered out): {install}"
            ) from None
        where = "the kernel's memory"
    try:
        use_btf(prog, Btf(data))
    except BtfError as error:
        raise TargetError(f"{where}: not BTF kmeminspect can read ({error}): {install}") from None


def attach_kernel_btf(prog: drgn.Program) -> None:
    """Give a Program without the kernel's debug info (a drgn session's) the kernel's own BTF and kallsyms;
    TargetError when it has none, or when its finders are already taken."""
    try:
        _load_btf(prog, None, "the kernel")
    except ValueError:  # a finder of that name is registered: the session set up its own
        raise TargetError(
            "no debug info for the kernel, and its kallsyms/btf finders are taken: start drgn with -s VMLINUX"
        ) from None
    except TargetError as error:
        raise TargetError(f"{error} (in drgn: start it with -s VMLINUX)") from None
    prog.cache[_MODE_KEY] = "btf"


#: the running kernel's BTF (CONFIG_DEBUG_INFO_BTF)
LIVE_BTF = "/sys/kernel/btf/vmlinux"


def live_types(vmlinux: Path | None, btf: Path | None) -> tuple[str, str, list[str]]:
    """How ``--live`` finds the running kernel's types, found by opening it as every command does:
    ``("dwarf", the debug file drgn loaded, ...)`` or ``("btf", where the BTF comes from, ...)``, and the
    debug info finders drgn tried (``standard``, and ``debuginfod`` where drgn has it); TargetError when
    neither works (``doctor``)."""
    prog = open_live(vmlinux, btf)
    finders = list(prog.enabled_debug_info_finders())
    if types_mode(prog) == "dwarf":
        return "dwarf", str(prog.main_module().debug_file_path), finders
    return "btf", f"{btf or LIVE_BTF}, symbols from /proc/kallsyms", finders


def _release(prog: drgn.Program) -> str:
    try:
        text = prog["VMCOREINFO"].string_()
    except (KeyError, LookupError, drgn.FaultError):
        return "unknown"
    for line in text.splitlines():
        if line.startswith(b"OSRELEASE="):
            return str(line.split(b"=", 1)[1].decode())
    return "unknown"


def open_vmcore(
    path: Path, vmlinux: Path | None, vmcoreinfo: Path | None = None, btf: Path | None = None
) -> drgn.Program:
    """Open a vmcore; ``vmcoreinfo`` overrides the dump's own note (dumps taken during early boot,
    before the kernel published it, have none). Types: see :func:`_load_types`."""
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
    _load_types(prog, vmlinux, btf, f"the kernel in {path}")
    return prog


def open_live(vmlinux: Path | None, btf: Path | None = None) -> drgn.Program:
    """The running kernel through /proc/kcore (root, x86_64), with its types (see :func:`_load_types`)."""
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
    _load_types(prog, vmlinux, btf, f"the running kernel ({platform.release()})")
    return prog


def open_qemu(address: str, vmlinux: Path | None, btf: Path | None = None) -> drgn.Program:
    """A live QEMU guest through its QMP socket (a path, or HOST:PORT), with the guest kernel's types (see
    :func:`_load_types`)."""
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
    _load_types(prog, vmlinux, btf, f"the guest behind {address}")
    return prog


def open_target(
    kind: str, location: str | None, vmlinux: str | None, vmcoreinfo: str | None = None, btf: str | None = None
) -> tuple[drgn.Program, dict[str, object]]:
    """Open a target; return the program and a description of the source for snapshots (what it is, and
    where its types came from: ``types`` is ``dwarf`` or ``btf``)."""
    vmlinux_path = Path(vmlinux) if vmlinux else None
    btf_path = Path(btf) if btf else None
    if vmcoreinfo and kind != "vmcore":
        raise TargetError("--vmcoreinfo goes with --vmcore")
    if kind == "vmcore":
        assert location is not None
        info = Path(vmcoreinfo) if vmcoreinfo else None
        prog = open_vmcore(Path(location), vmlinux_path, info, btf_path)
        source: dict[str, object] = {"kind": "vmcore", "path": location}
    elif kind == "qemu":
        assert location is not None
        prog, source = open_qemu(location, vmlinux_path, btf_path), {"kind": "qemu", "path": location}
    else:
        prog, source = open_live(vmlinux_path, btf_path), {"kind": "live", "path": "/proc/kcore"}
    return prog, dict(source, types=types_mode(prog))
