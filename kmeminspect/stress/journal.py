"""The journal of a stress run: what it may change, written before the first change, and every change as it
happens (JSON lines, each fsync'd), so a run killed by SIGKILL or a crash can be put back by
``stress --restore JOURNAL``. The format is in the package's docstring."""

from __future__ import annotations

import fcntl
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import schema
from ..errors import KmemError, UsageError
from ..files import fsync_directory
from ..schema import written_by

JOURNAL_FORMAT = "kmeminspect-stress-journal"
JOURNAL_VERSION = 1


def new_seed() -> int:
    """A seed for a run that was given none (printed, so the run can be repeated)."""
    return random.SystemRandom().randrange(1 << 31)


def default_journal_path() -> Path:
    """``/var/lib/kmeminspect/stress-<time>-<pid>.journal``, or the same name in the temporary directory
    when /var/lib is not writable (a read-only root)."""
    name = f"stress-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.journal"
    for directory in (Path("/var/lib/kmeminspect"), Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory / name
    raise KmemError("no writable directory for the journal: pass --journal PATH")


class Journal:
    """An append-only JSON-lines file, each line fsync'd before the next change (see the module docstring).
    Holds an exclusive flock while open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.error: str | None = None  # the first failure to write while restoring

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Journal:
        """A new journal holding ``header``: written to a temporary file, fsync'd, then linked to ``path`` (never
        over an existing file), so a run killed while creating it leaves a whole journal or none."""
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as error:
            raise KmemError(f"--journal {path}: cannot create: {error.strerror}; choose a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the lock is the inode's: it holds under the final name too
            journal = cls(path, fd)
            journal._write({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "written_by": written_by(), **header})
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UsageError(
                    f"--journal {path}: exists (a journal is never overwritten: choose another path)"
                ) from None
            except OSError as error:
                raise KmemError(f"--journal {path}: cannot create: {error.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        # the file's directory entry too: a journal must survive a crash right after the first change
        fsync_directory(path.parent)
        return journal

    @classmethod
    def reopen(cls, path: Path) -> Journal:
        """Open an existing journal to append restoration records; refuse while its run holds it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise KmemError(f"--restore {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_journal(path)[0].get("pid")
            raise KmemError(
                f"--restore {path}: its run (pid {pid}) is still going: stop it with kill -TERM {pid}, "
                "it puts the blocks back itself"
            ) from None
        return cls(path, fd)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
            os.fsync(self.fd)
        except OSError as error:
            raise KmemError(f"journal {self.path}: cannot write: {error.strerror}") from None

    def append(self, event: str, **fields: Any) -> None:
        """Append an event; a failure raises (no change may happen that the journal does not hold)."""
        self._write({"event": event, "time": round(time.time(), 3), **fields})

    def note(self, event: str, **fields: Any) -> None:
        """Append an event while putting blocks back: a failure to write must not stop that, so it is
        kept in ``self.error`` for the report instead."""
        try:
            self.append(event, **fields)
        except KmemError as error:
            self.error = self.error or str(error)

    def close(self) -> None:
        os.close(self.fd)


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the events of a journal, checked against the journal's schema (:mod:`..schema`); a
    last line cut short by a crash is dropped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise KmemError(f"--restore {path}: {error.strerror}") from None
    records: list[Any] = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            if number == len(lines) - 1 and number > 0:
                break  # the write a SIGKILL or crash cut short
            raise UsageError(f"--restore {path}: line {number + 1} is not JSON (not a stress journal?)") from None
    if not records or not isinstance(records[0], dict) or records[0].get("format") != JOURNAL_FORMAT:
        raise UsageError(f"--restore {path}: not a kmeminspect stress journal")
    version = records[0].get("version")
    if version != JOURNAL_VERSION:
        raise schema.newer(f"--restore {path}", "journal version", version, (JOURNAL_VERSION,), records[0])
    for number, record in enumerate(records[1:], 2):
        if not isinstance(record, dict):
            raise UsageError(f"--restore {path}: line {number} is not a journal record; the journal is damaged")
    schema.check_journal(records[0], records[1:], f"--restore {path}")
    return records[0], records[1:]
