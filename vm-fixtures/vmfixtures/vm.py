"""Launch a test guest under QEMU/TCG and control it: QMP for the machine, a virtio-serial line
protocol (``guest/agent``) for commands inside it."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .cache import log
from .download import Kernel
from .initramfs import build_initramfs
from .qmp import QMP


class GuestError(RuntimeError):
    """The guest died, timed out, or a command in it failed."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """``-m BOOT,slots=N,maxmem=M`` (MiB)."""

    boot_mb: int = 1024
    slots: int = 4
    maxmem_mb: int = 8192


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class Guest:
    """One QEMU guest running the busybox initramfs of ``kernel``.

    Use as a context manager; the guest is killed on exit.
    """

    def __init__(
        self,
        kernel: Kernel,
        cmdline: list[str] | None = None,
        qemu_args: list[str] | None = None,
        memory: Memory = Memory(),
        workdir: Path | None = None,
        smp: int = 1,
        gdb: bool = False,
    ) -> None:
        self.kernel = kernel
        self.cmdline = ["console=ttyS0", "panic=-1", "rdinit=/init", "loglevel=6"] + (cmdline or [])
        self.qemu_args = qemu_args or []
        self.memory = memory
        self.smp = smp
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kmi-guest."))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = self.workdir / "qmp.sock"
        # QEMU's QMP serves one client per socket: a second one is left for tools (drgn --qemu)
        self.tools_qmp_path = self.workdir / "qmp-tools.sock"
        self.ctl_path = self.workdir / "ctl.sock"
        self.console_path = self.workdir / "console.log"
        # with gdb, QEMU starts frozen (-S) with a gdbstub: the caller stops the boot where it wants
        # (gdbstub.py), then lets it go on
        self.gdb_path = self.workdir / "gdb.sock" if gdb else None
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self._ctl: socket.socket | None = None
        self._ctl_buffer = b""
        self._next_id = 1
        self._launched = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def initrd(self) -> Path:
        """The initramfs QEMU boots (``-initrd``); ``rootfs.RootfsGuest`` boots its own."""
        return build_initramfs(self.kernel)

    def qemu_command(self) -> list[str]:
        m = self.memory
        return [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-machine", "pc",
            "-smp", str(self.smp),
            "-m", f"{m.boot_mb}M,slots={m.slots},maxmem={m.maxmem_mb}M",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.initrd()),
            "-append", " ".join(self.cmdline),
            "-display", "none",
            "-vga", "none",
            "-nodefaults",
            "-no-reboot",
            "-serial", f"file:{self.console_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.tools_qmp_path},server=on,wait=off",
            "-device", "vmcoreinfo",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=ctl,name=kmi.ctl",
            *self.qemu_args,
            *self._gdb_args(),
        ]  # fmt: skip

    def _gdb_args(self) -> list[str]:
        if self.gdb_path is None:
            return []
        return ["-S", "-chardev", f"socket,id=gdb,path={self.gdb_path},server=on,wait=off", "-gdb", "chardev:gdb"]

    def launch(self) -> Guest:
        """Start QEMU and connect QMP and the control channel, without waiting for the guest."""
        if not shutil.which("qemu-system-x86_64"):
            raise GuestError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        for path in (self.qmp_path, self.tools_qmp_path, self.ctl_path, self.gdb_path):
            if path is not None:
                path.unlink(missing_ok=True)
        self._launched = time.monotonic()
        self.process = subprocess.Popen(
            self.qemu_command(),
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        self.qmp = QMP(str(self.qmp_path))
        deadline = time.monotonic() + 10
        while True:
            try:
                self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._ctl.connect(str(self.ctl_path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to {self.ctl_path}") from None
                time.sleep(0.05)
        return self

    def wait_for_agent(self, timeout: float = 180.0) -> Guest:
        """Wait until the guest's control agent answers (the guest has booted)."""
        self.run("true", timeout=timeout)
        log(f"guest {self.kernel.release} up in {time.monotonic() - self._launched:.1f}s ({self.workdir})")
        return self

    def start(self, timeout: float = 180.0) -> Guest:
        return self.launch().wait_for_agent(timeout)

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def console(self, tail: int = 40) -> str:
        try:
            lines = self.console_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    # -- commands in the guest ---------------------------------------------------------------------
    def _send(self, mode: str, script: str) -> int:
        assert self._ctl is not None
        request_id = self._next_id
        self._next_id += 1
        payload = base64.b64encode(script.encode()).decode()
        self._ctl.sendall(f"{request_id} {mode} {payload}\n".encode())
        return request_id

    def _receive(self, request_id: int, timeout: float) -> list[bytes]:
        assert self._ctl is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._ctl_buffer:
                line, self._ctl_buffer = self._ctl_buffer.split(b"\n", 1)
                fields = line.split(b" ")
                if fields and fields[0] == str(request_id).encode():
                    return fields[1:]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"guest command timed out after {timeout:.0f}s\n{self.console()}")
            if self.process is not None and self.process.poll() is not None:
                raise GuestError(f"QEMU exited ({self.process.returncode})\n{self.console()}")
            self._ctl.settimeout(min(remaining, 1.0))
            try:
                chunk = self._ctl.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"control channel closed\n{self.console()}")
            self._ctl_buffer += chunk

    def run(self, script: str, timeout: float = 120.0, check: bool = True) -> Result:
        """Run a shell script in the guest and return its exit status, stdout and stderr."""
        fields = self._receive(self._send("fg", script), timeout)
        rc = int(fields[0])
        out = base64.b64decode(fields[1][1:]) if len(fields) > 1 else b""
        err = base64.b64decode(fields[2][1:]) if len(fields) > 2 else b""
        result = Result(rc, out, err)
        if check and rc != 0:
            raise GuestError(
                f"guest command failed ({rc}): {script.strip()[:200]}\nstdout: {out.decode(errors='replace')[-2000:]}"
                f"\nstderr: {err.decode(errors='replace')[-2000:]}"
            )
        return result

    def run_background(self, script: str) -> int:
        """Start a script in the background in the guest; return its pid (output in /tmp/bg.ID.out)."""
        fields = self._receive(self._send("bg", script), 30)
        return int(base64.b64decode(fields[1][1:]))

    # -- machine -----------------------------------------------------------------------------------
    def execute(self, command: str, **arguments: Any) -> Any:
        assert self.qmp is not None
        return self.qmp.execute(command, **arguments)

    def dump(self, path: Path, fmt: str = "elf") -> Path:
        """Write a vmcore of the guest (``elf`` or ``kdump-zlib``, QEMU's flattened kdump format)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        self.execute("dump-guest-memory", paging=False, protocol=f"file:{tmp}", format=fmt)
        os.replace(tmp, path)
        return path
