"""`--dist loadfile` that survives a test worker's crash (pytest-xdist 3.8.0, its latest release, does not).

A worker process that dies (a segmentation fault in a native library: XLA on the CPU has done it in cold runs, in
compiling and in serializing a program; or a test stuck for `faulthandler_timeout`, whose worker then exits) is
replaced, and xdist hands its unfinished file to the new worker. Two faults of xdist's file scheduler then hang the
run until CI's time runs out (xdist issues #1323, #1327 and #1378; the fixes are merged upstream but unreleased):
- it puts back every file the dead worker had finished too, and a worker handed a file with nothing left to run never
  reports back;
- a worker handed a single test waits for a second one (it needs the next test to tear fixtures down) that never
  comes.

`Files` mends both. The test a worker died on is run once more on the new worker: a crash that does not happen again
is reported as a rerun ("R", and listed at the end of the run), one that does is a failure and is not run a third
time. Assertion failures are never rerun.
"""

from __future__ import annotations

import collections

import pytest
from xdist.scheduler import LoadFileScheduling


class Files(LoadFileScheduling):
    """xdist's `loadfile` scheduler, which recovers from a worker's crash without hanging."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.crashes: collections.Counter = collections.Counter()  # test id -> how many workers died running it

    def remove_node(self, node):
        """Forget a worker (at its shutdown or its crash); for a crash, put its unfinished files back on the queue
        and return the test it died on."""
        workload = self.assigned_work.pop(node)
        unfinished = [(scope, test) for scope, unit in workload.items() for test, done in unit.items() if not done]
        if not unfinished:
            return None
        scope, crashed = unfinished[0]  # a worker runs its tests in order: the first unfinished is the one it died on
        self.crashes[crashed] += 1
        if self.crashes[crashed] > 1:  # died on it twice: a failure, not run again
            workload[scope][crashed] = True
        for scope, unit in workload.items():
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node) -> None:
        """Give `node` files until at least two tests wait for it, or shut it down once the queue is empty (a
        worker holding one test waits for the next before running it); a replacement still collecting waits."""
        if node not in self.registered_collections:
            return
        super()._reschedule(node)
        while not node.shutting_down and self._pending_of(self.assigned_work.get(node, {})) < 2:
            if not self.workqueue:
                node.shutdown()
                return
            self._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)  # (xdist's hooks: unknown where it is not loaded)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` gets `Files`; other modes keep xdist's own."""
    return Files(config, log) if config.getvalue("dist") == "loadfile" else None


AWAITED: set[str] = set()  # tests reported as reruns whose second run has not reported yet


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A worker's first crash on a test is a rerun (the test runs again on the new worker), not a failure."""
    if isinstance(sched, Files) and sched.crashes[crashitem] == 1:
        report.outcome = "rerun"
        AWAITED.add(crashitem)


def pytest_runtest_logreport(report):
    """A rerun test's own report has come."""
    if report.outcome != "rerun":
        AWAITED.discard(report.nodeid)


def pytest_sessionfinish(session):
    """A rerun that never ran (xdist stopped replacing crashed workers: `--max-worker-restart`) fails the run."""
    if AWAITED and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_teststatus(report):
    """Show a crash that is being rerun as "R"."""
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    """Name every test a worker died on, so a crash that did not happen again is still seen."""
    reruns = terminalreporter.stats.get("rerun", [])
    if reruns:
        terminalreporter.write_sep("=", "test workers that crashed (each test was run again on a new worker)")
        for report in reruns:
            never = " (never run again: xdist replaced no more workers)" if report.nodeid in AWAITED else ""
            terminalreporter.write_line(f"{report.nodeid}: {report.longrepr}{never}")
