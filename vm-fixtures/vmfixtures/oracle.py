"""A per-pfn oracle of the kernel's ``pfn_to_online_page()``, for every kernel generation.

``pfn_to_online_page(pfn)`` returns the pfn's struct page only when the pfn's section is online
(SECTION_IS_ONLINE), its subsection has a memmap (subsection_map bit), and it is not ZONE_DEVICE memory
sharing a section with RAM (TAINT_ZONE_DEVICE + a dev_pagemap): "this memmap is initialized and its
memory is online". On 6.1 and 6.12 ``/proc/kpageflags`` reports a NULL as KPF_NOPAGE, so the file is the
oracle (``truth.py``). From 7.2 on a NULL reads as 0, like a page without flags, so the only way to learn
the answer from inside is to watch the function: here a bcc program in the rootfs guest
(``guest-rootfs/pfn_oracle.py``) probes its return while it reads ``/proc/kpageflags`` once, from pfn 0
to the end, and aggregates the answers into runs in BPF maps.

Run as ``python -m vmfixtures.oracle GENERATION SCENARIO`` to boot a rootfs guest, set the scenario up
and print the ranges and timings (and, where KPF_NOPAGE still works, whether the two oracles agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

from .vm import Guest

GUEST_PROGRAM = Path(__file__).parent / "guest-rootfs" / "pfn_oracle.py"
#: fexit (a BPF trampoline, needs BTF) is the default: under TCG it walked 1.18M pfns in 0.4 s where the
#: kprobe + kretprobe pair took 2.4 s (6.1, 6.12, 7.3 alike)
MODES = ("fexit", "kretprobe")


class OracleError(RuntimeError):
    """The probe did not see exactly one call per pfn the read walked."""


@dataclasses.dataclass(frozen=True)
class OnlinePages:
    """What ``pfn_to_online_page()`` answered for every pfn ``/proc/kpageflags`` walked."""

    release: str
    mode: str  # "fexit" (BPF trampoline) or "kretprobe" (kprobe + kretprobe pair)
    ranges: list[tuple[int, int]]  # sorted [start, end) pfn ranges where it returned non-NULL
    calls: int  # calls seen by the probe
    pfns: int  # pfns the read walked (bytes / 8); equal to calls
    gaps: int  # calls whose pfn did not follow the previous one (0: kpageflags walks in order)
    seconds: dict[str, float]  # in the guest: walk_unprobed, compile_and_load, attach, walk_probed, ...
    warnings: str  # what bcc and clang printed on stderr
    kpageflags: bytes | None = None  # the bytes read under the probe, when asked for


def pfn_to_online_page_ranges(
    guest: Guest, mode: str = "fexit", keep_kpageflags: bool = False, timeout: float = 1800.0
) -> OnlinePages:
    """Probe ``pfn_to_online_page`` in a running rootfs guest (``rootfs.RootfsGuest``) while reading
    ``/proc/kpageflags`` completely; detach and return where it returned non-NULL.

    Raises OracleError unless the probe saw one call per pfn walked and the runs tile ``[0, pfns)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    install_program(guest)
    copy = " /tmp/kpageflags.bin" if keep_kpageflags else ""
    start = time.monotonic()
    result = guest.run(f"python3 /tmp/pfn_oracle.py {mode}{copy}", timeout=timeout)
    total = time.monotonic() - start
    raw = None
    if keep_kpageflags:
        raw = gzip.decompress(guest.run("gzip -1 < /tmp/kpageflags.bin; rm /tmp/kpageflags.bin").stdout)
    return checked(json.loads(result.text), total, result.stderr.decode(errors="replace"), raw)


def install_program(guest: Guest) -> None:
    """Put the guest side of the oracle at /tmp/pfn_oracle.py."""
    program = GUEST_PROGRAM.read_text()
    guest.run(f"cat > /tmp/pfn_oracle.py <<'KMI_END_OF_PROGRAM'\n{program}\nKMI_END_OF_PROGRAM\n")


def checked(data: dict[str, Any], total: float, warnings: str, raw: bytes | None = None) -> OnlinePages:
    """The guest program's JSON answer as OnlinePages, once its runs are checked to tile the walk.

    Raises OracleError unless the probe saw one call per pfn walked and the runs tile ``[0, pfns)``."""
    mode = data["mode"]
    pfns = data["bytes"] // 8
    runs = sorted((int(a), int(b), bool(ok)) for a, b, ok in data["runs"])
    problems = []
    if data["calls"] != pfns:
        problems.append(f"{data['calls']} calls for {pfns} pfns")
    if data["overflow"]:
        problems.append(f"{data['overflow']} runs lost (map full)")
    position = 0
    for a, b, _ in runs:
        if a != position:
            problems.append(f"runs do not tile [0, {pfns}): {position} then [{a}, {b})")
            break
        position = b
    if position != pfns and not problems:
        problems.append(f"runs end at {position}, the walk at {pfns}")
    if problems:
        raise OracleError(f"{data['release']} ({mode}): " + "; ".join(problems))
    ranges: list[tuple[int, int]] = []
    for a, b, ok in runs:
        if not ok:
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return OnlinePages(
        release=data["release"],
        mode=mode,
        ranges=ranges,
        calls=data["calls"],
        pfns=pfns,
        gaps=data["gaps"],
        seconds={**data["seconds"], "total": total},
        warnings=warnings,
        kpageflags=raw,
    )


def nopage_ranges(kpageflags: bytes) -> list[tuple[int, int]] | None:
    """The same answer as read from KPF_NOPAGE (6.1, 6.12), or None if no pfn carries KPF_NOPAGE."""
    import numpy as np

    from .truth import KPF_NOPAGE, runs_of

    flags = np.frombuffer(kpageflags, dtype="<u8")
    nopage = (flags >> KPF_NOPAGE) & 1 == 1
    if not nopage.any():
        return None
    return [(a, b) for a, b in runs_of(~nopage)]


def main(argv: list[str] | None = None) -> int:
    from .download import load_kernel
    from .rootfs import rootfs_guest
    from .scenarios import SCENARIOS

    parser = argparse.ArgumentParser(prog="python -m vmfixtures.oracle", description=main.__doc__)
    parser.add_argument("generation")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--mode", choices=MODES, action="append", help="repeatable; default: both")
    args = parser.parse_args(argv)
    kernel = load_kernel(args.generation)
    if kernel is None:
        parser.error(f"no cached kernel of generation {args.generation}")
    report: dict[str, object] = {"release": kernel.release, "scenario": args.scenario}
    with rootfs_guest(args.scenario, kernel) as guest:
        report["boot_seconds"] = round(guest.boot_seconds, 1)
        SCENARIOS[args.scenario].setup(guest)
        for mode in args.mode or MODES:
            result = pfn_to_online_page_ranges(guest, mode, keep_kpageflags=True)
            assert result.kpageflags is not None
            nopage = nopage_ranges(result.kpageflags)
            report[mode] = {
                "ranges": result.ranges,
                "calls": result.calls,
                "pfns": result.pfns,
                "gaps": result.gaps,
                "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
                "kpf_nopage_ranges_equal": None if nopage is None else nopage == result.ranges,
                "warning_lines": len(result.warnings.splitlines()),
            }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
