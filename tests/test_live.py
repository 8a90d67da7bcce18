"""One kernel state, read three ways: live from inside the guest (/proc/kcore), over QMP, from a vmcore.

Inside the guest kmeminspect runs in the rootfs guest: its wheels are in the image, its code and the
kernel's vmlinux come from the host over read-only 9p shares (``RootfsGuest(shares=...)``). The guest is
stopped (QMP ``stop``) before the host reads it, so the QMP read, the dump and the in-guest read see one
state; only the snapshot's ``source`` (kind, path, time) may differ (docs/snapshot-format.md).
"""

from __future__ import annotations

import base64
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GENERATIONS, get_kernel
from vmfixtures.rootfs import KMEMINSPECT_SHARE, RootfsGuest, rootfs_guest
from vmfixtures.scenarios import SCENARIOS

from kmeminspect import snapshot as snapshot_mod
from kmeminspect.kernel import read_snapshot
from kmeminspect.state import MEMMAP_NOT_IN_DUMP, MEMMAP_READ, Snapshot
from kmeminspect.target import open_qemu, open_vmcore

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
VMLINUX_SHARE = "vmlinux"
COMMANDS = ("sections", "blocks")
#: everything a snapshot holds but its source
FIELDS = ("layout", "sections", "blocks", "pagemaps", "zones", "nodes", "resources")


def live_guest(scenario: str, generation: str) -> RootfsGuest:
    """A rootfs guest of ``scenario`` that can run ``kmeminspect`` (the checkout and vmlinux shared)."""
    kernel = get_kernel(generation)
    reason = SCENARIOS[scenario].unsupported(kernel)
    if reason:
        pytest.skip(f"{scenario} on {kernel.release}: {reason}")
    shares = {KMEMINSPECT_SHARE: REPO, VMLINUX_SHARE: kernel.vmlinux.parent}
    return rootfs_guest(scenario, kernel, shares=shares)


def in_guest(guest: RootfsGuest, *args: str) -> Any:
    """``kmeminspect --live --vmlinux (shared) --json ARGS`` as root in the guest, parsed."""
    vmlinux = f"/mnt/{VMLINUX_SHARE}/{guest.kernel.vmlinux.name}"
    result = guest.run(f"kmeminspect --live --vmlinux {vmlinux} --json {' '.join(args)}", timeout=900)
    return json.loads(result.stdout)


