"""Read nodes and zones (``struct pglist_data``, ``struct zone``)."""

from __future__ import annotations

from drgn import Program
from drgn.helpers.linux.mmzone import for_each_online_pgdat

from ..state import Node, Zone

ULONG_MAX = (1 << 64) - 1


def deferred_init_running(prog: Program) -> bool:
    """Whether deferred struct page init may still be running: the ``deferred_pages`` static key stays
    enabled until ``page_alloc_init_late()`` has waited for every pgdatinit thread. False without
    CONFIG_DEFERRED_STRUCT_PAGE_INIT."""
    try:
        key = prog["deferred_pages"]
    except KeyError:
        return False
    return bool(key.key.enabled.counter.value_() > 0)


def read_nodes_and_zones(prog: Program) -> tuple[list[Node], list[Zone]]:
    """Every online node (``pg_data_t``: its pfn span, ``first_deferred_pfn`` when deferred struct page init
    is configured, whether it may still run) and every zone of each (``zone_start_pfn``, ``spanned_pages``,
    ``present_pages``)."""
    nodes, zones = [], []
    running = deferred_init_running(prog)
    for pgdat in for_each_online_pgdat(prog):
        nid = pgdat.node_id.value_()
        deferred = None
        if pgdat.type_.type.has_member("first_deferred_pfn"):
            value = pgdat.first_deferred_pfn.value_()
            deferred = None if value == ULONG_MAX else value
        nodes.append(
            Node(
                nid=nid,
                start_pfn=pgdat.node_start_pfn.value_(),
                spanned=pgdat.node_spanned_pages.value_(),
                first_deferred_pfn=deferred,
                deferred_init_running=running,
            )
        )
        for zone_id in range(len(pgdat.node_zones)):
            zone = pgdat.node_zones[zone_id]
            zones.append(
                Zone(
                    nid=nid,
                    zone_id=zone_id,
                    name=zone.name.string_().decode(),
                    start_pfn=zone.zone_start_pfn.value_(),
                    spanned=zone.spanned_pages.value_(),
                    present=zone.present_pages.value_(),
                )
            )
    return nodes, zones
