"""kmeminspect's one QMP (QEMU Machine Protocol) client: the QEMU project's ``qemu.qmp`` behind a small
synchronous adapter, used by ``stress --qemu`` and by the test bed (vm-fixtures).

``qemu.qmp`` is asyncio; the callers are synchronous and rely on signals (``stress`` turns SIGINT, SIGTERM
and its per-operation SIGALRM into exceptions that abort whatever is waiting). So the client's event loop
runs in a thread of its own and the caller waits on the result in the main thread, where a signal
handler's exception interrupts the wait cleanly; the command it abandoned is cancelled, and its answer,
should QEMU still send one, is dropped by its id. QEMU serves one client per QMP socket: close this one
before drgn attaches to the same socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient
from qemu.qmp import QMPError as LibraryError

from .errors import TargetError

T = TypeVar("T")
#: how long close() waits for the library to hang up
CLOSE_TIMEOUT = 5.0
#: command ids unique in this process and, with the pid, across processes: QEMU can deliver the answer to a
#: command of a connection closed meanwhile (a run interrupted mid-command) on the next connection
_TAGS = itertools.count(1)

# the library logs a hang-up as an error; kmeminspect reports its own errors in one line
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())


class QMPError(Exception):
    """QEMU refused a command: ``error_class`` (GenericError, DeviceNotFound, ...) and its description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QMP:
    """One QMP connection: ``execute`` a command and get its result; events are kept until
    :meth:`wait_event` asks for them.

    :param address: the QMP socket's path, or a socket already connected to it.
    :param timeout: seconds to connect and to get QEMU's greeting.
    :param command_timeout: seconds an answer may take (None: no limit; ``TimeoutError`` after it).
    """

    def __init__(
        self, address: str | socket.socket, timeout: float = 10.0, command_timeout: float | None = 60.0
    ) -> None:
        self.path = address if isinstance(address, str) else str(address.getpeername())
        self.command_timeout = command_timeout
        self.events: list[dict[str, Any]] = []  # received, not yet asked for
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp {self.path}", daemon=True)
        self._thread.start()
        self._client = QMPClient(self.path)
        self._listener = EventListener()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._client.register_listener(self._listener)
        try:
            sock = address if isinstance(address, socket.socket) else self._connect_socket(address, timeout)
            try:
                self._call(self._client.connect(sock), timeout)
            except TimeoutError:
                raise TargetError(f"--qemu {self.path}: no QMP greeting (is another client attached?)") from None
            except ConnectError as error:
                if isinstance(error.exc, (EOFError, ConnectionError)):
                    raise TargetError(f"--qemu {self.path}: QEMU closed the connection (did the guest exit?)") from None
                raise TargetError(f"--qemu {self.path}: not a QEMU QMP socket") from None
        except BaseException:
            self.close()
            raise
        self._pump = self._call(self._start_forwarding(), timeout)

    def _connect_socket(self, path: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as error:
            sock.close()
            raise TargetError(f"--qemu {path}: cannot connect: {error.strerror or error}") from None
        return sock

    async def _start_forwarding(self) -> asyncio.Task[None]:
        """Hand every event to the caller's thread (a thread-safe queue) as it arrives."""

        async def forward() -> None:
            async for event in self._listener:
                self._queue.put(dict(event))

        return asyncio.ensure_future(forward())

    async def _shutdown(self) -> None:
        try:
            await self._client.disconnect()
        except Exception:  # noqa: BLE001 - disconnect re-raises what ended the connection; it is closed either way
            pass
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coroutine`` on the client's loop and wait for it here; an exception (a timeout, or one a
        signal handler raises) cancels it."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its result, or raise :class:`QMPError`; events seen meanwhile are kept."""
        message: dict[str, Any] = {"execute": command, "id": f"kmi-{os.getpid()}-{next(_TAGS)}"}
        if arguments:
            message["arguments"] = arguments
        try:
            return self._call(self._client.execute_msg(Message(message)), self.command_timeout)
        except ExecuteError as error:
            raise QMPError(command, error.error_class, error.error.error.desc) from None
        except LibraryError as error:  # a hang-up (the reader saw EOF), or a command after one
            raise TargetError(f"--qemu {self.path}: QEMU closed the connection (did the guest exit?)") from error

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first event (kept, or arriving within ``timeout`` s) that ``match`` accepts, else None."""
        for i, event in enumerate(self.events):
            if match(event):
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if match(event):
                return event
            self.events.append(event)
        return None

    def close(self) -> None:
        """Hang up and stop the client's thread; never raises (a connection QEMU dropped is closed too)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TimeoutError):
            self._call(self._shutdown(), CLOSE_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
