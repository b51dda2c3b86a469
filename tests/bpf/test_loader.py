"""Loader: compile cache, source expansion, pinned maps reused across loads and
recreated when they no longer match the program (bcc itself reuses a pinned map
of any shape). The load under test compiles; a load that only puts maps and entries in place
before it takes the run's compiled programs (conftest.py load_elsewhere): a compile there would
prove nothing more and cost seconds."""

from __future__ import annotations

import logging

import pytest

from ebpfsvc import maglev
from ebpfsvc.datapath import loader
from ebpfsvc.datapath.writer import ApplyStats, MapWriter

from .conftest import TEST_LIMITS
from .packets import BACKEND1, CLIENT, VIP, be, from_pod, frontend, run, state, tcp

pytestmark = pytest.mark.root


def test_expanded_source_has_no_local_includes():
    text = loader.expand_source()
    assert '#include "' not in text
    assert f'#line 1 "{loader.BPF_DIR / "lib" / "flow.h"}"' in text


def test_cache_returns_the_loaded_object(pin_dir, compiled_datapaths):
    a = loader.load(pin_dir, limits=TEST_LIMITS)
    try:
        assert loader.load(pin_dir, limits=TEST_LIMITS) is a
    finally:
        a.close()
    # Through the program cache or not, load() returns a cached object before it loads anything.
    b = compiled_datapaths.load_elsewhere(pin_dir, cache=True)
    try:
        assert b is not a          # closing dropped it from the cache
    finally:
        b.close()


def test_pins_survive_a_reload(pin_dir, compiled_datapaths):
    a = compiled_datapaths.load_elsewhere(pin_dir)
    try:
        MapWriter(a.maps).apply(state(frontend(VIP, 80, [be(BACKEND1)])))
        assert run(a, "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80))).verdict == "TC_ACT_OK"
    finally:
        a.close()
    b = loader.load(pin_dir, limits=TEST_LIMITS, cache=False)
    try:
        assert len(list(b.maps["ct4"].items())) == 2, "the flow survived"
        assert MapWriter(b.maps).apply(state(frontend(VIP, 80, [be(BACKEND1)]))) == ApplyStats()
    finally:
        b.close()


def test_pins_of_other_limits_are_recreated(pin_dir, caplog, compiled_datapaths):
    a = compiled_datapaths.load_elsewhere(pin_dir)
    try:
        MapWriter(a.maps).apply(state(frontend(VIP, 80, [be(BACKEND1)])))
    finally:
        a.close()
    bigger = loader.Limits(**{**TEST_LIMITS.__dict__, "maglev_slots": TEST_LIMITS.maglev_slots * 2})
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.datapath.loader"):
        b = loader.load(pin_dir, limits=bigger, cache=False)
    try:
        assert "lb_maglev" in caplog.text
        assert loader.stale_pins(b.bpf, pin_dir) == []
        assert list(b.maps["lb4_frontends"].items()) == [], "recreated empty"
        w = MapWriter(b.maps)
        assert w.free_slots() == bigger.maglev_slots
        w.apply(state(frontend(VIP, 80, [be(BACKEND1)])))
        assert w.free_slots() == bigger.maglev_slots - maglev.table_size(1)
    finally:
        b.close()


def test_open_maps_writes_what_the_programs_then_read_and_refuses_pins_of_other_limits(pin_dir, compiled_datapaths):
    """open_maps (the agent's start: maps before programs) creates the pins on a new node; what a
    writer puts through its tables is what the programs loaded afterwards (the run's, as an agent
    loads them) forward with."""
    bpf, maps = loader.open_maps(pin_dir, limits=TEST_LIMITS)
    try:
        assert sorted(maps) == sorted(loader.MAPS) and (pin_dir / "lb4_frontends").exists()
        MapWriter(maps).apply(state(frontend(VIP, 80, [be(BACKEND1)])))
        dp = compiled_datapaths.load_elsewhere(pin_dir)
        try:
            assert run(dp, "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80))).data == \
                bytes(from_pod(tcp(CLIENT, BACKEND1, 40000, 8080)))
        finally:
            dp.close()
    finally:
        bpf.cleanup()
    bigger = loader.Limits(**{**TEST_LIMITS.__dict__, "maglev_slots": TEST_LIMITS.maglev_slots * 2})
    assert loader.open_maps(pin_dir, limits=bigger) is None        # load() recreates those: write nothing before
    again, maps = loader.open_maps(pin_dir, limits=TEST_LIMITS)       # the pins were left as they were
    try:
        assert MapWriter(maps).apply(state(frontend(VIP, 80, [be(BACKEND1)]))) == ApplyStats()
    finally:
        again.cleanup()
