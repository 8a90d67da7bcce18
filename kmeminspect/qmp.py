"""A small QMP (QEMU Machine Protocol) client for ``stress`` in QEMU mode: commands in, results out, events
kept until asked for. QEMU serves one client per QMP socket: close this one before drgn attaches."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import TargetError


class QMPError(Exception):
    """QEMU refused a command: ``error_class`` (GenericError, DeviceNotFound, ...) and its description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.commands = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self.file = self.sock.makefile("rwb")
            greeting = self._read()
        except TimeoutError:
            self.sock.close()
            raise TargetError(f"--qemu {path}: no QMP greeting (is another client attached?)") from None
        except OSError as error:
            self.sock.close()
            raise TargetError(f"--qemu {path}: cannot connect: {error.strerror or error}") from None
        if "QMP" not in greeting:
            self.close()
            raise TargetError(f"--qemu {path}: not a QEMU QMP socket")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise TargetError(f"--qemu {self.path}: QEMU closed the connection (did the guest exit?)")
        data: dict[str, Any] = json.loads(line)
        return data

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its result, or raise QMPError; events seen meanwhile are kept.

        Each command carries an id and only the answer with that id is taken: QEMU can deliver the answer
        to a command of a connection that was closed meanwhile (a run interrupted mid-command) on the
        next connection.
        """
        self.commands += 1
        tag = f"kmi-{self.commands}"
        message: dict[str, Any] = {"execute": command, "id": tag}
        if arguments:
            message["arguments"] = arguments
        self.sock.settimeout(60.0)
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != tag:
                continue  # another connection's
            if "error" in reply:
                error = reply["error"]
                raise QMPError(command, str(error.get("class", "")), str(error.get("desc", "")))
            return reply.get("return")

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first event (kept, or arriving within ``timeout`` s) that ``match`` accepts, else None."""
        for i, event in enumerate(self.events):
            if match(event):
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                reply = self._read()
            except TimeoutError:
                return None
            if "event" in reply:
                if match(reply):
                    return reply
                self.events.append(reply)
        return None

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
