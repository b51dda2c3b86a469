"""Fixtures for datapath tests: a freshly compiled datapath per test, pinned
under /sys/fs/bpf/<unique_prefix> and removed afterwards (also on failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpfsvc.datapath import loader
from ebpfsvc.datapath.writer import MapWriter

from .packets import HAIRPIN

# Small maps: each test compiles its own datapath, and LRU maps preallocate.
TEST_LIMITS = loader.Limits(
    frontends=1024, services=1024, backends=1024, maglev_slots=1 << 16,
    ct_entries=4096, affinity_entries=1024, frag_entries=256, snat_entries=4096, source_ranges=256,
)


@pytest.fixture
def pin_dir(unique_prefix):
    path = Path("/sys/fs/bpf") / unique_prefix
    yield path
    loader.unpin(path)


@pytest.fixture
def datapath(pin_dir):
    dp = loader.load(pin_dir, limits=TEST_LIMITS, hairpin_addr=HAIRPIN, cache=False)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def writer(datapath):
    return MapWriter(datapath.maps)


@pytest.fixture
def uplink(request, pin_dir, unique_prefix):
    """The north-south programs (bpf/lb_node.c) in a private namespace: tests/bpf/northsouth.py.
    Indirect parameters (a dict) go to uplink_fixture, e.g. {"snat_keep_client_port": False}."""
    from .northsouth import uplink_fixture
    yield from uplink_fixture(pin_dir, unique_prefix, **(getattr(request, "param", None) or {}))



def age(dp, map_name: str, field: str, seconds: float) -> int:
    """Make every entry of a datapath-owned LRU map (ct4, lb4_affinity) look
    `seconds` older, instead of sleeping: bpf_ktime_get_ns() is CLOCK_MONOTONIC,
    so the entries' timestamps are simply moved back. The subtraction wraps
    modulo 2**64 like the datapath's `now - last_seen` does, so an age longer
    than the machine's uptime still reads as that age. Returns entries aged."""
    table = dp.maps[map_name]
    n = 0
    for k, v in list(table.items()):
        setattr(v, field, (getattr(v, field) - int(seconds * 1e9)) % (1 << 64))
        table[k] = v
        n += 1
    return n
