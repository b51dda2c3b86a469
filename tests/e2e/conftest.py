"""End-to-end fixtures: a real lab (namespaces, veths, processes) that always comes down.

    @pytest.mark.root
    def test_x(lab): ...                                   # agents started (the default)

    @pytest.mark.parametrize("lab", [{"agents": False}], indirect=True)
    def test_y(lab): ...                                   # no agents: plain routing

The lab uses the `unique_prefix` of the test, so parallel runs never share
namespaces, state dirs or pin dirs, and `lab.down()` runs even when the test
fails (or its setup half-fails: Lab.up tears down what it built before raising).
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from ebpfsvc.lab import Lab


_OWNER = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _OWNER:
        # A forked copy of this session (pyroute2 forks helpers for IPRoute(netns=...) and ends
        # them with SIGTERM): it must just exit, not run the session's finalizers, which would
        # tear down the labs and namespaces the real session is still using.
        os._exit(0)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # `timeout`, a cancelled CI job or a plain kill send SIGTERM, which ends pytest at once and
    # leaves labs behind (namespaces, processes, pins).  As a KeyboardInterrupt it makes pytest
    # run every fixture finalizer first, so the labs come down.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture
def lab(request, unique_prefix):
    params = getattr(request, "param", None) or {}
    instance = Lab.up(params.get("labfile"), prefix=unique_prefix, agents=params.get("agents", True))
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture(scope="module")
def shared_lab():
    """One lab (with agents) for all tests of a module that do not interfere: each test uses its
    own pods and Services.  Its own prefix, so it never meets the per-test `lab` fixture's."""
    instance = Lab.up(prefix="es" + uuid.uuid4().hex[:6], agents=True)
    try:
        yield instance
    finally:
        instance.down()
