"""Read the kernel's physical address map (``iomem_resource``, what /proc/iomem prints)."""

from __future__ import annotations

import drgn
from drgn import Program

from ..state import Resource


def read_resources(prog: Program) -> list[Resource]:
    """The ``iomem_resource`` tree (``/proc/iomem``) in depth-first order: each resource's [start, end) bytes,
    name and depth."""
    resources: list[Resource] = []

    def walk(res: drgn.Object, depth: int) -> None:
        child = res.child.read_()
        while child.value_():
            try:
                name = child.name.string_().decode(errors="replace") if child.name.value_() else ""
            except drgn.FaultError:
                name = "?"
            resources.append(Resource(child.start.value_(), child.end.value_() + 1, name, depth))
            walk(child, depth + 1)
            child = child.sibling.read_()

    walk(prog["iomem_resource"].address_of_(), 0)
    return resources
