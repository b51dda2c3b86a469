"""MapWriter's incremental applies leave the maps exactly as a full recomputation does.

Property-style, on real pinned maps: a seeded random generator changes frontends (backends
added, removed, turning terminating or local, shared between frontends, flags, source ranges,
frontends added and removed, address markers shared by frontends on one address).  Two writers
on two datapaths follow the same sequence: one incrementally (with a correct LBDelta, a stale
one, or none), one with full=True every time.  After every step both must have written the same
number of entries of every kind, and the maps must be what a fresh writer reading them back
finds nothing to change in (no stale entry left, no entry missing or wrong).
"""

from __future__ import annotations

import random
from ipaddress import IPv4Network

import pytest

from ebpfsvc.datapath import writer as writer_mod
from ebpfsvc.datapath.writer import ApplyStats, MapWriter
from ebpfsvc.desired import LBDelta
from ebpfsvc.lbmodel import Algorithm, FrontendKind, LBState, Protocol, Scope

from .conftest import TEST_LIMITS
from .packets import be, frontend

pytestmark = pytest.mark.root

KINDS = [FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT, FrontendKind.EXTERNAL_IP, FrontendKind.LOAD_BALANCER]


def random_frontend(rng: random.Random, slot: tuple):
    addr, port, proto, scope = slot
    backends = [be(f"198.18.2.{rng.randint(1, 12)}", rng.choice([8080, 9090]), proto,
                   terminating=rng.random() < 0.2, local=rng.random() < 0.3)
                for _ in range(rng.randint(0, 5))]
    kind = rng.choice(KINDS)
    ranges = ()
    if kind is FrontendKind.LOAD_BALANCER and rng.random() < 0.5:
        ranges = tuple(IPv4Network(f"198.18.{rng.randint(0, 3)}.0/{rng.choice([24, 30])}")
                       for _ in range(rng.randint(1, 2)))
    fe = frontend(addr, port, backends, proto=proto, name=rng.choice(["a", "b", "c", "d"]), kind=kind,
                  affinity_timeout=rng.choice([0, 0, 300]),
                  algorithm=rng.choice([Algorithm.MAGLEV, Algorithm.MAGLEV, Algorithm.RANDOM]),
                  local_only=rng.random() < 0.2, source_ranges=ranges)
    return fe._replace(key=type(fe.key)(fe.key.address, port, proto, scope))


SLOTS = [(f"198.19.0.{a}", port, proto, scope) for a in range(1, 5) for port, proto in
         ((80, Protocol.TCP), (53, Protocol.UDP), (30080, Protocol.TCP)) for scope in Scope]


def step(rng: random.Random, current: LBState) -> LBState:
    fes = dict(current.frontends)
    for _ in range(rng.randint(1, 4)):
        slot = rng.choice(SLOTS)
        fe = random_frontend(rng, slot)
        if fe.key in fes and rng.random() < 0.3:
            del fes[fe.key]
        else:
            fes[fe.key] = fe
    return LBState(fes)


def maps_agree(dp, st: LBState) -> bool:
    """A writer reading the maps back finds nothing to do: no entry missing, wrong or stale."""
    return MapWriter(dp.maps).apply(st) == ApplyStats()


@pytest.fixture
def second_datapath(compiled):
    """A datapath on maps of its own, for the writer applying full states."""
    return compiled.load(TEST_LIMITS, maps="second")


@pytest.mark.parametrize("behind", [False, True], ids=["inline", "behind"])
@pytest.mark.parametrize("seed", range(3))
def test_incremental_applies_match_full_ones(datapath, second_datapath, seed, behind, monkeypatch):
    if behind:      # every apply's writes made on the writer's thread (a large apply's way)
        monkeypatch.setattr(writer_mod, "_BEHIND_MIN", 1)
    rng = random.Random(seed)
    inc, full = MapWriter(datapath.maps), MapWriter(second_datapath.maps)
    current = LBState()
    for i in range(40):
        nxt = step(rng, current)
        changed = frozenset(current.frontends.keys() | nxt.frontends.keys())
        changed = frozenset(k for k in changed if current.frontends.get(k) is not nxt.frontends.get(k))
        how = rng.random()
        if how < 0.6:
            delta = LBDelta(current, changed)                  # what the DesiredStateBuilder gives
        elif how < 0.8:
            delta = LBDelta(LBState(), frozenset())           # stale: not the state applied last
        else:
            delta = None                                       # the writer compares by identity
        got = inc.apply(nxt, delta=delta)
        want = full.apply(nxt, full=True)
        assert got == want, (i, got, want)
        assert inc.apply(nxt, full=True) == ApplyStats()      # its bookkeeping matches a recount
        if i % 5 == 4:
            assert maps_agree(datapath, nxt)
        current = nxt
    assert maps_agree(datapath, current) and maps_agree(second_datapath, current)


def test_equal_but_new_objects_write_nothing(datapath, writer):
    rng = random.Random(5)
    st = step(rng, LBState())
    writer.apply(st)
    copies = LBState({k: type(fe)(*fe) for k, fe in st.frontends.items()})
    assert writer.apply(copies) == ApplyStats()
    assert writer.apply(copies, delta=LBDelta(st, frozenset(st.frontends))) == ApplyStats()


def test_a_failed_apply_is_followed_by_a_full_one(datapath, writer):
    rng = random.Random(9)
    st = step(rng, LBState())
    writer.apply(st)
    bad = LBState({**st.frontends, **{fe.key: fe for fe in [frontend("198.19.0.9", 80, [be("198.18.2.1")])]}})
    broken = frontend("198.19.0.10", 80, [])
    broken = broken._replace(key=type(broken.key)(broken.key.address, 0))
    with pytest.raises(ValueError):
        writer.apply(LBState({**bad.frontends, broken.key: broken}))
    assert writer.apply(bad).frontends_written == 2             # the new frontend and its marker
    assert maps_agree(datapath, bad)


def _cluster_generator():
    """The random cluster events of tests/unit/test_desired_incremental.py (one generator for both tiers)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "unit" / "test_desired_incremental.py"
    spec = importlib.util.spec_from_file_location("_desired_incremental_events", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", range(2))
def test_events_to_maps_as_the_agent_syncs(datapath, writer, seed):
    """ClusterState -> DesiredStateBuilder -> MapWriter(delta), as Agent.sync chains them: after
    every sync the maps hold exactly the fresh desired state of the same snapshot."""
    from ebpfsvc.config import NodeConfig
    from ebpfsvc.desired import DesiredStateBuilder, desired_state
    from ebpfsvc.tracker import ClusterState

    gen = _cluster_generator()
    rng = random.Random(seed)
    cluster = ClusterState(NodeConfig("any"))
    builder = DesiredStateBuilder(gen.NODE)
    for i in range(40):
        for _ in range(rng.randint(1, 4)):
            cluster.on_event(gen.random_event(rng))
        snap = cluster.snapshot()
        result = builder.build(snap)
        writer.apply(result.state, delta=result.delta)
        if i % 4 == 3:
            assert maps_agree(datapath, desired_state(snap, gen.NODE))
    assert writer.apply(builder.result.state, full=True) == ApplyStats()
