"""Which probes ``kmeminspect trace`` attaches, and the ``-D`` flags that compile bpf/*.c for them.

Pure Python: the kernel's facts (argument positions, constants, whether BTF trampolines work) come in as
plain data from ``kmeminspect.kernel.probepoints`` and the session, so the plan is unit-testable.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

#: the BPF sources, compiled together in this order (each also includes what it needs, guarded): bpf/ of
#: the checkout, or where ``pip install`` put them (pyproject.toml, data-files)
BPF_DIRS = (Path(__file__).resolve().parents[2] / "bpf", Path(sys.prefix) / "share" / "kmeminspect" / "bpf")
BPF_SOURCES = ("common.h", "pfn_active.c", "lifecycle.c", "callers.c")


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    """What to trace. ``active`` and ``races`` need the lifecycle probes even when ``events`` is off."""

    events: bool = True  # print the lifecycle timeline
    callers: bool = True  # aggregate pfn_to_online_page() callers by kernel stack
    split: bool = False  # ... and by result (NULL or a page): needs a return probe
    exact_stacks: bool = False  # unwind every call (as bcc's stackcount does) instead of reusing stack ids
    active: bool = True  # live pfn_active: report pages handed out whose memmap is not active
    races: bool = False  # report invalidations of pages a task still holds (hooks every syscall exit)
    verify_every: int = 256  # with reused stack ids, unwind anyway every N-th reuse and count disagreements
    hold_window_ms: float = 10.0  # a kernel thread's hold ends after this long (it has no system call)

    @property
    def lifecycle(self) -> bool:
        return self.events or self.active or self.races

    @property
    def entry(self) -> bool:
        """The entry probe on pfn_to_online_page: stacks for callers and for the holds of races."""
        return self.callers or self.races

    @property
    def returns(self) -> bool:
        return self.split or self.active or self.races


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe to attach: the kernel function, the BPF program it runs, and how (kprobe, kretprobe, fexit)."""

    function: str  # kernel function
    program: str  # BPF function in bpf/*.c ("" for fexit: bcc attaches KRETFUNC_PROBE by its name)
    kind: str  # "kprobe", "kretprobe" or "fexit"


#: the probed functions and the parameters the programs read (ARG_<function>_<parameter>), by name
PROBED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "sparse_add_section": ("nid", "start_pfn", "nr_pages"),
    "sparse_remove_section": ("pfn", "nr_pages"),
    "online_pages": ("pfn", "nr_pages", "zone"),
    "offline_pages": ("start_pfn", "nr_pages", "zone"),
    "move_pfn_range_to_zone": ("zone", "start_pfn", "nr_pages", "altmap"),
    "remove_pfn_range_from_zone": ("zone", "start_pfn", "nr_pages"),
    "online_mem_sections": ("start_pfn", "end_pfn"),
    "offline_mem_sections": ("start_pfn", "end_pfn"),
    "memremap_pages": ("pgmap",),
    "memunmap_pages": ("pgmap",),
    "memmap_init_zone_device": ("zone", "start_pfn", "nr_pages", "pgmap"),
    "memory_subsys_online": ("dev",),
    "memory_subsys_offline": ("dev",),
    "pfn_to_online_page": ("pfn",),
    "__add_pages": ("nid", "pfn", "nr_pages"),
}
#: the lifecycle: kernel function -> (entry program, return program); None where there is none
LIFECYCLE: dict[str, tuple[str | None, str | None]] = {
    "mem_hotplug_begin": ("kmi_mem_hotplug_begin", None),
    "mem_hotplug_done": ("kmi_mem_hotplug_done", None),
    "sparse_add_section": ("kmi_sparse_add_section", "kmi_sparse_add_section_ret"),
    "sparse_remove_section": ("kmi_sparse_remove_section", None),
    "online_pages": ("kmi_online_pages", "kmi_online_pages_ret"),
    "offline_pages": ("kmi_offline_pages", "kmi_offline_pages_ret"),
    "move_pfn_range_to_zone": ("kmi_move_pfn_range_to_zone", "kmi_move_pfn_range_to_zone_ret"),
    "remove_pfn_range_from_zone": ("kmi_remove_pfn_range_from_zone", None),
    "online_mem_sections": ("kmi_online_mem_sections", None),
    "offline_mem_sections": ("kmi_offline_mem_sections", None),
    "memremap_pages": ("kmi_memremap_pages", "kmi_memremap_pages_ret"),
    "memunmap_pages": ("kmi_memunmap_pages", "kmi_memunmap_pages_ret"),
    "memmap_init_zone_device": ("kmi_memmap_init_zone_device", "kmi_memmap_init_zone_device_ret"),
    "memory_subsys_online": ("kmi_memory_subsys_online", "kmi_memory_subsys_online_ret"),
    "memory_subsys_offline": ("kmi_memory_subsys_offline", "kmi_memory_subsys_offline_ret"),
}
#: a function that cannot be probed in some builds -> (its equivalent, the equivalent's parameter for each of
#: its own): sparse_add_section() is __meminit, so notrace, and 6.1's kprobes refuse it; __add_pages()
#: calls it for each section of the range it adds and returns 0 only when all were added
EQUIVALENTS: dict[str, tuple[str, dict[str, str]]] = {
    "sparse_add_section": ("__add_pages", {"nid": "nid", "start_pfn": "pfn", "nr_pages": "nr_pages"}),
}
#: without these the live pfn_active cannot follow the kernel
ACTIVE_NEEDS = ("move_pfn_range_to_zone", "remove_pfn_range_from_zone", "sparse_remove_section")
TARGET = "pfn_to_online_page"

