"""A small QMP (QEMU Machine Protocol) client: commands in, results out, events kept."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QMPError(RuntimeError):
    """QEMU answered a command with an error."""


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
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.sock = connect_unix(path, timeout)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"{path}: not a QMP socket")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QMPError("QEMU closed the QMP connection")
        data: dict[str, Any] = json.loads(line)
        return data

    def execute(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run a command and return its result; events seen meanwhile are appended to ``events``."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.settimeout(timeout)
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for an event (or take it from those already seen)."""
        for i, event in enumerate(self.events):
            if event["event"] == name:
                return self.events.pop(i)
        self.sock.settimeout(timeout)
        while True:
            reply = self._read()
            if reply.get("event") == name:
                return reply
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
