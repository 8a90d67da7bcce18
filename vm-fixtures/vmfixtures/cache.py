"""Where the test bed keeps kernels, images and dumps: outside the clone, never in git."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_START = time.monotonic()


def cache_dir() -> Path:
    """``$KMEMINSPECT_CACHE`` or ``/var/cache/kmeminspect``, created on first use."""
    path = Path(os.environ.get("KMEMINSPECT_CACHE", "/var/cache/kmeminspect"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    """Progress for people: on stderr, with seconds since start."""
    print(f"[vm-fixtures {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` in the cache (parallel test workers share the cache)."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / (name.replace("/", "_") + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
