"""kmeminspect stress without a VM: block choice, journal, restoration, signals, on a fake sysfs tree whose
fake kernel answers writes like state_store() does (tests/fakesysfs.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakesysfs import BOOT_ID, DEFAULT_BLOCKS, Behaviour, FakeKernel, make_tree, states
from test_cli_errors import assert_one_line_error, kmem

from kmeminspect import stress
from kmeminspect.audit import ERROR, WARNING, Finding
from kmeminspect.errors import KmemError, UsageError
from kmeminspect.stress import qemu as stress_qemu

FAKESYSFS = Path(__file__).resolve().parent / "fakesysfs.py"
DIMM_MOVABLE = [33, 34, 35]


def original() -> dict[int, stress.BlockState | None]:
    """The fake tree's blocks as they were made."""
    return {b: stress.BlockState(s, z if s == "online" else None) for b, (s, z) in DEFAULT_BLOCKS.items()}


def runner(
    kernel: FakeKernel,
    journal: Path,
    transitions: int = 30,
    seed: int = 1,
    audit: stress.AuditSource | None = None,
    audit_every: int = 0,
    blocks: list[int] | None = None,
    timeout: float = 30.0,
) -> stress.LiveStress:
    plan = stress.plan_blocks(kernel, blocks or DIMM_MOVABLE, False, False)
    limits = stress.Limits(transitions, None, timeout)
    return stress.LiveStress(kernel, plan, limits, journal, seed, [], audit_every, audit)


def events(journal: Path) -> list[dict[str, object]]:
    return stress.read_journal(journal)[1]


# -- choosing blocks ---------------------------------------------------------------------------------


def test_parse_block_list() -> None:
    assert stress.parse_block_list("32-35,40") == [32, 33, 34, 35, 40]
    assert stress.parse_block_list("7") == [7]
    for bad in ("x", "35-32", "-1", "3-", ""):
        with pytest.raises(UsageError):
            stress.parse_block_list(bad)


def test_plan_explicit(tmp_path: Path) -> None:
    blocks = stress.MemoryBlocks(make_tree(tmp_path) / "sys", tmp_path / "proc")
    plan = stress.plan_blocks(blocks, [33, 34], False, False)
    assert plan.blocks == {33: stress.BlockState("online", "Movable"), 34: stress.BlockState("offline", None)}
    assert plan.writes == ["offline", "online_movable"]
    with pytest.raises(UsageError, match="no memory block 99"):
        stress.plan_blocks(blocks, [33, 99], False, False)
    with pytest.raises(UsageError, match="--allow-kernel-zone"):
        stress.plan_blocks(blocks, [32], False, False)
    assert stress.plan_blocks(blocks, [32], False, True).writes == ["offline", "online_movable", "online_kernel"]
    with pytest.raises(UsageError, match="several zones"):
        stress.plan_blocks(blocks, [0], False, True)
    with pytest.raises(UsageError, match="one of them"):
        stress.plan_blocks(blocks, None, False, False)
    with pytest.raises(UsageError, match="one of them"):
        stress.plan_blocks(blocks, [33], True, False)


def test_plan_all_hotpluggable(tmp_path: Path) -> None:
    """The DIMM's blocks (firmware_node: an ACPI memory device), without the one in a kernel zone unless
    allowed; boot memory never."""
    blocks = stress.MemoryBlocks(make_tree(tmp_path) / "sys", tmp_path / "proc")
    plan = stress.plan_blocks(blocks, None, True, False)
    assert sorted(plan.blocks) == DIMM_MOVABLE
    assert list(plan.skipped) == [32] and "Normal" in plan.skipped[32]
    assert sorted(stress.plan_blocks(blocks, None, True, True).blocks) == [32, *DIMM_MOVABLE]


def test_plan_kmem_ram_is_hotpluggable(tmp_path: Path) -> None:
    make_tree(tmp_path, {0: ("online", None), 8: ("offline", None), 9: ("offline", None)})
    (tmp_path / "proc/iomem").write_text("40000000-47ffffff : System RAM (kmem)\n")
    blocks = stress.MemoryBlocks(tmp_path / "sys", tmp_path / "proc")
    assert sorted(stress.plan_blocks(blocks, None, True, False).blocks) == [8]


# -- runs and restoration ----------------------------------------------------------------------------


