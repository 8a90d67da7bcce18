"""``make bench``: kmeminspect against its anchors on the same dumps, side by side, as ratios.

For each guest size (boot memory only; the 6.1 kernel, the one bookworm's crash can open) this builds or
reuses an ELF and a kdump-compressed dump under ``$KMEMINSPECT_CACHE/bench``, then runs, alternating,
several times each:

- ``kmeminspect --vmcore ELF audit`` end to end (a new process: Python start, debug info, every memmap)
  and ``crash -s VMLINUX ELF`` running ``kmem -n`` (the section table every analyst knows) on the same
  ELF dump, and the same audit of the kdump-compressed dump (QEMU's flattened output, reassembled);
- ``makedumpfile -d 31`` on the ELF dump, whose "Excluding unnecessary pages" stage walks every memmap;
- in process: kmeminspect's memmap walk alone and its whole read per page, and one drgn Object per page
  (``page->flags``) over a sample, the slow way this project avoids.

Then a scaling row (time per page and peak RSS of each size against the smallest) and, in live guests of
``--guest-mb`` (8 GiB), ``kmeminspect --qemu SOCKET audit`` from the host and ``kmeminspect --live audit``
inside a rootfs guest (timed there, under TCG). It prints medians, ratios, peak RSS, the targets of
issue 7 with pass or fail, and the machine, as Markdown tables for docs/benchmarks.md.
makedumpfile 1.7 expects the program headers right after the ELF header; QEMU (7.2 here, and 10) puts
a section header there and the program headers after it, so makedumpfile says "Can't get the number of
PT_LOAD". The runner gives makedumpfile a sparse copy with the program header table moved to offset 64.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# this checkout's kmeminspect, in this process and in the ones it starts (not an installed copy)
sys.path[:0] = [
    str(Path(__file__).resolve().parent.parent),
    str(Path(__file__).resolve().parent.parent / "vm-fixtures"),
]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))

from markdown import markdown_header, markdown_row  # noqa: E402
from vmfixtures import download  # noqa: E402
from vmfixtures.cache import cache_dir, locked, log  # noqa: E402
from vmfixtures.rootfs import KMEMINSPECT_SHARE, RootfsGuest  # noqa: E402
from vmfixtures.vm import Guest, Memory  # noqa: E402

from kmeminspect.target import elf_program_headers  # noqa: E402

GENERATION = "6.1"
REPO = Path(__file__).resolve().parent.parent
#: wait for deferred struct page init to finish, so the memmap is complete
DEFERRED_INIT_DONE = "while ! dmesg | grep -q 'deferred pages initialised'; do sleep 0.5; done"


def unreserved_ram(size_mb: int) -> list[str]:
    """QEMU arguments backing guest RAM with a MAP_NORESERVE mapping (``reserve=off``).

    The host's heuristic overcommit refuses one mapping larger than its RAM (a 32 GiB guest on this
    24 GiB machine: "cannot set up guest memory 'pc.ram'"); the guest touches little of its RAM, and
    a mapping that reserves no swap space is not counted against the heuristic.
    """
    return [
        "-object",
        f"memory-backend-ram,id=bench-ram,size={size_mb}M,reserve=off",
        "-machine",
        "memory-backend=bench-ram",
    ]


def build_dumps(kernel: download.Kernel, size_mb: int) -> tuple[Path, Path]:
    directory = cache_dir() / "bench" / kernel.release / f"{size_mb}M"
    elf, kdump = directory / "vmcore.elf", directory / "vmcore.kdump"
    with locked(f"bench-{kernel.release}-{size_mb}"):
        if elf.is_file() and kdump.is_file():
            reassemble(kdump)  # dumps cached by an earlier runner
            return elf, kdump
        directory.mkdir(parents=True, exist_ok=True)
        log(f"bench: booting a {size_mb} MiB guest of {kernel.release}")
        memory = Memory(boot_mb=size_mb, slots=1, maxmem_mb=size_mb + 1024)
        with Guest(
            kernel, cmdline=["memhp_default_state=offline"], memory=memory, qemu_args=unreserved_ram(size_mb)
        ) as guest:
            guest.run(DEFERRED_INIT_DONE, timeout=600)
            guest.execute("stop")
            guest.dump(elf, "elf")
            subprocess.run(["fallocate", "--dig-holes", str(elf)], check=False)
            guest.dump(kdump, "kdump-zlib")
        reassemble(kdump)
    return elf, kdump


def reassemble(kdump: Path) -> None:
    """Turn QEMU's kdump-zlib output, in makedumpfile's flattened format, into a plain kdump-compressed file.

    The flattened format is what makedumpfile writes to a pipe (``-F``); a kdump kernel writing a file
    makes the plain one, and libkdumpfile reads a flattened file through an index whose lookups grow with
    its size (3.1 s against 1.15 s for the memmap of the 32 GiB dump), so the runner measures the plain one.
    """
    with open(kdump, "rb") as f:
        if not f.read(16).startswith(b"makedumpfile"):
            return
    plain = kdump.with_suffix(".plain")
    with open(kdump, "rb") as source:
        subprocess.run(["makedumpfile", "-R", str(plain)], stdin=source, check=True, capture_output=True)
    os.replace(plain, kdump)


def timed(command: list[str], stdin: str | None = None) -> float:
    """Wall seconds of one run (exit status 0 or 1: an audit with findings is a successful run)."""
    start = time.perf_counter()
    result = subprocess.run(command, input=stdin, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr[-500:]}")
    return seconds


def peak_rss(command: list[str]) -> int:
    """Peak RSS in KiB of one run, from /usr/bin/time -v (getrusage keeps the maximum of all children)."""
    out = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True).stderr
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out)
    return int(m.group(1)) if m else -1


def fixed_for_makedumpfile(elf: Path) -> Path:
    """A sparse copy of a QEMU ELF dump with its program headers right after the ELF header."""
    fixed = elf.with_name("vmcore.makedumpfile.elf")
    if fixed.is_file():
        return fixed
    subprocess.run(["cp", "--sparse=always", str(elf), str(fixed)], check=True)
    with open(fixed, "r+b") as f:
        phoff, headers = elf_program_headers(f)
        f.seek(0)
        header = bytearray(f.read(64))
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        first_data = min(h.offset for h in headers)
        if 64 + len(table) > first_data:
            raise RuntimeError(f"{elf}: no room to move the program headers")
        struct.pack_into("<Q", header, 32, 64)  # e_phoff
        struct.pack_into("<Q", header, 40, 0)  # e_shoff: drop QEMU's single section header
        struct.pack_into("<HHH", header, 58, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
        f.seek(0)
        f.write(bytes(header) + table)
    return fixed


def makedumpfile_exclusion_seconds(vmlinux: Path, elf: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "makedumpfile",
                "-d",
                "31",
                "-l",
                "--message-level",
                "31",
                "-x",
                str(vmlinux),
                str(fixed_for_makedumpfile(elf)),
                f"{tmp}/out",
            ],
            capture_output=True,
            text=True,
        )
    text = out.stdout + out.stderr
    m = re.search(r"STEP \[Excluding unnecessary pages\s*\] : ([0-9.]+) seconds", text)
    if not m:
        raise RuntimeError(f"makedumpfile printed no exclusion time:\n{text[-800:]}")
    return float(m.group(1))


def in_process(vmlinux: Path, elf: Path, kdump: Path, sample: int) -> dict[str, float]:
    """Per-page cost of kmeminspect's whole read (ELF, as makedumpfile reads; and kdump-compressed,
    where libkdumpfile's zlib decompression dominates), of its memmap walk alone (every section's struct
    pages read and decoded into runs: what makedumpfile's exclusion step times of itself, without the
    fixed cost of layout, sections, blocks, resources and zones) and of one drgn Object per page.

    The reads take tens of milliseconds: the best of several runs, as for makedumpfile's step, so that a
    time slice lost to other processes (TCG guests of other users) counts for neither."""
    import drgn
    from drgn.helpers.linux.mm import page_flags

    from kmeminspect.kernel import read_snapshot
    from kmeminspect.kernel.layout import read_layout
    from kmeminspect.kernel.memmap import MemmapReader
    from kmeminspect.kernel.sections import read_sections
    from kmeminspect.state import MEMMAP_READ, Snapshot
    from kmeminspect.target import open_vmcore

    def best_read(path: Path, repeat: int) -> tuple[float, drgn.Program, Snapshot]:
        prog = open_vmcore(path, vmlinux)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            snap = read_snapshot(prog, {"kind": "vmcore"})
            times.append(time.perf_counter() - start)
        return min(times), prog, snap

    bulk_kdump, _, _ = best_read(kdump, 3)
    bulk, prog, snap = best_read(elf, 7)
    layout, fmt = read_layout(prog)
    sections = read_sections(prog, layout)
    reader = MemmapReader(prog, layout, fmt)
    walks = []
    for _ in range(7):
        start = time.perf_counter()
        for section in sections:
            reader.section_runs(section)
        walks.append(time.perf_counter() - start)
    runs = snap.runs
    pages = int((runs["pfn_end"] - runs["pfn_start"])[runs["memmap"] == MEMMAP_READ].sum())
    page_type = prog.type("struct page")
    vmemmap = snap.layout.vmemmap_base
    start = time.perf_counter()
    total = 0
    for pfn in range(4096, 4096 + sample):
        page = drgn.Object(prog, page_type, address=vmemmap + pfn * snap.layout.struct_page_size)
        total += page_flags(page.address_of_()).value_() & 1
    per_object = (time.perf_counter() - start) / sample
    return {
        "pages": pages,
        "bulk_ns_per_page": bulk / pages * 1e9,
        "walk_ns_per_page": min(walks) / pages * 1e9,
        "kdump_ns_per_page": bulk_kdump / pages * 1e9,
        "object_ns_per_page": per_object * 1e9,
    }


def guest_memory(size_mb: int) -> Memory:
    return Memory(boot_mb=size_mb, slots=1, maxmem_mb=size_mb + 1024)


def qemu_audit(kernel: download.Kernel, size_mb: int, repeat: int) -> dict[str, float]:
    """``kmeminspect --qemu`` on a stopped guest of ``size_mb``: the audit's wall time (median of
    ``repeat`` processes), then in one process where it goes: debug info, and the read with its QMP
    memory reads (cProfile)."""
    import cProfile
    import pstats

    from kmeminspect.kernel import read_snapshot
    from kmeminspect.target import open_qemu

    log(f"bench: booting a {size_mb} MiB guest for --qemu")
    memory = guest_memory(size_mb)
    with Guest(
        kernel, cmdline=["memhp_default_state=offline"], memory=memory, qemu_args=unreserved_ram(size_mb)
    ) as guest:
        guest.run(DEFERRED_INIT_DONE, timeout=600)
        guest.execute("stop")  # a still guest reads consistently
        socket = str(guest.tools_qmp_path)
        audit = [sys.executable, "-m", "kmeminspect", "--qemu", socket, "--vmlinux", str(kernel.vmlinux), "audit"]
        times = [timed(audit) for _ in range(repeat)]
        start = time.perf_counter()
        prog = open_qemu(socket, kernel.vmlinux)
        debug_info = time.perf_counter() - start
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.runcall(read_snapshot, prog, {"kind": "qemu"})
        read = time.perf_counter() - start
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        memory_reads = [v for k, v in stats.items() if k[2] == "<method 'read' of '_drgn.Program' objects>"]
        calls, _, _, read_seconds, _ = memory_reads[0] if memory_reads else (0, 0, 0, 0.0, None)
        del prog
    return {
        "audit_s": statistics.median(times),
        "debug_info_s": debug_info,
        "read_s": read,
        "memory_reads": calls,
        "memory_read_s": read_seconds,
    }


def live_audit(kernel: download.Kernel, size_mb: int, repeat: int) -> float:
    """``kmeminspect --live audit`` inside a rootfs guest of ``size_mb`` (this checkout and the vmlinux
    shared over 9p), timed inside the guest: median seconds of ``repeat`` runs under TCG."""
    log(f"bench: booting a {size_mb} MiB rootfs guest for --live")
    shares = {KMEMINSPECT_SHARE: REPO, "vmlinux": kernel.vmlinux.parent}
    vmlinux = f"/mnt/vmlinux/{kernel.vmlinux.name}"
    with RootfsGuest(kernel, memory=guest_memory(size_mb), qemu_args=unreserved_ram(size_mb), shares=shares) as guest:
        guest.run(DEFERRED_INIT_DONE, timeout=600)
        times = []
        for _ in range(repeat):
            script = (
                "start=$(date +%s.%N); "
                f"kmeminspect --live --vmlinux {vmlinux} audit >/dev/null; status=$?; "
                'end=$(date +%s.%N); [ $status -le 1 ] && echo "$start $end"'
            )
            start, end = guest.run(script, timeout=1800).text.split()
            times.append(float(end) - float(start))
    return statistics.median(times)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,32768", help="guest boot memory in MiB, comma separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--guest-mb", type=int, default=8192, help="memory of the --qemu and --live guests")
    parser.add_argument("--no-guests", action="store_true", help="skip the --qemu and --live measurements")
    args = parser.parse_args()
    apt = download.prepare_apt()
    kernel = download.fetch_kernel(GENERATION, apt, update=False)
    kmem = [sys.executable, "-m", "kmeminspect"]
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        elf, kdump = build_dumps(kernel, size)
        log(f"bench: {size} MiB")
        audit = [*kmem, "--vmlinux", str(kernel.vmlinux), "--vmcore"]
        ours, theirs, ours_kdump = [], [], []
        for _ in range(args.repeat):  # alternate, so drifts hit both alike; crash and we read the same dump
            ours.append(timed([*audit, str(elf), "audit"]))
            theirs.append(timed(["crash", "-s", str(kernel.vmlinux), str(elf)], stdin="kmem -n\nquit\n"))
            ours_kdump.append(timed([*audit, str(kdump), "audit"]))
        exclusion = min(makedumpfile_exclusion_seconds(kernel.vmlinux, elf) for _ in range(args.repeat))
        inner = in_process(kernel.vmlinux, elf, kdump, sample=20000)
        rss = max(peak_rss([*audit, str(elf), "audit"]), peak_rss([*audit, str(kdump), "audit"]))
        pages = inner["pages"]
        rows.append(
            {
                "size": f"{size // 1024} GiB",
                "kmem_audit_s": statistics.median(ours),
                "crash_kmem_n_s": statistics.median(theirs),
                "ratio_e2e": statistics.median(ours) / statistics.median(theirs),
                "kdump_audit_s": statistics.median(ours_kdump),
                "read_ns": inner["bulk_ns_per_page"],
                "walk_ns": inner["walk_ns_per_page"],
                "kdump_ns": inner["kdump_ns_per_page"],
                "mdf_ns": exclusion / pages * 1e9,
                "ratio_walk": inner["walk_ns_per_page"] / (exclusion / pages * 1e9),
                "ratio_read": inner["bulk_ns_per_page"] / (exclusion / pages * 1e9),
                "object_ns": inner["object_ns_per_page"],
                "rss_mb": rss / 1024,
                "pages": pages,
            }
        )
    print(
        f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {kernel.release}, drgn {__import__('drgn').__version__}; wall times: medians of {args.repeat}, "
        f"memmap walks: best of {args.repeat} (makedumpfile) and of 7 (kmeminspect)\n"
    )
    header = [
        "dump",
        "kmeminspect audit, ELF (s)",
        "crash kmem -n, ELF (s)",
        "ratio",
        "kmeminspect audit, kdump-zlib (s)",
        "memmap walk, ELF (ns/page)",
        "makedumpfile exclusion, ELF (ns/page)",
        "ratio",
        "whole read, ELF (ns/page)",
        "ratio",
        "whole read, kdump-zlib (ns/page)",
        "drgn Object per page (ns)",
        "audit peak RSS (MB)",
    ]
    print(markdown_header(header))
    for r in rows:
        cells = [
            str(r["size"]),
            f"{r['kmem_audit_s']:.2f}",
            f"{r['crash_kmem_n_s']:.2f}",
            f"{r['ratio_e2e']:.2f}",
            f"{r['kdump_audit_s']:.2f}",
            f"{r['walk_ns']:.1f}",
            f"{r['mdf_ns']:.1f}",
            f"{r['ratio_walk']:.2f}",
            f"{r['read_ns']:.1f}",
            f"{r['ratio_read']:.2f}",
            f"{r['kdump_ns']:.1f}",
            f"{r['object_ns']:.0f}",
            f"{r['rss_mb']:.0f}",
        ]
        print(markdown_row(cells))
    print_scaling(rows)
    sys.stdout.flush()
    qemu = None if args.no_guests else qemu_audit(kernel, args.guest_mb, args.repeat)
    live = None if args.no_guests else live_audit(kernel, args.guest_mb, args.repeat)
    print_targets(rows, qemu, live, args.guest_mb)
    return 0


def print_scaling(rows: list[dict[str, Any]]) -> None:
    """Each size against the smallest: memory, time per page (the walk and the audit), RSS growth."""
    base = rows[0]
    print(f"\nscaling against {base['size']}:\n")
    header = [
        "dump",
        "memory ×",
        "memmap walk per page ×",
        "whole read per page ×",
        "whole read per page, kdump-zlib ×",
        "audit wall time, ELF ×",
        "audit wall time, kdump-zlib ×",
        "audit RSS growth (MB)",
    ]
    print(markdown_header(header))
    for r in rows:
        cells = [
            str(r["size"]),
            f"{r['pages'] / base['pages']:.1f}",
            f"{r['walk_ns'] / base['walk_ns']:.2f}",
            f"{r['read_ns'] / base['read_ns']:.2f}",
            f"{r['kdump_ns'] / base['kdump_ns']:.2f}",
            f"{r['kmem_audit_s'] / base['kmem_audit_s']:.2f}",
            f"{r['kdump_audit_s'] / base['kdump_audit_s']:.2f}",
            f"{r['rss_mb'] - base['rss_mb']:+.0f}",
        ]
        print(markdown_row(cells))


def print_targets(rows: list[dict[str, Any]], qemu: dict[str, float] | None, live: float | None, guest_mb: int) -> None:
    """Issue 7's targets, each with its measured figure and pass or fail."""
    base = rows[0]
    print("\ntargets (issue 7):\n")
    for r in rows:
        print(
            f"- memmap walk {r['size']}: {r['walk_ns']:.1f} ns/page vs makedumpfile {r['mdf_ns']:.1f} "
            f"({r['ratio_walk']:.2f}×, target ≤ 1): {verdict(r['ratio_walk'] <= 1)}; whole read with its fixed "
            f"costs {r['read_ns']:.1f} ns/page ({r['ratio_read']:.2f}×): {verdict(r['ratio_read'] <= 1)}"
        )
        print(
            f"- end to end {r['size']}: audit {r['ratio_e2e']:.2f} of crash kmem -n (target ≤ 0.25): "
            f"{verdict(r['ratio_e2e'] <= 0.25)}"
        )
    for r in rows[1:]:
        growth = r["rss_mb"] - base["rss_mb"]
        linear = all(r[k] <= 1.10 * base[k] for k in ("walk_ns", "read_ns", "kdump_ns")) and all(
            r[k] / base[k] <= 1.10 * r["pages"] / base["pages"] for k in ("kmem_audit_s", "kdump_audit_s")
        )
        limit = 128 if r["pages"] / base["pages"] > 8 else 64
        print(
            f"- peak RSS {r['size']} vs {base['size']}: {growth:+.0f} MB (target < {limit}): {verdict(growth < limit)}"
        )
        print(
            f"- linear time {base['size']} → {r['size']}: walk per page ×{r['walk_ns'] / base['walk_ns']:.2f} "
            f"(kdump-zlib ×{r['kdump_ns'] / base['kdump_ns']:.2f}), "
            f"audit wall time ×{r['kmem_audit_s'] / base['kmem_audit_s']:.2f} "
            f"(kdump-zlib ×{r['kdump_audit_s'] / base['kdump_audit_s']:.2f}) for ×{r['pages'] / base['pages']:.1f} "
            f"memory (target: per page no worse, 10% for noise): {verdict(linear)}"
        )
    if qemu is not None:
        print(
            f"- --qemu audit of a {guest_mb // 1024} GiB guest: {qemu['audit_s']:.2f} s (target < 2 s): "
            f"{verdict(qemu['audit_s'] < 2)}; in one process: debug info {qemu['debug_info_s']:.2f} s, read "
            f"{qemu['read_s']:.3f} s of which {qemu['memory_reads']:.0f} drgn memory reads "
            f"{qemu['memory_read_s']:.3f} s"
        )
    if live is not None:
        print(f"- --live audit inside a {guest_mb // 1024} GiB rootfs guest (TCG, a figure): {live:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
