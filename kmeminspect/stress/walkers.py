"""The pfn walkers of a live run: child processes (``kmeminspect.walkers``) that read ``/proc/kpageflags``
and ``page_idle/bitmap`` or trigger compaction over the cycled blocks while they change."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import walkers as walkers_mod
from ..errors import UsageError

#: seconds a walker gets to print its counters after SIGTERM
WALKER_GRACE = 10.0


@dataclasses.dataclass
class WalkerRun:
    """One walker process of a run and, once stopped, its counters (or a note on why there are none)."""

    kind: str
    process: subprocess.Popen[str] | None  # None when unavailable on this kernel
    note: str | None = None
    result: dict[str, Any] | None = None


def parse_walkers(text: str) -> list[str]:
    """``kpageflags,compact`` -> the kinds; ``all`` -> every kind."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["all"]:
        return list(walkers_mod.KINDS)
    unknown = [k for k in kinds if k not in walkers_mod.KINDS]
    if unknown:
        raise UsageError(f"--walkers: unknown {', '.join(unknown)} (choose from {', '.join(walkers_mod.KINDS)}, all)")
    return list(dict.fromkeys(kinds))


def available_walkers(kinds: list[str]) -> dict[str, str | None]:
    """kind -> None when it can run here, else why not (a file the kernel lacks)."""
    return {
        kind: None if walkers_mod.WALKER_FILES[kind].exists() else f"{walkers_mod.WALKER_FILES[kind]} absent"
        for kind in kinds
    }


def start_walkers(kinds: list[str], ranges: list[tuple[int, int]]) -> list[WalkerRun]:
    """Start each walker as a child process (kmeminspect.walkers) over the blocks' pfn ranges."""
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding kmeminspect/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    spec = ",".join(f"{a}-{b}" for a, b in ranges)
    runs = []
    for kind, missing in available_walkers(kinds).items():
        if missing:
            runs.append(WalkerRun(kind, None, note=f"not run: {missing}"))
            continue
        command = [sys.executable, "-m", "kmeminspect.walkers", kind, str(os.getpid()), spec]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        runs.append(WalkerRun(kind, process))
    return runs


def stop_walkers(runs: list[WalkerRun]) -> None:
    """SIGTERM each walker and collect its counters; SIGKILL one that does not answer in time."""
    for run in runs:
        if run.process is not None and run.process.poll() is None:
            run.process.terminate()
    for run in runs:
        if run.process is None:
            continue
        try:
            out, _ = run.process.communicate(timeout=WALKER_GRACE)
        except subprocess.TimeoutExpired:
            run.process.kill()
            out, _ = run.process.communicate()
            run.note = f"killed: no answer {WALKER_GRACE:.0f} s after SIGTERM"
        if out.strip():
            run.result = json.loads(out.strip().splitlines()[-1])
        elif run.note is None:
            run.note = f"exited with status {run.process.returncode} without counters"
