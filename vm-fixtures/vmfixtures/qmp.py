"""The test bed's QMP connection: kmeminspect's client (``kmeminspect.qmp``, over the QEMU project's
``qemu.qmp``) with the test bed's conventions, and the Unix-socket helper the gdbstub shares. Not a QMP
client of its own: the protocol is spoken in one place."""

from __future__ import annotations

import socket
import time
from typing import Any

from kmeminspect.qmp import QMP as Client
from kmeminspect.qmp import QMPError

__all__ = ["QMP", "QMPError", "connect_unix"]


def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect to a Unix socket QEMU is about to create, retrying until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class QMP:
    """The machine's QMP socket, connected as soon as QEMU creates it; commands have no answer limit (a
    large ``dump-guest-memory`` takes minutes) and an event waited for by name must come."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.client = Client(connect_unix(path, timeout), timeout, command_timeout=None)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its result (``QMPError`` when QEMU refuses it)."""
        return self.client.execute(command, **arguments)

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the event ``name`` (or take it from those already seen); ``TimeoutError`` if none comes."""
        event = self.client.wait_event(lambda e: e.get("event") == name, timeout)
        if event is None:
            raise TimeoutError(f"no {name} event within {timeout:g} s")
        return event

    def close(self) -> None:
        self.client.close()
