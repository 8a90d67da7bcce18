"""Driving ``kmeminspect trace`` and bcc's ``stackcount`` inside a rootfs guest, for tests and benchmarks.

The guest shares the checkout (``RootfsGuest(shares={"kmeminspect": ...})``) and nothing else: no DWARF
vmlinux is anywhere in it, so kmeminspect reads and traces with the guest kernel's own BTF and kallsyms
(docs/btf.md). Not a capture input: changing this file recaptures nothing.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from typing import Any

from .rootfs import RootfsGuest

TRACE_OUT = "/tmp/trace.jsonl"
#: our BPF programs as ``bpftool prog show`` names them (cut at 15 characters)
OUR_PROGRAMS = re.compile(r"\bname (kmi_\w*|kretfunc__\w*|tracepoint__raw\w*)")
#: one full read of /proc/kpageflags, timed inside the guest: prints seconds and bytes
WALK = (
    "python3 -c 'import os, time\n"
    'fd = os.open("/proc/kpageflags", os.O_RDONLY); n = 0; t = time.monotonic()\n'
    "while (c := os.read(fd, 65536)): n += len(c)\n"
    "print(time.monotonic() - t, n)'"
)


class GuestTracer:
    """``kmeminspect trace -o TRACE_OUT ARGS`` running in the background in ``guest``."""

    def __init__(self, guest: RootfsGuest) -> None:
        self.guest = guest
        self.pid = 0

    def start(self, *args: str, timeout: float = 300.0) -> None:
        """Start the tracer and wait until its probes are attached (it says "tracing" on stderr)."""
        quoted = " ".join(map(shlex.quote, args))
        command = f"kmeminspect --live trace -o {TRACE_OUT} {quoted}"
        self.guest.run(f"rm -f {TRACE_OUT}; ({command} > /tmp/trace.out 2> /tmp/trace.err & echo $! > /tmp/trace.pid)")
        self.pid = int(self.guest.run("cat /tmp/trace.pid").text)
        deadline = time.monotonic() + timeout
        while "tracing" not in self.guest.run("cat /tmp/trace.err").text:
            if self.guest.run(f"kill -0 {self.pid}", check=False).returncode != 0:
                raise RuntimeError("trace exited early: " + self.guest.run("cat /tmp/trace.err").text)
            if time.monotonic() > deadline:
                raise RuntimeError("trace did not start in time")
            time.sleep(0.5)

    def stop(self, signal: str = "INT") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Signal the tracer and wait for it to exit; return its summary and its events."""
        wait = f"kill -{signal} {self.pid}; while kill -0 {self.pid} 2>/dev/null; do sleep 0.2; done"
        self.guest.run(wait, timeout=300)
        records = [json.loads(line) for line in self.guest.run(f"cat {TRACE_OUT}").text.splitlines()]
        summaries = [r for r in records if r["type"] == "summary"]
        if not records or records[0]["type"] != "trace" or not summaries:
            raise RuntimeError("no complete trace: " + self.guest.run("cat /tmp/trace.err").text)
        return summaries[0], [r for r in records if r["type"] == "event"]


