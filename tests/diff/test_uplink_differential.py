"""The uplink's differential run in the test tier: 10,000 generated north-south packets through the real
from_uplink / to_uplink (in node-1's namespace) and through the reference model (tests/diff/uplink.py),
with no difference in verdict, output bytes, conntrack / SNAT entries or drop counters; and a model with
one fault is caught.  `python -m tests.diff.uplink --packets 200000` (make fuzz) runs the long one."""

from __future__ import annotations

import uuid

import pytest

from ebpfsvc.datapath import loader

from . import model as M
from . import runner
from . import uplink as U

pytestmark = pytest.mark.root

SEED = 20261202


@pytest.fixture(scope="module")
def node(through_program_cache, ahead_compiles):
    ahead_compiles.wait(runner.LIMITS, source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS)  # tests/conftest.py
    n = U.NodeDatapath("esdu" + uuid.uuid4().hex[:6], program_cache=True)
    try:
        yield n
    finally:
        n.close()


def test_ten_thousand_north_south_packets_agree(node):
    res = node.run(10_000, SEED)
    assert not res.mismatches, "\n".join(str(m) for m in res.mismatches)
    assert res.packets == 10_000
    assert set(U.UplinkGenerator.KINDS) <= set(res.kinds), res.kinds
    assert {M.OK, M.SHOT, M.REDIRECT} <= set(res.verdicts), res.verdicts
    assert {"churn_removed", "churn_terminating", "churn_not_ready", "time_jump"} <= set(res.kinds), res.kinds
    assert res.translated > 3_000, res.translated


def test_through_xdp_first_the_outcome_is_the_same(node):
    """xdp_uplink does the common translations earlier and passes the rest to from_uplink: together
    they must do exactly what the model (and TC alone) does."""
    res = node.run(5_000, SEED + 1, xdp=True)
    assert not res.mismatches, "\n".join(str(m) for m in res.mismatches)
    assert res.packets == 5_000 and res.translated > 1_500, res.translated


@pytest.mark.parametrize("fault", ["kept port", "snat probe", "source range", "internal twin", "hop",
                                   "removed backend", "icmp error"])
def test_a_wrong_uplink_model_is_caught(node, fault):
    """The comparison can fail: a model with one fault disagrees with the kernel within 5,000 packets."""
    patches = {
        "kept port": (U.abi, "SNAT_KEEP_PORT_MIN", 1 << 16),         # never keep the client's port
        "snat probe": (U, "PORT_RANGE", U.PORT_RANGE - 1),
        "source range": (U.UplinkModel, "_admitted", lambda self, svc, client: True),
        "internal twin": (U, "SVC_KINDS", 0),                        # a NodePort's INTERNAL twin matched
        "hop": (U.UplinkModel, "_hop", lambda self, buf: True),      # TTL left alone
        "removed backend": (U.UplinkModel, "_usable", lambda self, bid, proto: True),   # flows never move
        "icmp error": (U.UplinkModel, "_icmp", lambda self, frame, p, d: (M.OK, frame)),  # never translated
    }
    obj, name, value = patches[fault]
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        res = node.run(5_000, SEED, max_mismatches=1)
    finally:
        setattr(obj, name, saved)
    assert res.mismatches, f"a model with a wrong {fault} went unnoticed"