def on_host(*args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "kmeminspect", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def project(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{k: row[k] for k in keys} for row in rows]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_live_in_guest_equals_qmp(generation: str, tmp_path: Path) -> None:
    """``kmeminspect --live`` inside the guest and ``--qemu`` from the host agree on sections and blocks,
    and on the whole snapshot; and so does ``--live`` without the vmlinux (the guest kernel's BTF from
    /sys/kernel/btf/vmlinux, its symbols from /proc/kallsyms)."""
    with live_guest("dimm-online", generation) as guest:
        SCENARIOS["dimm-online"].setup(guest)
        live = {command: in_guest(guest, command) for command in COMMANDS}
        live_snapshot = snapshot_in_guest(guest, tmp_path / "live.snap")
        guest.run("kmeminspect --live snapshot -o /tmp/btf.snap", timeout=900)
        (tmp_path / "btf.snap").write_bytes(base64.b64decode(guest.run("base64 -w0 /tmp/btf.snap").stdout))
        guest.execute("stop")
        target = ["--qemu", str(guest.tools_qmp_path), "--vmlinux", str(guest.kernel.vmlinux), "--json"]
        qmp = {command: on_host(*target, command) for command in COMMANDS}
        qmp_snapshot = read_snapshot(open_qemu(str(guest.tools_qmp_path), guest.kernel.vmlinux), {"kind": "qemu"})

    keys = ("nr", "flags", "subsection_map")
    assert project(live["sections"]["sections"], keys) == project(qmp["sections"]["sections"], keys)
    assert live["blocks"] == qmp["blocks"]
    # 1 GiB of boot memory and the 512 MiB DIMM in 128 MiB blocks, all online
    assert [b["state"] for b in live["blocks"]["blocks"]] == ["online"] * (8 + 4)
    # and the rest of a section's row (addresses, node) as well
    assert live["sections"] == qmp["sections"]
    # no struct page of RAM is out of /proc/kcore's reach
    assert (live_snapshot.runs["memmap"] == MEMMAP_READ).all()
    assert_same_snapshot(live_snapshot, qmp_snapshot)
    btf_snapshot = snapshot_mod.load(tmp_path / "btf.snap")
    assert (live_snapshot.source["types"], btf_snapshot.source["types"]) == ("dwarf", "btf")
    assert_same_snapshot(btf_snapshot, live_snapshot)


def snapshot_in_guest(guest: RootfsGuest, path: Path) -> Snapshot:
    """``kmeminspect --live snapshot`` in the guest, copied to ``path`` and loaded."""
    in_guest(guest, "snapshot", "-o", "/tmp/live.snap")
    path.write_bytes(base64.b64decode(guest.run("base64 -w0 /tmp/live.snap").stdout))
    return snapshot_mod.load(path)


def assert_same_snapshot(a: Snapshot, b: Snapshot) -> None:
    """Equal in everything but ``source`` (kind, path, time)."""
    for field in FIELDS:
        assert getattr(a, field) == getattr(b, field), field
    differences = snapshot_mod.diff(a, b)["runs"]
    assert not differences, differences[:5]
    assert a.runs.dtype == b.runs.dtype and np.array_equal(a.runs, b.runs)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_live_device_memmap_on_device(generation: str, tmp_path: Path) -> None:
    """/proc/kcore does not map memory it does not consider RAM: an fsdax namespace whose memmap lives on
    the device itself (``--map=dev``) reads live as "not in dump" there, without failing anything else."""
    with live_guest("pmem-fsdax", generation) as guest:
        SCENARIOS["pmem-fsdax"].setup(guest)
        live = snapshot_in_guest(guest, tmp_path / "live.snap")
        guest.execute("stop")
        qmp = read_snapshot(open_qemu(str(guest.tools_qmp_path), guest.kernel.vmlinux), {"kind": "qemu"})
    for field in FIELDS:
        assert getattr(live, field) == getattr(qmp, field), field

    assert len(qmp.pagemaps) == 1 and qmp.pagemaps[0].altmap is not None
    ((device_start, device_end),) = qmp.pagemaps[0].ranges
    size = device_end - device_start
    assert memmap_states(qmp, device_start, device_end) == {MEMMAP_READ: size}
    # the whole device's memmap is on the device: not one of its struct pages is readable live
    assert memmap_states(live, device_start, device_end) == {MEMMAP_NOT_IN_DUMP: size}
    outside = live.runs[~runs_inside(live, device_start, device_end)]
    assert np.array_equal(outside, qmp.runs[~runs_inside(qmp, device_start, device_end)])


def memmap_states(snapshot: Snapshot, start: int, end: int) -> dict[int, int]:
    """memmap state -> number of pfns in [start, end)."""
    runs = snapshot.runs
    lo = np.maximum(runs["pfn_start"], np.uint64(start))
    hi = np.minimum(runs["pfn_end"], np.uint64(end))
    counts: dict[int, int] = {}
    for state, low, high in zip(runs["memmap"].tolist(), lo.tolist(), hi.tolist(), strict=True):
        if high > low:
            counts[state] = counts.get(state, 0) + high - low
    return counts


def runs_inside(snapshot: Snapshot, start: int, end: int) -> np.ndarray:
    runs = snapshot.runs
    return (runs["pfn_start"] < end) & (runs["pfn_end"] > start)


QMP_VMCORE_CASES = [pytest.param(g, s, id=f"{g}-{s}") for g in GENERATIONS for s in ("dimm-online", "pmem-collision")]


@pytest.mark.parametrize(("generation", "scenario"), QMP_VMCORE_CASES)
def test_qmp_equals_vmcore(generation: str, scenario: str, tmp_path: Path) -> None:
    """A stopped guest read over QMP and from its kdump-compressed dump: identical but for the source; and
    over QMP without the vmlinux (the BTF and kallsyms in the guest's memory) as well."""
    kernel = get_kernel(generation)
    setup = SCENARIOS[scenario]
    reason = setup.unsupported(kernel)
    if reason:
        pytest.skip(f"{scenario} on {kernel.release}: {reason}")
    with setup.guest(kernel) as guest:
        setup.setup(guest)
        guest.execute("stop")
        qmp = read_snapshot(open_qemu(str(guest.tools_qmp_path), kernel.vmlinux), {"kind": "qemu"})
        gc.collect()  # drgn lets the socket go with the Program (QEMU serves one client per socket)
        qmp_btf = read_snapshot(open_qemu(str(guest.tools_qmp_path), None))
        dump = guest.dump(tmp_path / "vmcore.kdump", "kdump-zlib")
    vmcore = read_snapshot(open_vmcore(dump, kernel.vmlinux), {"kind": "vmcore"})

    assert_same_snapshot(qmp, vmcore)
    assert qmp_btf.source["types"] == "btf"
    assert_same_snapshot(qmp_btf, vmcore)
    assert (qmp.runs["memmap"] == MEMMAP_READ).all()


#: each doctor check, and a shell probe in the guest that says independently whether it holds
DOCTOR_PROBES = {
    "root": '[ "$(id -u)" = 0 ]',
    "/proc/kcore": "test -e /proc/kcore",
    "bcc": "python3 -c 'import bcc'",
    "tracefs": "test -e /sys/kernel/tracing/trace || test -e /sys/kernel/debug/tracing/trace",
    "kprobes": "test -e /sys/kernel/tracing/kprobe_events || test -e /sys/kernel/debug/tracing/kprobe_events",
    "BTF": "test -e /sys/kernel/btf/vmlinux",
    "fentry": "test -e /sys/kernel/btf/vmlinux && cut -d' ' -f1 /sys/kernel/tracing/available_filter_functions"
    " | grep -qx pfn_to_online_page",
    "memory hotplug": "test -d /sys/devices/system/memory",
    "qemu-system-x86_64": "command -v qemu-system-x86_64",
    "crash": "command -v crash",
}


@pytest.mark.parametrize("generation", GENERATIONS)
def test_doctor_in_guest(generation: str) -> None:
    """``kmeminspect doctor`` inside the rootfs guest: every verdict equals an independent probe of the
    guest; the shared vmlinux's build id (readelf on the host) matches the running kernel; everything
    trace needs is there (the tracing tests run in this guest); a missing tool comes with its fix; and
    which types ``--live`` will use, with the vmlinux and without."""
    with live_guest("boot", generation) as guest:
        checks = {c["name"]: c for c in in_guest(guest, "doctor")["checks"]}
        probes = {name: guest.run(probe, check=False).returncode == 0 for name, probe in DOCTOR_PROBES.items()}
        without = json.loads(guest.run("kmeminspect --live --json doctor", timeout=900).stdout)["checks"]
    # what --live will use: the DWARF given, else (no debug package in the guest) the kernel's own BTF
    assert checks["types"]["ok"] and checks["types"]["detail"].startswith("--live: DWARF")
    types = {c["name"]: c for c in without}
    assert types["types"]["ok"] and types["types"]["detail"].startswith("--live: BTF (/sys/kernel/btf/vmlinux")
    assert not types["debug info"]["ok"] and "drgn finds none" in types["debug info"]["detail"]
    for name, holds in probes.items():
        assert checks[name]["ok"] == holds, (name, checks[name])
    assert all((c["fix"] is None) == c["ok"] for c in checks.values())
    assert all(checks[name]["ok"] for name in ("root", "/proc/kcore", "bcc", "tracefs", "kprobes", "BTF", "fentry"))
    notes = subprocess.run(["readelf", "-n", str(guest.kernel.vmlinux)], capture_output=True, text=True).stdout
    build_id = notes.split("Build ID:")[1].split()[0]
    assert checks["debug info"]["ok"] and f"build id {build_id} matches" in checks["debug info"]["detail"]
    assert not checks["qemu-system-x86_64"]["ok"] and "apt-get install" in checks["qemu-system-x86_64"]["fix"]


@pytest.mark.parametrize("generation", GENERATIONS[:1])
def test_doctor_names_a_wrong_vmlinux(generation: str) -> None:
    """On this machine (not running that kernel) a test bed vmlinux is the wrong build: doctor says whose."""
    vmlinux = get_kernel(generation).vmlinux
    checks = {c["name"]: c for c in on_host("--vmlinux", str(vmlinux), "--json", "doctor")["checks"]}
    notes = subprocess.run(["readelf", "-n", str(vmlinux)], capture_output=True, text=True).stdout
    assert not checks["debug info"]["ok"]
    assert f"build id {notes.split('Build ID:')[1].split()[0]}, running kernel " in checks["debug info"]["detail"]
