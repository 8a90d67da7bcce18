"""The live pfn_active's state, to seed it from a snapshot and to read it back as pfn ranges.

The BPF side (bpf/pfn_active.c) keeps, per present section, a bitmap of active subsections and flags
(present, online), and for subsections only partly active the one active pfn range. This module converts
between that and pfn ranges. Pure Python, no drgn, no bcc.

What counts as active at the start is the model's ``pfn_active`` (``model.py``) of a snapshot taken
when the trace starts, restricted to the causes that are lifecycle state (LIFECYCLE_CAUSES: no memmap,
section offline, altmap reserve, device memmap not yet initialized, deferred init). The other causes
judge a memmap's content (zeroed, poisoned, a zone id out of range, outside its zone's span, unreadable
from /proc/kcore): the kernel initialized those memmaps, and finding odd content is the audit's job,
not the tracker's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..model import CAUSE_BITS, segments
from ..state import Snapshot

#: the INACTIVE_CAUSES that say a memmap was not (or no longer) initialized by the kernel
LIFECYCLE_CAUSES = ("no-memmap", "section-offline", "altmap-reserve", "device-not-initialized", "deferred")
SEC_PRESENT = 1
SEC_ONLINE = 2


@dataclasses.dataclass
class TrackedState:
    """bpf/pfn_active.c's maps as plain data."""

    pages_per_section: int
    pages_per_subsection: int
    sections: dict[int, tuple[int, int]]  # section nr -> (active subsection bits, SEC_* flags)
    partial: dict[int, tuple[int, int]]  # global subsection index -> active [lo, hi) inside it

    def active_ranges(self) -> list[tuple[int, int]]:
        """The active pfns as sorted, merged [start, end) ranges."""
        ranges: list[tuple[int, int]] = []
        per = self.pages_per_subsection
        subs = self.pages_per_section // per
        for nr, (bits, _) in self.sections.items():
            for i in range(subs):
                if (bits >> i) & 1:
                    start = nr * self.pages_per_section + i * per
                    ranges.append((start, start + per))
        ranges.extend(self.partial.values())
        return merge(ranges)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty [start, end) ranges with overlapping and touching ones merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def seed_ranges(snapshot: Snapshot) -> list[tuple[int, int]]:
    """The pfns whose memmap is active in ``snapshot``, as the tracer starts from."""
    seg = segments(snapshot)
    lifecycle = np.uint32(sum(CAUSE_BITS[name] for name in LIFECYCLE_CAUSES))
    active = (seg["inactive"] & lifecycle) == 0
    return merge(list(zip(seg["pfn_start"][active].tolist(), seg["pfn_end"][active].tolist(), strict=True)))


def tracked_state(snapshot: Snapshot) -> TrackedState:
    """The BPF maps' content that describes ``snapshot``."""
    layout = snapshot.layout
    online_mask = layout.section_flags.get("SECTION_IS_ONLINE", 0)
    state = TrackedState(layout.pages_per_section, layout.pages_per_subsection, {}, {})
    for section in snapshot.sections:
        flags = SEC_PRESENT | (SEC_ONLINE if section.section_mem_map & online_mask else 0)
        state.sections[section.nr] = (0, flags)
    per = layout.pages_per_subsection
    for start, end in seed_ranges(snapshot):
        pfn = start
        while pfn < end:
            sub = pfn // per
            sub_end = min(end, (sub + 1) * per)
            nr = pfn // layout.pages_per_section
            bits, flags = state.sections.get(nr, (0, 0))
            if pfn == sub * per and sub_end == (sub + 1) * per:
                state.sections[nr] = (bits | 1 << (sub % layout.subsections_per_section), flags)
            else:
                state.partial[sub] = (pfn, sub_end)
            pfn = sub_end
    return state