def test_run_puts_everything_back(tmp_path: Path) -> None:
    make_tree(tmp_path)
    kernel = FakeKernel(tmp_path)
    report = runner(kernel, tmp_path / "j", transitions=40).run()
    assert states(tmp_path) == original()
    assert report.stopped_by == "transitions" and report.exit_code() == 0
    assert report.counters.attempted == 40 and report.counters.done == 40
    assert not report.counters.refusals
    # only the chosen blocks were written to, and only with the planned writes
    assert {b for b, _ in kernel.writes} <= set(DIMM_MOVABLE)
    assert {a for _, a in kernel.writes} <= {"offline", "online_movable"}
    header, recorded = stress.read_journal(tmp_path / "j")
    assert header["blocks"] == {str(b): original()[b].to_json() for b in DIMM_MOVABLE}  # type: ignore[union-attr]
    assert header["boot_id"] == BOOT_ID and header["version"] == stress.JOURNAL_VERSION
    kinds = [e["event"] for e in recorded]
    assert kinds.count("begin") == kinds.count("end") == 40
    assert kinds[-1] == "closed" and recorded[-1]["restored"] is True
    assert [e["result"] for e in recorded if e["event"] == "end"] == ["done"] * 40


def test_same_seed_same_run(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        make_tree(tmp_path / name)
        kernel = FakeKernel(tmp_path / name)
        runner(kernel, tmp_path / f"{name}.j", seed=7).run()
        runs.append(kernel.writes)
    assert runs[0] == runs[1]


def test_refusals_are_counted_not_errors(tmp_path: Path) -> None:
    make_tree(tmp_path)
    kernel = FakeKernel(tmp_path, {33: Behaviour(refuse={"offline": "EBUSY"})})
    report = runner(kernel, tmp_path / "j", transitions=30).run()
    refused = sum(1 for b, a in kernel.writes if (b, a) == (33, "offline"))
    assert refused > 0
    assert report.counters.refusals == {"EBUSY": refused}
    assert report.counters.by_action["offline"].refusals == {"EBUSY": refused}
    assert report.counters.done == 30 - refused
    assert report.exit_code() == 0 and report.error is None
    assert report.to_json()["transitions"]["refusals"]["EBUSY"]["meaning"] == stress.REFUSALS["EBUSY"]
    assert states(tmp_path) == original()


def test_timeout_aborts_an_offline(tmp_path: Path) -> None:
    make_tree(tmp_path)
    kernel = FakeKernel(tmp_path, {35: Behaviour(hang=True)})
    report = runner(kernel, tmp_path / "j", transitions=2, blocks=[35], timeout=0.3).run()
    assert report.counters.refusals == {"timeout": 2}
    assert states(tmp_path) == original()


def test_block_not_put_back_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 34 was offline; once onlined, the kernel refuses to offline it: the run reports it with the
    errno and advice (exit 2), the journal says so, and --restore puts it back once the kernel relents."""
    make_tree(tmp_path)
    journal = tmp_path / "j"
    kernel = FakeKernel(tmp_path, {34: Behaviour(refuse_offline_after_online="EBUSY")})
    monkeypatch.setattr(stress.restore, "RESTORE_PAUSE", 0.01)
    report = runner(kernel, journal, transitions=1, blocks=[34]).run()
    assert report.exit_code() == 2 and not report.restored
    (failed,) = report.restorations
    assert (failed.block, failed.result, failed.errno) == (34, "failed", "EBUSY")
    assert failed.advice and f"--restore {journal}" in failed.advice and "memory34/state" in failed.advice
    assert kernel.writes.count((34, "offline")) == stress.RESTORE_ATTEMPTS
    assert events(journal)[-1]["failed"] == [34]

    relented = FakeKernel(tmp_path)
    result = stress.restore_journal(journal, lambda line: None, sysfs=relented)
    assert result.complete and [r.result for r in result.restorations] == ["restored"]
    assert relented.writes == [(34, "offline")]
    assert states(tmp_path) == original()
    # and now the journal says everything is back: a second --restore does nothing
    again = stress.restore_journal(journal, lambda line: None, sysfs=FakeKernel(tmp_path))
    assert again.note and not again.restorations


def test_tool_failure_still_restores(tmp_path: Path) -> None:
    make_tree(tmp_path)
    kernel = FakeKernel(tmp_path, fail_at=6)
    report = runner(kernel, tmp_path / "j", transitions=50).run()
    assert report.stopped_by == "error" and report.error and "injected failure" in report.error
    assert report.exit_code() == 2
    assert states(tmp_path) == original()


# -- audit sampling ----------------------------------------------------------------------------------


class ScriptedAudit:
    """An audit source answering from a list of finding lists, one per read."""

    def __init__(self, reads: list[list[Finding]]) -> None:
        self.reads = reads
        self.count = 0

    def read(self) -> tuple[str, list[Finding]]:
        findings = self.reads[min(self.count, len(self.reads) - 1)]
        self.count += 1
        return "fake", findings


def finding(rule: str, start: int, severity: str = ERROR) -> Finding:
    return Finding(rule, severity, start, start + 1, rule, {})


def test_audit_confirms_new_errors_by_a_second_read(tmp_path: Path) -> None:
    make_tree(tmp_path)
    old, torn, real = finding("old", 0), finding("torn", 5), finding("real", 9)
    warning = finding("w", 7, WARNING)
    reads = [
        [old],  # baseline
        [old, torn, warning],  # after 10 transitions: a new error...
        [old],  # ...not seen again: unconfirmed
        [old, real],  # after 20: a new error...
        [old, real],  # ...confirmed
        [old],  # after 30 (and after restoring): clean
    ]
    source = ScriptedAudit(reads)
    report = runner(FakeKernel(tmp_path), tmp_path / "j", transitions=30, audit=source, audit_every=10).run()
    assert report.audit is not None
    assert report.audit.samples == 4  # three during the run, one after restoring
    assert [(n, f.rule) for n, f in report.audit.confirmed] == [(20, "real")]
    assert report.audit.unconfirmed == 1
    assert report.audit.final == []
    assert report.exit_code() == 1
    assert [e["new_errors"] for e in events(tmp_path / "j") if e["event"] == "audit"] == [0, 1, 0]


# -- the journal -------------------------------------------------------------------------------------


def test_journal_is_never_overwritten(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "j").write_text("precious\n")
    with pytest.raises(UsageError, match="exists"):
        runner(FakeKernel(tmp_path), tmp_path / "j").run()
    assert (tmp_path / "j").read_text() == "precious\n"


def test_read_journal_drops_a_torn_last_line(tmp_path: Path) -> None:
    make_tree(tmp_path)
    journal = tmp_path / "j"
    runner(FakeKernel(tmp_path), journal, transitions=2).run()
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"event": "beg')
    assert len(events(journal)) == len(whole.splitlines()) - 1
    journal.write_bytes(b"garbage\n" + whole)
    with pytest.raises(UsageError, match="not a kmeminspect stress journal|not JSON"):
        stress.read_journal(journal)
    header = json.loads(whole.splitlines()[0])
    journal.write_text(json.dumps(dict(header, version=99)) + "\n")
    with pytest.raises(UsageError, match="version 99"):
        stress.read_journal(journal)


def test_restore_refuses_another_boot(tmp_path: Path) -> None:
    make_tree(tmp_path)
    journal = tmp_path / "j"
    runner(FakeKernel(tmp_path), journal, transitions=2).run()
    (tmp_path / "proc/sys/kernel/random/boot_id").write_text("another\n")
    with pytest.raises(KmemError, match="another boot"):
        stress.restore_journal(journal, lambda line: None, sysfs=FakeKernel(tmp_path))


# -- signals and SIGKILL, in a child process -----------------------------------------------------------


def start_fake_run(root: Path, journal: Path, seed: int, transitions: int = 400) -> subprocess.Popen[str]:
    make_tree(root)
    command = [sys.executable, str(FAKESYSFS), str(root), str(journal), str(seed), str(transitions), "0.01"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (journal.exists() and b'"begin"' in journal.read_bytes()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_restore(tmp_path: Path, signum: int) -> None:
    """A stop signal at three random moments: the run stops, puts every block back and reports."""
    rng = random.Random(signum)
    for attempt in range(3):
        root, journal = tmp_path / f"t{attempt}", tmp_path / f"j{attempt}"
        process = start_fake_run(root, journal, seed=attempt)
        time.sleep(rng.uniform(0, 0.5))
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        report = json.loads(out.splitlines()[-1])
        assert report["stopped_by"] == signal.Signals(signum).name
        assert report["restored"] is True
        assert states(root) == original()
        assert events(journal)[-1]["event"] == "closed"


def test_sigkill_then_restore(tmp_path: Path) -> None:
    process = start_fake_run(tmp_path, tmp_path / "j", seed=5)
    # until some block differs from its original state
    deadline = time.monotonic() + 30
    while states(tmp_path) == original() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()
    process.communicate()
    assert states(tmp_path) != original()
    assert events(tmp_path / "j")[-1]["event"] != "closed"
    said: list[str] = []
    result = stress.restore_journal(tmp_path / "j", said.append, sysfs=FakeKernel(tmp_path))
    assert result.complete and "restored" in [r.result for r in result.restorations]
    assert states(tmp_path) == original()
    assert any("restored" in line for line in said)


def test_restore_refused_while_the_run_lives(tmp_path: Path) -> None:
    process = start_fake_run(tmp_path, tmp_path / "j", seed=9, transitions=100000)
    try:
        with pytest.raises(KmemError, match=f"pid {process.pid}.*kill -TERM"):
            stress.restore_journal(tmp_path / "j", lambda line: None, sysfs=FakeKernel(tmp_path))
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert states(tmp_path) == original()


def test_one_run_at_a_time(tmp_path: Path) -> None:
    process = start_fake_run(tmp_path, tmp_path / "j", seed=9, transitions=100000)
    try:
        with pytest.raises(KmemError, match="another kmeminspect stress run"):
            runner(FakeKernel(tmp_path), tmp_path / "j2").run()
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert not (tmp_path / "j2").exists()


# -- walkers -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.access("/proc/kpageflags", os.R_OK), reason="/proc/kpageflags needs root")
def test_kpageflags_walker_counts_and_stops() -> None:
    (run,) = stress.start_walkers(["kpageflags"], [(0, 4096)])
    time.sleep(1.0)
    stress.stop_walkers([run])
    assert run.result is not None and run.result["kind"] == "kpageflags"
    assert run.result["passes"] > 0 and run.result["pfns"] == 4096 * run.result["passes"]
    assert run.process is not None and run.process.returncode == 0


def test_unknown_walkers() -> None:
    assert stress.parse_walkers("all") == ["kpageflags", "compact", "idle"]
    assert stress.parse_walkers("compact,kpageflags,compact") == ["compact", "kpageflags"]
    with pytest.raises(UsageError, match="unknown nope"):
        stress.parse_walkers("kpageflags,nope")


# -- the command line --------------------------------------------------------------------------------


def fake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "tree"
    if not root.exists():
        make_tree(root)
    return kmem("stress", "--sysfs-root", str(root / "sys"), "--procfs-root", str(root / "proc"), *args)


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(fake(tmp_path), "--blocks LIST or --all-hotpluggable")
    assert_one_line_error(fake(tmp_path, "--blocks", "99"), "no memory block 99", "32-35")
    assert_one_line_error(fake(tmp_path, "--blocks", "32"), "--allow-kernel-zone")
    assert_one_line_error(fake(tmp_path, "--blocks", "3x"), "not a block number")
    assert_one_line_error(fake(tmp_path, "--blocks", "33", "--transitions", "many"), "not an integer")
    assert_one_line_error(fake(tmp_path, "--blocks", "33", "--duration", "-1"), "at least")
    assert_one_line_error(fake(tmp_path, "--blocks", "33", "--walkers", "fast"), "unknown fast")
    assert_one_line_error(fake(tmp_path, "--restore", str(tmp_path / "nope")), "No such file")
    assert_one_line_error(fake(tmp_path, "--restore", "j", "--blocks", "33"), "takes no other")
    (tmp_path / "notes").write_text("hello\n")
    assert_one_line_error(fake(tmp_path, "--restore", str(tmp_path / "notes")), "not JSON")
    assert_one_line_error(kmem("--vmcore", "x", "stress", "--blocks", "33"), "running kernel")
    assert not list((tmp_path / "tree").glob("*.journal"))


# -- QEMU mode, without a VM -------------------------------------------------------------------------


def test_qemu_mode_pieces() -> None:
    assert stress_qemu.parse_size("128M") == 128 << 20 and stress_qemu.parse_size("1G") == 1 << 30
    assert stress_qemu.parse_size("4096") == 4096
    with pytest.raises(UsageError, match="not a size"):
        stress_qemu.parse_size("lots")
    assert stress_qemu.backend_of("kmi-stress-7-dimm12") == "kmi-stress-7-mem12"
    assert "device busy" in stress_qemu.ost_reason(stress_qemu.OST_EJECT_SOURCE, 0x82)
    assert "non-specific" in stress_qemu.ost_reason(stress_qemu.OST_INSERT_SOURCE, 1)


def test_qemu_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    socket = str(tmp_path / "qmp.sock")
    assert_one_line_error(kmem("--qemu", socket, "stress"), "--dimm-rounds")
    assert_one_line_error(kmem("--qemu", socket, "stress", "--blocks", "33", "--dimm-rounds", "2"), "live only")
    assert_one_line_error(kmem("stress", "--dimm-rounds", "2"), "--qemu QMP_SOCKET")
    assert_one_line_error(kmem("--qemu", socket, "stress", "--dimm-rounds", "x"), "not an integer")
    assert_one_line_error(kmem("--qemu", socket, "stress", "--dimm-rounds", "2", "--dimm-size", "big"), "not a size")
    assert_one_line_error(kmem("--qemu", socket, "stress", "--dimm-rounds", "2"), "cannot connect")
    make_tree(tmp_path / "tree")
    runner(FakeKernel(tmp_path / "tree"), tmp_path / "live.journal", transitions=1).run()
    assert_one_line_error(
        kmem("--qemu", socket, "stress", "--restore", str(tmp_path / "live.journal")), "without --qemu"
    )
