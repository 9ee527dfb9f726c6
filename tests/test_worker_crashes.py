"""The suite's own runner: `make test`'s two xdist workers, one of which dies (a segmentation fault) in the middle of
a later file, as XLA's CPU compiler once made one do. Without `worker_crashes` xdist 3.8.0 hangs here."""

import os
import subprocess
import sys
import textwrap

import pytest

CRASH = """
import os, signal

def test_before():
    pass

def test_crash():
    if {always} or not os.path.exists("crashed"):
        open("crashed", "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)

def test_after():
    pass
"""


def _run(tmp_path, always: bool, *extra: str) -> subprocess.CompletedProcess:
    """Run pytest on two workers over six light files and one that crashes a worker, as `make test` runs."""
    for name in "abcdef":
        (tmp_path / f"test_{name}.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tmp_path / "test_g.py").write_text(textwrap.dedent(CRASH.format(always=always)))
    (tmp_path / "conftest.py").write_text(
        "from worker_crashes import pytest_handlecrashitem, pytest_report_teststatus, pytest_terminal_summary, "
        "pytest_xdist_make_scheduler, pytest_runtest_logreport, pytest_sessionfinish  # noqa: F401\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
                           "--no-loadscope-reorder", "-p", "no:cacheprovider", "-p", "no:randomly", *extra,
                           str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("always", [False, True])
def test_a_crashed_worker_is_replaced_and_its_test_run_once_more(tmp_path, always):
    """A crash that does not happen again is a rerun, listed at the end, and the run passes; one that happens again
    fails the run, and is not tried a third time. Either way every other test runs and the run ends."""
    out = _run(tmp_path, always)
    tail = out.stdout.splitlines()[-1]
    assert "node down" in out.stdout and "test_g.py::test_crash: worker" in out.stdout
    if always:
        assert out.returncode == 1 and "1 failed, 14 passed, 1 rerun" in tail, out.stdout[-3000:]
        assert out.stdout.count("node down") == 2  # not tried a third time
    else:
        assert out.returncode == 0 and "15 passed, 1 rerun" in tail, out.stdout[-3000:]
        assert out.stdout.count("node down") == 1


def test_a_crash_with_no_worker_left_to_rerun_it_fails_the_run(tmp_path):
    """Where xdist replaces no more workers (`--max-worker-restart`), the crashed test is never run again: the run
    fails and says so, rather than pass on a rerun that never happened."""
    out = _run(tmp_path, False, "--max-worker-restart", "0")
    assert out.returncode == 1 and "(never run again: xdist replaced no more workers)" in out.stdout, out.stdout[-3000:]
