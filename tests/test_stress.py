"""kmeminspect stress on real kernels: inside the rootfs guest, on the DIMM blocks of ``dimm-online`` plus a
second 512 MiB DIMM left offline (7 blocks of 128 MiB to cycle: 3 online_movable, 4 offline; the first
DIMM block is online in Normal and is left out without --allow-kernel-zone).

Every check compares the guest's sysfs, read by a shell loop (not by kmeminspect), before and after.
The CI tests are short; the long ones ("make stress": 500 transitions, 10 SIGINT and 10 SIGTERM at random
moments, SIGKILL and --restore) are marked ``slow`` and print their reports (docs/stress.md).
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GENERATIONS
from test_live import live_guest
from vmfixtures.rootfs import RootfsGuest
from vmfixtures.scenarios import DIMM_SIZE, SCENARIOS, add_dimm, memory_blocks, wait_for
from vmfixtures.vm import Result

from kmeminspect.stress import report_text as stress_report_text

pytestmark = pytest.mark.vm

#: every block: "N state valid_zones..." (valid_zones of an online block is its zone)
SYSFS_BLOCKS = (
    "cd /sys/devices/system/memory && for d in memory*; do echo ${d#memory} $(cat $d/state) $(cat $d/valid_zones); done"
)
JOURNAL = "/tmp/s.journal"
#: a run in the background: its pid, output and exit status in /tmp/s.*
BACKGROUND = (
    "{command} --journal " + JOURNAL + " > /tmp/s.out 2> /tmp/s.err & echo $! > /tmp/s.pid; "
    "wait $!; echo $? > /tmp/s.rc"
)
#: enough to be sure a signal lands before the end: the run stops on the signal only
LONG = "--duration 600"
#: interrupted runs audit often, so that signals land in audits too
INTERRUPT_AUDIT_EVERY = 5


class StressGuest:
    """A rootfs guest with two DIMMs, running the host's kmeminspect."""

    def __init__(self, guest: RootfsGuest, hotplugged: list[int]) -> None:
        self.guest = guest
        self.hotplugged = hotplugged
        self.release = guest.kernel.release

    def sysfs(self) -> dict[int, str]:
        blocks = {}
        for line in self.guest.run(SYSFS_BLOCKS).text.splitlines():
            number, _, rest = line.partition(" ")
            blocks[int(number)] = rest
        return blocks

    def command(self, *args: str) -> str:
        """``kmeminspect ARGS`` in the guest, its audits reading with the guest kernel's BTF (docs/btf.md)."""
        return f"kmeminspect {' '.join(args)}"

    def kmeminspect(self, *args: str, timeout: float = 900) -> Result:
        return self.guest.run(self.command(*args), timeout=timeout, check=False)

    def start(self, *args: str) -> None:
        """Start ``kmeminspect ARGS`` in the background; return once its journal exists (it holds the
        original states: the run may change blocks from now on)."""
        self.guest.run("rm -f /tmp/s.*")  # before starting: a journal left by the last run would pass for this one's
        self.guest.run_background(BACKGROUND.format(command=self.command(*args)))
        self.guest.run(f"for i in $(seq 1200); do [ -s {JOURNAL} ] && exit 0; sleep 0.05; done; exit 1", timeout=90)

    def signal(self, signum: int) -> None:
        self.guest.run(f"kill -{signal.Signals(signum).name[3:]} $(cat /tmp/s.pid)")

    def wait(self, timeout: float = 180) -> tuple[int, str, str]:
        """The background run's exit status, stdout and stderr once it has ended."""
        self.guest.run("while [ ! -s /tmp/s.rc ]; do sleep 0.1; done", timeout=timeout)
        result = self.guest.run("cat /tmp/s.rc; echo; cat /tmp/s.out; echo '<stderr>'; cat /tmp/s.err")
        rc, _, rest = result.text.partition("\n")
        out, _, err = rest.partition("<stderr>")
        return int(rc), out, err

    def journal(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.guest.run(f"cat {JOURNAL}").text.splitlines() if line.strip()]

    def walkers_alive(self) -> bool:
        # [.]: grep's own command line holds the pattern, not what it matches
        check = "grep -l 'kmeminspect[.]walkers' /proc/[0-9]*/cmdline 2>/dev/null"
        return bool(self.guest.run(check, check=False).text.strip())


#: one guest per generation: all of a generation's tests on one xdist worker (make test: --dist loadgroup)
ON_ONE_WORKER = [pytest.param(g, id=g, marks=pytest.mark.xdist_group(f"stress-{g}")) for g in GENERATIONS]


