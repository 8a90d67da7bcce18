"""Stop a guest at a kernel function during boot: a small client of QEMU's gdbstub (the GDB remote
serial protocol), and drgn on the kernel's debug info reading guest memory through it.

Some states exist only during boot, before the control agent (or any user space) runs: deferred
struct page init, for one. A guest started with ``Guest(gdb=True)`` waits frozen (``-S``); a breakpoint
on a kernel function's entry (a virtual address: the kernel must boot with ``nokaslr``) stops it there.
Under TCG, QEMU checks breakpoints as it translates guest code, so the stop is exact. While stopped
("debug" run state) QMP still works: ``dump-guest-memory`` dumps the stopped guest and leaves it stopped.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import TracebackType

import drgn

from .qmp import connect_unix

#: offset of rip in the reply to 'g' (x86_64: 16 general-purpose registers of 8 bytes come first)
RIP_OFFSET = 16 * 8
#: GDB's x86_64 register order: rax, rbx, rcx, rdx, rsi, rdi, ...; rdi holds a function's first argument
RDI_OFFSET = 5 * 8
#: the kernel half of the x86_64 address space, where drgn reads go through the gdbstub
KERNEL_HALF = 0xFFFF800000000000
#: bytes per 'm' request (QEMU's gdbstub packets hold 4096 characters, two per byte)
READ_CHUNK = 1024


class GdbError(RuntimeError):
    """The gdbstub refused a request, or the guest did not stop in time."""


def _checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


class GdbStub:
    """A connection to QEMU's gdbstub on a Unix socket (``Guest.gdb_path``)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = connect_unix(str(path), timeout)
        self.buffer = b""

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- packets -----------------------------------------------------------------------------------
    def _send(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$" + data + b"#" + _checksum(data))

    def _receive(self, timeout: float) -> str:
        """The next packet's payload (acknowledged); '+' acks and stray bytes before '$' are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            start = self.buffer.find(b"$")
            end = self.buffer.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buffer) >= end + 3:
                payload = self.buffer[start + 1 : end]
                if self.buffer[end + 1 : end + 3].lower() != _checksum(payload):
                    raise GdbError(f"bad checksum on packet {payload[:80]!r}")
                self.buffer = self.buffer[end + 3 :]
                self.sock.sendall(b"+")
                return payload.decode()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GdbError(f"no answer from the gdbstub within {timeout:.0f}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GdbError("the gdbstub closed the connection (QEMU exited?)")
            self.buffer += chunk

    def request(self, payload: str, timeout: float = 30.0) -> str:
        self._send(payload)
        reply = self._receive(timeout)
        if reply.startswith("E") and len(reply) == 3:
            raise GdbError(f"gdbstub: {payload[:40]} failed ({reply})")
        return reply

    # -- commands ----------------------------------------------------------------------------------
    def set_breakpoint(self, address: int) -> None:
        reply = self.request(f"Z0,{address:x},1")
        if reply != "OK":
            raise GdbError(f"cannot set a breakpoint at {address:#x} ({reply!r})")

    def halt_reason(self) -> str:
        """Ask why the guest is stopped ('?'): what a debugger does first on attaching to a running guest,
        which QEMU stops. A stop QEMU reports on its own as the guest halts is drained with it."""
        reply = self.request("?")
        try:
            while True:
                reply = self._receive(timeout=1.0)
        except GdbError:
            return reply

    def remove_breakpoint(self, address: int) -> None:
        self.request(f"z0,{address:x},1")

    def run_until_stop(self, timeout: float) -> str:
        """Resume the guest (also out of ``-S``) and wait for it to stop; return the stop reply."""
        self._send("c")
        reply = self._receive(timeout)
        if not reply.startswith(("T", "S")):
            raise GdbError(f"the guest did not stop at a breakpoint: {reply!r}")
        return reply

    def pc(self) -> int:
        registers = bytes.fromhex(self.request("g"))
        return int.from_bytes(registers[RIP_OFFSET : RIP_OFFSET + 8], "little")

    def first_argument(self) -> int:
        """rdi: at a function's entry, its first argument (System V x86_64 calling convention)."""
        registers = bytes.fromhex(self.request("g"))
        return int.from_bytes(registers[RDI_OFFSET : RDI_OFFSET + 8], "little")

    def stop_at(self, address: int, hits: int, timeout: float) -> int:
        """Run until the ``hits``-th time the guest reaches ``address``, then leave it stopped there; return
        the thread (vCPU, 1-based) that reached it."""
        self.set_breakpoint(address)
        thread = 1
        for _ in range(hits):
            reply = self.run_until_stop(timeout=timeout)
            match = re.search(r"thread:(?:p[0-9a-f]+\.)?([0-9a-f]+);", reply)
            thread = int(match.group(1), 16) if match else 1
            self.request(f"Hg{thread:x}")  # read that vCPU's registers
            pc = self.pc()
            if pc != address:
                raise GdbError(f"the guest stopped at {pc:#x}, not at {address:#x}")
        self.remove_breakpoint(address)
        return thread

    def resume_only(self, thread: int) -> None:
        """Let one vCPU run while the others stay stopped (QEMU resumes only the threads a vCont names)."""
        self._send(f"vCont;c:{thread:x}")

    def read(self, address: int, size: int) -> bytes:
        """Guest virtual memory, translated by the stopped CPU's page tables."""
        out = bytearray()
        while len(out) < size:
            n = min(READ_CHUNK, size - len(out))
            out += bytes.fromhex(self.request(f"m{address + len(out):x},{n:x}"))
        return bytes(out)

    def detach(self) -> None:
        """Let the guest run on (the gdbstub resumes it once no debugger is attached)."""
        self.request("D")


def kernel_debug_info(vmlinux: Path) -> drgn.Program:
    """drgn with the vmlinux's types and symbols at their link addresses (right under ``nokaslr``), and
    no memory: add some with :func:`read_through`."""
    platform = drgn.Platform(
        drgn.Architecture.X86_64, drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN
    )
    prog = drgn.Program(platform)
    module = prog.extra_module(str(vmlinux), 0, create=True)
    module.try_file(str(vmlinux), force=True)
    return prog


def read_through(prog: drgn.Program, stub: GdbStub) -> None:
    """Let ``prog`` read the kernel half of the address space through the stopped guest's gdbstub."""

    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        return stub.read(address, count)

    prog.add_memory_segment(KERNEL_HALF, (1 << 64) - KERNEL_HALF, read, physical=False)
