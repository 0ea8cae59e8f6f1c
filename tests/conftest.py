"""Test-wide environment. Runs before any test module, so before torch is imported anywhere.

The nbval kernels inherit this environment too (they are started by the pytest workers).
"""
import os

os.environ["COURSE_MODE"] = "smoke"  # seconds per notebook; numbers are meaningless
os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network (and offline HF fails fast)
os.environ["MPLBACKEND"] = "Agg"  # no display
os.environ["OMP_NUM_THREADS"] = "1"  # two xdist workers on two cores: more threads slow both ~25x

# tests/fixtures/ holds sample notebooks read by the tests, not notebooks for nbval to run.
collect_ignore_glob = ["fixtures/*"]


def pytest_report_header(config):
    """The versions this run tests, against constraints.txt (the versions the course was last tested with)."""
    from course_lib.versions import summary

    return f"course dependencies: {summary()}"
