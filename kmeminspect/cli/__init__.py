"""The ``kmeminspect`` command: parsing and printing only. Reading is in kernel/, meaning in model.py and
audit/, the views every front end prints in views.py.

One module per command group, each registering its commands on the group of :mod:`.group`:
:mod:`.inspection` (sections, blocks, pfn, audit, map, snapshot, diff, doctor), :mod:`.stress`,
:mod:`.trace` and :mod:`.completion`. ``main`` is the console script (``kmeminspect.cli:main``).
"""

from __future__ import annotations

from . import completion, inspection, stress, trace  # noqa: F401 - each registers its commands on main
from .completion import COMPLETE_VAR, COMPLETION_SHELLS
from .group import Context, main

__all__ = ["COMPLETE_VAR", "COMPLETION_SHELLS", "Context", "main"]
