"""A tracing session: compile bpf/*.c with bcc, attach, seed the live pfn_active, read, detach.

bcc's Python module comes from the distribution (``python3-bpfcc``), not from PyPI, so it is imported
only here, when a trace starts. Everything bcc attaches is released by ``BPF.cleanup()`` (kprobes,
kretprobes, BPF trampolines, tracepoints, maps); :meth:`Session.close` runs it on every way out.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import KmemError, UsageError
from ..kernel.probepoints import argument_positions, bpf_constants, memory_type_names
from ..state import Snapshot
from . import events as ev
from .plan import ACTIVE_NEEDS, PROBED_PARAMETERS, TARGET, Plan, PlanError, TraceOptions, make_plan, program_text
from .seed import SEC_ONLINE, SEC_PRESENT, TrackedState, tracked_state

BPF_NOEXIST = 1
#: bpf/callers.c: a call counted at entry, without its result
RESULT_UNKNOWN = 2


class TraceError(KmemError):
    """Tracing cannot start or go on; the message says what is missing and what still works."""


def import_bcc() -> Any:
    """bcc's Python module, or a TraceError saying how to install it."""
    try:
        import bcc  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise TraceError(
            "tracing needs bcc's Python module (from the distribution, not PyPI): apt-get install python3-bpfcc; "
            "every other command works without it"
        ) from None
    return bcc


