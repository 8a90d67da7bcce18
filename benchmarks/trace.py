"""``make bench-trace``: the cost of ``kmeminspect trace`` on a pfn_to_online_page() hot path, against
bcc's ``stackcount`` on the same workload in the same boot.

The workload is one full read of /proc/kpageflags (kpageflags_read() asks pfn_to_online_page() once per
pfn), timed inside a rootfs guest of each generation asked for, under TCG. Each mode of
``vmfixtures.tracing.TRACE_MODES`` is measured next to unprobed walks before and after it; its overhead
is its median minus the baseline's, and ``vs stackcount`` is that overhead over stackcount's. The target
(issue 5): entry-only stack aggregation ("callers") at most a quarter of stackcount's overhead.

Prints a Markdown table for docs/benchmarks.md and the raw results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vm-fixtures"))

from vmfixtures import download  # noqa: E402
from vmfixtures.rootfs import KMEMINSPECT_SHARE, rootfs_guest  # noqa: E402
from vmfixtures.tracing import TRACE_MODES, trace_overhead  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", default="6.1,6.12", help="comma separated (6.1, 6.12, 7.x)")
    parser.add_argument("--repeat", type=int, default=5, help="walks per mode and per baseline")
    args = parser.parse_args()
    results = []
    for generation in args.generations.split(","):
        kernel = download.load_kernel(generation)
        if kernel is None:
            apt = download.prepare_apt()
            kernel = download.fetch_kernel(generation, apt)
        shares = {KMEMINSPECT_SHARE: REPO}
        with rootfs_guest("boot", kernel, smp=2, shares=shares) as guest:
            results.append(trace_overhead(guest, repeats=args.repeat, modes=list(TRACE_MODES)))
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, QEMU TCG guests with 2 vCPUs; repeat {args.repeat}\n")
    print("| kernel | mode | walk (s) | baseline (s) | overhead (s) | vs stackcount | calls counted |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        for mode, m in result["modes"].items():
            print(
                f"| {result['release']} | {mode} | {m['seconds']:.3f} | {m['baseline']:.3f} | {m['overhead']:.3f} "
                f"| {m.get('vs_stackcount', '')} | {m['calls_counted'] if m['calls_counted'] is not None else ''} |"
            )
    print("\n" + json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
