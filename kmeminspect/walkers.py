"""pfn walkers for ``kmeminspect stress``: child processes that make the kernel look pfns up while blocks churn.

Each walker drives a kernel path that goes through ``pfn_to_online_page()`` on pfns of the blocks under
stress, so a pfn whose memmap is going away or not yet initialized is touched at the worst moment:

``kpageflags``
    reads ``/proc/kpageflags`` over the blocks' pfns (``kpageflags_read()``: one
    ``pfn_to_online_page()`` per pfn, then the page's flags).
``compact``
    writes ``1`` to ``/proc/sys/vm/compact_memory``: every zone of every node is compacted
    (``compact_nodes()``); the migration and free scanners walk pageblocks with
    ``pfn_to_online_page()``. It moves pages, it sets nothing.
``idle``
    reads ``/sys/kernel/mm/page_idle/bitmap`` over the blocks' pfns (``page_idle_get_folio()`` calls
    ``pfn_to_online_page()``); only read, never written, so no page is marked idle. Present with
    ``CONFIG_IDLE_PAGE_TRACKING`` (Debian's kernels leave it out).

Run as ``python -m kmeminspect.walkers KIND PARENT_PID START-END[,START-END...]`` (pfns, end exclusive).
A walker ignores SIGINT (a terminal's Ctrl-C reaches the whole process group: the parent decides), dies
with its parent (``PR_SET_PDEATHSIG``: a SIGKILLed ``stress`` leaves no walker behind), and on SIGTERM
prints one JSON line of counters and exits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

KPAGEFLAGS = Path("/proc/kpageflags")
COMPACT_MEMORY = Path("/proc/sys/vm/compact_memory")
PAGE_IDLE_BITMAP = Path("/sys/kernel/mm/page_idle/bitmap")
#: what each walker needs; a walker whose file is absent is reported and not started
WALKER_FILES = {"kpageflags": KPAGEFLAGS, "compact": COMPACT_MEMORY, "idle": PAGE_IDLE_BITMAP}
KINDS = tuple(WALKER_FILES)
#: pfns per read: 64 KiB of kpageflags (8 bytes per pfn)
CHUNK_PFNS = 8192
#: page_idle/bitmap: one bit per pfn, read in 8-byte words of 64 pfns each
IDLE_PFNS_PER_WORD = 64
#: pause between compactions: a full compaction runs back to back otherwise, starving the guest
COMPACT_PAUSE = 0.2
PR_SET_PDEATHSIG = 1


class Walker:
    """One walker child of a stress run: reads (or compacts) the given pfn ranges in passes until SIGTERM."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.stop = False
        self.passes = 0
        self.pfns = 0
        self.errors: dict[str, int] = {}

    def error(self, error: OSError) -> None:
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        self.errors[name] = self.errors.get(name, 0) + 1

    def read_pfns(self, path: Path, bytes_per_pfn: float, align: int) -> None:
        """One pass over the ranges, reading ``path`` at the offsets of their pfns."""
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            for start, end in self.ranges:
                pfn = start - start % align
                while pfn < end and not self.stop:
                    count = min(CHUNK_PFNS, end - pfn)
                    count += -count % align
                    try:
                        os.pread(fd, int(count * bytes_per_pfn), int(pfn * bytes_per_pfn))
                        self.pfns += count
                    except OSError as error:
                        self.error(error)
                    pfn += count
        self.passes += 1

    def kpageflags(self) -> None:
        self.read_pfns(KPAGEFLAGS, 8, 1)

    def idle(self) -> None:
        self.read_pfns(PAGE_IDLE_BITMAP, 1 / 8, IDLE_PFNS_PER_WORD)

    def compact(self) -> None:
        try:
            with open(COMPACT_MEMORY, "w") as f:
                f.write("1")
            self.passes += 1
        except OSError as error:
            self.error(error)
        time.sleep(COMPACT_PAUSE)

    def report(self, kind: str) -> dict[str, object]:
        return {"kind": kind, "passes": self.passes, "pfns": self.pfns, "errors": self.errors}


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``0-4096,8192-12288`` -> [(0, 4096), (8192, 12288)] (pfn ranges, end exclusive)."""
    ranges = []
    for part in text.split(","):
        start, _, end = part.partition("-")
        ranges.append((int(start), int(end)))
    return ranges


def die_with_parent(parent: int) -> None:
    """Get SIGKILL when the parent dies (and exit now if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str]) -> int:
    """The walker process: ``python -m kmeminspect.walkers KIND PARENT_PID RANGES``; prints its counters as JSON."""
    kind, parent, ranges = argv[0], int(argv[1]), parse_ranges(argv[2])
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    walker = Walker(ranges)

    def stop(signum: int, frame: FrameType | None) -> None:
        walker.stop = True

    signal.signal(signal.SIGTERM, stop)
    step: Callable[[], None] = getattr(walker, kind)
    while not walker.stop:
        step()
    print(json.dumps(walker.report(kind)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