def trace_command(guest: RootfsGuest, args: list[str], command: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``kmeminspect trace -o TRACE_OUT ARGS -- sh -c COMMAND``: traced until the command ends."""
    quoted = " ".join(map(shlex.quote, [*args, "--", "sh", "-c", command]))
    trace = f"kmeminspect --live trace -o {TRACE_OUT} {quoted}"
    result = guest.run(f"{trace} > /tmp/trace.out 2> /tmp/trace.err", timeout=900, check=False)
    records = [json.loads(line) for line in guest.run(f"cat {TRACE_OUT}").text.splitlines()]
    summaries = [r for r in records if r["type"] == "summary"]
    if result.returncode not in (0, 1) or not summaries:
        raise RuntimeError(f"trace exited {result.returncode}: " + guest.run("cat /tmp/trace.err").text)
    return summaries[0], [r for r in records if r["type"] == "event"]


def attached_leftovers(guest: RootfsGuest) -> list[str]:
    """Registered kprobes on the functions the tracer probes, and loaded BPF programs of ours."""
    kprobes = guest.run("cat /sys/kernel/debug/kprobes/list", check=False).text.splitlines()
    probed = r"pfn_to_online_page|online_pages|pfn_range|mem_sections|memremap|memunmap|add_pages|subsys_o"
    return [line for line in kprobes if re.search(probed, line)] + OUR_PROGRAMS.findall(
        guest.run("bpftool prog show", check=False).text
    )


def walk(guest: RootfsGuest) -> tuple[float, int]:
    """Read /proc/kpageflags once, from pfn 0 to the end: (seconds, pfns walked)."""
    seconds, nbytes = guest.run(WALK, timeout=600).text.split()
    return float(seconds), int(nbytes) // 8


#: the benchmark's ways of watching pfn_to_online_page(): name -> kmeminspect trace arguments (None: stackcount)
TRACE_MODES: dict[str, list[str] | None] = {
    "stackcount": None,  # bcc's stackcount -K: kprobe on entry, one stack unwind per call
    "callers": ["--no-events", "--no-active"],  # the like-for-like comparison: entry probe, stacks aggregated
    "callers-exact": ["--no-events", "--no-active", "--exact-stacks"],
    "callers-split": ["--no-events", "--no-active", "--split"],  # plus the fexit (or kretprobe) on return
    "active": ["--no-events", "--no-callers"],  # the live pfn_active alone: return probe and state lookup
    "races": ["--no-events", "--no-callers", "--races"],  # plus the per-task holds (entry stacks, syscall exits)
}


def trace_overhead(guest: RootfsGuest, repeats: int = 3, modes: list[str] | None = None) -> dict[str, Any]:
    """Time a full /proc/kpageflags walk with each of TRACE_MODES attached, each next to an unprobed walk
    in the same boot; medians of ``repeats`` walks. Per mode: seconds, the unprobed baseline measured
    around it, overhead (the difference), and for every mode its overhead over stackcount's."""
    results: dict[str, Any] = {"release": guest.kernel.release, "repeats": repeats, "modes": {}}
    for mode in modes or list(TRACE_MODES):
        args = TRACE_MODES[mode]
        base_before = [walk(guest)[0] for _ in range(repeats)]
        if args is None:
            # unbuffered: its "Tracing ..." line must reach the file while it runs
            stackcount = "python3 -u /usr/sbin/stackcount-bpfcc -K pfn_to_online_page"
            guest.run(f"({stackcount} > /tmp/sc.out 2>&1 & echo $! > /tmp/sc.pid)")
            deadline = time.monotonic() + 300
            while "Tracing" not in guest.run("cat /tmp/sc.out").text:
                if time.monotonic() > deadline:
                    raise RuntimeError("stackcount did not start: " + guest.run("cat /tmp/sc.out").text)
                time.sleep(0.5)
            probed = [walk(guest) for _ in range(repeats)]
            # SIGTERM: a background job of a non-interactive shell ignores SIGINT, and so does its python
            guest.run("kill -TERM $(cat /tmp/sc.pid); while kill -0 $(cat /tmp/sc.pid) 2>/dev/null; do sleep 0.2; done")
            calls = None
        else:
            tracer = GuestTracer(guest)
            tracer.start(*args)
            probed = [walk(guest) for _ in range(repeats)]
            summary, _ = tracer.stop("INT")
            calls = summary.get("calls")
        base_after = [walk(guest)[0] for _ in range(repeats)]
        baseline = statistics.median(base_before + base_after)
        seconds = statistics.median(t for t, _ in probed)
        results["modes"][mode] = {
            "seconds": round(seconds, 4),
            "baseline": round(baseline, 4),
            "overhead": round(seconds - baseline, 4),
            "pfns": probed[0][1],
            "calls_counted": calls,
        }
    reference = results["modes"].get("stackcount", {}).get("overhead")
    if reference:
        for entry in results["modes"].values():
            entry["vs_stackcount"] = round(entry["overhead"] / reference, 3)
    return results
