"""Fixtures shared by the tests: the test bed's kernels and captured scenarios.

VM tests are marked ``vm``. Under ``CI=true`` a missing prerequisite of a VM test (QEMU, a kernel that
cannot be fetched) fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vm-fixtures"))

from vmfixtures import download, truth  # noqa: E402
from vmfixtures.cache import locked  # noqa: E402
from vmfixtures.scenarios import SCENARIOS  # noqa: E402

IN_CI = os.environ.get("CI") == "true"
GENERATIONS = list(download.GENERATIONS)
#: scenarios whose truth was read inside the running guest (kpageflags, sysfs) and whose dumps carry their
#: VMCOREINFO: all but those stopped by a breakpoint (``Scenario.stopped``: see test_stopped_states.py)
IN_GUEST_SCENARIOS = [name for name, scenario in SCENARIOS.items() if not scenario.stopped]


def missing_prerequisite(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"missing VM prerequisite in CI: {reason}")
    pytest.skip(reason)


_kernels: dict[str, download.Kernel] = {}
_apt_ready: list[download.PrivateApt] = []


def get_kernel(generation: str) -> download.Kernel:
    if generation not in _kernels:
        if not shutil.which("qemu-system-x86_64"):
            missing_prerequisite("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
        try:
            if not _apt_ready:
                # test workers share the private apt state: an update must not race another worker's
                # download (fetch_kernel holds the same lock)
                with locked("apt"):
                    _apt_ready.append(download.prepare_apt())
            _kernels[generation] = download.fetch_kernel(generation, _apt_ready[0], update=False)
        except Exception as error:  # noqa: BLE001 - any failure to fetch is a missing prerequisite
            cached = download.load_kernel(generation)
            if cached is None:
                missing_prerequisite(f"kernel {generation} unavailable: {error}")
                raise
            _kernels[generation] = cached
    return _kernels[generation]


@pytest.fixture(scope="session")
def kernel_of() -> Callable[[str], download.Kernel]:
    return get_kernel


@pytest.fixture(scope="session")
def captured() -> Callable[[str, str], truth.Capture]:
    """captured(generation, scenario) -> the scenario's capture on that generation's kernel."""

    def get(generation: str, scenario: str) -> truth.Capture:
        kernel = get_kernel(generation)
        reason = SCENARIOS[scenario].unsupported(kernel)
        if reason:
            pytest.skip(f"{scenario} on {kernel.release}: {reason}")
        return truth.capture(kernel, scenario)

    return get


#: live-guest tests that `make test` (CI, under 20 minutes warm) runs on fewer generations than `make
#: test-slow`, which runs every test on every generation: test -> the parameter ids CI keeps (none: only in
#: `make test-slow`). What depends on the kernel version most (the hotplug lifecycle probes, every reader
#: on every scenario, BTF against DWARF, live and QMP reads) runs in CI on all three; the tracer's callers,
#: race and refusal tests, a stress run, a stop signal and a restore on one generation each; the longer
#: tracing scenarios and the traced stress run only in `make test-slow`.
CI_PARAMETERS: dict[str, tuple[str, ...]] = {
    "test_trace.py::test_kpageflags_is_the_top_caller": ("6.12",),
    "test_trace.py::test_stalled_walker_is_a_race": ("7.x",),
    "test_trace.py::test_trace_refuses_without_root": ("6.1",),
    "test_trace.py::test_walkers_during_offline_online_no_races": (),
    "test_trace.py::test_memmap_on_memory_online_after_vmemmap": (),
    "test_trace.py::test_pmem_namespace_device_init": (),
    "test_trace.py::test_injected_late_activation_is_reported": (),
    "test_trace.py::test_trace_overhead_benchmark": (),
    "test_stress.py::test_run_traced": (),
    "test_stress.py::test_short_run": ("7.x",),
    "test_stress.py::test_stop_signal": ("6.1-SIGINT",),
    "test_stress.py::test_sigkill_then_restore": ("6.12",),
    "test_stress_qemu.py::test_qemu_fifty_each": ("6.1", "7.x"),
    "test_live.py::test_live_device_memmap_on_device": ("6.12",),
    "test_live.py::test_doctor_in_guest": ("7.x",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow what CI leaves to `make test-slow` (see CI_PARAMETERS)."""
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        callspec = getattr(item, "callspec", None)
        if name in CI_PARAMETERS and callspec is not None and callspec.id not in CI_PARAMETERS[name]:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: needs QEMU and the test bed's kernels")
    config.addinivalue_line("markers", "slow: long runs for 'make stress', left out of 'make test'")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The kernels the test bed resolved (Debian retires ABIs: CI logs say which ones ran)."""
    lines = []
    for generation in GENERATIONS:
        kernel = download.load_kernel(generation)
        if kernel:
            lines.append(f"kernel {generation}: {kernel.release} ({kernel.version}) from {kernel.suite}")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Benchmarks that ran as tests (``record_property("benchmark", ...)``) print their results here."""
    lines = [
        str(value)
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call"
        for name, value in getattr(report, "user_properties", [])
        if name == "benchmark"
    ]
    if lines:
        terminalreporter.section("benchmarks")
        for line in lines:
            terminalreporter.write_line(line)
