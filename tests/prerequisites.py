"""What some tests need from the machine beyond `make install`: each check says why it is missing and how to
get it, so that those tests skip with that reason (and the run's summary repeats it).

Under CI (CI=true) nothing is skipped for a missing prerequisite: CI installs them all (.ci/run), so a test that
would skip there runs and fails with the real error instead of passing unseen.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

MOONCAKE_MISSING_PREFIX = "Mooncake Transfer Engine unavailable"


@functools.cache
def mooncake_missing() -> str:
    """'' when the Mooncake Transfer Engine loads here, as the workers load it; else why not, and the fix."""
    if importlib.util.find_spec("mooncake") is None:
        return f"{MOONCAKE_MISSING_PREFIX}: mooncake-transfer-engine is not installed (pip install -e '.[rdma]')"
    from splitwise.kv.transport.mooncake import MooncakeUnavailable, _transfer_engine_class

    try:
        _transfer_engine_class()
    except MooncakeUnavailable as e:
        if "libibverbs" in str(e):
            return f"{MOONCAKE_MISSING_PREFIX}: libibverbs1 is missing (apt-get install libibverbs1)"
        return f"{MOONCAKE_MISSING_PREFIX}: {e}"
    return ""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_for(reason: str) -> pytest.MarkDecorator:
    """A skip with `reason` where `reason` is not empty, except under CI."""
    return pytest.mark.skipif(bool(reason) and not in_ci(), reason=reason or "available")


def needs_mooncake() -> pytest.MarkDecorator:
    return skip_for(mooncake_missing())


def mooncake_loads() -> bool:
    return not mooncake_missing()