def check_tracing_prerequisites() -> None:
    """Root, and a kernel that can run BPF programs on kprobes."""
    if os.geteuid() != 0:
        raise TraceError("tracing needs root (BPF programs and kprobes): run with sudo")
    if not Path("/sys/kernel/tracing").is_dir() and not Path("/sys/kernel/debug/tracing").is_dir():
        raise TraceError("no tracefs (CONFIG_FTRACE off?): kprobes cannot be attached; use the other commands")


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], list[str]]]:
    """Collect what C code (libbcc, clang) writes to file descriptor 2 meanwhile; yields a function
    returning those lines once the block is left. Keeps "one line on stderr" for failures."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def traceable_functions() -> set[str]:
    """The functions ftrace can hook (``available_filter_functions``): where kprobes attach reliably.

    A function missing there was inlined, or is ``notrace``: ``__meminit`` functions are, and 6.1's
    kprobes refuse sparse_add_section() with EINVAL."""
    for tracefs in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        try:
            text = (tracefs / "available_filter_functions").read_text()
        except OSError:
            continue
        return {line.split()[0] for line in text.splitlines() if line}
    raise TraceError(
        "cannot read available_filter_functions (tracefs not mounted?): mount -t tracefs nodev /sys/kernel/tracing"
    )


def sleep_states() -> int:
    """The bits of sched_switch's prev_state that mean "asleep" (S and D), from the tracepoint's print
    format (``{ 0x00000001, "S" }, { 0x00000002, "D" }`` on 6.1 to 7.x)."""
    for tracefs in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        try:
            text = (tracefs / "events/sched/sched_switch/format").read_text()
        except OSError:
            continue
        found = {letter: int(value, 16) for value, letter in re.findall(r'\{ (0x[0-9a-f]+), "([A-Z])" \}', text)}
        if "S" in found and "D" in found:
            return found["S"] | found["D"]
    raise TraceError("cannot read the sched_switch tracepoint's format (tracefs?): --races needs it")


class Kallsyms:
    """Kernel addresses to function names, from /proc/kallsyms read once the probes are loaded: BPF
    programs and trampolines are in it then (bcc's own cache, read when bcc starts, misses them and
    names their frames after whatever symbol precedes them)."""

    def __init__(self) -> None:
        entries = []
        with open("/proc/kallsyms") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1] in "tTwW":
                    entries.append((int(fields[0], 16), fields[2]))
        entries.sort()
        self.addresses = [a for a, _ in entries]
        self.names = [n for _, n in entries]

    def name(self, address: int) -> str:
        i = bisect.bisect_right(self.addresses, address) - 1
        return self.names[i] if i >= 0 and self.addresses[i] else "[unknown]"


class Session:
    """One trace of the running kernel. ``prog`` is a drgn Program on it (debug info for the constants),
    ``snapshot`` the state read at the start (the live pfn_active's seed)."""

    def __init__(self, prog: Any, snapshot: Snapshot, options: TraceOptions) -> None:
        self.options = options
        self.snapshot = snapshot
        self.bcc = import_bcc()
        check_tracing_prerequisites()
        constants = bpf_constants(prog, snapshot.layout)
        positions, unavailable = argument_positions(prog, PROBED_PARAMETERS)
        traceable = traceable_functions()
        for function in PROBED_PARAMETERS:
            if function not in unavailable and function not in traceable:
                unavailable[function] = "not traceable in this build (inlined, or notrace such as __meminit)"
        self.fexit_supported = bool(self.bcc.BPF.support_kfunc())
        if options.races:
            constants["SLEEP_STATES"] = sleep_states()
        try:
            self.plan: Plan = make_plan(options, positions, unavailable, constants, self.fexit_supported)
        except PlanError as error:
            raise TraceError(str(error)) from None
        self.context = ev.Context(snapshot.layout.zone_names, memory_type_names(prog), 0)
        self.bpf: Any = None
        self.attached: list[dict[str, str]] = []
        self.stacks: dict[int, list[str]] = {}
        self._kallsyms: Kallsyms | None = None
        self.seeding_conflicts = 0
        self.counts: dict[str, int] = {}

    # -- start ---------------------------------------------------------------------------------------
    def start(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Compile, attach everything, then seed the live pfn_active (events seen meanwhile win)."""
        BPF = self.bcc.BPF
        started = time.monotonic()
        with captured_stderr() as bcc_said:
            try:
                self.bpf = BPF(text=program_text(), cflags=self.plan.cflags)
            except Exception as error:  # noqa: BLE001 - bcc raises bare Exceptions for compile failures
                failure: BaseException | None = error
            else:
                failure = None
        if failure is not None:
            said = [line for line in bcc_said() if "error" in line.lower()] or [str(failure) or repr(failure)]
            hint = (
                f"are the kernel headers installed? apt-get install linux-headers-{os.uname().release}"
                if "compile" in str(failure) and "map" not in said[0]
                else "is BPF enabled and is there memory for its maps?"
            )
            raise TraceError(f"bcc could not load the tracer: {said[0].strip()}; {hint}")
        self.compile_seconds = time.monotonic() - started
        # bpf_ktime_get_ns() and time.monotonic_ns() read the same clock (CLOCK_MONOTONIC)
        self.context = ev.Context(self.context.zone_names, self.context.memory_types, time.monotonic_ns())
        with captured_stderr():  # bcc prints its own complaint too; the summary says it once, as "not traced"
            fatal = self._attach()
        if fatal:
            self.close()
            raise TraceError(fatal)

        def callback(_ctx: Any, data: Any, _size: int) -> None:
            on_event(self._decode(self.bpf["events"].event(data)))

        self.bpf["events"].open_ring_buffer(callback)
        if self.options.active or self.options.races:
            self._seed(tracked_state(self.snapshot))
            done = self.bpf["seed_done"]
            done[done.Key(0)] = done.Leaf(1)  # the hand-out check starts now

    def _attach(self) -> str | None:
        """Attach the plan's probes; a function the asked-for tracing cannot do without is fatal (its
        message is returned), any other failure is recorded in ``unavailable``."""
        needed = {TARGET} | (set(ACTIVE_NEEDS) if self.options.active or self.options.races else set())
        for probe in self.plan.probes:
            try:
                if probe.kind == "kprobe":
                    self.bpf.attach_kprobe(event=probe.function, fn_name=probe.program)
                elif probe.kind == "kretprobe":
                    self.bpf.attach_kretprobe(event=probe.function, fn_name=probe.program, maxactive=64)
                # fexit: attached by bcc when it loaded the KRETFUNC_PROBE
            except Exception as error:  # noqa: BLE001 - bcc raises bare Exceptions for attach failures
                if probe.function in needed:
                    return f"cannot attach a {probe.kind} to {probe.function}(): {error}"
                self.plan.unavailable[probe.function] = f"{probe.kind} failed: {error}"
                continue
            self.attached.append({"function": probe.function, "kind": probe.kind})
        return None

    def _seed(self, state: TrackedState) -> None:
        lib = self.bcc.libbcc.lib
        sections = self.bpf["sections"]
        for nr, (bits, flags) in state.sections.items():
            key, leaf = sections.Key(nr), sections.Leaf(bits, flags)
            if lib.bpf_update_elem(sections.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST) < 0:
                self.seeding_conflicts += 1  # changed by the kernel since the probes were attached
        partial = self.bpf["partial"]
        for sub, (lo, hi) in state.partial.items():
            key, leaf = partial.Key(sub), partial.Leaf(lo, hi)
            lib.bpf_update_elem(partial.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST)

    def inject_inactive(self, start: int, end: int) -> None:
        """Mark [start, end) (whole subsections) not active, as a kernel that initialized it late would
        look: the self-test of the hand-out check (``trace --inject-inactive``)."""
        layout = self.snapshot.layout
        per = layout.pages_per_subsection
        if start % per or end % per or end <= start:
            raise UsageError(f"--inject-inactive {start:#x}-{end:#x}: use whole subsections ({per} pfns)")
        sections = self.bpf["sections"]
        for pfn in range(start, end, per):
            nr = pfn // layout.pages_per_section
            key = sections.Key(nr)
            try:
                leaf = sections[key]
            except KeyError:
                continue
            leaf.active &= ~(1 << ((pfn % layout.pages_per_section) // per))
            sections[key] = leaf

    # -- running -------------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def _decode(self, raw_event: Any) -> dict[str, Any]:
        raw = {name: getattr(raw_event, name) for name, _ in raw_event._fields_}
        raw["comm"] = bytes(raw_event.comm).split(b"\0", 1)[0].decode(errors="replace")
        raw["comm2"] = bytes(raw_event.comm2).split(b"\0", 1)[0].decode(errors="replace")
        stackid = raw["stackid"]
        stack = self.symbolize(stackid) if stackid >= 0 else None
        event = ev.event_fields(raw, self.context, stack)
        key = f"{event['function']}:{event['phase']}"
        self.counts[key] = self.counts.get(key, 0) + 1
        return event

    @property
    def kallsyms(self) -> Kallsyms:
        if self._kallsyms is None:
            self._kallsyms = Kallsyms()
        return self._kallsyms

    def symbolize(self, stackid: int) -> list[str]:
        if stackid not in self.stacks:
            try:
                addresses = list(self.bpf["stacks"].walk(stackid))
            except KeyError:
                addresses = []
            frames = [self.kallsyms.name(a) for a in addresses]
            self.stacks[stackid] = ev.strip_probe_frames(frames, TARGET) or ["[empty stack]"]
        return self.stacks[stackid]

    # -- stop ----------------------------------------------------------------------------------------
    def _percpu_sum(self, name: str, index: int) -> int:
        table = self.bpf[name]
        return int(table.sum(table.Key(index)).value)

    def _stack_caches(self) -> list[Any]:
        """Each CPU's entry of bpf/callers.c's stack_cache (pending counts and reuse statistics)."""
        table = self.bpf["stack_cache"]
        return list(table[table.Key(0)])

    def tracked(self) -> TrackedState:
        layout = self.snapshot.layout
        state = TrackedState(layout.pages_per_section, layout.pages_per_subsection, {}, {})
        for key, leaf in self.bpf["sections"].items():
            if leaf.flags & SEC_PRESENT or leaf.active:
                state.sections[key.value] = (leaf.active, leaf.flags)
        for key, leaf in self.bpf["partial"].items():
            state.partial[key.value] = (leaf.lo, leaf.hi)
        return state

    def summary(self, duration: float) -> dict[str, Any]:
        """Everything the maps hold, read before detaching: callers, losses, the tracked state."""
        self.poll(0)
        out: dict[str, Any] = {
            "type": "summary",
            "duration_s": round(duration, 3),
            "compile_s": round(self.compile_seconds, 3),
            "probes": self.attached,
            "unavailable": self.plan.unavailable,
            "events": dict(sorted(self.counts.items())),
            "events_lost": self._percpu_sum("losses", 0),
            "stack_failures": self._percpu_sum("losses", 1),
            "state_approximations": self._percpu_sum("losses", 2),
            "holds_evicted": self._percpu_sum("losses", 3),
            "handouts_inactive": sum(v.value for v in self.bpf["inactive_handouts"].values()),
            "inactive_subsections": sorted(k.value for k in self.bpf["inactive_handouts"].keys()),
            "races": self.counts.get(f"{TARGET}:race", 0),
            "race_windows": self.counts.get(f"{TARGET}:race-window", 0),
        }
        if self.options.callers or self.options.split:
            counts = [(k.stackid, k.context, k.result, v.value) for k, v in self.bpf["callers"].items()]
            caches = self._stack_caches()
            counts += [(c.stackid, c.context, RESULT_UNKNOWN, c.pending) for c in caches if c.pending]
            rows = ev.caller_rows(counts, {sid: self.symbolize(sid) for sid, *_ in counts if sid >= 0})
            out["calls"] = sum(r.count for r in rows)
            out["returns_without_entry"] = self._percpu_sum("call_stats", 1)
            out["callers"] = [r.to_json() for r in rows]
            if not self.options.exact_stacks:
                out["stack_cache"] = {
                    name: sum(getattr(c, name) for c in caches) for name in ("reused", "verified", "disagreed")
                }
        if self.options.active or self.options.races:
            state = self.tracked()
            out["active_ranges"] = state.active_ranges()
            out["online_sections"] = sorted(nr for nr, (_, flags) in state.sections.items() if flags & SEC_ONLINE)
            out["sections_changed_while_seeding"] = self.seeding_conflicts
        return out

    def close(self) -> None:
        """Detach and free everything; safe to call twice."""
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            bpf.cleanup()
