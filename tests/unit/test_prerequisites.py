"""Tests that need what a fresh machine may lack skip exactly when it is missing, never under CI, and the run's last
lines say how many skipped and what to install."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.prerequisites import mooncake_missing, skip_for

ROOT = Path(__file__).resolve().parents[2]


def test_mooncake_cases_skip_exactly_where_libibverbs1_is_missing():
    """The check .ci/run makes before it installs the library, against the reason the tests skip with."""
    reason = mooncake_missing()
    if importlib.util.find_spec("mooncake") is None:
        assert "pip install" in reason
        return
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    assert ("libibverbs1 is missing (apt-get install libibverbs1)" in reason) == ("libibverbs.so.1" not in ldconfig)


def test_under_ci_a_missing_prerequisite_is_a_failure_not_a_skip(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert skip_for("libfoo is missing").args == (False,)
    monkeypatch.delenv("CI")
    assert skip_for("libfoo is missing").args == (True,) and skip_for("").args == (False,)


def test_the_run_ends_with_its_skips_counted_by_reason(tmp_path):
    (tmp_path / "test_needs_libfoo.py").write_text(textwrap.dedent('''
        import pytest

        needs_libfoo = pytest.mark.skipif(True, reason="libfoo is missing (apt-get install libfoo)")

        @needs_libfoo
        def test_a(): pass

        @needs_libfoo
        def test_b(): pass

        def test_c(): pytest.skip("network namespaces need root")

        def test_d(): pass
    '''))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-3:-1] == ["2 tests skipped: libfoo is missing (apt-get install libfoo)",
                            "1 test skipped: network namespaces need root"], run.stdout
