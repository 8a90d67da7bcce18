"""The test bed's command line: ``python3 -m vmfixtures {fetch,capture,demo}`` (see docs/testing.md)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from . import cache, download, truth
from .scenarios import SCENARIOS


def _kernels(generations: list[str]) -> list[download.Kernel]:
    apt = download.prepare_apt()
    return [download.fetch_kernel(g, apt, update=False) for g in generations]


def demo(generation: str) -> int:
    """Boot the bundled guest with hotplugged memory and run kmeminspect on it over QMP."""
    (kernel,) = _kernels([generation])
    scenario = SCENARIOS["mixed"]
    kmem = shutil.which("kmeminspect") or ""
    command = [kmem] if kmem else [sys.executable, "-m", "kmeminspect"]
    print(f"# {scenario.description}\n# kernel {kernel.release} ({kernel.suite}), QEMU/TCG", flush=True)
    with scenario.guest(kernel) as guest:
        scenario.setup(guest)
        guest.execute("stop")  # a still guest reads consistently
        status = 0
        html_map = cache.cache_dir() / "demo" / "map.html"
        html_map.parent.mkdir(parents=True, exist_ok=True)
        for args in (["sections"], ["blocks"], ["pfn", "0x40000-0x48000"], ["map", "--html", str(html_map)], ["audit"]):
            line = [*command, "--qemu", str(guest.tools_qmp_path), "--vmlinux", str(kernel.vmlinux), *args]
            shown = " ".join(args).replace(str(html_map), "map.html")
            print(f"\n$ kmeminspect --qemu GUEST {shown}", flush=True)
            result = subprocess.run(line)
            if args == ["audit"]:
                status = result.returncode
            elif result.returncode:
                return result.returncode
    print(f"\n# the map as a page to look at (hover a cell for its details): {html_map}")
    # audit exits 1 on stock kernels: they hand out pages with zone id MAX_NR_ZONES (docs/semantics.md)
    return 0 if status in (0, 1) else status


def main() -> int:
    parser = argparse.ArgumentParser(prog="vmfixtures", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="resolve, download and extract kernels into the cache")
    fetch.add_argument("generations", nargs="*", default=list(download.GENERATIONS))
    cap = sub.add_parser("capture", help="bring scenarios up and capture dumps and truth")
    cap.add_argument("--generation", "-g", action="append", choices=list(download.GENERATIONS))
    cap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    dem = sub.add_parser("demo", help="boot the bundled hotplug guest and inspect it with kmeminspect")
    dem.add_argument("--generation", "-g", default="6.12", choices=list(download.GENERATIONS))
    args = parser.parse_args()
    if args.command == "fetch":
        for kernel in _kernels(args.generations):
            print(f"{kernel.generation}\t{kernel.suite}\t{kernel.release}\t{kernel.version}\t{kernel.directory}")
        return 0
    if args.command == "capture":
        for kernel in _kernels(args.generation or list(download.GENERATIONS)):
            for name in args.scenarios:
                capture = truth.capture(kernel, name)
                print(f"{kernel.release}\t{name}\t{capture.directory}")
        return 0
    return demo(args.generation)


if __name__ == "__main__":
    sys.exit(main())
