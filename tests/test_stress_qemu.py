"""kmeminspect stress in QEMU mode, from the host: DIMM rounds and virtio-mem resizes on a busybox guest whose
hotplugged memory is onlined movable by the kernel (``memhp_default_state=online_movable``).

Checked through the test bed's own QMP connection (kmeminspect drives the tools socket): after a run, no
DIMM and no RAM backend of the run is left, virtio-mem has its original requested and plugged size, and
the guest's boot memory blocks are as before.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GENERATIONS, get_kernel
from vmfixtures.scenarios import memory_blocks
from vmfixtures.vm import Guest, Memory

from kmeminspect.stress import report_text as stress_report_text

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
VIRTIO_MEM = "vmem0"
VIRTIO_MEM_MAX = 1024 * MiB
VIRTIO_MEM_START = 256 * MiB
QEMU_ARGS = [
    "-object", f"memory-backend-ram,id={VIRTIO_MEM}-mem,size={VIRTIO_MEM_MAX}",
    "-device", f"virtio-mem-pci,id={VIRTIO_MEM},memdev={VIRTIO_MEM}-mem,requested-size={VIRTIO_MEM_START}",
]  # fmt: skip
ON_ONE_WORKER = [pytest.param(g, id=g, marks=pytest.mark.xdist_group(f"stress-qemu-{g}")) for g in GENERATIONS]


@pytest.fixture(scope="module", params=ON_ONE_WORKER)
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    kernel = get_kernel(request.param)
    cmdline = ["memhp_default_state=online_movable"]
    with Guest(kernel, cmdline=cmdline, qemu_args=QEMU_ARGS, memory=Memory(1024, 4, 4096)) as g:
        g.run("loadmod virtio_mem")
        deadline = time.monotonic() + 60
        while virtio_mem(g) != (VIRTIO_MEM_START, VIRTIO_MEM_START):
            assert time.monotonic() < deadline, virtio_mem(g)
            time.sleep(0.2)
        yield g


def virtio_mem(guest: Guest) -> tuple[int, int]:
    """(requested, plugged) bytes."""
    path = f"/machine/peripheral/{VIRTIO_MEM}"
    return (
        int(guest.execute("qom-get", path=path, property="requested-size")),
        int(guest.execute("qom-get", path=path, property="size")),
    )


def leftovers(guest: Guest) -> list[str]:
    """Memory devices and objects of a stress run still in QEMU."""
    devices = [d["data"].get("id", "") for d in guest.execute("query-memory-devices")]
    objects = [o["name"] for o in guest.execute("qom-list", path="/objects")]
    return [name for name in devices + objects if name.startswith("kmi-stress-")]


def boot_blocks(guest: Guest) -> dict[int, str]:
    """Blocks below 4 GiB (boot RAM): hotplugged memory starts at 4 GiB."""
    return {b: s for b, s in memory_blocks(guest).items() if b < 32}


def kmeminspect(guest: Guest, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "kmeminspect", "--qemu", str(guest.tools_qmp_path),
        "--vmlinux", str(guest.kernel.vmlinux), "--json", "stress", *args,
    ]  # fmt: skip


def run(guest: Guest, tmp_path: Path, rounds: int, resizes: int, audit_every: int) -> dict[str, Any]:
    before = boot_blocks(guest)
    journal = tmp_path / "qemu.journal"
    command = kmeminspect(
        guest, "--dimm-rounds", str(rounds), "--virtio-mem", VIRTIO_MEM, "--resizes", str(resizes),
        "--audit-every", str(audit_every), "--journal", str(journal), "--seed", "1",
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["error"] is None and report["stopped_by"] == "operations"
    by_action = report["transitions"]["by_action"]
    assert by_action["dimm-add"]["attempted"] == rounds
    assert by_action["resize"]["attempted"] == resizes
    assert report["restored"] is True
    assert report["audit"]["new_errors"] == [] and report["audit"]["final_new_errors"] == []
    assert leftovers(guest) == []
    assert virtio_mem(guest) == (VIRTIO_MEM_START, VIRTIO_MEM_START)
    assert boot_blocks(guest) == before
    report["stderr"] = result.stderr
    return report


def test_qemu_fifty_each(guest: Guest, tmp_path: Path) -> None:
    """The issue's bar, quick enough for CI: 50 DIMM add/online/offline/remove rounds and 50 virtio-mem
    resizes without a tool error, audited every 10 operations over QMP; prints the report (pytest -s)."""
    report = run(guest, tmp_path, rounds=50, resizes=50, audit_every=10)
    by_action = report["transitions"]["by_action"]
    # a refused add leaves nothing to remove
    assert by_action["dimm-remove"]["attempted"] <= by_action["dimm-add"]["attempted"]
    print(f"\n{guest.kernel.release}:\n{report['stderr']}{stress_report_text(report)}")


def start(guest: Guest, journal: Path) -> subprocess.Popen[str]:
    command = kmeminspect(
        guest, "--dimm-rounds", "1000", "--virtio-mem", VIRTIO_MEM, "--resizes", "1000", "--audit-every", "0",
        "--journal", str(journal),
    )  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (journal.exists() and b'"end"' in journal.read_bytes()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_qemu_stop_signal(guest: Guest, tmp_path: Path, signum: int) -> None:
    before = boot_blocks(guest)
    process = start(guest, tmp_path / "j")
    time.sleep(random.Random(f"{guest.kernel.release} {signum}").uniform(0, 3))
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    report = json.loads(out)
    assert report["stopped_by"] == signal.Signals(signum).name and report["restored"] is True
    assert leftovers(guest) == []
    assert virtio_mem(guest) == (VIRTIO_MEM_START, VIRTIO_MEM_START)
    assert boot_blocks(guest) == before


def test_qemu_sigkill_then_restore(guest: Guest, tmp_path: Path) -> None:
    """SIGKILL right after a DIMM was added (the guest took it), then --restore removes it."""
    before = boot_blocks(guest)
    journal = tmp_path / "j"
    process = start(guest, journal)
    deadline = time.monotonic() + 120
    while not leftovers(guest) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    left = leftovers(guest)
    result = subprocess.run(
        kmeminspect(guest, "--restore", str(journal)), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] is True
    # a DIMM whose device_del the run had sent may finish leaving on its own before --restore looks
    restored = {r["what"] for r in report["blocks"] if r["result"] == "restored" and r["what"].startswith("dimm")}
    assert restored <= {f"dimm {name}" for name in left if "-dimm" in name}
    assert leftovers(guest) == []
    assert virtio_mem(guest) == (VIRTIO_MEM_START, VIRTIO_MEM_START)
    assert boot_blocks(guest) == before