@pytest.fixture(scope="module", params=ON_ONE_WORKER)
def guest(request: pytest.FixtureRequest) -> Iterator[StressGuest]:
    with live_guest("dimm-online", request.param) as g:
        boot = set(memory_blocks(g))
        SCENARIOS["dimm-online"].setup(g)
        add_dimm(g, DIMM_SIZE, "dimm1")
        yield StressGuest(g, sorted(set(memory_blocks(g)) - boot))


def state(line: str) -> str:
    """``online Movable`` or ``offline``: an offline block's valid_zones (the zones it could go to, the
    default first) changes with its neighbours' states, not its own."""
    return line if line.startswith("online") else line.split()[0]


def cycled(guest: StressGuest, before: dict[int, str]) -> set[int]:
    """What --all-hotpluggable should choose: the DIMMs' blocks, but the one online in a kernel zone."""
    return {b for b in guest.hotplugged if not before[b].startswith("online Normal")}


def check_run(guest: StressGuest, before: dict[int, str], transitions: int, audit_every: int) -> dict[str, Any]:
    """Run ``stress`` in the foreground with every walker; check the report and sysfs; return the report."""
    started = time.monotonic()
    result = guest.kmeminspect(
        "--json", "stress", "--all-hotpluggable", "--transitions", str(transitions), "--walkers", "all",
        "--audit-every", str(audit_every), "--journal", JOURNAL, "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    report: dict[str, Any] = json.loads(result.stdout)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    report["stderr"] = result.stderr.decode()
    assert guest.sysfs() == before
    assert {int(b) for b in report["blocks"]} == cycled(guest, before)
    assert report["stopped_by"] == "transitions" and report["error"] is None
    t = report["transitions"]
    assert t["attempted"] == transitions
    assert t["done"] + sum(r["count"] for r in t["refusals"].values()) == transitions, t
    assert not t["anomalies"]
    assert report["restored"] is True
    walkers = {w["kind"]: w for w in report["walkers"]}
    assert walkers["kpageflags"]["passes"] > 0 and not walkers["kpageflags"]["errors"]
    assert walkers["compact"]["passes"] > 0 and not walkers["compact"]["errors"]
    assert "passes" in walkers["idle"] or "absent" in walkers["idle"]["note"]
    audit = report["audit"]
    assert audit["samples"] == transitions // audit_every + 1  # and once after restoring
    assert audit["new_errors"] == [] and audit["final_new_errors"] == []
    header = guest.journal()[0]
    assert {int(b): s for b, s in header["blocks"].items()} == {
        b: {"state": before[b].split()[0], "zone": before[b].split()[1] if before[b].startswith("online") else None}
        for b in cycled(guest, before)
    }
    return report


def test_short_run(guest: StressGuest) -> None:
    """40 transitions over the 7 DIMM blocks with every walker and an audit every 10: every block back,
    nothing else changed, the audit clean (no error the baseline did not have)."""
    before = guest.sysfs()
    assert len(cycled(guest, before)) >= 4
    check_run(guest, before, transitions=40, audit_every=10)
    assert not guest.walkers_alive()


def test_run_traced(guest: StressGuest) -> None:
    """stress --trace: the tracer saw one offline_pages and one online_pages return per transition the
    kernel carried out, no race and no inactive hand-out, and detached afterwards."""
    before = guest.sysfs()
    guest.guest.run("rm -f /tmp/s.*")  # the journal of the module's previous run: never overwritten
    result = guest.kmeminspect(
        "--json", "stress", "--all-hotpluggable", "--transitions", "12", "--walkers", "kpageflags",
        "--audit-every", "0", "--journal", JOURNAL, "--seed", "2", "--trace",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert guest.sysfs() == before and report["restored"] is True
    traced = report["hooks"]["trace"]
    assert traced["races"] == 0 and traced["handouts_inactive"] == 0 and traced["events_lost"] == 0, report["hooks"]
    done = [e for e in guest.journal() if e.get("event") == "end" and e["result"] == "done"]
    restored = [r for r in report["restoration"] if r["result"] == "restored"]
    # every transition done, and every restoration, is one offline_pages or online_pages the kernel finished
    finished = traced["events"].get("offline_pages:end", 0) + traced["events"].get("online_pages:end", 0)
    assert finished >= len(done) + len(restored) and len(done) > 0
    assert "offline_pages:end" in traced["events"] and "online_pages:end" in traced["events"]
    assert not guest.guest.run("bpftool prog show | grep -c kmi_", check=False).text.strip().strip("0")


def interrupt(guest: StressGuest, signum: int, delay: float) -> dict[str, Any]:
    """Start a run, deliver ``signum`` ``delay`` seconds after its journal appeared; check that every block
    is back and the run reported it, exit 0."""
    before = guest.sysfs()
    guest.start(
        "--json", "stress", "--all-hotpluggable", LONG, "--walkers", "kpageflags,compact",
        "--audit-every", str(INTERRUPT_AUDIT_EVERY),
    )  # fmt: skip
    time.sleep(delay)
    guest.signal(signum)
    rc, out, err = guest.wait()
    assert rc == 0, err
    report: dict[str, Any] = json.loads(out)
    assert report["stopped_by"] == signal.Signals(signum).name
    assert report["restored"] is True, report["restoration"]
    assert guest.sysfs() == before
    assert not guest.walkers_alive()
    assert guest.journal()[-1]["event"] == "closed"
    return report


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal(guest: StressGuest, signum: int) -> None:
    """A stop signal at two random moments of a run (the baseline audit, a transition, an audit)."""
    rng = random.Random(f"{guest.release} {signum}")
    for _ in range(2):
        interrupt(guest, signum, rng.uniform(0, 6))


def kill_and_restore(guest: StressGuest, delay: float) -> dict[str, Any]:
    """SIGKILL a run ``delay`` s after its first completed transition, then ``--restore``: every block back,
    and exactly the blocks found changed were put back."""
    before = guest.sysfs()
    guest.start("--json", "stress", "--all-hotpluggable", LONG, "--walkers", "kpageflags,compact", "--audit-every", "0")
    guest.guest.run(f'while ! grep -q \'"result":"done"\' {JOURNAL}; do sleep 0.02; done', timeout=120)
    time.sleep(delay)
    guest.signal(signal.SIGKILL)
    guest.wait()
    # PR_SET_PDEATHSIG: the walkers get SIGKILL with their parent; one inside a long /proc/kpageflags read
    # or a compaction dies when the kernel gets back to it, which a loaded TCG guest may take seconds to do
    wait_for("the walkers to die with their parent", lambda: not guest.walkers_alive(), timeout=60)
    killed = guest.sysfs()
    changed = {b for b in before if state(killed[b]) != state(before[b])}
    assert changed <= cycled(guest, before)
    assert guest.journal()[-1]["event"] != "closed"
    result = guest.kmeminspect("--json", "stress", "--restore", JOURNAL)
    assert result.returncode == 0, result.stderr.decode()
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["complete"] is True
    assert {r["block"] for r in report["blocks"] if r["result"] == "restored"} == changed
    assert guest.sysfs() == before
    assert guest.journal()[-1]["event"] == "closed"
    return report


def test_sigkill_then_restore(guest: StressGuest) -> None:
    kill_and_restore(guest, random.Random(guest.release).uniform(0, 2))


# -- make stress ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_long_run(guest: StressGuest) -> None:
    """The issue's bar: at least 500 transitions over at least 4 blocks with concurrent walkers, every
    block back, the audit clean. Prints the report."""
    before = guest.sysfs()
    report = check_run(guest, before, transitions=500, audit_every=25)
    print(f"\n{guest.release}, {report['wall_seconds']} s:\n{report['stderr']}{stress_report_text(report)}")


@pytest.mark.slow
def test_ten_signals_each(guest: StressGuest) -> None:
    """SIGINT and SIGTERM, each at 10 random moments of a run; three SIGKILLs and --restore."""
    rng = random.Random(guest.release)
    lines = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        for _ in range(10):
            delay = rng.uniform(0, 10)
            report = interrupt(guest, signum, delay)
            put_back = sum(1 for r in report["restoration"] if r["result"] == "restored")
            events = guest.journal()
            attempted = report["transitions"]["attempted"]
            audited = {e["after"] for e in events if e["event"] == "audit"}
            if any(e.get("result") == "interrupted" for e in events):
                landed = "aborted a transition"
            elif not attempted:
                landed = "aborted the baseline audit"
            elif attempted % INTERRUPT_AUDIT_EVERY == 0 and attempted not in audited:
                landed = "aborted an audit"
            else:
                landed = "came between two transitions"
            lines.append(
                f"{signal.Signals(signum).name} after {delay:4.1f} s: {attempted:3} transitions, "
                f"{put_back} blocks put back; it {landed}"
            )
    for _ in range(3):
        delay = rng.uniform(0, 3)
        restored = kill_and_restore(guest, delay)
        put_back = sum(1 for r in restored["blocks"] if r["result"] == "restored")
        lines.append(f"SIGKILL {delay:3.1f} s after a transition, --restore: {put_back} blocks put back")
    print(f"\n{guest.release}:\n" + "\n".join(lines))
