"""``kmeminspect stress``: cycle chosen memory blocks offline and online, and always put them back.

Live mode works on the running kernel through its memory block devices,
``/sys/devices/system/memory/memoryN``: writing ``offline``, ``online_movable`` or ``online_kernel`` to
``state`` makes the kernel offline the block (isolate its pageblocks, migrate every page away, tear down
its memmap's "online" state) or online it into ZONE_MOVABLE or a kernel zone. The kernel answers a write
with an errno when it refuses (``state_store()`` in drivers/base/memory.c): those are counted by reason,
they are what the stress is there to provoke. QEMU mode (a test VM driven from the host) adds and removes
DIMMs and resizes virtio-mem over QMP.

The package: ``sysfs`` (the memory block devices), ``plan`` (what a live run may touch), ``journal``,
``restore`` (putting live blocks back), ``sampling`` (the audit during a run), ``walkers`` (the pfn
walker processes), ``report`` (the report and its texts), ``runner`` (the one runner every run uses),
and two drivers on it: ``live`` (memory blocks) and ``qemu`` (DIMMs and virtio-mem; its QMP side in
``guest``). Stop signals are handled by :mod:`kmeminspect.signals`, shared with ``trace``.

Safety, in order:

1. Nothing is touched without an explicit choice (``--blocks`` or ``--all-hotpluggable``); a block whose
   way back needs onlining into a kernel zone needs ``--allow-kernel-zone`` (such a block may never
   offline again); the plan is printed before anything changes.
2. Before the first change, a journal records the original state of every block the run may touch
   (JSON lines, fsync'd; the format is below); every transition is appended (fsync'd) as it happens.
3. On normal end, on an exception, on SIGINT, SIGTERM or SIGHUP the run puts every block back and says
   what it restored. After SIGKILL or a crash, ``kmeminspect stress --restore JOURNAL`` does it.
   Restoration reads the blocks' current state from sysfs; the journal's transitions are a record, the
   original states are what counts. A block the kernel will not put back is reported with the errno and
   what the user can do.
4. Nothing else is written: the walkers only read (``/proc/kpageflags``, ``page_idle/bitmap``) or trigger
   compaction (``/proc/sys/vm/compact_memory``, which moves pages and sets nothing).

Journal format (version 1): one JSON object per line. The first line is the header::

    {"format": "kmeminspect-stress-journal", "version": 1, "mode": "live", "created": ISO-8601,
     "pid": N, "boot_id": "...", "kernel": "6.12.117+deb13-amd64", "sysfs": "/sys", "seed": N,
     "blocks": {"33": {"state": "online", "zone": "Movable"}, "34": {"state": "offline", "zone": null}}}

then events, each with ``"event"`` and ``"time"`` (seconds since the epoch)::

    {"event": "begin", "seq": 1, "block": 33, "from": {...state...}, "write": "offline"}
    {"event": "end", "seq": 1, "block": 33, "result": "done" | "refused" | "anomaly" | "interrupted",
     "errno": "EBUSY" | "timeout" | null, "state": {...state after...}, "seconds": 0.31}
    {"event": "audit", "after": 50, "new_errors": 0, "unconfirmed": 0}
    {"event": "restore", "block": 33, "result": "unchanged" | "restored" | "failed" | "gone",
     "errno": null, "state": {...}}
    {"event": "closed", "stopped_by": "transitions", "restored": true, "failed": []}

A line cut short by a crash is ignored when the journal is read back. A run holds an exclusive ``flock``
on its journal (``--restore`` refuses while the run lives) and on the sysfs memory directory (one run at a
time per machine).
"""

from __future__ import annotations

from .journal import JOURNAL_FORMAT, JOURNAL_VERSION, Journal, default_journal_path, new_seed, read_journal
from .live import DEFAULT_TRANSITIONS, Limits, LiveAudit, LiveStress
from .plan import Plan, parse_block_list, plan_blocks, plan_text
from .report import Report, RestoreReport, report_text, restore_text
from .restore import RESTORE_ATTEMPTS, Restoration, restore_blocks, restore_journal
from .runner import Hooks, Runner
from .sampling import AuditLog, AuditSource
from .sysfs import REFUSALS, BlockState, MemoryBlocks
from .walkers import available_walkers, parse_walkers, start_walkers, stop_walkers

__all__ = [
    "DEFAULT_TRANSITIONS",
    "JOURNAL_FORMAT",
    "JOURNAL_VERSION",
    "REFUSALS",
    "RESTORE_ATTEMPTS",
    "AuditLog",
    "AuditSource",
    "BlockState",
    "Hooks",
    "Journal",
    "Limits",
    "LiveAudit",
    "LiveStress",
    "MemoryBlocks",
    "Plan",
    "Report",
    "RestoreReport",
    "Restoration",
    "Runner",
    "available_walkers",
    "default_journal_path",
    "new_seed",
    "parse_block_list",
    "parse_walkers",
    "plan_blocks",
    "plan_text",
    "read_journal",
    "report_text",
    "restore_blocks",
    "restore_journal",
    "restore_text",
    "start_walkers",
    "stop_walkers",
]