SIZES = {
    "MAX_SECTIONS_PER_OP": 512,  # 64 GiB of 128 MiB sections per state update; more is reported
    "HOLDER_SLOTS": 256,  # tasks whose latest hand-out is remembered (a power of two)
    "STACK_ENTRIES": 4096,  # preallocated, 1 KiB each
    "COUNT_ENTRIES": 16384,
    "SECTION_ENTRIES": 1 << 20,  # 128 TiB of 128 MiB sections
    "PARTIAL_ENTRIES": 65536,
}


class PlanError(Exception):
    """The asked-for tracing cannot be done on this kernel; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a trace attaches and the ``-D`` flags bpf/*.c is compiled with; ``unavailable`` says what is not
    probed and why."""

    probes: list[Probe]
    cflags: list[str]
    unavailable: dict[str, str]  # kernel function -> why it is not probed


def make_plan(
    options: TraceOptions,
    positions: dict[str, dict[str, int]],
    unavailable: dict[str, str],
    constants: dict[str, int],
    fexit: bool,
) -> Plan:
    """The probes and compiler flags for ``options`` on a kernel whose probed functions take their
    arguments at ``positions`` (``probepoints.argument_positions``); ``fexit``: BTF trampolines work."""
    if (options.entry or options.returns) and TARGET in unavailable:
        raise PlanError(f"{TARGET}() cannot be probed here ({unavailable[TARGET]}): only the lifecycle works")
    if options.active or options.races:
        missing = [f for f in ACTIVE_NEEDS if f in unavailable]
        if missing:
            raise PlanError(
                f"the live pfn_active needs {', '.join(missing)}() ({unavailable[missing[0]]}): "
                "trace with --no-active (and without --races)"
            )
    if options.verify_every < 1 or options.verify_every & (options.verify_every - 1):
        raise PlanError(f"--verify-every {options.verify_every}: use a power of two")
    flags = dict(constants) | SIZES
    flags["VERIFY_EVERY"] = options.verify_every
    flags["HOLD_WINDOW_NS"] = int(options.hold_window_ms * 1e6)
    cflags = [f"-D{name}={value}" for name, value in sorted(flags.items())]
    unavailable = dict(unavailable)
    attach_at = {function: function for function in LIFECYCLE if function not in unavailable}
    for function, (equivalent, _) in EQUIVALENTS.items():
        if function in unavailable and equivalent not in unavailable and equivalent in positions:
            attach_at[function] = equivalent
            unavailable[function] += f"; traced at {equivalent}() instead"
    for function in LIFECYCLE:
        for parameter in PROBED_PARAMETERS.get(function, ()):
            probed = attach_at.get(function, function)
            name = EQUIVALENTS[function][1][parameter] if probed != function else parameter
            position = positions.get(probed, {}).get(name)
            value = f"PT_REGS_PARM{position}(ctx)" if position else "0"
            cflags.append(f"-DARG_{function}_{parameter}={value}")
    probes: list[Probe] = []
    if options.lifecycle:
        for function, (entry, ret) in LIFECYCLE.items():
            if function not in attach_at:
                continue
            if entry:
                probes.append(Probe(attach_at[function], entry, "kprobe"))
            if ret:
                probes.append(Probe(attach_at[function], ret, "kretprobe"))
    use_fexit = fexit and options.returns
    if options.entry or (options.returns and not use_fexit):
        cflags.append("-DWITH_ENTRY")
        probes.append(Probe(TARGET, "kmi_p2op_entry", "kprobe"))
    if options.returns:
        cflags.append("-DWITH_RETURN")
        if use_fexit:
            cflags.append("-DRETURN_FEXIT")
            probes.append(Probe(TARGET, "", "fexit"))
        else:
            probes.append(Probe(TARGET, "kmi_p2op_return", "kretprobe"))
    for wanted, flag in (
        (options.callers, "WITH_CALLERS"),
        (options.split, "WITH_SPLIT"),
        (options.active, "WITH_ACTIVE"),
        (options.races, "WITH_RACES"),
        (options.exact_stacks, "EXACT_STACKS"),
    ):
        if wanted:
            cflags.append(f"-D{flag}")
    return Plan(probes, cflags, unavailable)


def bpf_dir() -> Path:
    """The directory holding BPF_SOURCES."""
    for directory in BPF_DIRS:
        if all((directory / name).is_file() for name in BPF_SOURCES):
            return directory
    raise PlanError(f"the BPF sources ({', '.join(BPF_SOURCES)}) are in none of {', '.join(map(str, BPF_DIRS))}")


def program_text() -> str:
    """The BPF program as bcc compiles it: bpf/*.c in BPF_SOURCES order, pasted into one text.

    Not ``#include``d: bcc only turns functions of its main file into programs. Each file's own
    ``#include "..."`` of a sibling is dropped (its text is already there).
    """
    directory = bpf_dir()
    parts = []
    for name in BPF_SOURCES:
        lines = (directory / name).read_text().splitlines()
        parts.append(f"/* ---- {name} ---- */")
        parts.extend(line for line in lines if not re.match(r'#include\s+"', line))
    return "\n".join(parts) + "\n"
