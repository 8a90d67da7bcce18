"""What the BPF programs of ``bpf/`` need to know about a kernel, read from its debug info.

The programs include no kernel headers: struct field offsets, the section geometry, ZONE_DEVICE's index
and the position of each probed function's arguments come from here, as ``-D`` macros. So one source
serves every generation, and a parameter that moved (``sparse_remove_section()`` lost ``ms`` in v6.3)
or was added (``move_pfn_range_to_zone()``'s ``isolate_pageblock``, v6.15) is followed by name.
"""

from __future__ import annotations

from drgn import Program, offsetof, sizeof

from ..errors import ReadError
from ..state import Layout

#: x86_64 passes the first six integer arguments in registers (PT_REGS_PARM1..6)
REGISTER_ARGUMENTS = 6


def argument_positions(
    prog: Program, probed: dict[str, tuple[str, ...]]
) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """For each function of ``probed`` (function -> the parameter names a program reads), parameter name
    -> 1-based position; and, for functions that cannot be probed that way, why (absent from the debug
    info, a parameter renamed or not in a register)."""
    positions: dict[str, dict[str, int]] = {}
    unavailable: dict[str, str] = {}
    for function, wanted in probed.items():
        try:
            parameters = [p.name for p in prog.function(function).type_.parameters]
        except (LookupError, ValueError):
            unavailable[function] = "not in this kernel's debug info"
            continue
        where = {}
        for name in wanted:
            if name not in parameters:
                unavailable[function] = f"has no parameter {name!r} (has {', '.join(map(str, parameters))})"
                break
            position = parameters.index(name) + 1
            if position > REGISTER_ARGUMENTS:
                unavailable[function] = f"parameter {name!r} is argument {position}, not in a register"
                break
            where[name] = position
        else:
            positions[function] = where
    return positions, unavailable


def _offset(prog: Program, type_name: str, member: str) -> int:
    try:
        return int(offsetof(prog.type(type_name), member))
    except (LookupError, ValueError) as error:
        raise ReadError(f"debug info lacks {type_name}.{member} ({error}): cannot trace this kernel") from None


def bpf_constants(prog: Program, layout: Layout) -> dict[str, int]:
    """The ``-D`` values bpf/common.h documents, from debug info and the reader's layout."""
    try:
        pgmap_altmap = offsetof(prog.type("struct dev_pagemap"), "altmap")
        pgmap_ranges = _offset(prog, "struct dev_pagemap", "ranges")
    except LookupError:  # no CONFIG_ZONE_DEVICE: the pgmap probes are never attached
        pgmap_altmap = pgmap_ranges = 0
    constants = {
        "KMI_PAGE_SHIFT": layout.page_shift,
        "SECTION_PFN_SHIFT": layout.section_size_bits - layout.page_shift,
        "SUBSECTION_PFN_SHIFT": layout.subsection_shift - layout.page_shift,
        "ZONE_DEVICE_IDX": layout.zone_device if layout.zone_device is not None else -1,
        "OFF_ZONE_PGDAT": _offset(prog, "struct zone", "zone_pgdat"),
        "OFF_PGDAT_NODE_ZONES": _offset(prog, "struct pglist_data", "node_zones"),
        "OFF_PGDAT_NODE_ID": _offset(prog, "struct pglist_data", "node_id"),
        "SIZEOF_ZONE": sizeof(prog.type("struct zone")),
        "OFF_DEVICE_ID": _offset(prog, "struct device", "id"),
        "OFF_TASK_MM": _offset(prog, "struct task_struct", "mm"),
        "OFF_ALTMAP_BASE": _offset(prog, "struct vmem_altmap", "base_pfn"),
        "OFF_ALTMAP_RESERVE": _offset(prog, "struct vmem_altmap", "reserve"),
        "OFF_ALTMAP_FREE": _offset(prog, "struct vmem_altmap", "free"),
        "OFF_PGMAP_RANGES": pgmap_ranges,
        "OFF_PGMAP_TYPE": _offset(prog, "struct dev_pagemap", "type") if pgmap_ranges else 0,
        "OFF_PGMAP_NR_RANGE": _offset(prog, "struct dev_pagemap", "nr_range") if pgmap_ranges else 0,
    }
    for name in ("BASE", "RESERVE", "FREE"):
        constants[f"OFF_PGMAP_ALTMAP_{name}"] = pgmap_altmap + constants[f"OFF_ALTMAP_{name}"]
    if layout.subsections_per_section > 64:
        raise ReadError(f"{layout.subsections_per_section} subsections per section: the tracer handles 64 at most")
    return constants


def memory_type_names(prog: Program) -> dict[int, str]:
    """``enum memory_type`` value -> name (MEMORY_DEVICE_FS_DAX, ...), empty without ZONE_DEVICE."""
    try:
        return {e.value: e.name for e in prog.type("enum memory_type").enumerators or ()}
    except LookupError:
        return {}
