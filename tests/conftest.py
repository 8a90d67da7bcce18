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


#: tracing tests `make test` runs on every generation; the others run there on 6.1 and 6.12 only (the
#: CI matrix: tracing on two generations, the version-sensitive part on all), all of them under
#: `make test-slow`. The overhead benchmark runs on 6.1 only.
TRACE_ON_EVERY_GENERATION = {
    "test_dimm_online_events_follow_blocks",
    "test_kpageflags_is_the_top_caller",
    "test_stalled_walker_is_a_race",
    "test_trace_refuses_without_root",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow what CI leaves to `make test-slow` (see TRACE_ON_EVERY_GENERATION)."""
    for item in items:
        if not item.nodeid.startswith("tests/test_trace.py::"):
            continue
        name = getattr(item, "originalname", item.name)
        latest = "[7.x]" in item.nodeid
        if (latest and name not in TRACE_ON_EVERY_GENERATION) or (
            name == "test_trace_overhead_benchmark" and "[6.1]" not in item.nodeid
        ):
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
