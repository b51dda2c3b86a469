"""The differential run in the test tier: 20,000 generated packets through the real pod-side programs
and through the reference model (tests/diff/model.py), with no difference in verdict, output bytes,
conntrack / affinity / fragment entries or drop counters. `make fuzz` runs a million."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpfsvc.datapath import loader, nodeaddrs
from ebpfsvc.datapath.writer import MapWriter

from . import model as M
from . import runner
from .generator import KINDS

pytestmark = pytest.mark.root

SEED = 20261202


@pytest.fixture(scope="module")
def datapath(through_program_cache, ahead_compiles):
    """One load for the module, from the run's program cache (a child compiled it while the tests
    before ran: tests/conftest.py AheadCompiles); each test starts from fresh pins and the scenario's maps."""
    import uuid
    ahead_compiles.wait(runner.LIMITS)
    pin = Path("/sys/fs/bpf") / ("esdf" + uuid.uuid4().hex[:6])
    dp = loader.load(pin, limits=runner.LIMITS, cache=False, program_cache=True)
    try:
        nodeaddrs.write(dp.maps, nodeaddrs.NodeAddrs(hairpin4=runner.HAIRPIN))
        MapWriter(dp.maps).apply(runner.scenario())
        yield dp
    finally:
        dp.close()
        loader.unpin(pin)


def test_twenty_thousand_packets_agree(datapath):
    res = runner.run(datapath, 20_000, SEED)
    assert not res.mismatches, "\n".join(str(m) for m in res.mismatches)
    assert res.packets == 20_000
    # The run went everywhere it should: every kind of packet, every verdict, translations.
    assert set(KINDS) <= set(res.kinds), res.kinds
    assert {M.OK, M.SHOT, M.REDIRECT} <= set(res.verdicts), res.verdicts
    assert {"churn_removed", "churn_terminating", "churn_not_ready", "churn_left_service", "time_jump"} \
        <= set(res.kinds), res.kinds
    assert res.translated > 5_000, res.translated


@pytest.mark.parametrize("fault", ["flow hash", "checksum", "reply state", "affinity", "expiry", "ipv6 walk"])
def test_a_wrong_model_is_caught(datapath, fault):
    """The comparison can fail: a model with one fault disagrees with the kernel within 10,000 packets."""
    patches = {
        "flow hash": (M, "flow_hash", lambda *a, **k: 7),
        "checksum": (M, "csum_update", lambda hc, old, new: hc),
        "reply state": (M, "F_ESTABLISHED", 0x20),
        "affinity": (M, "SVC_AFFINITY", 0x100),
        "expiry": (M.Lifetimes, "of", lambda self, proto, flags: 1 << 40),
        "ipv6 walk": (M, "IPV6_MAX_HEADERS", 6),
    }
    obj, name, value = patches[fault]
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        res = runner.run(datapath, 10_000, SEED, max_mismatches=1)
    finally:
        setattr(obj, name, saved)
    assert res.mismatches, f"a model with a wrong {fault} went unnoticed"
