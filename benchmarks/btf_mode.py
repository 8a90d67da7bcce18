"""``make bench-btf`` (part of ``make bench``): BTF mode against DWARF mode and crash, on the same dumps.

For each guest size (the dumps of ``benchmarks/run.py``, built or reused under ``$KMEMINSPECT_CACHE/bench``)
this runs, alternating, several times each:

- ``kmeminspect --vmcore ELF audit`` without a vmlinux (BTF mode: the dump's own BTF and kallsyms),
- ``kmeminspect --vmcore ELF --vmlinux V audit`` (DWARF mode),
- ``crash -s V ELF`` running ``kmem -n``,

then the same two audits (no crash: bookworm's cannot open them) on the test bed's ``mixed`` capture of the
newer generations (1 GiB guests; 7.x has over twice 6.1's kallsyms symbols), and measures each mode's
start-up in process (opening the dump with its types, then the layout, the first
reader: what every command pays before its work) and each audit's peak RSS. It prints Markdown tables for
docs/benchmarks.md and issue 13's targets (BTF audit wall time at most 1.2x DWARF's, peak RSS at most half)
with pass or fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from markdown import markdown_header, markdown_row  # noqa: E402
from run import GENERATION, build_dumps, peak_rss, timed, verdict  # noqa: E402  (sets up sys.path, PYTHONPATH)
from vmfixtures import download, truth  # noqa: E402
from vmfixtures.cache import log  # noqa: E402


def startup_seconds(elf: Path, vmlinux: Path | None, repeat: int) -> tuple[float, str]:
    """Best of ``repeat``: open the dump with its types (``vmlinux`` None: BTF mode) and read the layout."""
    from kmeminspect.kernel.layout import read_layout
    from kmeminspect.target import open_vmcore, types_mode

    times, mode = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        prog = open_vmcore(elf, vmlinux)
        read_layout(prog)
        times.append(time.perf_counter() - start)
        mode = types_mode(prog)
        del prog
    return min(times), mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,32768", help="guest boot memory in MiB, comma separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    apt = download.prepare_apt()
    kernel = download.fetch_kernel(GENERATION, apt, update=False)
    kmem = [sys.executable, "-m", "kmeminspect", "--vmcore"]
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        elf, _ = build_dumps(kernel, size)
        log(f"bench-btf: {size} MiB")
        btf_audit = [*kmem, str(elf), "audit"]
        dwarf_audit = [*kmem, str(elf), "--vmlinux", str(kernel.vmlinux), "audit"]
        btf, dwarf, crash = [], [], []
        for _ in range(args.repeat):  # alternate, so drifts hit all three alike
            btf.append(timed(btf_audit))
            dwarf.append(timed(dwarf_audit))
            crash.append(timed(["crash", "-s", str(kernel.vmlinux), str(elf)], stdin="kmem -n\nquit\n"))
        btf_start, btf_mode = startup_seconds(elf, None, args.repeat)
        dwarf_start, dwarf_mode = startup_seconds(elf, kernel.vmlinux, args.repeat)
        assert (btf_mode, dwarf_mode) == ("btf", "dwarf"), (btf_mode, dwarf_mode)
        rows.append(
            {
                "size": f"{size // 1024} GiB",
                "btf_s": statistics.median(btf),
                "dwarf_s": statistics.median(dwarf),
                "crash_s": statistics.median(crash),
                "btf_start_s": btf_start,
                "dwarf_start_s": dwarf_start,
                "btf_rss_mb": peak_rss(btf_audit) / 1024,
                "dwarf_rss_mb": peak_rss(dwarf_audit) / 1024,
            }
        )
    for generation in ("6.12", "7.x"):
        newer = download.fetch_kernel(generation, apt, update=False)
        elf = truth.capture(newer, "mixed").elf
        log(f"bench-btf: {newer.release} mixed")
        btf_audit = [*kmem, str(elf), "audit"]
        dwarf_audit = [*kmem, str(elf), "--vmlinux", str(newer.vmlinux), "audit"]
        btf, dwarf = [], []
        for _ in range(args.repeat):
            btf.append(timed(btf_audit))
            dwarf.append(timed(dwarf_audit))
        rows.append(
            {
                "size": f"1 GiB, {newer.release}",
                "btf_s": statistics.median(btf),
                "dwarf_s": statistics.median(dwarf),
                "crash_s": None,
                "btf_start_s": startup_seconds(elf, None, args.repeat)[0],
                "dwarf_start_s": startup_seconds(elf, newer.vmlinux, args.repeat)[0],
                "btf_rss_mb": peak_rss(btf_audit) / 1024,
                "dwarf_rss_mb": peak_rss(dwarf_audit) / 1024,
            }
        )
    print(
        f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {kernel.release}, drgn {__import__('drgn').__version__}; audits: medians of {args.repeat}, "
        f"start-up: best of {args.repeat}\n"
    )
    header = [
        "dump",
        "audit, BTF (s)",
        "audit, DWARF (s)",
        "BTF / DWARF",
        "crash kmem -n (s)",
        "start-up, BTF (s)",
        "start-up, DWARF (s)",
        "peak RSS, BTF (MB)",
        "peak RSS, DWARF (MB)",
        "BTF / DWARF",
    ]
    print(markdown_header(header))
    for r in rows:
        cells = [
            r["size"],
            f"{r['btf_s']:.2f}",
            f"{r['dwarf_s']:.2f}",
            f"{r['btf_s'] / r['dwarf_s']:.2f}",
            "—" if r["crash_s"] is None else f"{r['crash_s']:.2f}",
            f"{r['btf_start_s']:.2f}",
            f"{r['dwarf_start_s']:.2f}",
            f"{r['btf_rss_mb']:.0f}",
            f"{r['dwarf_rss_mb']:.0f}",
            f"{r['btf_rss_mb'] / r['dwarf_rss_mb']:.2f}",
        ]
        print(markdown_row(cells))
    print("\ntargets (issue 13):\n")
    for r in rows:
        wall, rss = r["btf_s"] / r["dwarf_s"], r["btf_rss_mb"] / r["dwarf_rss_mb"]
        print(f"- {r['size']}: BTF audit {wall:.2f}x DWARF's wall time (target ≤ 1.2): {verdict(wall <= 1.2)}")
        print(f"- {r['size']}: BTF audit peak RSS {rss:.2f}x DWARF's (target ≤ 0.5): {verdict(rss <= 0.5)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
