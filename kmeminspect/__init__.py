"""kmeminspect: the truth about a Linux kernel's physical-memory bookkeeping during memory hotplug.

Inside a drgn session (``drgn -c VMCORE -s VMLINUX``, ``drgn -k``, ``drgn --qemu SOCKET``), the readers,
the model and the audit work on the program drgn has open::

    >>> from kmeminspect import read_snapshot, explain_pfns, audit_snapshot  # the 6.12 "mixed" fixture dump
    >>> snap = read_snapshot(prog)
    >>> explain_pfns(snap, 0x48000)[0]["pfn_to_online_page"]
    False
    >>> [f.rule for f in audit_snapshot(snap) if f.severity == "error"]
    ['online-memmap-not-sane']

and the drgn command ``%kmeminspect`` (``sections``, ``blocks``, ``pfn``, ``audit``) prints what the
command line prints. See docs/drgn.md. Importing this package loads nothing else: the readers, numpy and
tabulate load when a function is first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import Finding
    from .state import Snapshot
    from .target import Program

__version__ = "0.1.0"

__all__ = ["audit_snapshot", "explain_pfns", "read_snapshot"]


def read_snapshot(prog: Program, pfn_range: tuple[int, int] | None = None) -> Snapshot:
    """
    Read the kernel's memory-hotplug bookkeeping at this moment.

    That is every present ``struct mem_section`` (its ``section_mem_map`` flags such as
    ``SECTION_IS_ONLINE``, the ``subsection_map`` of ``struct mem_section_usage`` and the memmap it
    encodes), the ``struct memory_block`` devices, the ``struct dev_pagemap`` ranges of ZONE_DEVICE memory,
    zones, nodes, iomem, and the state of every ``struct page`` (zone, node, ``PG_reserved``,
    ``PageOffline``, ...) as runs of pfns in identical state.

    :param prog: Linux kernel program (a vmcore, ``/proc/kcore`` or a QEMU guest) with its vmlinux's
        debug info loaded.
    :param pfn_range: ``(start, end)``: read the memmap only of the sections overlapping these pfns (end
        exclusive); the others are marked not read. Default: every section.
    :raises kmeminspect.errors.ReadError: if the kernel's structures are not laid out as expected.
    """
    from .kernel import read_snapshot as read

    return read(prog, pfn_range=pfn_range)


def explain_pfns(snapshot: Snapshot, start: int, end: int | None = None) -> list[dict[str, Any]]:
    """
    Evaluate the kernel's pfn predicates over pfns [start, end) of a snapshot.

    Returns runs of pfns in identical state, each a dict with ``pfn_start`` and ``pfn_end`` (exclusive)
    and the keys ``kmeminspect pfn --json`` prints: ``pfn_valid()``, ``pfn_section_valid()``,
    ``online_section()``, ``pfn_to_online_page() != NULL`` as the snapshot's kernel implements it, the
    proposed ``pfn_active()`` and ``pfn_to_device_page()``, ``inactive_causes`` (why a pfn is not
    active), the zone and node read from ``page->flags``, and the section and subsection.

    :param snapshot: From :func:`read_snapshot` (or :func:`kmeminspect.snapshot.load`).
    :param start: First pfn.
    :param end: One past the last pfn. Default: ``start + 1``.
    :raises kmeminspect.errors.UsageError: if ``end`` is beyond what the architecture can address
        (``MAX_PHYSMEM_BITS``); pfns beyond the highest present section are answered (not present).
    """
    from .views import pfn_view

    data, _ = pfn_view(snapshot, start, start + 1 if end is None else end, is_range=True)
    runs: list[dict[str, Any]] = data["runs"]
    return runs


def audit_snapshot(snapshot: Snapshot) -> list[Finding]:
    """
    Check a snapshot against kmeminspect's audit rules (``kmeminspect audit --rules``).

    Returns the findings: each has a ``rule`` id, a ``severity`` (``error``, ``warning`` or ``info``),
    the pfns ``[pfn_start, pfn_end)`` it concerns, a one-line ``message`` and its ``evidence``.

    :param snapshot: From :func:`read_snapshot` (or :func:`kmeminspect.snapshot.load`).
    """
    from .audit import audit

    return audit(snapshot)
